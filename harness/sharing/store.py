"""The content store: one memfd holding one copy of each shared page.

It has no name anyone could open (``harness.memfd``): the engine holds it; merge agents and the
accounting open it as ``/proc/<engine pid>/fd/<n>`` (:attr:`ContentStore.ref`, checked), and
QEMUs keep the pages they map after the engine is gone. Nothing is left behind by a kill.

The engine's native core (``core.c``) writes the pages: it places each in the order its second
holder appears, so pages that guests read in sequence sit in sequence in the store and the merge
agent maps them with one ``mmap`` per run, and it pwrites the store's fd itself. The file only
grows while mapped (a shrinking file would SIGBUS the QEMUs that map it); a slot nobody maps any
more is *punched* (its memory freed, the file size kept) and the core may *reuse* it for new
content later, which keeps the store's size bounded against a guest that churns pages (the
oracle sees a reuse through its own watch mapping: ``harness.oracle.StoreWatch``).

This class owns the memfd, its checked reference and the punch; its own append/``sync`` path
(one ``pwritev`` per run of slots) serves tests that need a store without an engine; the engine
does not use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

from harness import memfd
from harness.errors import HarnessError
from harness.memfd import ProcFile

PAGE = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset+length)`` of a file (tmpfs supports it), keeping its size."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class StoreFull(HarnessError):
    """The host is out of memory for the store: slots ``first`` .. ``end - 1`` were not
    written (the pages are simply not merged)."""

    def __init__(self, first: int, end: int, why: str) -> None:
        super().__init__(f"content store: out of memory ({why}): {end - first} pages not stored, "
                         "not merged")
        self.first = first
        self.end = end


class ContentStore:
    """Append-only page store in a memfd named ``name`` (``satori-...``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = memfd.create(name, 0)
        self.ref = ProcFile.of(os.getpid(), self.fd, name)  # how agents and readers reach it
        self.slots = 0  # slots ever appended
        self.live = 0  # slots not punched
        self.punched = 0
        self._unwritten: list = []  # pages of the last len(_unwritten) slots, not written yet

    def append(self, page) -> int:
        """Add one page (any 4096-byte buffer) at the end; return its slot number. The bytes
        reach the file at the next :meth:`sync`; the buffer must not change until then."""
        if memoryview(page).nbytes != PAGE:
            raise ValueError("a store page is 4096 bytes")
        slot = self.slots
        self._unwritten.append(page)
        self.slots += 1
        self.live += 1
        return slot

    def sync(self) -> None:
        """Write every appended page to the file (one pwritev per 1024 pages).

        Out of memory (ENOSPC/ENOMEM) raises :class:`StoreFull` naming the first slot not
        written; that slot and every later unwritten one are lost (never mapped by anyone:
        the engine drops the merges planned on them), the slots written before are fine."""
        pages, self._unwritten = self._unwritten, []
        first = self.slots - len(pages)
        for k in range(0, len(pages), 1024):
            chunk = pages[k:k + 1024]
            off, want = (first + k) * PAGE, len(chunk) * PAGE
            done = 0
            try:
                done = os.pwritev(self.fd, chunk, off)
                if done != want:  # short write: finish it, or learn why not
                    raw = b"".join(bytes(p) for p in chunk)
                    while done < want:
                        n = os.pwrite(self.fd, raw[done:], off + done)
                        if n <= 0:
                            raise OSError(errno.ENOSPC, "short write")
                        done += n
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                lost = first + k + done // PAGE
                with contextlib.suppress(OSError):  # a torn page is no page: free it
                    punch_hole(self.fd, lost * PAGE, PAGE)
                self.live -= self.slots - lost
                raise StoreFull(lost, self.slots, e.strerror or str(e)) from None

    def read(self, slot: int) -> bytes:
        self.sync()
        return os.pread(self.fd, PAGE, slot * PAGE)

    def free(self, slot: int) -> None:
        """Free a slot's memory (no VM maps it any more); this class never reuses the slot (the core may)."""
        self.sync()
        punch_hole(self.fd, slot * PAGE, PAGE)
        self.live -= 1
        self.punched += 1

    def close(self) -> None:
        """Close the store. QEMUs that map its pages keep them: the memory lives until unmapped."""
        if self.fd >= 0:
            self._unwritten = []
            os.close(self.fd)
            self.fd = -1
