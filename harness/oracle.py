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
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from harness.errors import HarnessError
from harness.paths import cache_dir

PAGE = 4096
CHUNK_PAGES = 8192  # 32 MiB read buffer


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


_buf: np.ndarray | None = None


def _buffer() -> np.ndarray:
    """One read buffer for the process, kept: faulting in 32 MiB anew on every call costs."""
    global _buf
    if _buf is None:
        _buf = np.empty(CHUNK_PAGES * PAGE, dtype=np.uint8)
        _buf[::PAGE] = 0
    return _buf


def _chunks(idx: np.ndarray):
    """Split sorted page indices into chunks of <= CHUNK_PAGES pages: (slice, run starts, lengths)."""
    for c in range(0, len(idx), CHUNK_PAGES):
        part = idx[c : c + CHUNK_PAGES]
        yield c, len(part), *runs(part)


def hash_fd_pages(fd: int, base: int, idx: np.ndarray, what: str = "memory") -> np.ndarray:
    """Hash pages ``idx`` (sorted, unique page indices) at byte ``base + idx * 4096`` of ``fd``.

    Consecutive pages are read in one ``preadv`` (up to 32 MiB at a time). Returns ``(len(idx), 2)``.
    """
    idx = np.asarray(idx, dtype=np.int64)
    out = np.empty((len(idx), 2), dtype=np.uint64)
    buf = _buffer()
    for pos, n, starts, lengths in _chunks(idx):
        view = memoryview(buf)
        at = 0
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            off, want = base + start * PAGE, length * PAGE
            got = 0
            while got < want:
                try:
                    r = os.preadv(fd, [view[at + got : at + want]], off + got)
                except OSError as e:
                    raise HarnessError(f"reading {what} at {off + got:#x}: {e}") from None
                if r <= 0:
                    raise HarnessError(f"reading {what} at {off + got:#x}: short read")
                got += r
            at += want
        out[pos : pos + n] = hash_pages(buf[: n * PAGE])
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


def image_disk_set(image) -> np.ndarray:
    """The disk block set of a :class:`harness.image.Image` (its base ``rootfs.raw``)."""
    return disk_block_set(image.rootfs, image.recipe_hash)
