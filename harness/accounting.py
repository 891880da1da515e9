"""Accounting: the host frames guest memory really uses, and the sharing figures of METRICS.md.

``measure(vms, store=None, merged=None)`` takes one sample of a sharing domain:

- **G**: for each VM, every guest page whose host mapping is present in
  ``/proc/<qemu pid>/pagemap`` (bit 63; PFN in bits 0-54, which the kernel shows to root only),
  plus the *store-backed* pages: pages of the merge agent's ``merged_ranges()`` that are not
  present (the guest has not touched them since the merge, so the kernel has no PTE yet) but
  hold guest data: their frame and content are the content store's page.
- **F**: distinct physical frames behind G, plus the store's resident pages that no guest page
  of G maps (store overhead counts against sharing).
- **C**: distinct contents among G (``xxh3_128`` of each 4 KiB; all-zero pages are one content).
- **R = G - F**, **M = G - C**, **E = R / M**. When ``M == 0`` there is nothing to share and E is
  ``None`` (reports print "n/a"), never a made-up 0 or 1.
- the same figures over non-zero pages (``*_nonzero``) and over pages whose content equals a
  4 KiB-aligned data block of a VM's base disk image (``*_disk``, all-zero block excluded:
  :func:`harness.oracle.disk_block_set`). A frame holds one content, so every restriction keeps
  the frames of the pages it keeps, and the store-only pages of its contents.

How memory is read, so that measuring never allocates guest memory:

- guest page contents: ``preadv`` of ``/proc/<pid>/mem`` at ``hva + offset`` for present pages
  only, runs of consecutive pages in one read (not ``process_vm_readv``: its read-only pins
  unshare KSM-merged pages, see :func:`harness.oracle.hash_process_pages`). A page that stops
  being present between the pagemap read and the content read would be faulted in by that
  read: a narrow race with a running guest; pass ``pause=True`` to hold the vCPUs with QMP
  ``stop``/``cont`` around the sample.
- the content store (a ``/dev/shm`` file): mapped ``MAP_SHARED, PROT_READ`` in the harness;
  ``mincore`` tells which pages exist; only those are touched (a read fault on an existing page
  cache page allocates nothing) and their frames read from the harness's own pagemap; their
  contents are read with ``pread`` of the store file. Holes of the store are never touched.
- the host virtual address of guest RAM comes from QMP (HMP ``gpa2hva 0``), once per process.
  Guest RAM is one RAM block from guest-physical 0 (``VMSpec`` keeps guests below the PCI hole).

The arithmetic (:func:`figures`, :func:`guest_page_set`, :func:`expand_ranges`,
:func:`decode_pagemap`) is pure numpy on arrays, unit tested without QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harness import oracle
from harness.errors import HarnessError
from harness.surplus import credits_from_frames

PAGE = 4096
PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_PFN_MASK = np.uint64((1 << 55) - 1)

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


def guest_page_set(
    present: np.ndarray,
    pfn: np.ndarray,
    merged_guest: np.ndarray | None = None,
    merged_store: np.ndarray | None = None,
    store_resident: np.ndarray | None = None,
    store_pfn: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pages of one VM that count in G.

    ``present``/``pfn``: per guest page, from the pagemap. ``merged_guest``/``merged_store``:
    page indices of pages mapped from the store (:func:`expand_ranges`). ``store_resident``/
    ``store_pfn``: per store page, whether it exists and its frame.

    Returns (present page indices, store-backed page indices, their store page indices, frames
    of all G pages: present ones first, then store-backed ones). A merged page that is not
    present counts only if its store page exists.
    """
    present = np.asarray(present, dtype=bool)
    pres_idx = np.flatnonzero(present)
    frames = np.asarray(pfn, dtype=np.uint64)[pres_idx]
    if merged_guest is None or len(merged_guest) == 0:
        e = np.zeros(0, np.int64)
        return pres_idx, e, e, frames
    mg = np.asarray(merged_guest, dtype=np.int64)
    ms = np.asarray(merged_store, dtype=np.int64)
    sel = ~present[mg]
    if store_resident is not None:
        ok = ms < len(store_resident)
        ok[ok] = np.asarray(store_resident, dtype=bool)[ms[ok]]
        sel &= ok
    sb_g, sb_s = mg[sel], ms[sel]
    sb_frames = (
        np.asarray(store_pfn, dtype=np.uint64)[sb_s] if store_pfn is not None else np.zeros(len(sb_s), np.uint64)
    )
    return pres_idx, sb_g, sb_s, np.concatenate([frames, sb_frames])


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
    ram_file: Path | None = None  # the RAM file (memory-backend-file), None for anonymous RAM


_hva_cache: dict[tuple[int, int], int] = {}


def parse_gpa2hva(text: str) -> int:
    """``Host virtual address for 0x0 (pc.ram) is 0x7f...`` -> the address."""
    m = _HVA_RE.search(text or "")
    if not m:
        raise HarnessError(f"cannot parse the answer of HMP gpa2hva: {text!r}")
    return int(m.group(1), 16)


def ram_hva(vm) -> int:
    """Host virtual address of guest-physical 0 in the QEMU process of ``vm`` (QMP, cached)."""
    key = (vm.pid, _start_time(vm.pid))
    if key not in _hva_cache:
        text = vm.qmp("human-monitor-command", **{"command-line": "gpa2hva 0"})
        _hva_cache[key] = parse_gpa2hva(text)
    return _hva_cache[key]


def _start_time(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


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
        ram_file=Path(vm.ram_path) if getattr(vm.spec, "ram_backend", "file") == "file" else None,
    )


def target_from_state(state: dict) -> Target:
    """A :class:`Target` for a VM started in the background (its ``state.json``, as
    :func:`harness.vm.load_states` returns it). Asks QMP for the RAM address on the manual
    socket, so a harness holding the main one is not disturbed."""
    from harness.image import Image
    from harness.vm import qmp_connect

    pid = int(state["pid"])
    key = (pid, _start_time(pid))
    if key not in _hva_cache:
        q = qmp_connect(Path(state.get("qmp_manual") or state["qmp"]))
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
        ram_file=Path(state["ram"]) if backend == "file" and state.get("ram") else None,
    )


def _require_root() -> None:
    if os.geteuid() != 0:
        raise HarnessError("accounting reads physical frame numbers from pagemap: run as root")


def read_pagemap(pid: int | str, addr: int, npages: int) -> np.ndarray:
    """Raw pagemap entries of ``npages`` pages from virtual address ``addr`` of process ``pid``."""
    path = f"/proc/{pid}/pagemap"
    out = np.empty(npages, dtype=np.uint64)
    view = memoryview(out).cast("B")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise HarnessError(f"cannot open {path}: {e}") from None
    try:
        got = 0
        while got < len(view):
            r = os.preadv(fd, [view[got:]], (addr // PAGE) * 8 + got)
            if r <= 0:
                raise HarnessError(f"short read of {path} at page {addr // PAGE + got // 8}")
            got += r
    except OSError as e:
        raise HarnessError(f"cannot read {path}: {e}") from None
    finally:
        os.close(fd)
    return out


# --- mapping a file read-only without ever allocating its holes ----------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PROT_READ, _MAP_SHARED = 1, 1
_MAP_FAILED = ctypes.c_void_p(-1).value


class MappedFile:
    """A ``/dev/shm`` file mapped ``MAP_SHARED, PROT_READ`` in the harness.

    :meth:`resident` (``mincore``) says which pages exist without touching any. Only pages that
    exist may be read through :attr:`pages` (a read fault on an existing page maps it and
    allocates nothing; a read fault on a hole of a tmpfs file would allocate a page).
    Close it (or use ``with``) at once after use: a mapping keeps a deleted file's memory alive.
    """

    def __init__(self, path: str | os.PathLike, npages: int | None = None) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.addr = None
        try:
            size = os.fstat(self.fd).st_size
            self.npages = size // PAGE if npages is None else min(npages, size // PAGE)
            self.length = self.npages * PAGE
            if self.length:
                addr = _libc.mmap(None, self.length, _PROT_READ, _MAP_SHARED, self.fd, 0)
                if addr in (None, _MAP_FAILED):
                    raise HarnessError(f"cannot map {self.path}: {os.strerror(ctypes.get_errno())}")
                self.addr = addr
                buf = (ctypes.c_uint8 * self.length).from_address(addr)
                self.pages = np.ctypeslib.as_array(buf).reshape(self.npages, PAGE)
            else:
                self.pages = np.zeros((0, PAGE), np.uint8)
        except BaseException:
            self.close()
            raise

    def resident(self) -> np.ndarray:
        """Per page: does it exist in the file (page cache) now. Touches nothing."""
        vec = np.zeros(self.npages, dtype=np.uint8)
        if self.npages and _libc.mincore(self.addr, self.length, vec.ctypes.data) != 0:
            raise HarnessError(f"mincore on {self.path}: {os.strerror(ctypes.get_errno())}")
        return (vec & 1).astype(bool)

    def touch(self, idx: np.ndarray) -> None:
        """Map existing pages ``idx`` (read one byte of each)."""
        if len(idx):
            int(self.pages[np.asarray(idx), 0].sum())

    def frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(present, PFN) of every page of the harness's mapping (only touched pages are present)."""
        if not self.npages:
            return np.zeros(0, bool), np.zeros(0, np.uint64)
        return decode_pagemap(read_pagemap("self", self.addr, self.npages))

    def hash(self, idx: np.ndarray) -> np.ndarray:
        """Contents of existing pages ``idx`` (sorted), read through the mapping."""
        return oracle.hash_rows(self.pages, idx)

    def close(self) -> None:
        if self.addr is not None:
            self.pages = None
            _libc.munmap(self.addr, self.length)
            self.addr = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the content store -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreView:
    """The content store's resident pages: per store page, whether it exists, frame, content."""

    resident: np.ndarray  # bool per store page
    pfn: np.ndarray  # uint64 per store page (0 where not resident)
    hashes: np.ndarray  # (npages, 2) uint64 (0 where not resident)

    @property
    def npages(self) -> int:
        return len(self.resident)


def read_store(path: str | os.PathLike) -> StoreView:
    """Frames and contents of the existing pages of the store file, without allocating any."""
    _require_root()
    with MappedFile(path) as m:
        resident = m.resident()
        idx = np.flatnonzero(resident)
        hashes = np.zeros((m.npages, 2), dtype=np.uint64)
        hashes[idx] = m.hash(idx)  # read faults on existing pages only: maps them
        present, pfn = m.frames()
    resident &= present  # a page evicted meanwhile is not present: leave it out
    return StoreView(resident, np.where(resident, pfn, np.uint64(0)), hashes)


# --- one sample ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VMPages:
    """One VM's share of G in a sample."""

    name: str
    G: int
    present: int
    store_backed: int  # merged pages not present: counted through the store


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
    frames_read: int = 0  # distinct frames whose content was read (each frame is read once)
    cpu_seconds: float = 0.0  # CPU time of the harness process taking it (a loaded host shows
    # a wall time far above this)
    # per VM: the frames its pages share with other pages, (n-1)/n for each of its pages on a
    # frame held n times (harness.surplus.credits_from_frames); they add up to G minus the
    # distinct frames behind G
    credits: dict[str, float] = dataclasses.field(default_factory=dict)

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


def group_frames(pfn: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group pages by frame: (representative page of each frame, frame group of each page).

    The representative is the page of lowest ``rank`` (the cheapest to read) of its frame.
    """
    n = len(pfn)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # one uint64 key (PFNs have 55 bits): argsort of it is ~3x faster than a two-key lexsort
    key = (np.asarray(pfn, dtype=np.uint64) << np.uint64(2)) | (np.asarray(rank, np.int64) + 1).astype(np.uint64)
    order = np.argsort(key)
    sp = pfn[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sp[1:] != sp[:-1]
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.cumsum(first) - 1
    return order[first], inv


def measure(
    vms: Iterable[Any],
    store: str | os.PathLike | None = None,
    merged: Mapping[str, np.ndarray] | None = None,
    *,
    disk_set: np.ndarray | None | bool = True,
    pause: bool = False,
) -> Sample:
    """Take one sample of the sharing domain made of ``vms``.

    ``vms``: running :class:`harness.vm.VM` objects (or :class:`Target`). ``store``: the content
    store file of the domain, if any. ``merged``: per VM name, the merge agent's
    ``merged_ranges()`` (``(m, 3)``: guest byte offset, store byte offset, pages). ``disk_set``:
    True (default) derives it from the VMs' images, an array uses that set, None skips E_disk.
    ``pause``: hold the VMs' vCPUs (QMP stop/cont) while sampling (VM objects only).

    Each distinct frame is read once: from the store's contents if it is a store frame, else
    through a read-only mapping of the VM's RAM file when the harness's mapping shows the very
    frame QEMU maps (file backend), else from QEMU's memory (``process_vm_readv``). Do not run
    merges of the same VMs concurrently with a sample (same thread is fine): a page punched
    between the residency check and the read would be allocated again in the RAM file.
    """
    _require_root()
    vms = list(vms)
    if merged and store is None:
        raise HarnessError("merged ranges given without the content store they map")
    targets = [target(v) for v in vms]
    dset = domain_disk_set(targets) if disk_set is True else (disk_set if disk_set is not False else None)
    t0 = time.monotonic()
    c0 = time.process_time()
    with contextlib.ExitStack() as stack:
        if pause:
            for v in vms:  # VMs paused already stay paused afterwards
                if not isinstance(v, Target) and v.qmp("query-status").get("running"):
                    v.qmp("stop")
                    stack.callback(v.qmp, "cont")
        sv = read_store(store) if store is not None else None
        s_idx = np.flatnonzero(sv.resident) if sv is not None else np.zeros(0, np.int64)
        s_frames = sv.pfn[s_idx] if sv is not None else np.zeros(0, np.uint64)
        s_hashes = sv.hashes[s_idx] if sv is not None else np.zeros((0, 2), np.uint64)

        p_vm, p_idx, p_pfn, p_rank, per_vm, maps = [], [], [], [], [], {}
        for i, t in enumerate(targets):
            npages = t.ram_size // PAGE
            present, pfn = decode_pagemap(read_pagemap(t.pid, t.hva, npages))
            mg, ms = expand_ranges((merged or {}).get(t.name), npages)
            pres_idx, sb_g, sb_s, _ = guest_page_set(
                present, pfn, mg, ms,
                sv.resident if sv is not None else None, sv.pfn if sv is not None else None,
            )
            rank = np.ones(len(pres_idx), dtype=np.int8)  # 1: read from QEMU's memory
            if t.ram_file is not None and os.path.exists(t.ram_file):
                m = stack.enter_context(MappedFile(t.ram_file, npages))
                maps[i] = m
                res = m.resident()[pres_idx] if m.npages == npages else np.zeros(len(pres_idx), bool)
                rank[res] = 0  # 0: exists in the RAM file: maybe readable through the mapping
            p_vm.append(np.full(len(pres_idx), i, dtype=np.int32))
            p_idx.append(pres_idx)
            p_pfn.append(pfn[pres_idx])
            p_rank.append(rank)
            if len(sb_s):
                # store-backed pages: frame and content are the store page's
                p_vm.append(np.full(len(sb_s), i, dtype=np.int32))
                p_idx.append(-1 - sb_s)  # marks "store page" (never read from the VM)
                p_pfn.append(sv.pfn[sb_s])
                p_rank.append(np.full(len(sb_s), -1, dtype=np.int8))
            per_vm.append(VMPages(t.name, len(pres_idx) + len(sb_s), len(pres_idx), len(sb_s)))

        vm_of = np.concatenate(p_vm) if p_vm else np.zeros(0, np.int32)
        page_of = np.concatenate(p_idx) if p_idx else np.zeros(0, np.int64)
        frames = np.concatenate(p_pfn) if p_pfn else np.zeros(0, np.uint64)
        rank = np.concatenate(p_rank) if p_rank else np.zeros(0, np.int8)
        reps, inv = group_frames(frames, rank)
        rep_hash = np.zeros((len(reps), 2), dtype=np.uint64)
        todo = np.ones(len(reps), dtype=bool)
        # frames of the store: content known
        if len(s_frames):
            order = np.argsort(s_frames)
            sf = s_frames[order]
            j = np.searchsorted(sf, frames[reps])
            j[j == len(sf)] = 0
            hit = sf[j] == frames[reps]
            rep_hash[hit] = s_hashes[order[j[hit]]]
            todo &= ~hit
        read = int(np.count_nonzero(todo))
        for i, t in enumerate(targets):
            mine = np.flatnonzero(todo & (vm_of[reps] == i))
            if not len(mine):
                continue
            pages = page_of[reps[mine]]
            if i in maps:
                via_map = rank[reps[mine]] == 0
                sel = mine[via_map]
                sel = sel[np.argsort(page_of[reps[sel]], kind="stable")]  # runs of pages
                if len(sel):
                    idx = page_of[reps[sel]]
                    h = maps[i].hash(idx)
                    own_present, own_pfn = maps[i].frames()
                    same = own_present[idx] & (own_pfn[idx] == frames[reps[sel]])
                    rep_hash[sel[same]] = h[same]
                    todo[sel[same]] = False
                mine = mine[todo[mine]]
                pages = page_of[reps[mine]]
            if len(mine):
                order = np.argsort(pages)
                rep_hash[mine[order]] = oracle.hash_process_pages(
                    t.pid, t.hva, pages[order], what=f"VM {t.name} memory"
                )
                todo[mine] = False
        hashes = rep_hash[inv]
    fig = figures(frames, hashes, s_frames, s_hashes, dset)
    a, nz, dk = fig["all"], fig["nonzero"], fig["disk"]
    assert a is not None and nz is not None
    store_only = int(np.count_nonzero(~member(s_frames, frames)))
    return Sample(
        t=t0, seconds=time.monotonic() - t0,
        G=a.G, F=a.F, C=a.C, R=a.R, M=a.M, E=a.E,
        G_nonzero=nz.G, F_nonzero=nz.F, C_nonzero=nz.C, R_nonzero=nz.R, M_nonzero=nz.M,
        E_nonzero=nz.E,
        G_disk=dk.G if dk else None, F_disk=dk.F if dk else None, C_disk=dk.C if dk else None,
        R_disk=dk.R if dk else None, M_disk=dk.M if dk else None, E_disk=dk.E if dk else None,
        zero_pages=int(np.count_nonzero(oracle.is_zero_hash(hashes))),
        store_pages=len(s_frames), store_only_pages=store_only,
        vms=tuple(per_vm), frames_read=read, cpu_seconds=time.process_time() - c0,
        credits=credits_from_frames(frames, vm_of, [t.name for t in targets]),
    )


def format_sample(s: Sample) -> str:
    """One line: G F C R M and E, E_nonzero, E_disk."""

    def e(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (
        f"G={s.G} F={s.F} C={s.C} R={s.R} M={s.M} E={e(s.E)} E_nonzero={e(s.E_nonzero)} "
        f"E_disk={e(s.E_disk)} (G_disk={s.G_disk} M_disk={s.M_disk}) store={s.store_pages} "
        f"[{s.seconds * 1000:.0f} ms, cpu {s.cpu_seconds * 1000:.0f} ms]"
    )
