"""The content store file (append, sync in one pwritev per run, read, punch)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from harness.sharing.store import ContentStore

PAGE = 4096


def test_store_writes_appended_pages_at_sync(tmp_path):
    store = ContentStore(tmp_path / "store")
    try:
        pages = np.frombuffer(random.Random(1).randbytes(3000 * PAGE), np.uint8).reshape(-1, PAGE)
        slots = [store.append(p) for p in pages]
        assert slots == list(range(3000))
        assert os.stat(store.path).st_size == 0  # nothing written before sync
        store.sync()
        assert store.path.read_bytes() == pages.tobytes()
        assert store.read(2999) == pages[2999].tobytes()
        more = store.append(b"\x01" * PAGE)
        assert store.read(more) == b"\x01" * PAGE  # read syncs first
        store.free(5)
        assert store.live == 3000 and store.punched == 1
        with pytest.raises(ValueError):
            store.append(b"short")
    finally:
        store.close()
    assert not store.path.exists()
