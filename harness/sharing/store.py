"""The content store: one /dev/shm file holding one copy of each shared page.

Pages are appended in the order their second holder appears, so pages that guests read in
sequence sit in sequence in the store and the merge agent maps them with one ``mmap`` per run.
The file only grows while mapped (a shrinking file would SIGBUS the QEMUs that map it); a slot
nobody maps any more is *punched* (its memory freed, the file size kept) and never reused, so
the file is sparse and costs memory only for live slots.
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

    def append(self, page: bytes) -> int:
        """Write one page at the end; return its slot number."""
        assert len(page) == PAGE
        slot = self.slots
        os.pwrite(self.fd, page, slot * PAGE)
        self.slots += 1
        self.live += 1
        return slot

    def read(self, slot: int) -> bytes:
        return os.pread(self.fd, PAGE, slot * PAGE)

    def free(self, slot: int) -> None:
        """Free a slot's memory (no VM maps it any more); the slot is not reused."""
        punch_hole(self.fd, slot * PAGE, PAGE)
        self.live -= 1
        self.punched += 1

    def resident_pages(self) -> int:
        return os.fstat(self.fd).st_blocks * 512 // PAGE

    def close(self, unlink: bool = True) -> None:
        """Close the store. Unlinking is safe while QEMUs map it: the pages live until unmapped."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if unlink:
            self.path.unlink(missing_ok=True)
