"""The oracle: what a perfect, instantaneous deduplicator could share, by page content.

Contents are identified by ``xxh3_128`` of each 4 KiB page, kept as an ``(n, 2)`` array of
``uint64`` (``[:, 0]`` the high half, ``[:, 1]`` the low half: the digest read big-endian), so
sets of contents are sorted and compared with numpy. All-zero pages all hash to
:data:`ZERO_HASH`: they are one content.

- :func:`hash_pages` hashes a buffer of whole pages; :func:`hash_fd_pages` reads chosen pages
  of a file (the content store, a disk image) in coalesced runs and hashes them;
  :func:`hash_process_pages` does the same for another process's memory (``/proc/<pid>/mem``).
  They only ever read the pages they are given: callers pass only pages that exist (a read of
  another process's memory at a page that is not present faults it in).
- :func:`distinct_count` counts distinct contents, :func:`in_set` tests membership in a sorted
  content set.
- :func:`disk_block_set` is the set of contents of every 4 KiB-aligned data block of a disk
  image (holes skipped with ``SEEK_DATA``/``SEEK_HOLE``; the all-zero block left out, so that
  E_disk never counts zero pages), cached in ``<cache>/diskhash/<key>.npy``.
- :class:`ContentIndex` gives each distinct content a small integer id (and says whether it is
  the zero page and whether it is a disk block), so that the incremental accounting counts
  contents with arrays instead of re-sorting every hash at every sample.
- :class:`WriteTracker` tells which pages of a QEMU's guest RAM were written since its last
  look, so that the oracle re-hashes only those (see "Write tracking" below); :class:`StoreWatch`
  tells which pages of the content store left it (punched) since the oracle read them.

Write tracking
--------------
Re-hashing all guest memory at every sample cost a third of a core for 2 x 512 MB at 1 s.
Only pages written since the last sample can hold new contents, so the accounting keeps a
(frame, content) pair per guest page and re-hashes a page only when the kernel says it may have
changed. The kernel tells it in two ways:

- its frame changed (pagemap PFN): a copy-on-write break, a KSM merge, a merge agent remap,
  compaction or migration, a page freed and faulted in again elsewhere. Reading every pagemap
  entry at every sample was the largest fixed cost left, so the accounting reads only the
  entries of pages written, new, in untracked mappings or in the re-check slice, and all of
  them whenever the host's counters of page moves (``/proc/vmstat``: migrations, swap, huge
  page splits and collapses) moved since the last sample: a KSM merge or a copy-on-write break
  rewrites the page table entry (so the page shows as written), only those move a page to
  another frame without that (a huge page split maps its zero-filled parts to the shared zero
  page: under KSM, which splits huge pages to merge them, a test saw 4 such frames missed
  before the split counter was added);
- it was written in place: asynchronous userfaultfd write-protect (``UFFD_FEATURE_WP_ASYNC``,
  Linux >= 6.7). Each sample's ``PAGEMAP_SCAN`` ioctl on ``/proc/<qemu>/pagemap`` returns the
  present pages written since the previous scan and write-protects them again, atomically; the
  next write to such a page takes a minor fault that the kernel resolves by itself (the writer
  never waits for the harness). Writes the kernel makes on QEMU's behalf (``preadv`` of the disk
  image into guest RAM) fault the same way. A userfaultfd acts on the address space that
  created it: ``wptrack.c``, preloaded into every QEMU, creates one and leaves it open at
  :data:`TRACK_FD`; the harness takes a copy with ``pidfd_getfd`` and does the rest from outside.

Soft-dirty bits (``clear_refs`` + pagemap bit 55) are not used: the host kernel this harness
runs on is built without them (``CONFIG_MEM_SOFT_DIRTY`` unset), and they cannot be read and
cleared atomically (a write between reading pagemap and writing ``clear_refs`` is lost).

What the tracker cannot see, and why the figures do not depend on it:

- a mapping created after the last scan (the merge agent's ``MAP_FIXED`` remaps, an unmerge)
  is not registered: ``PAGEMAP_SCAN`` reports it as not write-protectable, the accounting
  re-hashes every present page in it and registers it for the next sample;
- a mapping another userfaultfd holds (``EBUSY``) stays untracked: re-hashed every sample and
  counted (``untracked_pages``);
- a page dropped and faulted in again by a *read* between two samples (a balloon inflated
  and deflated, then read before written) comes back holding zeros without a write, most often
  on the very same frame (the allocator hands the freed frame back: measured here, 39 of 40):
  same PFN, no write, old content cached. The guest writes such a page before it uses it, which
  re-hashes it; and a background re-check (``scrub``) re-reads a slice of the cached pages and
  their pagemap entries at every sample and counts any page whose content or frame changed
  behind the tracker's back and was not written since (``stale``; a test makes such changes on
  purpose and sees them counted);
- a KSM page moved without a write: when ksmd gives up a merge half done
  (``try_to_merge_two_pages`` -> ``break_cow`` -> ``break_ksm``) it *unshares* the page
  (``FAULT_FLAG_UNSHARE``): ``wp_page_copy`` copies it to a new frame and keeps its uffd-wp bit,
  so the tracker does not report it, while its frame changed (and the old frame, freed, may be
  handed to another page). The kernel counts that copy in ``cow_ksm`` as it counts a guest's
  write to a KSM page, so the accounting treats ``cow_ksm`` like a migration: when it moved, every
  page's frame is read again, at that sample and the next (it is counted just before the new
  frame is installed). Before that, the re-check found a few such pages under KSM only (3 of
  115,200 in a test, 256 in one ``satori+ksm`` collapse repetition);
- not a miss of the tracker but of reading: anonymous pages are read at their address, so a
  page that leaves its frame between its pagemap read and its content read (copy-on-write of
  a KSM page or of the zero page, by a write after the scan) gives its new content, which was
  taken for the old frame's and for every page sharing that frame (the last gap under KSM:
  3-31 contents of ~115,000 pages in ``test_oracle_vms``). The accounting reads such pages'
  pagemap entries again after reading them and leaves out of the sample a page that moved
  (it is looked at again at the next one); the pages sharing its frame are read one by one.
  Since then the KSM case of ``test_oracle_vms`` is exact (slack 0, 8 runs of 8);
- writes into guest RAM that bypass QEMU's page tables: another process writing the RAM file
  (nothing does in this harness), or a DMA still in flight from a pin taken before the scan
  (``O_DIRECT``/``aio=native`` drives; the harness uses ``cache=writeback``, whose reads are
  plain ``preadv`` copies). The scrub would count those too.

Without a tracker (no ``wptrack`` in QEMU, a kernel without ``WP_ASYNC``, ``measure()`` and
``satori status``) the accounting re-hashes every present page: the full scan the incremental
oracle is tested against (on processes standing in for QEMU and on real guests, with merges,
copy-on-write breaks and KSM: every figure equal).

The content store is tracked by what the kernel says too. The engine writes a store slot once,
but frees a slot nobody maps by punching its page out of the file and may then reuse the slot
for another content (that bounds the slots a churning guest can make it hold), so one slot can
hold two contents between two samples and be resident at both: residency (``mincore``) alone
would keep the old content's id (seen on real guests: contents miscounted, and the re-check
finding store pages changed). A punch unmaps the page from every process that maps the file,
so :class:`StoreWatch` keeps a read-only mapping of the store in the measuring process holding
every page the oracle has read (the entry made before the read); a page whose entry is gone at
the next sample left the file since and is read again, as is a page seen for the first time
(once more at the next sample, in case the first read caught the engine still writing it). Its
userfaultfd (missing mode, ``UFFD_FEATURE_SIGBUS``) makes sure that mapping never allocates a
page in a hole. The engine is not asked which slots it wrote. A store page rewritten in place
(``pwrite`` over a page still in the file: the engine never does that) keeps its entry and is
found by the re-check only, counted in ``stale``; without a userfaultfd every resident store
page is read at every sample (``Meter.untracked`` says so).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import os
import socket
import threading
from pathlib import Path

import numpy as np
import xxhash

from harness import memfd
from harness.errors import AgentError, HarnessError, ToolMissing
from harness.paths import cache_dir

PAGE = 4096
CHUNK_PAGES = 1024  # 4 MiB read buffer: hashing one chunk holds the GIL ~0.5 ms


def _digests_to_array(digests: bytes) -> np.ndarray:
    return np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)


ZERO_HASH: np.ndarray = _digests_to_array(xxhash.xxh3_128_digest(bytes(PAGE)))[0]


def hash_pages(buf: np.ndarray | bytes | memoryview) -> np.ndarray:
    """``xxh3_128`` of each 4 KiB page of ``buf`` (length a multiple of 4096) -> ``(n, 2)`` uint64."""
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    arr = arr.reshape(-1, PAGE)
    if len(arr) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    return _digests_to_array(b"".join(map(xxhash.xxh3_128_digest, arr)))


def hash_rows(pages: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Hash rows ``idx`` (sorted) of an ``(n, 4096)`` page array in place (runs, no copy)."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    h = xxhash.xxh3_128_digest
    starts, lengths = runs(idx)
    parts = [b"".join(map(h, pages[s : s + n])) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    return _digests_to_array(b"".join(parts))


def is_zero_hash(hashes: np.ndarray) -> np.ndarray:
    """Mask of the all-zero pages among ``hashes``."""
    return (hashes[:, 0] == ZERO_HASH[0]) & (hashes[:, 1] == ZERO_HASH[1])


def runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted page indices -> (start, length) of each run of consecutive indices."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(idx)]))
    return idx[starts], ends - starts


_local = threading.local()


def _buffer() -> np.ndarray:
    """One read buffer per thread, kept: faulting in 4 MiB anew on every call costs."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = np.empty(CHUNK_PAGES * PAGE, dtype=np.uint8)
        buf[::PAGE] = 0
    return buf


@functools.cache
def _reader() -> ctypes.CDLL:
    """``pageread.c``, built on first use."""
    from harness.sharing.agent import build_library, library_path

    src = Path(__file__).with_name("pageread.c")
    try:
        built = build_library(src, library_path(src, "pageread", "satori_pageread.so"), "the oracle's page reader")
    except AgentError as e:
        if "xxhash.h" in str(e.context):
            raise ToolMissing("the oracle's page reader needs xxhash.h to build: install the package "
                              "libxxhash-dev (bash ci/install.sh does)", e.context) from None
        raise
    lib = ctypes.CDLL(str(built), use_errno=True)
    lib.satori_read_pages.argtypes = [ctypes.c_int, np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS"),
                                      ctypes.c_size_t, ctypes.c_void_p]
    lib.satori_read_pages.restype = ctypes.c_long
    u64p = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
    lib.satori_read_spans.argtypes = [ctypes.c_int, u64p, u64p, ctypes.c_size_t, ctypes.c_void_p]
    lib.satori_read_spans.restype = ctypes.c_long
    lib.satori_hash_mapped.argtypes = [ctypes.c_void_p, u64p, ctypes.c_size_t, u64p,
                                       np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")]
    lib.satori_hash_mapped.restype = ctypes.c_long
    return lib


ENTRY_GAP = 64  # pagemap entries (512 bytes) between two runs read by one pread rather than two


def read_entries(fd: int, base: int, idx: np.ndarray, what: str = "pagemap") -> np.ndarray:
    """64-bit entries ``idx`` (sorted page indices) of a pagemap file opened at ``fd``, for the
    range starting at virtual address ``base``: one ``pread`` per run of consecutive pages, runs
    fewer than :data:`ENTRY_GAP` entries apart read as one (a system call costs more here than
    reading a few hundred bytes of entries nobody asked for)."""
    idx = np.asarray(idx, np.int64)
    if not len(idx):
        return np.empty(0, np.uint64)
    starts, lengths = runs(idx)
    ends = starts + lengths
    brk = np.flatnonzero(starts[1:] - ends[:-1] > ENTRY_GAP) + 1
    s0 = starts[np.concatenate(([0], brk))]
    lens = ends[np.concatenate((brk - 1, [len(ends) - 1]))] - s0
    buf = np.empty(int(lens.sum()), np.uint64)
    offs = np.ascontiguousarray(((base // PAGE + s0) * 8).astype(np.uint64))
    nbytes = np.ascontiguousarray((lens * 8).astype(np.uint64))
    got = _reader().satori_read_spans(fd, offs, nbytes, len(offs), buf.ctypes.data)
    if got != len(offs):
        raise HarnessError(f"reading {what} at page {int(offs[got]) // 8}: {os.strerror(ctypes.get_errno())}")
    span = np.searchsorted(s0, idx, side="right") - 1
    return buf[(np.cumsum(lens) - lens)[span] + (idx - s0[span])]


def hash_fd_pages(fd: int, base: int, idx: np.ndarray, what: str = "memory") -> np.ndarray:
    """Hash pages ``idx`` (sorted, unique page indices) at byte ``base + idx * 4096`` of ``fd``.

    The pages are read in C (``pageread.c``: one ``pread`` per run of consecutive pages, the GIL
    released), up to 4 MiB at a time, then hashed. Returns ``(len(idx), 2)``.
    """
    idx = np.asarray(idx, dtype=np.int64)
    out = np.empty((len(idx), 2), dtype=np.uint64)
    buf = _buffer()
    lib = _reader()
    for pos in range(0, len(idx), CHUNK_PAGES):
        part = idx[pos : pos + CHUNK_PAGES]
        offs = np.ascontiguousarray(part.astype(np.uint64) * np.uint64(PAGE) + np.uint64(base))
        got = lib.satori_read_pages(fd, offs, len(part), buf.ctypes.data)
        if got != len(part):
            raise HarnessError(f"reading {what} at {int(offs[got]):#x}: {os.strerror(ctypes.get_errno())}")
        out[pos : pos + len(part)] = hash_pages(buf[: len(part) * PAGE])
    return out


def hash_process_pages(pid: int, base: int, idx: np.ndarray, what: str = "memory") -> np.ndarray:
    """Hash pages ``idx`` (sorted, unique) at virtual address ``base + idx * 4096`` of process
    ``pid``, read through ``/proc/<pid>/mem`` (runs of pages in one ``preadv``).

    Not ``process_vm_readv``, although it copies once instead of twice: it *pins* the pages
    (FOLL_PIN), and pinning a KSM-merged (shared anonymous) page read-only makes the kernel
    unshare it, a copy-on-write copy. Measured here: with the oracle reading guest memory every
    second through process_vm_readv, ksm-fast stayed at E_disk 0.002 for 136 s; sampling every
    10 s it reached 0.98. ``/proc/<pid>/mem`` takes plain references (FOLL_GET): merged pages
    stay merged. Like any read of another process's memory, a page that is not present is
    faulted in: pass present pages only. Returns ``(len(idx), 2)``.
    """
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return hash_fd_pages(fd, base, idx, what=f"{what} (pid {pid})")
    finally:
        os.close(fd)


def sort_hashes(hashes: np.ndarray) -> np.ndarray:
    """An order of ``(n, 2)`` hashes in which equal hashes are adjacent, sorted by high half.

    Sorting the high halves alone is 5x faster than a two-key ``lexsort``; only when two
    different hashes share a high half (a 64-bit collision: in practice never) does it fall
    back to the full (high, low) ``lexsort``.
    """
    hi = np.ascontiguousarray(hashes[:, 0])
    order = np.argsort(hi)
    if len(order) > 1:
        sh, sl = hi[order], hashes[order, 1]
        if np.any((sh[1:] == sh[:-1]) & (sl[1:] != sl[:-1])):
            order = np.lexsort((hashes[:, 1], hashes[:, 0]))
    return order


def content_groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal hashes: (first row of each distinct content, content group of each row)."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = sort_hashes(hashes)
    s = hashes[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (s[1:, 0] != s[:-1, 0]) | (s[1:, 1] != s[:-1, 1])
    gid = np.empty(n, dtype=np.int64)
    gid[order] = np.cumsum(first) - 1
    return order[first], gid


def unique_hashes(hashes: np.ndarray) -> np.ndarray:
    """The distinct rows of ``(n, 2)`` hashes, sorted (high, low)."""
    if len(hashes) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    s = hashes[np.lexsort((hashes[:, 1], hashes[:, 0]))]
    keep = np.ones(len(s), dtype=bool)
    keep[1:] = (s[1:, 0] != s[:-1, 0]) | (s[1:, 1] != s[:-1, 1])
    return np.ascontiguousarray(s[keep])


def distinct_count(hashes: np.ndarray) -> int:
    """How many distinct contents ``(n, 2)`` hashes hold."""
    return len(content_groups(hashes)[0])


def in_set(hashes: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Mask: which rows of ``hashes`` are in ``sorted_set`` (distinct rows sorted (high, low))."""
    if len(hashes) == 0 or len(sorted_set) == 0:
        return np.zeros(len(hashes), dtype=bool)
    hi, lo = np.ascontiguousarray(sorted_set[:, 0]), sorted_set[:, 1]
    q = np.ascontiguousarray(hashes[:, 0])
    left = np.searchsorted(hi, q, side="left")
    at = np.minimum(left, len(hi) - 1)
    out = (hi[at] == q) & (lo[at] == hashes[:, 1])
    # a set member after the first with the same high half (sorted by low): rare, check those
    nxt = np.minimum(at + 1, len(hi) - 1)
    more = np.flatnonzero(~out & (hi[at] == q) & (nxt != at) & (hi[nxt] == q))
    for i in more:
        right = np.searchsorted(hi, q[i], side="right")
        out[i] = bool(np.any(lo[left[i] : right] == hashes[i, 1]))
    return out


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of a file that hold data (holes skipped), 4 KiB aligned."""
    segs = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % PAGE
        end = min(size, -(-end // PAGE) * PAGE)
        if segs and start <= segs[-1][1]:
            segs[-1] = (segs[-1][0], max(end, segs[-1][1]))
        else:
            segs.append((start, end))
        pos = end
    return segs


def hash_disk_blocks(path: Path) -> np.ndarray:
    """Distinct contents of the 4 KiB-aligned data blocks of a file, zero block excluded, sorted."""
    parts = []
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for start, end in data_segments(fd, size):
            whole = (end - start) // PAGE
            if whole:
                idx = np.arange(start // PAGE, start // PAGE + whole, dtype=np.int64)
                h = hash_fd_pages(fd, 0, idx, what=str(path))
                parts.append(unique_hashes(h[~is_zero_hash(h)]))
    if not parts:
        return np.zeros((0, 2), dtype=np.uint64)
    return unique_hashes(np.concatenate(parts))


def disk_block_set(path: Path, key: str | None = None) -> np.ndarray:
    """:func:`hash_disk_blocks` of a base disk image, cached under ``<cache>/diskhash/<key>.npy``.

    ``key`` is the image's recipe hash (an image of one recipe hash never changes); without a
    key the set is computed afresh.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"disk image not found: {path}")
    if key is None:
        return hash_disk_blocks(path)
    cache = cache_dir() / "diskhash" / f"{key}.npy"
    if cache.is_file():
        try:
            arr = np.load(cache)
            if arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype == np.uint64:
                return arr
        except (OSError, ValueError):
            pass
    arr = hash_disk_blocks(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{key}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return arr


# ============================================================================ content ids


class ContentIndex:
    """Distinct contents seen so far, each given a small integer id (its row in :attr:`hashes`).

    Ids are never reused (until :meth:`compact`). ``zero[id]`` says whether the content is the
    all-zero page and ``disk[id]`` whether it is a block of ``disk_set`` (None: no disk set, all
    False). Lookups are vectorised: known contents are kept sorted by the high half of their
    hash, in a large array and a small one that takes the new contents and is merged into the
    large one now and then (so adding a few contents never copies them all); a 64-bit collision
    between two contents only sends that batch through a slower exact path.
    """

    DELTA = 65_536  # new contents kept apart before they are merged into the large array

    def __init__(self, disk_set: np.ndarray | None = None) -> None:
        self.disk_set = disk_set
        self._n = 0
        self._hashes = np.zeros((1024, 2), np.uint64)
        self._zero = np.zeros(1024, bool)
        self._disk = np.zeros(1024, bool)
        self._sorted = (np.zeros(0, np.uint64), np.zeros(0, np.int64))  # high halves, ids
        self._delta = (np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return self._n

    @property
    def hashes(self) -> np.ndarray:
        return self._hashes[: self._n]

    @property
    def zero(self) -> np.ndarray:
        return self._zero[: self._n]

    @property
    def disk(self) -> np.ndarray:
        return self._disk[: self._n]

    def _find_in(self, part: tuple[np.ndarray, np.ndarray], h: np.ndarray, out: np.ndarray) -> None:
        hi_s, id_s = part
        if not len(hi_s):
            return
        todo = np.flatnonzero(out < 0)
        # queries in order: each binary search starts near the last one's end (numpy keeps it),
        # so the large array is walked once instead of missing the cache at every step (4-5x
        # faster over a few hundred thousand contents)
        todo = todo[np.argsort(h[todo, 0], kind="stable")]
        q = h[todo]
        left = np.searchsorted(hi_s, q[:, 0], side="left")
        right = np.searchsorted(hi_s, q[:, 0], side="right")
        cand = id_s[np.minimum(left, len(id_s) - 1)]
        hit = (right - left == 1) & (self._hashes[cand, 1] == q[:, 1])
        out[todo[hit]] = cand[hit]
        for k in np.flatnonzero(right - left > 1):  # the same high half twice: compare in full
            ids = id_s[left[k]:right[k]]
            m = ids[self._hashes[ids, 1] == q[k, 1]]
            if len(m):
                out[todo[k]] = m[0]

    def _find(self, h: np.ndarray) -> np.ndarray:
        """Ids of distinct hashes ``h`` (m, 2), -1 where unknown."""
        out = np.full(len(h), -1, np.int64)
        self._find_in(self._sorted, h, out)
        self._find_in(self._delta, h, out)
        return out

    def _append(self, nh: np.ndarray) -> np.ndarray:
        """Store new contents; returns their ids."""
        first, n = self._n, len(nh)
        if first + n > len(self._hashes):
            cap = max(first + n, 2 * len(self._hashes))
            for name in ("_hashes", "_zero", "_disk"):
                old = getattr(self, name)
                new = np.zeros((cap, *old.shape[1:]), old.dtype)
                new[:first] = old[:first]
                setattr(self, name, new)
        self._hashes[first:first + n] = nh
        self._zero[first:first + n] = is_zero_hash(nh)
        self._disk[first:first + n] = in_set(nh, self.disk_set) if self.disk_set is not None else False
        self._n += n
        return np.arange(first, first + n, dtype=np.int64)

    @staticmethod
    def _merge(part: tuple[np.ndarray, np.ndarray], hi: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(hi, kind="stable")
        at = np.searchsorted(part[0], hi[order])
        return np.insert(part[0], at, hi[order]), np.insert(part[1], at, ids[order])

    def intern(self, hashes: np.ndarray) -> np.ndarray:
        """Ids of ``(n, 2)`` hashes (new contents get new ids)."""
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1, 2)
        if not len(hashes):
            return np.zeros(0, np.int64)
        reps, gid = content_groups(hashes)  # each distinct content of the batch looked up once
        h = hashes[reps]
        ids = self._find(h)
        new = np.flatnonzero(ids < 0)
        if len(new):
            ids[new] = self._append(h[new])
            self._delta = self._merge(self._delta, h[new, 0], ids[new])
            if len(self._delta[0]) > self.DELTA:
                self._sorted = self._merge(self._sorted, *self._delta)
                self._delta = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        return ids[gid]

    def compact(self, keep: np.ndarray) -> np.ndarray:
        """Forget every content but ids ``keep``; they are renumbered 0.. in order. Returns the
        old id -> new id map (-1 for forgotten ids): the caller renumbers what it holds."""
        keep = np.unique(np.asarray(keep, np.int64))
        remap = np.full(self._n, -1, np.int64)
        remap[keep] = np.arange(len(keep))
        self._hashes, self._zero, self._disk = self.hashes[keep], self.zero[keep], self.disk[keep]
        self._n = len(keep)
        order = np.argsort(self._hashes[:, 0], kind="stable")
        self._sorted = (self._hashes[order, 0], order.astype(np.int64))
        self._delta = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        return remap


# ============================================================================ write tracking

TRACK_FD = 990  # where wptrack.c leaves its userfaultfd in QEMU (below the usual 1024 limit)
TRACK_LIB = "satori_wptrack.so"

_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # anonymous memory: PAGEMAP_SCAN may protect it
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
_PM_SCAN_WP_MATCHING = 1 << 0
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3
_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_FEATURE_SIGBUS = 1 << 7  # a fault the userfaultfd would be told of fails instead
_UFFDIO_REGISTER_MODE_MISSING = 1 << 0
_MADV_POPULATE_READ = 22
_MADV_DONTNEED = 4
_PROT_READ, _MAP_SHARED, _MAP_NORESERVE = 0x1, 0x01, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
_SCAN_VEC = 4096  # regions per PAGEMAP_SCAN call (the scan continues where it stopped)


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def tracker_source() -> Path:
    return Path(__file__).with_name("wptrack.c")


def tracker_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a QEMU whose guest RAM the oracle may track: ``wptrack.c`` (built on first
    use) appended to ``LD_PRELOAD``, and :data:`TRACK_FD`. Returns a new dict."""
    from harness.sharing.agent import build_library, library_path

    src = tracker_source()
    lib = str(build_library(src, library_path(src, "wptrack", TRACK_LIB), "the oracle's write tracker"))
    out = dict(env)
    pre = [p for p in out.get("LD_PRELOAD", "").split(":") if p and p != lib]
    out["LD_PRELOAD"] = ":".join([*pre, lib])
    out["SATORI_TRACK_FD"] = str(TRACK_FD)
    return out


def _join(r: np.ndarray) -> np.ndarray:
    """``(m, 2)`` sorted page ranges with touching ones joined."""
    r = np.asarray(r, np.int64).reshape(-1, 2)
    if len(r) > 1:
        brk = np.flatnonzero(r[1:, 0] != r[:-1, 1]) + 1
        r = np.column_stack([r[np.concatenate(([0], brk)), 0], r[np.concatenate((brk - 1, [len(r) - 1])), 1]])
    return r


def range_mask(npages: int, *ranges: np.ndarray) -> np.ndarray:
    """Per page: inside any of the ``(m, 2)`` page ranges."""
    d = np.zeros(npages + 1, np.int64)
    for r in ranges:
        np.add.at(d, r[:, 0], 1)
        np.add.at(d, r[:, 1], -1)
    return np.cumsum(d[:npages]) > 0


def _pagemap_scan(pagemap: int, base: int, first: int, end_page: int, how: tuple[int, int, int, int, int],
                  vec: ctypes.Array, what: str, categories: bool = False) -> np.ndarray:
    """PAGEMAP_SCAN (``pagemap`` an open ``/proc/<pid>/pagemap``) over pages ``[first, end_page)``
    of the range at virtual address ``base``; ``how`` = (flags, category_inverted, category_mask,
    category_anyof_mask, return_mask) -> ``(m, 2)`` page ranges of the matching pages (touching
    ranges joined), or with ``categories`` ``(m, 3)`` regions as the kernel gives them: start,
    end, category bits."""
    flags, inverted, mask, anyof, ret = how
    parts = []
    start, end = base + first * PAGE, base + end_page * PAGE
    while start < end:
        arg = _ScanArg(ctypes.sizeof(_ScanArg), flags, start, end, 0, ctypes.addressof(vec), len(vec) // 3,
                       0, inverted, mask, anyof, ret)
        # PAGEMAP_SCAN: reads (and with PM_SCAN_WP_MATCHING write-protects) the page tables
        n = _libc.ioctl(pagemap, _PAGEMAP_SCAN, ctypes.addressof(arg))
        if n < 0:
            err = ctypes.get_errno()
            raise HarnessError(f"PAGEMAP_SCAN of {what}: {os.strerror(err)}")
        parts.append(np.ctypeslib.as_array(vec).reshape(-1, 3)[:n].copy())
        if n < len(vec) // 3 or arg.walk_end >= end:
            break
        start = arg.walk_end
    r = np.concatenate(parts) if parts else np.zeros((0, 3), np.uint64)
    out = np.empty((len(r), 3), np.int64)
    out[:, :2] = ((r[:, :2] - np.uint64(base)) // np.uint64(PAGE)).astype(np.int64)
    out[:, 2] = r[:, 2].astype(np.int64)
    return out if categories else _join(out[:, :2])


class TrackerUnavailable(HarnessError):
    """No write tracking for this process (why is the message): the accounting re-hashes all."""


@dataclasses.dataclass
class ScanResult:
    """One look of a :class:`WriteTracker`: page index ranges ``(start, end)`` of the range."""

    written: np.ndarray  # (m, 2): present pages written since the last look
    untracked: np.ndarray  # (k, 2): pages in mappings not (yet) write-protectable: any may have
    # changed, and their mappings may have changed too
    registered: int = 0  # pages newly registered by this look (tracked from the next one)
    present: np.ndarray | None = None  # (p, 2): pages present (mapped to a frame) now

    def mask(self, npages: int) -> np.ndarray:
        """Per page: written or untracked (its content may have changed)."""
        return range_mask(npages, self.written, self.untracked)


class WriteTracker:
    """Which pages of ``[base, base + npages * 4096)`` in process ``pid`` were written since
    the last :meth:`scan` (see the module docstring). Only one tracker may use a process at a
    time: two would each clear what the other has not read yet (the second one gets
    :class:`TrackerUnavailable`, as does a process started without ``wptrack``); once the first
    is closed, another may take over."""

    def __init__(self, pid: int, base: int, npages: int) -> None:
        self.pid, self.base, self.npages = pid, base, npages
        self.uffd = self.pagemap = -1
        self._lock: socket.socket | None = None
        self._vec = (ctypes.c_uint64 * (3 * _SCAN_VEC))()
        self.untracked_pages = 0  # pages in mappings that could not be registered (last scan)
        self.why_untracked = ""  # why the last registration failed
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        # one tracker per process at a time: an abstract UNIX socket name is the lock (the
        # kernel frees it when its holder closes or dies; nothing to clean up)
        start = memfd.start_time(self.pid)
        if start is None:
            raise TrackerUnavailable(f"process {self.pid} is gone")
        self._lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._lock.bind(f"\0satori-wptrack-{self.pid}-{start}")
        except OSError:
            raise TrackerUnavailable(f"another tracker uses process {self.pid} already") from None
        # pidfd_open(2) + pidfd_getfd(2): a copy of the userfaultfd wptrack left in QEMU
        pidfd = _libc.syscall(_SYS_PIDFD_OPEN, self.pid, 0)
        if pidfd < 0:
            raise TrackerUnavailable(f"pidfd_open({self.pid}): {os.strerror(ctypes.get_errno())}")
        try:
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, TRACK_FD, 0)
            err = ctypes.get_errno()
        finally:
            os.close(pidfd)
        if fd < 0:
            raise TrackerUnavailable(f"process {self.pid} has no write tracker at fd {TRACK_FD} "
                                     f"(started without wptrack?): {os.strerror(err)}")
        self.uffd = int(fd)
        if os.readlink(f"/proc/self/fd/{self.uffd}") != "anon_inode:[userfaultfd]":
            raise TrackerUnavailable(f"fd {TRACK_FD} of process {self.pid} is not a userfaultfd")
        features = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED | _UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        api = (ctypes.c_uint64 * 3)(_UFFD_API, features, 0)
        if _libc.ioctl(self.uffd, _UFFDIO_API, ctypes.addressof(api)) != 0:
            err = ctypes.get_errno()
            # EINVAL: enabled already, by an earlier tracker (gone: we hold the lock); its
            # registrations and protections carry on
            if err != errno.EINVAL:
                raise TrackerUnavailable(f"asynchronous write-protect on process {self.pid}: {os.strerror(err)}")
        self.pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)

    def _scan(self, flags: int, inverted: int, mask: int, anyof: int, ret: int,
              categories: bool = False, pages: tuple[int, int] | None = None) -> np.ndarray:
        """PAGEMAP_SCAN over the whole range (or page range ``pages``) -> ``(m, 2)`` page ranges
        of the matching pages (touching ranges joined), or with ``categories`` ``(m, 3)``
        regions as the kernel gives them: start, end, category bits."""
        a, b = pages if pages is not None else (0, self.npages)
        return _pagemap_scan(self.pagemap, self.base, a, b, (flags, inverted, mask, anyof, ret), self._vec,
                             f"process {self.pid}", categories)

    def scan(self) -> ScanResult:
        """Present pages written since the last scan (write-protected again, atomically with
        reading), the pages present now, and the ranges no write-protect covers (registered
        now: tracked from the next scan)."""
        # Two walks, not one: a single PM_SCAN_WP_MATCHING walk selecting present OR written pages
        # (category_anyof_mask) would halve the cost (measured: 1.9 vs 3.3 ms per 512 MB VM) but
        # write-protects non-present entries too, and on 6.18.44 it corrupted guest data while a
        # merge agent merged (test_oracle_vms: guest binaries failed to load, twice; not
        # understood). Only present pages are ever write-protected here
        written = self._scan(_PM_SCAN_WP_MATCHING, 0, PAGE_IS_PRESENT, PAGE_IS_WRITTEN,
                             PAGE_IS_WRITTEN | PAGE_IS_PRESENT)
        regions = self._scan(0, 0, 0, 0, PAGE_IS_PRESENT | PAGE_IS_WPALLOWED, categories=True)
        untracked = _join(regions[(regions[:, 2] & PAGE_IS_WPALLOWED) == 0, :2])
        present = _join(regions[(regions[:, 2] & PAGE_IS_PRESENT) != 0, :2])
        registered = failed = splits = 0
        todo = untracked.tolist()[::-1]
        while todo:
            a, b = todo.pop()
            reg = (ctypes.c_uint64 * 4)(self.base + a * PAGE, (b - a) * PAGE, _UFFDIO_REGISTER_MODE_WP, 0)
            # UFFDIO_REGISTER: acts on QEMU's address space (the userfaultfd's), not ours
            if _libc.ioctl(self.uffd, _UFFDIO_REGISTER, ctypes.addressof(reg)) == 0:
                registered += b - a
                # protect what was just registered (only that: a protect pass anywhere else
                # would clear "written" bits nobody read): the caller reads these pages after
                # this scan (they are untracked), so a write from now on shows at the next one
                self._scan(_PM_SCAN_WP_MATCHING, 0, PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PAGE_IS_WRITTEN,
                           pages=(a, b))
                continue
            # EBUSY: another userfaultfd holds part of it (a merge agent holds the <= 64 pages it
            # is merging, for microseconds: the range's other pages are registered half by half,
            # ~2 x 17 calls per chunk held, and only the pages held stay untracked until the next
            # scan; a holder of much more is not chased further); EINVAL: it changed meanwhile
            err = ctypes.get_errno()
            if err == errno.EBUSY and b - a > 1 and splits < 256:
                splits += 1
                m = (a + b) // 2
                todo += [(m, b), (a, m)]
                continue
            failed += b - a
            self.why_untracked = ("another userfaultfd holds these mappings (a merge agent's?)"
                                  if err == errno.EBUSY else f"UFFDIO_REGISTER: {os.strerror(err)}")
        self.untracked_pages = failed
        return ScanResult(written, untracked, registered, present)

    def close(self) -> None:
        """Unregister what this tracker registered (best effort: the process may be gone)."""
        if self.uffd >= 0 and self.pagemap >= 0:
            with contextlib.suppress(HarnessError, OSError):
                for a, b in self._scan(0, 0, PAGE_IS_WPALLOWED, 0, PAGE_IS_WPALLOWED).tolist():
                    rng = (ctypes.c_uint64 * 2)(self.base + a * PAGE, (b - a) * PAGE)
                    _libc.ioctl(self.uffd, _UFFDIO_UNREGISTER, ctypes.addressof(rng))
        for fd in (self.uffd, self.pagemap):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.uffd = self.pagemap = -1
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> WriteTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sigbus_uffd(what: str) -> int:
    """A userfaultfd for our own address space in SIGBUS mode: a missing fault in a range
    registered with it fails (SIGBUS in user space, EFAULT in a system call); none is queued."""
    nr = _SYS_USERFAULTFD.get(os.uname().machine)
    if nr is None:
        raise TrackerUnavailable(f"no userfaultfd system call number for {os.uname().machine}")
    # userfaultfd(2): a context for our own address space (only for its SIGBUS mode)
    uffd = _libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        raise TrackerUnavailable(f"userfaultfd for {what}: {os.strerror(ctypes.get_errno())}")
    api = (ctypes.c_uint64 * 3)(_UFFD_API, _UFFD_FEATURE_SIGBUS | _UFFD_FEATURE_WP_HUGETLBFS_SHMEM, 0)
    # UFFDIO_API: missing faults in registered ranges fail (SIGBUS/EFAULT), none is queued
    if _libc.ioctl(int(uffd), _UFFDIO_API, ctypes.addressof(api)) != 0:
        err = ctypes.get_errno()
        os.close(int(uffd))
        raise TrackerUnavailable(f"userfaultfd SIGBUS mode for {what}: {os.strerror(err)}")
    return int(uffd)


def _map_sigbus(fd: int, uffd: int, npages: int, modes: int, what: str) -> int:
    """A read-only shared mapping of ``npages`` of file ``fd`` (beyond its end is allowed),
    registered with ``uffd`` (:func:`_sigbus_uffd`) in ``modes``: touching a hole of it fails
    instead of allocating a page in the file. Returns its address."""
    length = npages * PAGE
    # mmap(2): read-only, shared (punches unmap it), no swap reserved
    addr = _libc.mmap(None, length, _PROT_READ, _MAP_SHARED | _MAP_NORESERVE, fd, 0)
    if addr in (None, _MAP_FAILED):
        raise TrackerUnavailable(f"cannot map {what}: {os.strerror(ctypes.get_errno())}")
    reg = (ctypes.c_uint64 * 4)(addr, length, modes, 0)
    # UFFDIO_REGISTER: a fault on a hole of this mapping fails rather than allocate a page
    if _libc.ioctl(uffd, _UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
        err = ctypes.get_errno()
        _libc.munmap(addr, length)  # munmap(2): the mapping just made
        raise TrackerUnavailable(f"userfaultfd on {what}: {os.strerror(err)}")
    return int(addr)


class StoreWatch:
    """Which pages of a shared-memory file (the content store) left it since the oracle read
    them: the kernel's word, not its writer's.

    The engine frees a store slot by punching its page out of the file and may reuse the slot
    for another content at once, so one slot can hold two contents between two samples with
    the page resident at both. A punch (``fallocate(PUNCH_HOLE)``, also truncation and swap-out)
    unmaps the page from every process that maps it. So the watch keeps its own read-only
    shared mapping of the file with a page table entry for every page the oracle has read
    (:meth:`hold`, before it reads them); a page whose entry is gone at the next look
    (:meth:`present`: ``PAGEMAP_SCAN`` of our own page tables) was removed from the file since,
    and what the file holds there now is another page, to be read again. Nothing is read
    through the mapping, and no page is ever allocated in the file: the mapping is registered
    with a userfaultfd in missing mode with ``UFFD_FEATURE_SIGBUS``, so making the entry of a
    page that is a hole by then (punched after ``mincore`` said it was there) fails with
    ``EFAULT`` instead of filling the hole. A page rewritten in place (``pwrite`` over a page
    still in the file) keeps its entry: the engine never does that, and the re-check counts it.
    """

    def __init__(self, path: str | os.PathLike, reserve_pages: int, what: str = "the content store") -> None:
        """``path``: the file (or ``/proc/<pid>/fd/<n>``), opened read-write though never written
        through (the kernel lets a userfaultfd watch only a mapping that may become writable);
        ``reserve_pages``: how long to map it at first (it is remapped longer if it grows past)."""
        self.what = what
        self.fd = self.uffd = self.pagemap = -1
        self.addr, self.npages = 0, 0
        self._vec = (ctypes.c_uint64 * (3 * _SCAN_VEC))()
        try:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise TrackerUnavailable(f"cannot open {what}: {e.strerror}") from None
            self.uffd = _sigbus_uffd(what)
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._map(max(reserve_pages, 1))
        except BaseException:
            self.close()
            raise

    def _map(self, npages: int) -> None:
        """(Re)make the mapping, ``npages`` long (beyond the file's end is allowed; nothing there
        is touched). A new mapping holds no page: every page is read again once."""
        # write-protect mode (never used: the mapping is read-only) turns off fault-around, so
        # that an entry is made only for a page held on purpose, just before it is read
        addr = _map_sigbus(self.fd, self.uffd, npages, _UFFDIO_REGISTER_MODE_MISSING | _UFFDIO_REGISTER_MODE_WP,
                           self.what)
        self._unmap()
        self.addr, self.npages = addr, npages

    def _unmap(self) -> None:
        if self.addr:
            # munmap(2): our mapping of the file (its registration goes with it)
            _libc.munmap(self.addr, self.npages * PAGE)
            self.addr, self.npages = 0, 0

    def present(self, npages: int) -> np.ndarray:
        """Per page of the file's first ``npages``: still mapped since :meth:`hold` (False: never
        held, or removed from the file since). A file grown past the mapping gets a new one,
        twice as long: nothing is held then."""
        if npages > self.npages:
            self._map(max(npages, 2 * self.npages))
            return np.zeros(npages, bool)
        r = _pagemap_scan(self.pagemap, self.addr, 0, npages, (0, 0, PAGE_IS_PRESENT, 0, PAGE_IS_PRESENT),
                          self._vec, f"our mapping of {self.what}")
        return range_mask(npages, r)

    def hold(self, idx: np.ndarray) -> np.ndarray:
        """Make the page table entries of pages ``idx`` (sorted, unique, below the last
        :meth:`present`'s ``npages``) before reading them; per page: False where it is a hole
        now (then nothing was allocated, and there is nothing to read)."""
        idx = np.asarray(idx, np.int64)
        ok = np.ones(len(idx), bool)
        pos = 0
        for s, n in zip(*(a.tolist() for a in runs(idx)), strict=True):
            if self._populate(s, n) != 0:
                for k in range(n):
                    ok[pos + k] = self._populate(s + k, 1) == 0
            pos += n
        return ok

    def _populate(self, first: int, n: int) -> int:
        while True:
            # madvise(MADV_POPULATE_READ): map pages first..first+n of the file without reading them
            if _libc.madvise(self.addr + first * PAGE, n * PAGE, _MADV_POPULATE_READ) == 0:
                return 0
            err = ctypes.get_errno()
            if err == errno.EFAULT:  # a hole (the userfaultfd refused to fill it), or past the end
                return err
            if err not in (errno.EINTR, errno.EAGAIN):
                raise HarnessError(f"cannot map pages of {self.what}: {os.strerror(err)}")

    def close(self) -> None:
        self._unmap()
        for fd in (self.fd, self.uffd, self.pagemap):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.uffd = self.pagemap = -1


class RamMirror:
    """The oracle's own read-only view of a guest's RAM file, to read the pages the guest wrote
    without a system call per run of pages: a ``pread`` costs 1-3 us per call on a host like
    this one (nested virtualization, caches cold after the guest's write); here each page is
    hashed in place, in C (``pageread.c``, XXH3-128 from ``libxxhash-dev``), no copy.

    Safe by the same means as :class:`StoreWatch`: the mapping is registered with a userfaultfd
    in missing mode with ``UFFD_FEATURE_SIGBUS``, so touching a page that is a hole (punched out
    of the file by a merge agent or a balloon after the pagemap said present) raises SIGBUS
    instead of allocating a page in the guest's file. ``pageread.c`` catches that SIGBUS (its
    handler passes every other SIGBUS to the one the process had) and hashes the page as zeros,
    which is what ``pread`` of a hole reads.
    The page-table entries a read makes are dropped after each batch (``MADV_DONTNEED``): kept,
    they make every merge agent's punch of those pages unmap them from this process too.
    Nothing is ever written through it.
    """

    def __init__(self, path: memfd.ProcFile | str | os.PathLike, npages: int, what: str = "guest RAM") -> None:
        """``path``: the RAM file (opened read-write though never written through: the kernel
        lets a userfaultfd watch only a mapping that may become writable); ``npages``: its size."""
        self.what = what
        self.fd = self.uffd = -1
        self.addr, self.npages = 0, npages
        self.holes = 0  # cumulative: pages found punched between the caller's look and the read
        try:
            try:
                self.fd = memfd.open_file(path, os.O_RDWR)
            except HarnessError as e:
                raise TrackerUnavailable(f"cannot open {what}: {e}") from None
            self.uffd = _sigbus_uffd(what)
            self.addr = _map_sigbus(self.fd, self.uffd, npages, _UFFDIO_REGISTER_MODE_MISSING, what)
        except BaseException:
            self.close()
            raise

    def hash_pages(self, idx: np.ndarray) -> np.ndarray:
        """Hash pages ``idx`` (sorted, unique, below ``npages``) -> ``(len(idx), 2)``; a hole
        hashes as zeros."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx[0] < 0 or idx[-1] >= self.npages):
            raise HarnessError(f"page {int(idx[-1])} is outside {self.what} ({self.npages} pages)")
        out = np.empty((len(idx), 2), dtype=np.uint64)
        hole = np.empty(len(idx), np.uint8)
        pages = np.ascontiguousarray(idx.astype(np.uint64))
        # in C, the GIL released (ctypes): hashed where the page is, no copy
        got = _reader().satori_hash_mapped(self.addr, pages, len(pages), out.reshape(-1), hole)
        if got < 0:
            raise HarnessError(f"reading {self.what}: cannot catch SIGBUS: {os.strerror(ctypes.get_errno())}")
        self.holes += got
        if len(idx):
            # madvise(2) MADV_DONTNEED: drop our page-table entries of what was just read (the
            # file keeps the pages). Kept, a merge agent's punch of those pages must unmap them
            # from this process too, which nearly doubles its cost (measured): the oracle would
            # be charging its own presence to the engine it measures.
            first, last = int(idx[0]), int(idx[-1])
            _libc.madvise(self.addr + first * PAGE, (last - first + 1) * PAGE, _MADV_DONTNEED)
        return out

    def close(self) -> None:
        if self.addr:
            # munmap(2): our view of the file (its registration goes with it)
            _libc.munmap(self.addr, self.npages * PAGE)
            self.addr = 0
        for fd in (self.fd, self.uffd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.uffd = -1

    def __enter__(self) -> RamMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
