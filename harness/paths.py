"""Where the harness keeps things outside the repository, and how it writes there safely.

- cache (images, compiled agent, kernel debs): ``$SATORI_CACHE`` or ``$XDG_CACHE_HOME/satori``
  or ``~/.cache/satori``.
- runtime (state of background VMs, sockets, console logs, qcow2 overlays, saved system
  settings): ``$SATORI_RUNTIME`` or ``$XDG_RUNTIME_DIR/satori`` or, for root, ``/run/satori``
  (``/tmp/satori-<uid>`` for another user without ``XDG_RUNTIME_DIR``).
- guest RAM, hint rings and content stores have no path at all: they are memfds
  (``harness.memfd``).

Neither folder is trusted blindly: it is created 0700 if missing, and one that exists must be
a folder (not a symlink) owned by the user and not writable by group or others, else
:class:`HarnessError` says so (someone who could write there could plant the state files the
harness acts on as root). Files the harness writes there go through :func:`write_private`
(a fresh 0600 file, ``O_EXCL|O_NOFOLLOW``, renamed into place: a planted symlink is replaced,
never followed) and are read with :func:`read_private` (``O_NOFOLLOW``, owner checked).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from harness.errors import HarnessError

MAX_STATE_BYTES = 1 << 20


def check_private_dir(p: Path, what: str) -> Path:
    """``p`` must be a real folder owned by this user, not writable by group or others."""
    try:
        st = os.lstat(p)
    except OSError as e:
        raise HarnessError(f"{what} {p}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise HarnessError(f"{what} {p} is a symlink: refusing it (use the real folder)")
    if not stat.S_ISDIR(st.st_mode):
        raise HarnessError(f"{what} {p} is not a folder")
    if st.st_uid != os.geteuid():
        raise HarnessError(
            f"{what} {p} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): refusing "
            "it; remove it or choose another folder")
    if st.st_mode & 0o022:
        raise HarnessError(
            f"{what} {p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
            f"refusing it; chmod go-w {p} or remove it")
    return p


def private_dir(p: Path, what: str) -> Path:
    """Create ``p`` (0700, parents as needed) or check the one that exists."""
    if not os.path.lexists(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o700)
    return check_private_dir(p, what)


def cache_dir() -> Path:
    env = os.environ.get("SATORI_CACHE")
    if env:
        p = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        p = Path(xdg) / "satori" if xdg else Path.home() / ".cache" / "satori"
    return private_dir(p, "cache folder")


def default_runtime_dir() -> Path:
    env = os.environ.get("SATORI_RUNTIME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "satori"
    return Path("/run/satori") if os.geteuid() == 0 else Path(f"/tmp/satori-{os.getuid()}")


def runtime_dir() -> Path:
    return private_dir(default_runtime_dir(), "runtime folder")


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file of the harness (state, saved settings, status) atomically, mode 0600: a
    fresh temporary file (``O_CREAT|O_EXCL|O_NOFOLLOW``) renamed over ``path``; whatever was at
    ``path`` (a planted symlink included) is replaced, never followed."""
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_private(path: Path, limit: int = MAX_STATE_BYTES) -> str:
    """Read a file the harness wrote: no symlink followed, a regular file of this user, not
    writable by others, at most ``limit`` bytes. Raises OSError/HarnessError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HarnessError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise HarnessError(f"{path} is not a private file of yours (uid {st.st_uid}, "
                               f"mode {stat.S_IMODE(st.st_mode):o}): not used")
        if st.st_size > limit:
            raise HarnessError(f"{path} is larger than {limit} bytes: not used")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise HarnessError(f"{path} is not text: not used") from None
