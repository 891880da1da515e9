"""Machine-wide settings the harness changes (KSM sysfs, ``vm.max_map_count``): saved before any
change, restored afterwards, and recoverable after a ``kill -9``.

They belong to the machine, not to one runtime folder, so their saved state lives in one place
per machine, :func:`system_dir` (``/run/satori-system`` for root, 0700, checked like the runtime
folder): two harness sessions with different ``SATORI_RUNTIME`` still see each other's changes.

- Every change is recorded *before* it is made (:func:`save_json`, validated when read back by
  the caller), so a kill at any moment leaves a record of the machine's real value.
- :func:`locked` serialises the writers of one setting with an ``flock`` on ``<name>.lock``
  (released by the kernel when its holder dies: a dead holder never blocks anyone).
- ``vm.max_map_count`` can be raised by several engines at once (two domains of one run, two
  runs): :func:`raise_max_map_count` registers a holder (pid and start time) with the value it
  needs and sets the maximum; :func:`release_max_map_count` drops it and, with the last holder,
  writes the original back. :func:`recover_max_map_count` drops holders that are gone (what
  ``satori cleanup`` and every start do).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.memfd import same_process, start_time
from harness.paths import private_dir, read_private, write_private

MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


def system_dir() -> Path:
    """Where machine-wide saved settings and their locks live."""
    if os.geteuid() == 0:
        return private_dir(Path("/run/satori-system"), "system state folder")
    from harness.paths import runtime_dir

    return private_dir(runtime_dir() / "system", "system state folder")


def acquire_lock(path: Path, timeout: float, busy: Callable[[], str] | None = None) -> int:
    """Take the lock file ``path`` (flock, waiting up to ``timeout`` s); returns its descriptor,
    whose close releases it. On timeout: HarnessError with ``busy()`` as the message."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                msg = busy() if busy else (f"{path} is held by another harness process for more "
                                           f"than {timeout:.0f} s")
                raise HarnessError(msg) from None
            time.sleep(0.1)


@contextlib.contextmanager
def locked(name: str, timeout: float = 60.0, folder: Path | None = None) -> Iterator[None]:
    """Hold the machine-wide lock ``name`` (waiting up to ``timeout`` s)."""
    fd = acquire_lock((folder or system_dir()) / f"{name}.lock", timeout)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def me() -> dict[str, int]:
    """This process as a holder: pid and start time."""
    return {"pid": os.getpid(), "start": start_time(os.getpid()) or 0}


def holder_alive(h: dict[str, Any]) -> bool:
    return same_process(h.get("pid", 0), h.get("start"))


def load_json(path: Path) -> Any | None:
    """A saved-state file, or None if there is none. Unreadable, not private or not JSON:
    :class:`HarnessError` (never silently trusted)."""
    try:
        return json.loads(read_private(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HarnessError(f"{path}: unreadable saved state ({e})") from None


def save_json(path: Path, data: Any) -> None:
    write_private(path, json.dumps(data, indent=1))


# ------------------------------------------------------------------ vm.max_map_count

def _is_holder(h: Any) -> bool:
    return (isinstance(h, dict) and set(h) == {"pid", "start", "want"}
            and all(type(h[k]) is int and h[k] >= 0 for k in h))


def _load_mmc(path: Path) -> dict[str, Any] | None:
    d = load_json(path)
    if d is None:
        return None
    if not (isinstance(d, dict) and set(d) == {"original", "holders"} and type(d["original"]) is int
            and 0 < d["original"] < 1 << 31 and isinstance(d["holders"], list)
            and all(_is_holder(h) for h in d["holders"])):
        raise HarnessError(f"{path}: not a vm.max_map_count record of the harness: not used")
    return d


def _read_mmc(sysctl: Path) -> int:
    return int(sysctl.read_text())


def _apply_mmc(d: dict[str, Any], sysctl: Path) -> int:
    target = max([d["original"]] + [h["want"] for h in d["holders"]])
    if _read_mmc(sysctl) != target:
        sysctl.write_text(str(target))
    return target


def raise_max_map_count(want: int, sysctl: Path = MAX_MAP_COUNT, folder: Path | None = None) -> bool:
    """Make ``vm.max_map_count`` at least ``want`` while this process holds it (recorded before
    the change). Returns whether this process is now a holder (False: it was high enough)."""
    folder = folder or system_dir()
    path = folder / "max_map_count.json"
    with locked("max_map_count", folder=folder):
        d = _load_mmc(path)
        if d is None:
            cur = _read_mmc(sysctl)
            if cur >= want:
                return False
            d = {"original": cur, "holders": []}
        d["holders"] = [h for h in d["holders"] if holder_alive(h) and h["pid"] != os.getpid()]
        d["holders"].append({**me(), "want": int(want)})
        save_json(path, d)  # before the change
        _apply_mmc(d, sysctl)
    return True


def release_max_map_count(sysctl: Path = MAX_MAP_COUNT, folder: Path | None = None) -> None:
    """Drop this process's hold; the last holder out writes the original value back."""
    _settle_mmc(lambda h: h["pid"] != os.getpid() and holder_alive(h), sysctl, folder)


def recover_max_map_count(sysctl: Path = MAX_MAP_COUNT, folder: Path | None = None) -> list[str]:
    """Drop holders that are gone (killed); restore the original when none is left. Returns
    what it did, for ``satori cleanup``."""
    return _settle_mmc(holder_alive, sysctl, folder)


def _settle_mmc(keep, sysctl: Path, folder: Path | None) -> list[str]:
    folder = folder or system_dir()
    path = folder / "max_map_count.json"
    did: list[str] = []
    with locked("max_map_count", folder=folder):
        d = _load_mmc(path)
        if d is None:
            return did
        before = len(d["holders"])
        d["holders"] = [h for h in d["holders"] if keep(h)]
        if not d["holders"]:
            cur = _read_mmc(sysctl)
            if cur != d["original"]:
                sysctl.write_text(str(d["original"]))
                did.append(f"vm.max_map_count {cur} -> {d['original']} (restored)")
            path.unlink()
        elif len(d["holders"]) != before:
            save_json(path, d)
            _apply_mmc(d, sysctl)
    return did
