"""Accounting: the host frames guest memory really uses, and the sharing figures of METRICS.md.

A :class:`Meter` samples one sharing domain (its VMs and its content store);
:func:`measure` takes one full-scan sample. Every number comes from what the kernel says, never
from the system under test (the merge agent, the engine):

- **G**: for each VM, every guest page whose host mapping is present in
  ``/proc/<qemu pid>/pagemap`` (bit 63; PFN in bits 0-54, which the kernel shows to root only),
  plus the *store-backed* pages: pages whose mapping in QEMU is the content store file (found in
  ``/proc/<qemu pid>/maps`` by the store's device and inode, with the mapping's file offset) that
  are not present (the guest has not touched them since the merge) but whose store page exists
  (``mincore`` of the store): they hold guest data, and their frame is the store page's.
- **F**: distinct physical frames behind G, plus the store's resident pages that no guest page
  of G maps (store overhead counts against sharing). A store page counts as one frame whether a
  guest maps it present or not.
- **C**: distinct contents among G (``xxh3_128`` of each 4 KiB; all-zero pages are one content).
- **R = G - F**, **M = G - C**, **E = R / M**. When ``M == 0`` there is nothing to share and E is
  ``None`` (reports print "n/a"), never a made-up 0 or 1.
- the same figures over non-zero pages (``*_nonzero``) and over pages whose content equals a
  4 KiB-aligned data block of a VM's base disk image (``*_disk``, all-zero block excluded:
  :func:`harness.oracle.disk_block_set`). A frame holds one content, so every restriction keeps
  the frames of the pages it keeps, and the store-only pages of its contents.

How memory is read, so that measuring never allocates or unshares guest memory:

- RAM-file pages (file backend): ``pread`` of the RAM file (a hole reads as zeros and stays a
  hole); other present pages (anonymous RAM, copies made by copy-on-write): ``preadv`` of
  ``/proc/<pid>/mem`` (not ``process_vm_readv``: its read-only pins unshare KSM-merged pages,
  see :func:`harness.oracle.hash_process_pages`); only pages pagemap shows present, one page per
  distinct frame.
- the content store: ``mincore`` of a read-only mapping made for the call and never touched
  says which pages exist; their contents are read with ``pread``. Holes are never touched.
- the host virtual address of guest RAM comes from QMP (HMP ``gpa2hva 0``), once per process.
  Guest RAM is one RAM block from guest-physical 0 (``VMSpec`` keeps guests below the PCI hole).

What a sample costs: the meter keeps, per guest page, its frame and content id between samples,
and reads again only pages whose frame changed or that the kernel's write tracking says were
written (:class:`harness.oracle.WriteTracker`; what it can miss and why the figures do not
depend on it: :mod:`harness.oracle`). The counts (pages per frame, per content, per class) are
kept as arrays and updated by the pages that changed. Without write tracking every present
page is read at every sample (``method="full"``), which is what the incremental meter is
tested against.

The arithmetic (:func:`figures`, :func:`expand_ranges`, :func:`parse_maps`,
:func:`decode_pagemap`) is pure numpy on arrays, unit tested without QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harness import memfd, oracle
from harness.errors import HarnessError
from harness.memfd import ProcFile, open_file

PAGE = 4096
PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
PM_FILE = np.uint64(1 << 61)  # file page or shared anonymous

_HVA_RE = re.compile(r"is\s+(0x[0-9a-fA-F]+)")


# ============================================================================ pure arithmetic


def decode_pagemap(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw 64-bit pagemap entries -> (present mask, PFNs; PFN 0 where not present)."""
    entries = np.asarray(entries, dtype=np.uint64)
    present = (entries & PM_PRESENT) != 0
    pfn = np.where(present, entries & PM_PFN_MASK, np.uint64(0))
    return present, pfn


def expand_ranges(ranges: np.ndarray | None, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge agent ranges ``(m, 3)`` of (guest byte offset, store byte offset, pages) ->
    (guest page index, store page index) per page, clipped to ``npages`` guest pages."""
    if ranges is None or len(ranges) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 3)
    counts = r[:, 2]
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    step = np.arange(total, dtype=np.int64) - starts
    g = np.repeat(r[:, 0] // PAGE, counts) + step
    s = np.repeat(r[:, 1] // PAGE, counts) + step
    keep = (g >= 0) & (g < npages)
    return g[keep], s[keep]


def count_distinct(values: np.ndarray) -> int:
    """Distinct values of a 1-D array (sort based: numpy's hash-based ``unique`` was measured
    20-100x slower on 300k PFNs)."""
    if len(values) == 0:
        return 0
    s = np.sort(values, kind="stable")
    return 1 + int(np.count_nonzero(s[1:] != s[:-1]))


def member(values: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Mask: which of ``values`` occur in ``of`` (1-D arrays)."""
    if len(values) == 0 or len(of) == 0:
        return np.zeros(len(values), dtype=bool)
    s = np.sort(of)
    i = np.searchsorted(s, values)
    i[i == len(s)] = 0
    return s[i] == values


@dataclasses.dataclass(frozen=True)
class Figures:
    """G, F, C and the ratios for one set of pages (see the module docstring)."""

    G: int
    F: int
    C: int

    @property
    def R(self) -> int:
        return self.G - self.F

    @property
    def M(self) -> int:
        return self.G - self.C

    @property
    def E(self) -> float | None:
        return self.R / self.M if self.M > 0 else None


def figures(
    frames: np.ndarray,
    hashes: np.ndarray,
    store_frames: np.ndarray | None = None,
    store_hashes: np.ndarray | None = None,
    disk_set: np.ndarray | None = None,
) -> dict[str, Figures | None]:
    """The sharing figures of a domain.

    ``frames`` (n,) and ``hashes`` (n, 2): one row per page of G (all VMs together).
    ``store_frames``/``store_hashes``: the store's resident pages (frames that G maps too are
    not counted twice). ``disk_set``: sorted distinct disk block contents, or None (then the
    ``disk`` entry is None).

    Returns ``{"all": Figures, "nonzero": Figures, "disk": Figures | None}``.
    """
    frames = np.asarray(frames, dtype=np.uint64)
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1, 2)
    if len(frames) != len(hashes):
        raise ValueError("frames and hashes differ in length")
    if store_frames is None:
        store_frames = np.zeros(0, np.uint64)
        store_hashes = np.zeros((0, 2), np.uint64)
    store_frames = np.asarray(store_frames, dtype=np.uint64)
    store_hashes = np.asarray(store_hashes, dtype=np.uint64).reshape(-1, 2)
    only = ~member(store_frames, frames)
    so_frames, so_hashes = store_frames[only], store_hashes[only]

    # classify each distinct content once (zero? a disk block?), then each page by its content
    reps, gid = oracle.content_groups(hashes)
    c_zero = oracle.is_zero_hash(hashes[reps])
    nz, so_nz = ~c_zero[gid], ~oracle.is_zero_hash(so_hashes)
    out: dict[str, Figures | None] = {
        "all": Figures(len(frames), count_distinct(frames) + count_distinct(so_frames), len(reps)),
        "nonzero": Figures(
            int(np.count_nonzero(nz)),
            count_distinct(frames[nz]) + count_distinct(so_frames[so_nz]),
            len(reps) - int(np.count_nonzero(c_zero)),
        ),
        "disk": None,
    }
    if disk_set is not None:
        c_disk = oracle.in_set(hashes[reps], disk_set)
        d, so_d = c_disk[gid], oracle.in_set(so_hashes, disk_set)
        out["disk"] = Figures(
            int(np.count_nonzero(d)),
            count_distinct(frames[d]) + count_distinct(so_frames[so_d]),
            int(np.count_nonzero(c_disk)),
        )
    return out


# ============================================================================ reading the host


@dataclasses.dataclass(frozen=True)
class Target:
    """What measuring one VM needs: its QEMU pid, where its RAM is mapped, its base disk."""

    name: str
    pid: int
    hva: int
    ram_size: int
    disk: Path | None = None  # base disk image (for E_disk)
    disk_key: str | None = None  # cache key of its block set (image recipe hash)
    ram_file: ProcFile | Path | None = None  # the guest RAM memfd (a path in tests), None for anonymous RAM


_hva_cache: dict[tuple[int, int], int] = {}


def parse_gpa2hva(text: str) -> int:
    """``Host virtual address for 0x0 (pc.ram) is 0x7f...`` -> the address."""
    m = _HVA_RE.search(text or "")
    if not m:
        raise HarnessError(f"cannot parse the answer of HMP gpa2hva: {text!r}")
    return int(m.group(1), 16)


def ram_hva(vm) -> int:
    """Host virtual address of guest-physical 0 in the QEMU process of ``vm`` (QMP, cached)."""
    key = (vm.pid, memfd.start_time(vm.pid) or 0)
    if key not in _hva_cache:
        text = vm.qmp("human-monitor-command", **{"command-line": "gpa2hva 0"})
        _hva_cache[key] = parse_gpa2hva(text)
    return _hva_cache[key]


def target(vm) -> Target:
    """A :class:`Target` for a running :class:`harness.vm.VM` (or anything with its attributes)."""
    if isinstance(vm, Target):
        return vm
    if not vm.pid:
        raise HarnessError(f"VM {vm.name} is not running")
    image = getattr(vm, "image", None)
    return Target(
        name=vm.name,
        pid=vm.pid,
        hva=ram_hva(vm),
        ram_size=vm.ram_size,
        disk=Path(image.rootfs) if image is not None else None,
        disk_key=image.recipe_hash if image is not None else None,
        ram_file=vm.ram if getattr(vm.spec, "ram_backend", "file") == "file" else None,
    )


def target_from_state(state: dict) -> Target:
    """A :class:`Target` for a VM started in the background (its ``state.json``, as
    :func:`harness.vm.load_states` returns it). Asks QMP for the RAM address on the manual
    socket, so a harness holding the main one is not disturbed."""
    from harness.image import Image
    from harness.vm import qmp_connect, state_memfile, state_paths

    pid = int(state["pid"])
    key = (pid, memfd.start_time(pid) or 0)
    if key not in _hva_cache:
        q = qmp_connect(state_paths(state).qmp_manual)
        try:
            reply = q.cmd_raw("human-monitor-command", {"command-line": "gpa2hva 0"})
        finally:
            q.close()
        _hva_cache[key] = parse_gpa2hva(str(reply.get("return", reply.get("error"))))
    image = Image.load(Path(state["image"])) if state.get("image") else None
    backend = (state.get("spec") or {}).get("ram_backend", "file")
    return Target(
        name=state["name"], pid=pid, hva=_hva_cache[key], ram_size=int(state["ram_size"]),
        disk=image.rootfs if image else None, disk_key=image.recipe_hash if image else None,
        ram_file=state_memfile(state, "ram") if backend == "file" else None,
    )


def _require_root() -> None:
    if os.geteuid() != 0:
        raise HarnessError("accounting reads physical frame numbers from pagemap: run as root")


def read_pagemap(pid: int | str, addr: int, npages: int) -> np.ndarray:
    """Raw pagemap entries of ``npages`` pages from virtual address ``addr`` of process ``pid``."""
    path = f"/proc/{pid}/pagemap"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise HarnessError(f"cannot open {path}: {e}") from None
    try:
        return read_pagemap_fd(fd, addr, npages, what=path)
    finally:
        os.close(fd)


def read_pagemap_fd(fd: int, addr: int, npages: int, out: np.ndarray | None = None, what: str = "pagemap") -> np.ndarray:
    """:func:`read_pagemap` through an open pagemap descriptor (``out``: a buffer to reuse)."""
    if out is None or len(out) != npages:
        out = np.empty(npages, dtype=np.uint64)
    view = memoryview(out).cast("B")
    got = 0
    try:
        while got < len(view):
            r = os.preadv(fd, [view[got:]], (addr // PAGE) * 8 + got)
            if r <= 0:
                raise HarnessError(f"short read of {what} at page {addr // PAGE + got // 8}")
            got += r
    except OSError as e:
        raise HarnessError(f"cannot read {what}: {e}") from None
    return out


# --- which guest pages map the content store: the kernel's own word ------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PROT_READ, _MAP_SHARED = 1, 1
_MAP_FAILED = ctypes.c_void_p(-1).value


def file_id(fd: int) -> tuple[int, int, int]:
    """(device major, device minor, inode) of an open file, as ``/proc/<pid>/maps`` shows them."""
    st = os.fstat(fd)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def parse_maps(text: bytes, base: int, size: int, fid: tuple[int, int, int]) -> np.ndarray:
    """The mappings of file ``fid`` inside ``[base, base + size)`` in a ``/proc/<pid>/maps``
    text, as ``(m, 3)`` ranges (offset from ``base``, file offset, pages): the same shape as
    the merge agent's LIST, but what the kernel says."""
    major, minor, ino = fid
    needle = b" %d" % ino
    out = []
    for line in text.split(b"\n"):
        if needle not in line:  # cheap filter first: most lines map something else
            continue
        f = line.split(None, 5)
        if len(f) < 5 or int(f[4]) != ino:
            continue
        dmaj, dmin = f[3].split(b":")
        if int(dmaj, 16) != major or int(dmin, 16) != minor:
            continue
        lo, hi = (int(x, 16) for x in f[0].split(b"-"))
        a, b = max(lo, base), min(hi, base + size)
        if a < b:
            out.append((a - base, int(f[2], 16) + (a - lo), (b - a) // PAGE))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def store_ranges(pid: int, base: int, size: int, fid: tuple[int, int, int]) -> np.ndarray:
    """Where process ``pid`` maps file ``fid`` (the content store) inside ``[base, base + size)``:
    ``(m, 3)`` ranges (offset from ``base``, file offset, pages), from ``/proc/<pid>/maps``."""
    try:
        text = Path(f"/proc/{pid}/maps").read_bytes()
    except OSError as e:
        raise HarnessError(f"cannot read /proc/{pid}/maps: {e}") from None
    return parse_maps(text, base, size, fid)


def store_slots(pid: int, base: int, npages: int, fid: tuple[int, int, int]) -> np.ndarray:
    """Per guest page: the store page its mapping shows (the VMA's file offset), or -1."""
    g, s = expand_ranges(store_ranges(pid, base, npages * PAGE, fid), npages)
    slot = np.full(npages, -1, np.int64)
    slot[g] = s
    return slot


def resident_pages(fd: int, npages: int, what: str = "file") -> np.ndarray:
    """Per page of a file: is it in the page cache now (``mincore`` of a read-only mapping
    made for the call and never touched: no page is faulted, no hole allocated)."""
    if npages <= 0:
        return np.zeros(0, bool)
    length = npages * PAGE
    addr = _libc.mmap(None, length, _PROT_READ, _MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        raise HarnessError(f"cannot map {what}: {os.strerror(ctypes.get_errno())}")
    try:
        vec = np.zeros(npages, dtype=np.uint8)
        if _libc.mincore(addr, length, vec.ctypes.data) != 0:
            raise HarnessError(f"mincore on {what}: {os.strerror(ctypes.get_errno())}")
    finally:
        _libc.munmap(addr, length)
    return (vec & 1).astype(bool)


# --- one sample ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VMPages:
    """One VM's share of G in a sample."""

    name: str
    G: int
    present: int
    store_backed: int  # pages mapping the store, not present: counted through the store page


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of a sharing domain: the figures of METRICS.md (E is None when M == 0)."""

    t: float  # time.monotonic() when the sample started
    seconds: float  # how long taking it took (wall clock)
    G: int
    F: int
    C: int
    R: int
    M: int
    E: float | None
    G_nonzero: int
    F_nonzero: int
    C_nonzero: int
    R_nonzero: int
    M_nonzero: int
    E_nonzero: float | None
    G_disk: int | None
    F_disk: int | None
    C_disk: int | None
    R_disk: int | None
    M_disk: int | None
    E_disk: float | None
    zero_pages: int  # all-zero pages in G
    store_pages: int  # resident pages of the content store
    store_only_pages: int  # of which no page of G maps
    vms: tuple[VMPages, ...]
    frames_read: int = 0  # pages read and hashed for this sample (guest frames, store pages,
    # the re-check); a full scan reads every distinct frame
    cpu_seconds: float = 0.0  # CPU time of the thread taking it (a loaded host shows a wall
    # time far above this)
    # per VM: the frames its pages share with other pages, (n-1)/n for each of its pages on a
    # frame held n times; they add up to G minus the distinct frames behind G
    credits: dict[str, float] = dataclasses.field(default_factory=dict)
    method: str = "full"  # "incremental": only pages that may have changed were read
    untracked_pages: int = 0  # pages no write tracking covered: re-read at every sample
    scrubbed: int = 0  # cached pages re-read by the background re-check this sample
    stale: int = 0  # cumulative: pages the re-check found changed behind the tracker's back

    def per_vm(self) -> dict[str, int]:
        return {v.name: v.G for v in self.vms}

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vms"] = {v.name: dataclasses.asdict(v) for v in self.vms}
        return d


_disk_sets: dict[tuple[str, str | None], np.ndarray] = {}


def domain_disk_set(targets: Iterable[Target]) -> np.ndarray | None:
    """Union of the disk block sets of the targets' base images (None if none has one)."""
    sets = []
    for t in targets:
        if t.disk is None:
            continue
        key = (str(t.disk), t.disk_key)
        if key not in _disk_sets:
            _disk_sets[key] = oracle.disk_block_set(t.disk, t.disk_key)
        sets.append(_disk_sets[key])
    if not sets:
        return None
    if len(sets) == 1 or all(s is sets[0] for s in sets):
        return sets[0]
    return oracle.unique_hashes(np.concatenate(sets))


# events after which a page may sit on another frame without having been written: migration
# (compaction, NUMA, demotion), swap and zswap, a huge page split (zero-filled parts are
# remapped to the shared zero page: seen under KSM, which splits huge pages to merge them) or
# collapsed (khugepaged copies them into a new huge page), and a copy of a KSM page (cow_ksm):
# when KSM gives up a merge half done (try_to_merge_two_pages -> break_cow -> break_ksm) it
# *unshares* the page, FAULT_FLAG_UNSHARE, which copies it to a new frame and keeps its uffd-wp
# bit (wp_page_copy), so the write tracker does not report it while its frame changed; cow_ksm
# counts that copy as it counts a guest's write to a KSM page. This was the "oracle stale pages"
# seen under KSM only (3 of 115,200 pages in a test; 256 in one satori+ksm collapse repetition)
_MOVE_COUNTERS = (b"pgmigrate_success", b"pswpin", b"pswpout", b"zswpin", b"zswpout", b"ksm_swpin_copy",
                  b"thp_split_page", b"thp_collapse_alloc", b"cow_ksm")


def _moves() -> int:
    """How many times the host has moved pages to other frames behind their writers' backs,
    since boot (``/proc/vmstat``, :data:`_MOVE_COUNTERS`): while this does not change, a page
    nobody wrote keeps its frame."""
    total = 0
    try:
        for line in Path("/proc/vmstat").read_bytes().split(b"\n"):
            name, _, value = line.partition(b" ")
            if name in _MOVE_COUNTERS:
                total += int(value)
    except (OSError, ValueError):
        return -2  # unknown: the caller reads every frame again
    return total


def _max_pfn() -> int:
    """One past the highest physical frame number of this host (``/proc/zoneinfo``), or 0."""
    top = span = 0
    try:
        for line in Path("/proc/zoneinfo").read_text().splitlines():
            f = line.split()
            if len(f) == 2 and f[0] == "spanned":  # comes before its zone's start_pfn
                span = int(f[1])
            elif len(f) == 2 and f[0] == "start_pfn:":
                top = max(top, int(f[1]) + span)
    except (OSError, ValueError):
        return 0
    return top


class _Refs:
    """Reference counts over small non-negative integer keys (PFNs, store pages, content ids),
    with a class per key fixed when its count rises from 0 (class bit 0: non-zero content, bit
    1: disk content) and the number of live keys per class (all, non-zero, disk).

    ``size``: keys expected (the host's frame count for PFNs). The arrays are allocated zeroed
    (``calloc``: the kernel maps pages of them only where a key is counted), and grow by
    doubling past it. Growing a PFN-indexed array while sampling cost the meter 0.3 s each time
    on this host (100+ MB copied and faulted in): 4 s of the meter's 10 s of CPU in a satori
    scenario run, mostly in its first sample (which the oracle's cost figure leaves out)."""

    def __init__(self, size: int = 1024) -> None:
        size = size if size > 0 else 1024
        self.refs = np.zeros(size, np.int64)
        self.cls = np.zeros(size, np.uint8)
        self.live = np.zeros(3, np.int64)
        self.shared_changed = True  # a key counted more than once before or after a change
        # since the caller last cleared it (what the surplus credits depend on)

    def _grow(self, top: int) -> None:
        if top >= len(self.refs):
            n = max(top + 1, 2 * len(self.refs))
            refs, cls = np.zeros(n, np.int64), np.zeros(n, np.uint8)
            refs[: len(self.refs)] = self.refs
            cls[: len(self.cls)] = self.cls
            self.refs, self.cls = refs, cls

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Counts of ``keys`` (0 for keys never seen)."""
        keys = np.asarray(keys, np.int64)
        out = np.zeros(len(keys), np.int64)
        ok = keys < len(self.refs)
        out[ok] = self.refs[keys[ok]]
        return out

    def _count(self, keys: np.ndarray, sign: int) -> None:
        c = self.cls[keys]
        self.live += sign * np.array([len(keys), np.count_nonzero(c & 1), np.count_nonzero(c & 2)])

    def remove(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        uk, cnt = np.unique(keys, return_counts=True)
        if not self.shared_changed:
            self.shared_changed = bool(np.any(self.refs[uk] > 1))
        self.refs[uk] -= cnt
        if np.any(self.refs[uk] < 0):
            raise HarnessError("accounting ledger: a reference count went below zero")
        self._count(uk[self.refs[uk] == 0], -1)

    def add(self, keys: np.ndarray, cls: np.ndarray) -> None:
        if not len(keys):
            return
        uk, first, cnt = np.unique(keys, return_index=True, return_counts=True)
        self._grow(int(uk[-1]))
        born = self.refs[uk] == 0
        self.refs[uk] += cnt
        if not self.shared_changed:
            self.shared_changed = bool(np.any(self.refs[uk] > 1))
        b = uk[born]
        self.cls[b] = cls[first[born]]
        self._count(b, +1)


class _VMView:
    """What the meter keeps of one VM between samples: per guest page its frame key (a PFN,
    ``-2 - s`` for store page s, -1 when the page is not in G) and content id (-1 when not in
    G), the store page each mapping shows, and the descriptors it reads through."""

    def __init__(self, t: Target, track: bool) -> None:
        self.t = t
        self.n = t.ram_size // PAGE
        self.mem_fd = self.ram_fd = self.pm_fd = -1
        self.tracker: oracle.WriteTracker | None = None
        self.mirror: oracle.RamMirror | None = None
        self.why_untracked = "full scan" if not track else None
        try:
            self.pm_fd = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY)
            self.mem_fd = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)
            if t.ram_file is not None:
                self.ram_fd = open_file(t.ram_file, os.O_RDONLY)
                if track:  # an incremental meter reads what the guest wrote through a view
                    try:
                        self.mirror = oracle.RamMirror(t.ram_file, self.n, f"VM {t.name} RAM file")
                    except oracle.TrackerUnavailable:
                        self.mirror = None  # read with pread, as a full scan does
            if track:
                try:
                    self.tracker = oracle.WriteTracker(t.pid, t.hva, self.n)
                except oracle.TrackerUnavailable as e:
                    self.why_untracked = str(e)
        except (OSError, HarnessError) as e:
            self.close()
            raise HarnessError(f"VM {t.name}: cannot open its memory for measuring: {e}") from None
        self.key = np.full(self.n, -1, np.int64)
        self.cid = np.full(self.n, -1, np.int64)
        self.slot = np.full(self.n, -1, np.int64)
        self.maps_stale = True
        self.scrub_at = 0
        self.pm_buf = np.empty(self.n, np.uint64)
        self.suspect = np.zeros(self.n, bool)  # re-check found another content: stale?
        self.present = np.zeros(self.n, bool)  # as of the last sample
        self.pfn = np.zeros(self.n, np.int64)
        self.file = np.zeros(self.n, bool)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
        for fd in (self.mem_fd, self.ram_fd, self.pm_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.mem_fd = self.ram_fd = self.pm_fd = -1


class _StoreView:
    """The content store: which pages exist (``mincore``) and their content ids, hashed with
    ``pread`` (a hole is never touched). The engine writes a slot's page once per content and
    reuses a slot for another content only after punching it out: a page is hashed when first
    seen, once more at the next sample (it may have been read while the engine was still
    writing it), and again whenever the :class:`~harness.oracle.StoreWatch` says it left the
    file since (a punch, even with the slot written again before this sample). Without a watch
    (full scans, or no userfaultfd) every resident page is hashed at every sample."""

    def __init__(self, path: ProcFile | str | os.PathLike, watch_pages: int = 0) -> None:
        """``path``: the store (a :class:`~harness.memfd.ProcFile`, or a path); ``watch_pages``:
        with incremental sampling, the store size (pages) to map the watch for at first (it
        grows if the store does); 0: no watch."""
        self.path = path.path if isinstance(path, ProcFile) else os.fspath(path)
        self.watch: oracle.StoreWatch | None = None
        self.why_unwatched = "" if watch_pages else "full scan"
        try:
            self.fd = open_file(path, os.O_RDONLY)
        except HarnessError as e:
            raise HarnessError(f"cannot open the content store: {e}") from None
        if watch_pages:
            try:
                self.watch = oracle.StoreWatch(self.path, watch_pages, f"the content store {self.path}")
            except oracle.TrackerUnavailable as e:
                self.why_unwatched = str(e)
        self.fid = file_id(self.fd)
        self.cid = np.zeros(0, np.int64)
        self.first = np.zeros(0, np.int64)  # sample number of the first hash (-1: none)
        self.resident = np.zeros(0, bool)
        self.scrub_at = 0
        self.reread = 0  # cumulative: pages hashed again because they left the file since

    @property
    def npages(self) -> int:
        return len(self.cid)

    def update(self, index: oracle.ContentIndex, sample_no: int, full: bool, scrub: int) -> tuple[int, int, int]:
        """Residency and content ids now. Returns (pages hashed, re-checked, found changed)."""
        n = os.fstat(self.fd).st_size // PAGE
        if n > len(self.cid):  # the store only grows
            grow = n - len(self.cid)
            self.cid = np.concatenate([self.cid, np.full(grow, -1, np.int64)])
            self.first = np.concatenate([self.first, np.full(grow, -1, np.int64)])
        res = resident_pages(self.fd, n, f"the content store {self.path}")
        held = None
        if self.watch is not None and not full:
            # pages read before that left the file since (punched; the slot may hold another
            # content now): forgotten, read again below like new ones
            held = self.watch.present(n)
            lost = (self.cid >= 0) & ~held
            self.reread += int(np.count_nonzero(lost & res))
            self.cid[lost] = -1
            self.first[lost] = -1
        gone = ~res & (self.cid >= 0)
        self.cid[gone] = -1
        self.first[gone] = -1
        if full or held is None:
            need = res
        else:
            need = res & ((self.cid < 0) | (self.first == sample_no - 1))
        idx = np.flatnonzero(need)
        if held is not None and len(idx):
            # map them into the watch BEFORE reading: a punch from now on shows at the next sample
            new = idx[~held[idx]]
            hole = new[~self.watch.hold(new)]  # punched since mincore: not there any more
            if len(hole):
                res[hole] = need[hole] = False
                idx = np.flatnonzero(need)
        self.resident = res
        if len(idx):
            ids = index.intern(oracle.hash_fd_pages(self.fd, 0, idx, what=f"the content store {self.path}"))
            old = self.cid[idx]
            self.cid[idx] = ids
            fresh = old < 0
            self.first[idx[fresh]] = sample_no
        checked = changed = 0
        if scrub and not full and n:
            w = min(scrub, n)
            a = self.scrub_at % n
            win = np.arange(a, min(n, a + w))
            win = win[res[win] & (self.cid[win] >= 0) & ~need[win]]
            self.scrub_at = (a + w) % n
            if len(win):
                ids = index.intern(oracle.hash_fd_pages(self.fd, 0, win, what=f"the content store {self.path}"))
                bad = ids != self.cid[win]
                if bad.any() and held is not None:
                    # a slot the engine freed (punched, maybe reused) since the watch's look
                    # above: the punch took the watch's entry, so the next sample sees it lost
                    # and reads it again. Not a miss; only a change under a kept entry (a
                    # rewrite in place) is
                    bad[bad] = self.watch.present(n)[win[bad]]
                changed += int(np.count_nonzero(bad))
                self.cid[win] = ids
                checked = len(win)
        return len(idx), checked, changed

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _classes(index: oracle.ContentIndex, cids: np.ndarray) -> np.ndarray:
    """Class bits of content ids (bit 0 non-zero, bit 1 disk block)."""
    return ((~index.zero[cids]).astype(np.uint8) | (index.disk[cids].astype(np.uint8) << 1))


class Meter:
    """Samples of one sharing domain, each only as costly as what changed since the last one.

    ``vms``: running VMs (or :class:`Target`). ``store``: the domain's content store (a
    :class:`harness.memfd.ProcFile`, or a path to it), if any. ``disk_set``: True derives it from the VMs'
    images, an array uses that set, None skips E_disk. ``incremental``: keep each page's
    (frame, content) between samples and read only pages whose frame changed or that the write
    tracker says were written (see :mod:`harness.oracle`); False reads every distinct frame at
    every sample (the full scan). ``credits``: compute each VM's surplus credits (skip when no
    surplus manager reads them). ``scrub``: with incremental, re-read this many of the cached
    pages of each VM (and of the store) at every sample, in turn, and count those found changed
    (``Sample.stale``): 256 pages of a 512 MB guest go round it in ~9 minutes at 1 s samples;
    0 disables.

    Only one incremental meter may measure a QEMU at a time (write tracking is one reader's).
    Use it from one thread. Close it (or ``with``) when done: it holds descriptors of the VMs.
    """

    def __init__(
        self,
        vms: Iterable[Any],
        store: ProcFile | str | os.PathLike | None = None,
        *,
        disk_set: np.ndarray | None | bool = True,
        incremental: bool = True,
        scrub: int = 256,
        credits: bool = True,
    ) -> None:
        _require_root()
        self.want_credits = credits
        self.targets = [target(v) for v in vms]
        dset = domain_disk_set(self.targets) if disk_set is True else (disk_set if disk_set is not False else None)
        self.has_disk = dset is not None
        self.index = oracle.ContentIndex(dset)
        self.incremental = incremental
        self.scrub = scrub
        self.views: list[_VMView] = []
        self.store: _StoreView | None = None
        self.frames = _Refs(_max_pfn())  # PFN -> pages of G on it
        self.slots = _Refs()  # store page -> pages of G mapping it
        self.contents = _Refs()  # content id -> pages of G holding it
        self.g = np.zeros(3, np.int64)  # pages of G: all, non-zero, disk
        self.samples = 0
        self.stale = 0
        self.cpu_s = 0.0  # cumulative CPU of sample()
        self.compact_slack = 262_144  # contents no page holds that may pile up before compacting
        self._moves = -1  # the host's page migrations and swaps, as of the last sample
        self._moved_last = True  # they moved between the last two samples
        self._credits: dict[str, float] = {}  # as of the last sample
        try:
            for t in self.targets:
                self.views.append(_VMView(t, incremental))
            if store is not None:
                # the engine's bound on store slots (index.max_slots): the watch maps that much
                reserve = 2 * sum(t.ram_size // PAGE for t in self.targets) + 1024 if incremental else 0
                self.store = _StoreView(store, reserve)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for v in self.views:
            v.close()
        if self.store is not None:
            self.store.close()

    @property
    def untracked(self) -> dict[str, str]:
        """Per VM without write tracking, or with mappings it could not register at the last
        sample: why (those pages are re-read at every sample)."""
        out = {v.t.name: v.why_untracked for v in self.views if v.why_untracked}
        for v in self.views:
            if v.tracker is not None and v.tracker.untracked_pages:
                out[v.t.name] = f"{v.tracker.untracked_pages} pages untracked: {v.tracker.why_untracked}"
        if self.store is not None and self.store.why_unwatched:
            out["content store"] = self.store.why_unwatched
        return out

    # ------------------------------------------------------------ one sample
    def sample(self) -> Sample:
        t0, c0 = time.monotonic(), time.thread_time()
        self.samples += 1
        n_read = n_scrub = stale = untracked = moved_pages = 0
        full_all = not self.incremental

        # 1. what may have changed since the last sample: the write tracker first (a write after
        #    its scan shows at the next one), then the mappings, then the frames. With a tracker,
        #    only pagemap entries that may have changed are read: pages written, pages in
        #    mappings not tracked, pages that became present, the re-check slice; all of them if
        #    any page on the host migrated or was swapped since the last sample (a migration
        #    moves a page to another frame without writing it)
        moved = _moves()
        # and at the sample after a move too: the kernel counts some moves (cow_ksm) just before
        # it installs the new frame, so a pagemap read right after the count can still show the old
        refresh_all = moved < 0 or moved != self._moves or self.samples == 1 or self._moved_last
        self._moved_last = moved < 0 or moved != self._moves
        self._moves = moved
        looks = []
        for v in self.views:
            jumped = np.zeros(0, np.int64)  # pages found on another frame, unwritten
            seen: np.ndarray | None = None  # pages whose pagemap entry was read now (None: all)
            written: np.ndarray | None = None  # None: every page may have changed
            if v.tracker is not None:
                r = v.tracker.scan()
                written = r.mask(v.n)
                # pages the last re-check found changed: stale unless written since (the write
                # may have come between that sample's scan and its re-read)
                stale += int(np.count_nonzero(v.suspect & ~written))
                v.suspect[:] = False
                if len(r.untracked):
                    v.maps_stale = True
                untracked += v.tracker.untracked_pages
            else:
                untracked += v.n
                v.maps_stale = True
            if self.store is not None and v.maps_stale:
                v.slot = store_slots(v.t.pid, v.t.hva, v.n, self.store.fid)
                v.maps_stale = False
            what = f"/proc/{v.t.pid}/pagemap"
            if written is None or refresh_all or full_all:
                e = read_pagemap_fd(v.pm_fd, v.t.hva, v.n, v.pm_buf, what)
                present = (e & PM_PRESENT) != 0
                pfn = np.where(present, e & PM_PFN_MASK, np.uint64(0)).astype(np.int64)
                is_file = (e & PM_FILE) != 0
            else:
                present = oracle.range_mask(v.n, r.present)
                check = present & (written | ~v.present | self._scrub_window(v))
                idx = seen = np.flatnonzero(check)
                e = oracle.read_entries(v.pm_fd, v.t.hva, idx, what)
                pfn, is_file = v.pfn.copy(), v.file.copy()
                now = (e & PM_PRESENT) != 0  # later than the scan: it wins
                present[idx] = now
                pfn[idx] = np.where(now, e & PM_PFN_MASK, np.uint64(0)).astype(np.int64)
                is_file[idx] = (e & PM_FILE) != 0
                pfn[~present] = 0
                # a page neither written nor new on another frame (the re-check slice finds
                # them): moved behind our back, migrated during this sample (then the host's
                # counters moved too, see below), or remapped since this sample's scan (a merge
                # agent's MAP_FIXED: the next scan reports that mapping untracked). Read again
                # now, and suspect: stale at the next sample unless that scan says written or
                # untracked, like a content the re-check found changed
                quiet = idx[~written[idx] & v.present[idx] & now]
                jumped = quiet[pfn[quiet] != v.pfn[quiet]]
                moved_pages += len(jumped)
                written[jumped] = True
                v.suspect[jumped] = True
                if len(jumped) and self.store is not None:
                    # a remap onto the store since the maps were read: read them again
                    v.slot = store_slots(v.t.pid, v.t.hva, v.n, self.store.fid)
            v.present, v.pfn, v.file = present, pfn, is_file
            looks.append((written, present, pfn, is_file, jumped, seen))

        # 2. the store: which pages exist, their contents
        if self.store is not None:
            h, c, ch = self.store.update(self.index, self.samples, full_all, self.scrub)
            n_read += h
            n_scrub += c
            stale += ch
            s_res, s_cid = self.store.resident, self.store.cid
        else:
            s_res, s_cid = np.zeros(0, bool), np.zeros(0, np.int64)

        # 3. per page: frame key and, where it cannot have changed, the content id it had
        plan = []
        for v, (written, present, pfn, is_file, jumped, _seen) in zip(self.views, looks, strict=True):
            key = np.full(v.n, -1, np.int64)
            cid = np.full(v.n, -1, np.int64)
            sl = v.slot
            on_store = sl >= 0
            ok = np.zeros(v.n, bool)
            ok[on_store] = sl[on_store] < len(s_res)
            ok[ok] = s_res[sl[ok]]
            via_store = ok & (~present | is_file)  # the store page itself (mapped or not yet)
            key[via_store] = -2 - sl[via_store]
            cid[via_store] = s_cid[sl[via_store]]
            own = present & ~via_store
            key[own] = pfn[own]
            keep = own & (v.key == key) & (v.cid >= 0)
            if written is None or full_all:
                keep[:] = False
            else:
                keep &= ~written
            cid[keep] = v.cid[keep]
            file_pg = is_file & ~on_store
            # on another frame since the maps were read (a remap onto the store, its RAM-file
            # page punched): read as QEMU maps it
            file_pg[jumped] = False
            plan.append((key, cid, own, keep, file_pg))

        # 4. frames of pages to (re)read whose content is known from another page still on it
        #    (a KSM merge moves a page onto a frame some other page holds): reuse, not reread.
        #    Only from a page seen on that frame now (its pagemap entry read in this sample) and
        #    not written since its content was read: a holder whose entry was not read may have
        #    left the frame unseen since (a KSM merge after this sample's write scan frees its
        #    frame, which another page may get and fill before the pagemap read)
        leaving = [v.key[(v.key >= 0) & ~p[3]] for v, p in zip(self.views, plan, strict=True)]
        lk, lcnt = np.unique(np.concatenate(leaving), return_counts=True)
        reads, maybe = [], []  # per VM: page indices to read; of which on a frame others hold
        for key, _cid, own, keep, _ in plan:
            need = np.flatnonzero(own & ~keep)
            if len(need) and not full_all:
                f = key[need]
                left = np.zeros(len(f), np.int64)
                if len(lk):
                    j = np.minimum(np.searchsorted(lk, f), len(lk) - 1)
                    hit = lk[j] == f
                    left[hit] = lcnt[j[hit]]
                maybe.append(self.frames.get(f) - left > 0)
            else:
                maybe.append(np.zeros(len(need), bool))
            reads.append(need)
        cand = np.unique(np.concatenate([p[0][r][m] for p, r, m in zip(plan, reads, maybe, strict=True)]))
        if len(cand):
            sure_k, sure_c = [], []  # frames a page was seen on now, unwritten; its content
            for (key, cid, own, keep, _f), look in zip(plan, looks, strict=True):
                held = np.flatnonzero(own & keep) if look[5] is None else look[5][(own & keep)[look[5]]]
                held = held[member(key[held], cand)]
                sure_k.append(key[held])
                sure_c.append(cid[held])
            sure_keys, first = np.unique(np.concatenate(sure_k), return_index=True)
            sure_cids = np.concatenate(sure_c)[first]
            for i, ((key, cid, *_rest), need, m) in enumerate(zip(plan, reads, maybe, strict=True)):
                f = key[need]
                j = np.minimum(np.searchsorted(sure_keys, f), max(len(sure_keys) - 1, 0))
                ok = m & (sure_keys[j] == f) if len(sure_keys) else np.zeros(len(f), bool)
                cid[need[ok]] = sure_cids[j[ok]]
                reads[i] = need[~ok]

        # 5. read one page per frame among those left, hash, and give every page its content
        keys = np.concatenate([plan[i][0][r] for i, r in enumerate(reads)]) if reads else np.zeros(0, np.int64)
        if len(keys):
            uk, first, inv = np.unique(keys, return_index=True, return_inverse=True)
            owner = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(reads)])
            page = np.concatenate(reads)
            rep_cid = np.empty(len(uk), np.int64)
            for i, v in enumerate(self.views):
                mine = np.flatnonzero(owner[first] == i)
                if len(mine):
                    rep_cid[mine] = self._read(v, page[first[mine]], plan[i][4])
            n_read += len(uk)
            got = rep_cid[inv]
            # A page read at its address (anonymous memory, through /proc/<pid>/mem) may have
            # left the frame its pagemap entry showed before the read (copy-on-write of a KSM
            # page or of the zero page by a write after this sample's scan): then what was read
            # is not that frame's content. Such a page is left out of this sample (it is looked
            # at again at the next one), and if others share the frame it was read for, they are
            # read one by one (and checked alike). Pages read from the RAM file are read by
            # offset, not through the mapping, and a RAM-file frame has one page
            rep = np.arange(len(keys)) == first[inv]
            moved = self._left(rep, keys, owner, page, plan)
            alone = moved[first[inv]] & ~rep  # the others on a frame whose page read for it left
            if alone.any():
                for i, v in enumerate(self.views):
                    sel = np.flatnonzero(alone & (owner == i))
                    if len(sel):
                        got[sel] = self._read(v, page[sel], plan[i][4])
                        n_read += len(sel)
                moved |= self._left(alone, keys, owner, page, plan)
            for i, (v, r) in enumerate(zip(self.views, reads, strict=True)):
                mine = owner == i
                plan[i][0][r] = np.where(moved[mine], -1, plan[i][0][r])
                plan[i][1][r] = np.where(moved[mine], -1, got[mine])
                v.present[r[moved[mine]]] = False  # its pagemap entry is read again next time

        # 6. the re-check: a slice of the pages kept from earlier samples is read again
        if self.scrub and not full_all:
            for i, v in enumerate(self.views):
                key, cid, own, keep, file_pg = plan[i]
                win = self._scrub_window(v)
                v.scrub_at = (v.scrub_at + self.scrub) % v.n
                idx = np.flatnonzero(win & keep)
                if len(idx):
                    got = self._read(v, idx, file_pg)
                    bad = got != cid[idx]
                    v.suspect[idx[bad]] = True  # counted at the next sample unless written
                    cid[idx[bad]] = got[bad]
                    n_scrub += len(idx)
        if moved_pages and _moves() != self._moves:  # a migration during the sample: not suspect
            for v, look in zip(self.views, looks, strict=True):
                v.suspect[look[4]] = False
        self.stale += stale

        # 7. the ledger: pages whose frame or content changed leave their old counts, every VM's
        #    first (a frame several pages share, say a store page whose content was read again,
        #    then leaves the counts and comes back with its new class), then join the new ones
        changes = []
        for v, (key, cid, *_rest) in zip(self.views, plan, strict=True):
            ch = np.flatnonzero((key != v.key) | (cid != v.cid))
            changes.append((key[ch], cid[ch]))
            self._apply(v.key[ch], v.cid[ch], -1)
        for v, (key, cid), p in zip(self.views, changes, plan, strict=True):
            self._apply(key, cid, +1)
            v.key, v.cid = p[0], p[1]
        if len(self.index) > 2 * int(self.contents.live[0]) + self.compact_slack:
            self._compact()
        return self._result(t0, c0, n_read, n_scrub, untracked)

    def _compact(self) -> None:
        """Forget contents no page holds any more (the index would grow with every write)."""
        held = [v.cid[v.cid >= 0] for v in self.views]
        if self.store is not None:
            held.append(self.store.cid[self.store.cid >= 0])
        remap = self.index.compact(np.concatenate(held))
        n = len(self.index)
        for v in self.views:
            v.cid = np.where(v.cid >= 0, remap[np.maximum(v.cid, 0)], -1)
        if self.store is not None:
            self.store.cid = np.where(self.store.cid >= 0, remap[np.maximum(self.store.cid, 0)], -1)
        c = self.contents
        old = np.flatnonzero(remap >= 0)
        inside = old < len(c.cls)
        refs, cls = np.zeros(max(n, 1024), np.int64), np.zeros(max(n, 1024), np.uint8)
        refs[remap[old]] = c.get(old)
        cls[remap[old[inside]]] = c.cls[old[inside]]
        c.refs, c.cls = refs, cls

    def _left(self, sel: np.ndarray, keys: np.ndarray, owner: np.ndarray, page: np.ndarray, plan: list) -> np.ndarray:
        """Per entry of a sample's reads (``keys``: frame, ``owner``: VM, ``page``: guest page):
        among ``sel``, read at its address (not from the RAM file) and no longer on frame
        ``keys`` now (pagemap read again)."""
        out = np.zeros(len(keys), bool)
        for i, v in enumerate(self.views):
            mine = np.flatnonzero(sel & (owner == i))
            mine = mine[~(plan[i][4][page[mine]] & (v.ram_fd >= 0))]
            if len(mine):
                mine = mine[np.argsort(page[mine])]
                e = oracle.read_entries(v.pm_fd, v.t.hva, page[mine], f"/proc/{v.t.pid}/pagemap")
                out[mine] = decode_pagemap(e)[1].astype(np.int64) != keys[mine]
        return out

    def _scrub_window(self, v: _VMView) -> np.ndarray:
        """Per page: in this sample's re-check slice (``scrub`` pages from where the last stopped)."""
        m = np.zeros(v.n, bool)
        if self.scrub and self.incremental:
            a = v.scrub_at % v.n
            m[a:a + self.scrub] = True
            m[:max(0, a + self.scrub - v.n)] = True
        return m

    def _read(self, v: _VMView, pages: np.ndarray, file_pg: np.ndarray) -> np.ndarray:
        """Content ids of guest pages ``pages`` (present): RAM-file pages read from the file
        (``pread``: never allocates), others from QEMU's memory."""
        pages = np.asarray(pages, np.int64)
        out = np.empty(len(pages), np.int64)
        via_file = file_pg[pages] & (v.ram_fd >= 0)
        for sel, fd, base, what in ((via_file, v.ram_fd, 0, "RAM file"),
                                    (~via_file, v.mem_fd, v.t.hva, "memory")):
            idx = np.flatnonzero(sel)
            if not len(idx):
                continue
            order = idx[np.argsort(pages[idx], kind="stable")]
            if fd == v.ram_fd and v.mirror is not None:
                h = v.mirror.hash_pages(pages[order])
            else:
                h = oracle.hash_fd_pages(fd, base, pages[order], what=f"VM {v.t.name} {what}")
            out[order] = self.index.intern(h)
        return out

    def _apply(self, key: np.ndarray, cid: np.ndarray, sign: int) -> None:
        inn = key != -1
        key, cid = key[inn], cid[inn]
        if not len(key):
            return
        cls = _classes(self.index, cid)
        self.g += sign * np.array([len(key), np.count_nonzero(cls & 1), np.count_nonzero(cls & 2)])
        pf = key >= 0
        if sign < 0:
            self.frames.remove(key[pf])
            self.slots.remove(-2 - key[~pf])
            self.contents.remove(cid)
        else:
            self.frames.add(key[pf], cls[pf])
            self.slots.add(-2 - key[~pf], cls[~pf])
            self.contents.add(cid, cls)

    def _result(self, t0: float, c0: float, n_read: int, n_scrub: int, untracked: int) -> Sample:
        # store pages no page of G maps: frames paid for nothing
        if self.store is not None:
            s_idx = np.flatnonzero(self.store.resident)
            only = s_idx[self.slots.get(s_idx) == 0]
            oc = _classes(self.index, self.store.cid[only]) if len(only) else np.zeros(0, np.uint8)
            so = np.array([len(only), np.count_nonzero(oc & 1), np.count_nonzero(oc & 2)])
            store_pages = len(s_idx)
        else:
            so, store_pages = np.zeros(3, np.int64), 0
        F = self.frames.live + self.slots.live + so
        G, C = self.g, self.contents.live
        figs = [Figures(int(G[k]), int(F[k]), int(C[k])) for k in range(3)]
        a, nz, dk = figs[0], figs[1], figs[2] if self.has_disk else None
        per_vm = []
        # the credits change only when a frame or store page held more than once before or
        # after this sample's changes was touched: else last sample's stand
        again = self.want_credits and (self.frames.shared_changed or self.slots.shared_changed)
        credits = {} if again else dict(self._credits)
        for v in self.views:
            inn = v.key != -1
            pf = v.key >= 0
            if again:
                # every key of G is in the ledger (its arrays cover it): index directly
                n = np.concatenate([self.frames.refs[v.key[pf]], self.slots.refs[-2 - v.key[inn & ~pf]]])
                shared = n[n > 1].astype(np.float64)
                credits[v.t.name] = float(np.sum((shared - 1.0) / shared))
            G_v = int(np.count_nonzero(inn))
            backed = int(np.count_nonzero(inn & ~pf & ~v.present))
            per_vm.append(VMPages(v.t.name, G_v, G_v - backed, backed))
        self._credits = credits
        self.frames.shared_changed = self.slots.shared_changed = False
        zero = int(G[0] - G[1])
        cpu = time.thread_time() - c0
        self.cpu_s += cpu
        return Sample(
            t=t0, seconds=time.monotonic() - t0,
            G=a.G, F=a.F, C=a.C, R=a.R, M=a.M, E=a.E,
            G_nonzero=nz.G, F_nonzero=nz.F, C_nonzero=nz.C, R_nonzero=nz.R, M_nonzero=nz.M, E_nonzero=nz.E,
            G_disk=dk.G if dk else None, F_disk=dk.F if dk else None, C_disk=dk.C if dk else None,
            R_disk=dk.R if dk else None, M_disk=dk.M if dk else None, E_disk=dk.E if dk else None,
            zero_pages=zero, store_pages=store_pages, store_only_pages=int(so[0]),
            vms=tuple(per_vm), frames_read=n_read + n_scrub, cpu_seconds=cpu, credits=credits,
            method="incremental" if self.incremental else "full", untracked_pages=untracked,
            scrubbed=n_scrub, stale=self.stale,
        )

    # ------------------------------------------------------------ for tests
    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(frame key, content hash) of every page of G now and of the store-only pages, as
        :func:`figures` takes them: frames, hashes, store frames, store hashes."""
        keys, cids = [], []
        for v in self.views:
            inn = v.key != -1
            keys.append(v.key[inn])
            cids.append(v.cid[inn])
        k = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        c = np.concatenate(cids) if cids else np.zeros(0, np.int64)
        # store keys as frames above every PFN (PFNs have 55 bits)
        fr = np.where(k >= 0, k, (1 << 60) + (-2 - k)).astype(np.uint64)
        if self.store is not None:
            s_idx = np.flatnonzero(self.store.resident)
            sf = ((1 << 60) + s_idx).astype(np.uint64)
            sh = self.index.hashes[self.store.cid[s_idx]]
        else:
            sf, sh = np.zeros(0, np.uint64), np.zeros((0, 2), np.uint64)
        return fr, self.index.hashes[c], sf, sh


def _meter_main(fd: int) -> None:
    """The meter process (``python3 -c``, see :class:`MeterProcess`): one :class:`Meter` per
    domain, a sample of each on every request, over the connection at descriptor ``fd``."""
    import signal
    from multiprocessing.connection import Connection

    _libc.prctl(1, signal.SIGKILL)  # prctl(PR_SET_PDEATHSIG): die with the harness
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle
    conn = Connection(fd)
    meters: dict[str, Meter] = {}
    try:
        domains, scrub, credits = conn.recv()
        for dom, (targets, store) in domains.items():
            meters[dom] = Meter(targets, store, scrub=scrub, credits=credits)
        conn.send(("ready", {dom: m.untracked for dom, m in meters.items()}))
        while (msg := conn.recv()) is not None:
            if msg[0] == "drop":  # a domain no longer measured (say one of its QEMUs died)
                m = meters.pop(msg[1], None)
                if m is not None:
                    m.close()
                conn.send(("dropped", msg[1]))
                continue
            samples, errors = {}, {}
            for dom, m in meters.items():
                try:
                    samples[dom] = m.sample()
                except Exception as e:  # noqa: BLE001 - one domain's failure, said to the harness
                    errors[dom] = f"{type(e).__name__}: {e}"
            conn.send(("samples", (samples, errors, {dom: m.untracked for dom, m in meters.items()})))
    except EOFError:
        pass
    except BaseException as e:  # noqa: BLE001 - sent to the harness
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        for m in meters.values():
            m.close()


class MeterProcess:
    """:class:`Meter` s of several domains in a process of their own: measuring then takes no
    time from the harness's threads (no GIL shared with the sharing engine). ``sample()`` returns
    one :class:`Sample` per domain; their ``cpu_seconds`` is the meter process's CPU. Close it
    (or ``with``): the process ends (it also dies with the harness)."""

    def __init__(self, domains: Mapping[str, tuple[Iterable[Any], ProcFile | str | os.PathLike | None]], *,
                 scrub: int = 256, credits: bool = True, timeout_s: float = 600.0) -> None:
        import socket
        import sys
        from multiprocessing.connection import Connection

        _require_root()
        spec = {dom: ([target(v) for v in vms], store if isinstance(store, ProcFile) or store is None
                      else os.fspath(store))
                for dom, (vms, store) in domains.items()}
        mine, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)  # this tree's harness, not another's
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.timeout_s = timeout_s
        self._cpu_last = 0.0
        self.errors: dict[str, str] = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from harness.accounting import _meter_main; _meter_main({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(mine.detach())
        try:
            self._conn.send((spec, scrub, credits))
            self.untracked: dict[str, dict[str, str]] = self._reply("ready")
        except BaseException:
            self.close()
            raise

    def _reply(self, want: str) -> Any:
        if not self._conn.poll(self.timeout_s):
            raise HarnessError(f"the meter process did not answer in {self.timeout_s:.0f} s")
        try:
            kind, body = self._conn.recv()
        except EOFError:
            raise HarnessError(f"the meter process died (exit status {self.proc.poll()})") from None
        if kind == "error":
            raise HarnessError(f"measuring failed: {body}")
        assert kind == want, kind
        return body

    def sample(self) -> dict[str, Sample]:
        """One sample of each domain (:attr:`untracked` is updated with it). A domain that
        could not be measured is left out and :attr:`errors` says why (a QEMU that died: the
        caller decides, and may :meth:`drop` it)."""
        self._conn.send(("sample",))
        samples, self.errors, self.untracked = self._reply("samples")
        return samples

    def drop(self, domain: str) -> None:
        """Stop measuring ``domain`` (its meter is closed)."""
        self._conn.send(("drop", domain))
        self._reply("dropped")

    def cpu_s(self) -> float:
        """CPU time of the meter process so far (user + system), whatever it spent it on."""
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone: its last reading
            f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self._cpu_last = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return self._cpu_last

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._conn.close()

    def __enter__(self) -> MeterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure(
    vms: Iterable[Any],
    store: ProcFile | str | os.PathLike | None = None,
    *,
    disk_set: np.ndarray | None | bool = True,
    pause: bool = False,
) -> Sample:
    """One full-scan sample of the sharing domain made of ``vms`` (see :class:`Meter`).

    ``pause``: hold the VMs' vCPUs (QMP stop/cont) while sampling (VM objects only). Pages
    mapped from the store are found in QEMU's mappings (``/proc/<pid>/maps``), never asked of
    the merge agent.
    """
    vms = list(vms)
    with contextlib.ExitStack() as stack:
        if pause:
            for v in vms:  # VMs paused already stay paused afterwards
                if not isinstance(v, Target) and v.qmp("query-status").get("running"):
                    v.qmp("stop")
                    stack.callback(v.qmp, "cont")
        meter = stack.enter_context(Meter(vms, store, disk_set=disk_set, incremental=False))
        return meter.sample()


def format_sample(s: Sample) -> str:
    """One line: G F C R M and E, E_nonzero, E_disk."""

    def e(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (
        f"G={s.G} F={s.F} C={s.C} R={s.R} M={s.M} E={e(s.E)} E_nonzero={e(s.E_nonzero)} "
        f"E_disk={e(s.E_disk)} (G_disk={s.G_disk} M_disk={s.M_disk}) store={s.store_pages} "
        f"[{s.method}, {s.seconds * 1000:.0f} ms, cpu {s.cpu_seconds * 1000:.0f} ms, read {s.frames_read}]"
    )
