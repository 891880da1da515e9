"""The content store memfd (append, sync in one pwritev per run, read, punch; reached by other
processes through a checked /proc/<pid>/fd ref)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.sharing.store import ContentStore

PAGE = 4096


def test_store_writes_appended_pages_at_sync():
    store = ContentStore("satori-test-store")
    ref = store.ref
    assert ref.path == f"/proc/{os.getpid()}/fd/{store.fd}"
    try:
        pages = np.frombuffer(random.Random(1).randbytes(3000 * PAGE), np.uint8).reshape(-1, PAGE)
        slots = [store.append(p) for p in pages]
        assert slots == list(range(3000))
        assert os.fstat(store.fd).st_size == 0  # nothing written before sync
        store.sync()
        fd = ref.open()  # what an agent or the accounting opens
        try:
            assert os.pread(fd, len(pages) * PAGE, 0) == pages.tobytes()
            assert os.fstat(fd).st_mode & 0o777 == 0o600
        finally:
            os.close(fd)
        assert store.read(2999) == pages[2999].tobytes()
        more = store.append(b"\x01" * PAGE)
        assert store.read(more) == b"\x01" * PAGE  # read syncs first
        store.free(5)
        assert store.live == 3000 and store.punched == 1
        with pytest.raises(ValueError):
            store.append(b"short")
    finally:
        store.close()
    with pytest.raises(HarnessError):  # gone with the last fd: no name, nothing left
        ref.open()
