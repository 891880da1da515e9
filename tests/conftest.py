"""Shared fixtures: the guest image (built once per session, cached across sessions) and a
leak check that runs after every integration test: no QEMU, VM folder, status file or memfd of
the harness may remain (guest memory is memfds: what is not held by a live process is gone, so
the check counts this session's QEMUs and the memfds the test process still holds)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.image import Image, ensure_image
from harness.vm import harness_leftovers

# This test session's own runtime folder: its leak checks then see only what it made, even while
# other harness runs (a benchmark, another session) use the same machine.
_SESSION = f"satori-test-{os.getpid()}"
os.environ["SATORI_RUNTIME"] = str(Path("/tmp") / _SESSION)


def pytest_sessionfinish(session, exitstatus):
    left = harness_leftovers()
    if left:
        print("\nleft behind by the test session:\n" + "\n".join(left))
    shutil.rmtree(os.environ["SATORI_RUNTIME"], ignore_errors=True)


@pytest.fixture(scope="session")
def image() -> Image:
    return ensure_image(log=lambda m: print(m, flush=True))


@pytest.fixture(autouse=True)
def no_leftovers(request):
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    before = set(harness_leftovers())
    yield
    after = [x for x in harness_leftovers() if x not in before]
    assert not after, "the test left these behind:\n" + "\n".join(after)


def sigint_default() -> None:
    """``preexec_fn`` for a child a test stops with SIGINT: a shell without job control starts
    background commands with SIGINT ignored, and the child would inherit that (Python then
    installs no KeyboardInterrupt handler); the test means a user's Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
