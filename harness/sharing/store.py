"""The content store: one /dev/shm file holding one copy of each shared page.

Pages are appended in the order their second holder appears, so pages that guests read in
sequence sit in sequence in the store and the merge agent maps them with one ``mmap`` per run.
The file only grows while mapped (a shrinking file would SIGBUS the QEMUs that map it); a slot
nobody maps any more is *punched* (its memory freed, the file size kept) and never reused, so
the file is sparse and costs memory only for live slots.

Appended pages are written in one ``pwritev`` per run of slots by :meth:`ContentStore.sync`,
which the engine calls before it asks an agent to map any of them (reads and frees sync too).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

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


class ContentStore:
    """Append-only page store in a /dev/shm file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # O_EXCL: two engines must never share (and so corrupt) one store file
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
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
        """Write every appended page to the file (one pwritev per 1024 pages)."""
        pages, self._unwritten = self._unwritten, []
        first = self.slots - len(pages)
        for k in range(0, len(pages), 1024):
            chunk = pages[k:k + 1024]
            off, want = (first + k) * PAGE, len(chunk) * PAGE
            done = os.pwritev(self.fd, chunk, off)
            if done != want:  # short write (tmpfs full?): finish it page by page, or raise
                raw = b"".join(bytes(p) for p in chunk)
                while done < want:
                    done += os.pwrite(self.fd, raw[done:], off + done)

    def read(self, slot: int) -> bytes:
        self.sync()
        return os.pread(self.fd, PAGE, slot * PAGE)

    def free(self, slot: int) -> None:
        """Free a slot's memory (no VM maps it any more); the slot is not reused."""
        self.sync()
        punch_hole(self.fd, slot * PAGE, PAGE)
        self.live -= 1
        self.punched += 1

    def close(self, unlink: bool = True) -> None:
        """Close the store. Unlinking is safe while QEMUs map it: the pages live until unmapped."""
        if self.fd >= 0:
            self._unwritten = []
            os.close(self.fd)
            self.fd = -1
        if unlink:
            self.path.unlink(missing_ok=True)
