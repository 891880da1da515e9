"""Shared fixtures: the guest image (built once per session, cached across sessions) and a
leak check that runs after every integration test: no QEMU, socket or /dev/shm file of the
harness may remain."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness.image import Image, ensure_image
from harness.paths import runtime_dir, shm_dir


@pytest.fixture(scope="session")
def image() -> Image:
    return ensure_image(log=lambda m: print(m, flush=True))


def harness_leftovers() -> list[str]:
    """QEMU processes, /dev/shm files and VM folders the harness made that still exist."""
    left = [f"shm: {p}" for p in shm_dir().glob("satori-*")]
    vms = runtime_dir() / "vms"
    if vms.exists():
        left += [f"vm folder: {p}" for p in vms.iterdir()]
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-system-x86_64.*satori"], capture_output=True, text=True).stdout
    left += [f"process: {line}" for line in out.splitlines() if str(os.getpid()) not in line.split()[:1]]
    return left


@pytest.fixture(autouse=True)
def no_leftovers(request):
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    before = set(harness_leftovers())
    yield
    after = [x for x in harness_leftovers() if x not in before]
    assert not after, "the test left these behind:\n" + "\n".join(after)
