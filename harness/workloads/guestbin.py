"""Small C programs that run inside the guests (``harness/workloads/guest/*.c``): built on the
host as static x86-64 executables (so they need nothing from the guest image), cached per
source hash, and copied into a guest on demand.

Today: ``stallprobe`` (the guest-visible stall probe, see :mod:`harness.workloads.stall`).
Tests may build their own programs the same way (:func:`build`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from harness.errors import HarnessError, ToolMissing
from harness.paths import cache_dir

SOURCES = Path(__file__).with_name("guest")
CFLAGS = ("-O2", "-Wall", "-Werror", "-static", "-pthread")


def build(source: Path) -> Path:
    """Compile ``source`` into a static executable in the cache (once per source hash)."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out = cache_dir() / "guestbin" / digest / source.stem
    if out.is_file():
        return out
    cc = next((p for p in (shutil.which(n) for n in ("cc", "gcc")) if p), None)
    if cc is None:
        raise ToolMissing(f"no C compiler to build {source.name} for the guests: install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
    cmd = [cc, *CFLAGS, "-o", str(tmp), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise HarnessError(
            f"building {source.name} for the guests failed (a static build needs libc6-dev)",
            f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}".rstrip(),
        )
    os.replace(tmp, out)
    return out


def install(vm, name: str, source: Path | None = None) -> str:
    """Copy the program ``name`` (``guest/<name>.c``, or ``source``) into ``vm``; its guest path."""
    exe = build(source or SOURCES / f"{name}.c")
    path = f"/tmp/{name}"
    vm.ssh.put(exe.read_bytes(), path)
    vm.ssh.check(f"chmod 700 {path}")
    return path
