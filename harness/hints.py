"""Host side of the Satori hint ring (format: ``docs/hint-ring.md``).

The guest's ``satori_ring`` module (``guest_patches/satori_ring``) publishes one 32-byte record
per full 4 KiB page of every completed virtio-blk READ into the BAR2 of an ``ivshmem-plain``
device.  On the host that BAR is a memfd (no name: ``harness.memfd``) which this module maps.

- :func:`create_ring_memfd` makes it with an initialised header; the VM owner calls it before
  QEMU starts (the guest refuses a ring whose header it does not recognise) and hands the fd to
  QEMU. Other processes reach it as a :class:`harness.memfd.ProcFile` (``/proc/<qemu>/fd/<n>``).
- :class:`HintRing` is the reader: :meth:`HintRing.poll` takes every record published since the
  last call in one numpy batch, validates them, advances the consumer position and returns the
  valid ones as a structured array of :data:`RECORD_DTYPE`.
- ``HintRing(path, ram_size, readonly=True)`` is a passive observer (``satori hints NAME``):
  it never consumes, and reads the counters the consuming reader mirrors into the header.

Everything the guest can write is untrusted: the header's capacity is read once at open and
clamped to what the file can hold (or the caller passes the capacity it created the ring with);
the producer position is bounded before use; each record's sequence word, flags and address are
checked.  A guest writing random bytes anywhere in the file can cause rejected records and
resynchronisations, never an exception, an out-of-map read or an unbounded loop.

Memory ordering: the guest writes a record, ``smp_wmb()``, then the producer position.  The
reader loads the producer position before the records; x86-64 never reorders loads with loads,
so no fence is needed on an x86 host (the only host the harness supports).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import HarnessError
from .memfd import ProcFile, fd_errno_message, open_file
from .memfd import create as memfd_create

MAGIC = int.from_bytes(b"SATORIHR", "little")
VERSION = 1
HEADER_SIZE = 4096
RECORD_SIZE = 32
PAGE_SIZE = 4096
FLAG_VALID = 0x0001
DEFAULT_RING_SIZE = 1 << 20  # 1 MiB: 32,640 records

# Header field offsets (bytes).  Guest-written fields are marked (g), host-written (h).
OFF_MAGIC = 0  # u64 (h)
OFF_VERSION = 8  # u32 (h)
OFF_HEADER_SIZE = 12  # u32 (h)
OFF_RECORD_SIZE = 16  # u32 (h)
OFF_CAPACITY = 20  # u32 (h) records
OFF_RING_BYTES = 24  # u64 (h) header_size + capacity * record_size
OFF_PRODUCER = 64  # u64 (g) records ever published
OFF_DROPPED = 72  # u64 (g) records dropped, ring full
OFF_PARTIAL = 80  # u64 (g) read segments not reported (partial/unaligned)
OFF_GUEST_STATE = 88  # u32 (g) 0 none, 1 attached, 2 rejected the header
OFF_GUEST_VERSION = 92  # u32 (g)
OFF_CONSUMER = 128  # u64 (h) records consumed
OFF_HOST_RECORDS = 136  # u64 (h) valid records taken (mirror, for observers)
OFF_HOST_REJECTED = 144  # u64 (h) records rejected by validation
OFF_HOST_RESYNCS = 152  # u64 (h) producer positions that made no sense

GUEST_STATE_NONE = 0
GUEST_STATE_ATTACHED = 1
GUEST_STATE_REJECTED = 2

RECORD_DTYPE = np.dtype(
    [
        ("gpa", "<u8"),
        ("hash", "<u8"),
        ("sector", "<u8"),
        ("disk", "<u2"),
        ("flags", "<u2"),
        ("seq", "<u4"),
    ]
)
assert RECORD_DTYPE.itemsize == RECORD_SIZE

_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class HintRecord:
    """One hint: the guest page at ``gpa`` holds content whose xxh64 (seed 0) is ``hash``;
    it was read from ``sector`` (512-byte units) of the guest's disk number ``disk``."""

    gpa: int
    hash: int
    sector: int
    disk: int
    seq: int


@dataclass(frozen=True, slots=True)
class HintStats:
    """Counters of one ring.  ``records`` and ``rejected`` are the host reader's; ``dropped`` and
    ``partial`` are the guest's own word (from the header, so only informative)."""

    records: int
    dropped: int
    rejected: int
    partial: int
    resyncs: int
    producer: int
    consumer: int
    capacity: int
    guest_state: int


def max_capacity(size: int) -> int:
    """How many records a ring file of ``size`` bytes holds."""
    return max(0, (size - HEADER_SIZE) // RECORD_SIZE)


def create_ring_file(path: Path, size: int = DEFAULT_RING_SIZE, capacity: int | None = None) -> int:
    """Create a ring file ``path`` (tests and tools: a VM's ring is a memfd, see
    :func:`create_ring_memfd`) of ``size`` bytes with an initialised header; it must not exist
    (``O_EXCL|O_NOFOLLOW``: nothing planted there is followed or reused). Returns the capacity."""
    try:
        fd = os.open(Path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise HarnessError(f"cannot create hint ring {path}: {e.strerror}") from None
    try:
        return init_ring(fd, size, capacity)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def create_ring_memfd(name: str, size: int = DEFAULT_RING_SIZE, capacity: int | None = None) -> tuple[int, int]:
    """A new hint ring as a memfd (no name anyone could open; see ``harness.memfd``) of ``size``
    bytes with an initialised header. Returns (fd, capacity); the caller owns the fd."""
    _check_ring_size(size)
    fd = memfd_create(name, size)
    try:
        return fd, init_ring(fd, size, capacity)
    except BaseException:
        os.close(fd)
        raise


def _check_ring_size(size: int) -> None:
    if size < 2 * HEADER_SIZE or size & (size - 1):
        raise HarnessError(f"hint ring size must be a power of two >= 8192, not {size}")


def init_ring(fd: int, size: int, capacity: int | None = None) -> int:
    """Size the ring file ``fd`` to ``size`` bytes and write its header.

    ``size`` must be a power of two (it becomes a PCI BAR) of at least 8 KiB; ``capacity``
    defaults to all the room the file has and may be set lower (tiny rings for tests).
    Returns the capacity in records.
    """
    _check_ring_size(size)
    cap_max = max_capacity(size)
    if capacity is None:
        capacity = cap_max
    if not 1 <= capacity <= min(cap_max, 0xFFFFFFFF):
        raise HarnessError(f"hint ring capacity {capacity} does not fit 1..{cap_max}")
    header = bytearray(HEADER_SIZE)
    header[OFF_MAGIC : OFF_MAGIC + 8] = MAGIC.to_bytes(8, "little")
    header[OFF_VERSION : OFF_VERSION + 4] = VERSION.to_bytes(4, "little")
    header[OFF_HEADER_SIZE : OFF_HEADER_SIZE + 4] = HEADER_SIZE.to_bytes(4, "little")
    header[OFF_RECORD_SIZE : OFF_RECORD_SIZE + 4] = RECORD_SIZE.to_bytes(4, "little")
    header[OFF_CAPACITY : OFF_CAPACITY + 4] = capacity.to_bytes(4, "little")
    ring_bytes = HEADER_SIZE + capacity * RECORD_SIZE
    header[OFF_RING_BYTES : OFF_RING_BYTES + 8] = ring_bytes.to_bytes(8, "little")
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, bytes(header), 0)
    except OSError as e:
        raise fd_errno_message(e, "cannot write the hint ring") from None
    return capacity


class HintRing:
    """Reader of one VM's hint ring file.

    ``ram_size`` is the size of the guest RAM (guest-physical address == RAM file offset);
    records outside ``[0, ram_size)`` are rejected.  ``capacity`` is the one the ring was created
    with; when omitted it is read from the header once, now, and clamped to the file.
    ``readonly=True`` opens a passive observer that can only :meth:`stats`.
    """

    def __init__(
        self,
        path: Path | ProcFile,
        ram_size: int,
        capacity: int | None = None,
        *,
        readonly: bool = False,
    ) -> None:
        self.path = path if isinstance(path, ProcFile) else Path(path)
        self.ram_size = int(ram_size)
        self.readonly = readonly
        fd = open_file(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE + RECORD_SIZE:
                raise HarnessError(f"hint ring {self.path} is too small ({size} bytes)")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            self._mm: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.size = size
        cap_max = max_capacity(size)
        self._hdr = np.frombuffer(self._mm, dtype="<u8", count=HEADER_SIZE // 8)
        self._hdr32 = np.frombuffer(self._mm, dtype="<u4", count=HEADER_SIZE // 4)
        if capacity is None:
            capacity = int(self._hdr32[OFF_CAPACITY // 4])
            if not 1 <= capacity <= cap_max:
                capacity = cap_max
        elif not 1 <= capacity <= cap_max:
            self.close()
            raise HarnessError(f"hint ring capacity {capacity} does not fit 1..{cap_max}")
        self.capacity = int(capacity)
        self._recs = np.frombuffer(
            self._mm, dtype=RECORD_DTYPE, count=self.capacity, offset=HEADER_SIZE
        )
        # Reader state.  Restarting a reader on a live ring continues where the last one was.
        self._consumer = self._h64(OFF_CONSUMER)
        self._records = self._h64(OFF_HOST_RECORDS)
        self._rejected = self._h64(OFF_HOST_REJECTED)
        self._resyncs = self._h64(OFF_HOST_RESYNCS)

    # -- header access ---------------------------------------------------------------------

    def _h64(self, off: int) -> int:
        return int(self._hdr[off // 8])

    def _h32(self, off: int) -> int:
        return int(self._hdr32[off // 4])

    def _set64(self, off: int, value: int) -> None:
        self._hdr[off // 8] = value % _U64

    def header_ok(self) -> bool:
        """Whether the host-written identification fields are still what the host wrote."""
        return (
            self._h64(OFF_MAGIC) == MAGIC
            and self._h32(OFF_VERSION) == VERSION
            and self._h32(OFF_HEADER_SIZE) == HEADER_SIZE
            and self._h32(OFF_RECORD_SIZE) == RECORD_SIZE
        )

    def guest_state(self) -> int:
        """0: no guest attached yet, 1: attached, 2: the guest rejected the header."""
        return self._h32(OFF_GUEST_STATE)

    # -- reading ---------------------------------------------------------------------------

    def pending(self) -> int:
        """Records published and not yet consumed (bounded by the capacity; 0 if nonsense)."""
        avail = (self._h64(OFF_PRODUCER) - self._consumer) % _U64
        return avail if avail <= self.capacity else 0

    def poll(self, max_records: int | None = None) -> np.ndarray:
        """Take the records published since the last call (at most one ring's worth, or
        ``max_records``), advance the consumer position and return the valid ones as a
        structured array of :data:`RECORD_DTYPE` (a copy; the ring slots are free again)."""
        if self.readonly or self._mm is None:
            raise HarnessError("this hint ring reader is read-only or closed")
        producer = self._h64(OFF_PRODUCER)
        cons = self._consumer
        avail = (producer - cons) % _U64
        if avail == 0:
            return np.empty(0, dtype=RECORD_DTYPE)
        if avail > self.capacity:
            # Behind the consumer, or further ahead than a correct guest can be: the producer
            # position is garbage.  Skip to it; nothing in between can be trusted.
            self._resyncs += 1
            self._consumer = producer
            self._publish()
            return np.empty(0, dtype=RECORD_DTYPE)
        n = avail
        if max_records is not None:
            n = max(0, min(n, int(max_records)))
            if n == 0:
                return np.empty(0, dtype=RECORD_DTYPE)
        cap = self.capacity
        start = cons % cap
        first = min(n, cap - start)
        if first == n:
            batch = self._recs[start : start + n].copy()
        else:
            batch = np.concatenate((self._recs[start:cap], self._recs[: n - first]))
        expect_seq = ((cons + np.arange(n, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)).astype(
            np.uint32
        )
        gpa = batch["gpa"]
        ok = (
            (batch["seq"] == expect_seq)
            & (batch["flags"] == FLAG_VALID)
            & ((gpa & np.uint64(PAGE_SIZE - 1)) == 0)
            & (gpa < np.uint64(max(0, self.ram_size - PAGE_SIZE + 1)))
        )
        good = batch[ok]
        self._records += len(good)
        self._rejected += n - len(good)
        self._consumer = (cons + n) % _U64
        self._publish()
        return good

    def _publish(self) -> None:
        self._set64(OFF_CONSUMER, self._consumer)
        self._set64(OFF_HOST_RECORDS, self._records)
        self._set64(OFF_HOST_REJECTED, self._rejected)
        self._set64(OFF_HOST_RESYNCS, self._resyncs)

    # -- counters --------------------------------------------------------------------------

    def snapshot(self) -> HintStats:
        if self._mm is None:
            raise HarnessError("hint ring reader is closed")
        if self.readonly:  # an observer reports what the consuming reader mirrored
            records, rejected, resyncs = (
                self._h64(OFF_HOST_RECORDS),
                self._h64(OFF_HOST_REJECTED),
                self._h64(OFF_HOST_RESYNCS),
            )
            consumer = self._h64(OFF_CONSUMER)
        else:
            records, rejected, resyncs = self._records, self._rejected, self._resyncs
            consumer = self._consumer
        return HintStats(
            records=records,
            dropped=self._h64(OFF_DROPPED),
            rejected=rejected,
            partial=self._h64(OFF_PARTIAL),
            resyncs=resyncs,
            producer=self._h64(OFF_PRODUCER),
            consumer=consumer,
            capacity=self.capacity,
            guest_state=self._h32(OFF_GUEST_STATE),
        )

    def stats(self) -> dict[str, int]:
        """``records``, ``dropped``, ``rejected``, ``partial`` (and a few more), as a dict."""
        return asdict(self.snapshot())

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        if self._mm is None:
            return
        self._hdr = self._hdr32 = self._recs = None  # type: ignore[assignment]
        mm, self._mm = self._mm, None
        mm.close()

    def __enter__(self) -> HintRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_records(batch: np.ndarray) -> list[HintRecord]:
    """Structured array of :data:`RECORD_DTYPE` -> list of :class:`HintRecord`."""
    return [
        HintRecord(int(g), int(h), int(s), int(d), int(q))
        for g, h, s, d, q in zip(
            batch["gpa"].tolist(),
            batch["hash"].tolist(),
            batch["sector"].tolist(),
            batch["disk"].tolist(),
            batch["seq"].tolist(),
            strict=True,
        )
    ]
