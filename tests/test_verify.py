"""The engine's C verifier (XXH64 + pread per record, a batch per call) and the batched store."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import xxhash

from harness.sharing import verify
from harness.sharing.store import ContentStore

PAGE = 4096


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 9, 31, 32, 33, 64, 100, 4095, 4096, 10_000])
def test_xxh64_matches_the_reference(n):
    rng = random.Random(n)
    data = rng.randbytes(n)
    for seed in (0, 1, 2**63 + 12345, 2**64 - 1):
        assert verify.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed), (n, seed)


@pytest.fixture()
def pagefile(tmp_path):
    rng = random.Random(7)
    data = rng.randbytes(16 * PAGE)
    path = tmp_path / "ram"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def test_verify_accepts_true_records_and_rejects_the_rest(pagefile):
    fd, data = pagefile
    offs = np.arange(16, dtype=np.uint64) * PAGE
    hashes = np.array([xxhash.xxh64_intdigest(data[o:o + PAGE]) for o in range(0, len(data), PAGE)], np.uint64)
    bad = hashes.copy()
    bad[3] ^= 1  # a forged hash
    offs2 = offs.copy()
    offs2[5] = 16 * PAGE  # past the end of the file: a short read
    offs2[6] = 2**62  # far outside
    pages, ok = verify.verify([fd], np.zeros(16), offs2, bad)
    assert ok.tolist() == [i not in (3, 5, 6) for i in range(16)]
    assert pages[0].tobytes() == data[:PAGE] and pages[15].tobytes() == data[-PAGE:]
    # the second source (index 1) is used where src says so
    pages, ok = verify.verify([-1, fd], np.ones(16), offs, hashes)
    assert ok.all()
    # a reused buffer: the same answers, in the same memory while it is large enough
    small, ok = verify.verify([fd], np.zeros(4), offs[:4], hashes[:4])
    again, ok2 = verify.verify([fd], np.zeros(3), offs[4:7], hashes[4:7], out=small)
    assert ok2.all() and again.base is small.base and again[2].tobytes() == data[6 * PAGE:7 * PAGE]
    big, ok3 = verify.verify([fd], np.zeros(16), offs, hashes, out=np.empty((1, PAGE), np.uint8))
    assert ok3.all() and len(big) == 16
    # a closed/invalid descriptor is "not verified", never a crash
    _, ok = verify.verify([-1], np.zeros(16), offs, hashes)
    assert not ok.any()
    with pytest.raises(ValueError):
        verify.verify([fd], np.full(16, 1), offs, hashes)  # src names a missing descriptor


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
