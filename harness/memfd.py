"""Memory with no name: the memfds that hold guest RAM, hint rings and content stores, and how
a process other than their owner reaches one.

Nothing the harness shares with QEMU has a path another user could open: :func:`create` makes a
memfd (mode 0600, close-on-exec), the owner passes it to QEMU (``Popen(pass_fds=...)``, named
``mem-path=/proc/self/fd/<n>`` on QEMU's command line) or keeps it (the engine's store). It
lives exactly as long as some process holds it or maps it: a SIGKILL leaves nothing behind.

Another process reaches it as ``/proc/<pid>/fd/<n>`` of a process that holds it (QEMU for RAM
and rings, the engine for its store). A :class:`ProcFile` names it that way, with what makes it
unambiguous: the holder's start time (a pid can be reused; a (pid, start time) pair cannot) and
the memfd's name and size. :meth:`ProcFile.open` opens the link, then checks on the open file
that it is the memfd it expects and that the holder is still the same process, so a stale
state file can never make the harness read or write another process's memory.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

_NAME_RE = re.compile(r"^satori-[A-Za-z0-9_.-]{1,200}$")


def create(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes (sparse: nothing is allocated until written), mode 0600,
    close-on-exec (``pass_fds`` hands it to one child only). Returns the fd."""
    if not _NAME_RE.match(name):
        raise HarnessError(f"memfd name {name!r}: 'satori-' and letters, digits, '.', '-', '_'")
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError as e:
        raise HarnessError(f"cannot create memory {name}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # no name to open it by anyway; /proc/<pid>/fd is the owner's only
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        raise HarnessError(f"cannot size memory {name} to {size} bytes: {e.strerror}") from None
    return fd


def fd_name(fd: int, pid: int | str = "self") -> str | None:
    """The memfd name behind ``/proc/<pid>/fd/<fd>`` (None if it is not a memfd)."""
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    m = re.fullmatch(r"/memfd:(.*) \(deleted\)", link)
    return m.group(1) if m else None


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks after boot, ``/proc/<pid>/stat`` field 22), or None
    if there is no such process. With the pid it names one process for ever."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def exe(pid: int) -> str | None:
    """The program a process runs (``/proc/<pid>/exe``), or None."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def same_process(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is still the process that had start time ``start`` (and not a zombie)."""
    if not pid or pid <= 0 or start is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[19]) == start and fields[0] not in ("Z", "X")
    except (OSError, IndexError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class ProcFile:
    """A memfd as any process of the user reaches it: ``/proc/<pid>/fd/<fd>`` of its holder.

    ``size`` is checked when given (guest RAM and rings never change size; a store grows, so its
    ref has none).
    """

    pid: int
    fd: int
    name: str
    start: int
    size: int | None = None

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"

    @classmethod
    def of(cls, pid: int, fd: int, name: str, size: int | None = None) -> ProcFile:
        """A ref to fd ``fd`` of the live process ``pid`` (its start time read now)."""
        start = start_time(pid)
        if start is None:
            raise HarnessError(f"process {pid} holding {name} is gone")
        return cls(pid=pid, fd=fd, name=name, start=start, size=size)

    def alive(self) -> bool:
        return same_process(self.pid, self.start)

    def open(self, flags: int = os.O_RDONLY) -> int:
        """Open the memfd (``O_CLOEXEC`` added) and check it is the one this ref names: the
        holder is the same process as when the ref was made, the fd a memfd of that name and
        size. Returns the new fd; raises :class:`HarnessError` otherwise."""
        what = f"{self.name} of process {self.pid}"
        if not self.alive():
            raise HarnessError(f"cannot open {what}: the process is gone")
        try:
            fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise HarnessError(f"cannot open {what} ({self.path}): {e.strerror}") from None
        try:
            got = fd_name(fd)
            if got != self.name:
                raise HarnessError(f"{self.path} is not {what} (it is {got or 'not a memfd'})")
            if self.size is not None and os.fstat(fd).st_size != self.size:
                raise HarnessError(f"{what} has {os.fstat(fd).st_size} bytes, not {self.size}")
            # checked after the open: had the pid been reused before it, the start time differs
            if not self.alive():
                raise HarnessError(f"cannot open {what}: the process is gone")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, what: str = "memory ref") -> ProcFile:
        """Parse what :meth:`as_dict` wrote (from a state file: every field checked)."""
        if not isinstance(d, dict) or set(d) != {"pid", "fd", "name", "start", "size"}:
            raise HarnessError(f"{what}: not a memory ref")
        ints = ("pid", "fd", "start")
        if not all(type(d[k]) is int and d[k] >= 0 for k in ints):
            raise HarnessError(f"{what}: pid, fd and start must be non-negative integers")
        if d["size"] is not None and not (type(d["size"]) is int and d["size"] > 0):
            raise HarnessError(f"{what}: size must be a positive integer or null")
        if not isinstance(d["name"], str) or not _NAME_RE.match(d["name"]):
            raise HarnessError(f"{what}: bad memfd name")
        return cls(**d)


def open_file(ref: ProcFile | str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """Open a memfd ref (checked) or, for tests and tools, a plain path."""
    if isinstance(ref, ProcFile):
        return ref.open(flags)
    try:
        return os.open(ref, flags | os.O_CLOEXEC)
    except OSError as e:
        raise HarnessError(f"cannot open {ref}: {e.strerror}") from None


def fd_errno_message(e: OSError, what: str) -> HarnessError:
    """A clear error for ENOSPC/ENOMEM (and the rest) while writing shared memory."""
    if e.errno in (errno.ENOSPC, errno.ENOMEM):
        return HarnessError(f"{what}: out of memory ({e.strerror}); free host memory or run "
                            "fewer/smaller VMs")
    return HarnessError(f"{what}: {e.strerror or e}")
