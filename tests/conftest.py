"""Shared fixtures: the guest image (built once per session, cached across sessions) and a
leak check that runs after every integration test: no QEMU, socket or /dev/shm file of the
harness may remain."""

from __future__ import annotations

import pytest

from harness.image import Image, ensure_image
from harness.vm import harness_leftovers


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
