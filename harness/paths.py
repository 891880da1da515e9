"""Where the harness keeps things outside the repository: the build cache and the runtime folder.

- cache (images, compiled agent, kernel debs): ``$SATORI_CACHE`` or ``$XDG_CACHE_HOME/satori``
  or ``~/.cache/satori``.
- runtime (state of background VMs, sockets, console logs): ``$SATORI_RUNTIME`` or
  ``$XDG_RUNTIME_DIR/satori`` or ``/tmp/satori-<uid>``.
- guest RAM and hint ring files: ``/dev/shm/satori-<run>-<vm>-*`` (``$SATORI_SHM`` overrides
  the folder, for tests only).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("SATORI_CACHE")
    if env:
        p = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        p = Path(xdg) / "satori" if xdg else Path.home() / ".cache" / "satori"
    p.mkdir(parents=True, exist_ok=True)
    return p


def runtime_dir() -> Path:
    env = os.environ.get("SATORI_RUNTIME")
    if env:
        p = Path(env)
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        p = Path(xdg) / "satori" if xdg else Path(f"/tmp/satori-{os.getuid()}")
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def shm_dir() -> Path:
    return Path(os.environ.get("SATORI_SHM", "/dev/shm"))
