"""The arithmetic of G, F, C, R, M, E (all, non-zero, disk) on hand-made arrays; the oracle's
hashing, sets and disk block set; the pagemap decoding and the store reader (no QEMU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from harness import accounting as acc
from harness import oracle


def H(*ids: int) -> np.ndarray:
    """Fake content hashes: content id k -> (k, 1000 + k); id 0 is the all-zero page."""
    out = np.array([[k, 1000 + k] for k in ids], dtype=np.uint64).reshape(-1, 2)
    for i, k in enumerate(ids):
        if k == 0:
            out[i] = oracle.ZERO_HASH
    return out


def S(*ids: int) -> np.ndarray:
    return oracle.unique_hashes(H(*ids))


def F(*pfns: int) -> np.ndarray:
    return np.array(pfns, dtype=np.uint64)


def test_no_sharing_two_vms_same_content():
    # VM a: contents 1,2,3 on frames 10,11,12; VM b: the same contents on frames 20,21,22
    f = acc.figures(F(10, 11, 12, 20, 21, 22), H(1, 2, 3, 1, 2, 3))
    a = f["all"]
    assert (a.G, a.F, a.C, a.R, a.M) == (6, 6, 3, 0, 3)
    assert a.E == 0.0
    assert f["disk"] is None


def test_full_sharing_and_partial():
    # b's pages 1 and 2 share a's frames; page 3 does not
    a = acc.figures(F(10, 11, 12, 10, 11, 22), H(1, 2, 3, 1, 2, 3))["all"]
    assert (a.G, a.F, a.C, a.R, a.M) == (6, 4, 3, 2, 3)
    assert a.E == pytest.approx(2 / 3)
    full = acc.figures(F(10, 11, 12, 10, 11, 12), H(1, 2, 3, 1, 2, 3))["all"]
    assert full.E == 1.0


def test_nothing_to_share_gives_none():
    a = acc.figures(F(1, 2, 3), H(1, 2, 3))["all"]
    assert a.M == 0 and a.E is None
    empty = acc.figures(F(), H())["all"]
    assert (empty.G, empty.F, empty.C, empty.E) == (0, 0, 0, None)


def test_zero_pages_are_one_content_and_left_out_of_nonzero():
    # four zero pages on distinct frames, two on the same frame (e.g. the kernel's zero page)
    frames = F(1, 2, 3, 4, 9, 9, 10, 11)
    hashes = H(0, 0, 0, 0, 0, 0, 5, 5)
    f = acc.figures(frames, hashes)
    a, nz = f["all"], f["nonzero"]
    assert (a.G, a.F, a.C) == (8, 7, 2)  # frames 1,2,3,4,9,10,11; contents zero, 5
    assert (a.R, a.M) == (1, 6)
    assert (nz.G, nz.F, nz.C, nz.R, nz.M) == (2, 2, 1, 0, 1)
    assert nz.E == 0.0


def test_store_only_pages_count_against_sharing():
    # both VMs map store frames 100, 101 for contents 1, 2; the store also holds 102 (content 3)
    # and 103 (zero) that nobody maps
    frames = F(100, 101, 100, 101)
    hashes = H(1, 2, 1, 2)
    f = acc.figures(frames, hashes, store_frames=F(100, 101, 102, 103), store_hashes=H(1, 2, 3, 0))
    a, nz = f["all"], f["nonzero"]
    assert (a.G, a.F, a.C, a.R, a.M) == (4, 4, 2, 0, 2)  # F: 100, 101 + store-only 102, 103
    assert a.E == 0.0
    assert (nz.G, nz.F, nz.C) == (4, 3, 2)  # the zero store page is out of the non-zero view
    assert nz.E == pytest.approx(0.5)


def test_disk_restriction():
    disk = S(1, 2, 7)  # contents 1, 2 and 7 are disk blocks; 3 and zero are not
    frames = F(10, 11, 12, 13, 10, 21, 22, 23, 200)
    hashes = H(1, 2, 3, 0, 1, 2, 3, 0, 9)
    f = acc.figures(frames, hashes, store_frames=F(10, 300, 301), store_hashes=H(1, 7, 3), disk_set=disk)
    d = f["disk"]
    # disk pages: a's 1 (frame 10), 2 (11); b's 1 (frame 10: shared), 2 (21) -> G 4, frames 10, 11, 21
    # store-only: 300 (content 7, a disk block) counts, 301 (content 3) does not
    assert (d.G, d.F, d.C, d.R, d.M) == (4, 4, 2, 0, 2)
    assert d.E == 0.0
    f2 = acc.figures(frames, hashes, disk_set=disk)
    d2 = f2["disk"]
    assert (d2.G, d2.F, d2.C, d2.R, d2.M) == (4, 3, 2, 1, 2)
    assert d2.E == pytest.approx(0.5)
    a = f2["all"]
    assert (a.G, a.F, a.C) == (9, 8, 5)


def test_pagemap_decoding():
    present_bit = 1 << 63
    entries = np.array([present_bit | 0x1234, 0, (1 << 62) | 5, present_bit | ((1 << 55) - 1) | (1 << 56)],
                       dtype=np.uint64)
    present, pfn = acc.decode_pagemap(entries)
    assert present.tolist() == [True, False, False, True]
    assert pfn.tolist() == [0x1234, 0, 0, (1 << 55) - 1]


def test_expand_ranges_and_parse_maps():
    ranges = np.array([[2 * 4096, 0, 3], [10 * 4096, 7 * 4096, 2], [15 * 4096, 20 * 4096, 4]], dtype=np.uint64)
    g, s = acc.expand_ranges(ranges, npages=16)
    assert g.tolist() == [2, 3, 4, 10, 11, 15]  # clipped to the 16-page guest
    assert s.tolist() == [0, 1, 2, 7, 8, 20]
    base = 0x7F0000000000
    text = "\n".join([
        f"{base - 0x1000:x}-{base + 0x2000:x} rw-p 00003000 00:1a 4242 /memfd:store (deleted)",  # clipped
        f"{base + 0x2000:x}-{base + 0x5000:x} rw-s 00000000 00:01 77 /memfd:ram (deleted)",
        f"{base + 0x5000:x}-{base + 0x6000:x} rw-p 00010000 00:1a 4242 /memfd:store (deleted)",
        f"{base + 0x6000:x}-{base + 0x7000:x} rw-p 00004242 00:1b 4242 /other",  # other device
        f"{base + 0x7000:x}-{base + 0x8000:x} rw-p 00000000 00:1a 14242 /x",  # other inode
        f"{base + 0x9000:x}-{base + 0xA000:x} rw-p 00000000 00:00 0 ",
        f"{base + 0x20000:x}-{base + 0x21000:x} rw-p 00000000 00:1a 4242 /memfd:store (deleted)",  # outside
    ]).encode()
    r = acc.parse_maps(text, base, 16 * 4096, (0, 0x1A, 4242))
    assert r.tolist() == [[0, 0x4000, 2], [0x5000, 0x10000, 1]]


def test_ledger_counts_equal_figures():
    """The meter's reference counts, updated page by page over random changes, give what
    figures() computes from scratch."""
    rng = np.random.default_rng(5)
    index = oracle.ContentIndex(S(1, 2, 3))
    ids = index.intern(H(*range(12)))
    frames, slots, contents = acc._Refs(8), acc._Refs(), acc._Refs()  # frames grow past their size
    n = 300
    key = np.full(n, -1, np.int64)
    cid = np.full(n, -1, np.int64)
    for _ in range(40):
        new_key = np.where(rng.random(n) < 0.8, rng.integers(0, 60, n), -1)
        on_store = rng.random(n) < 0.2
        new_key[on_store] = -2 - rng.integers(0, 5, int(on_store.sum()))  # store pages
        # a frame holds one content: content of a frame is a function of the frame
        new_cid = np.where(new_key != -1, ids[np.abs(new_key * 7 + 3) % 12], -1)
        ch = np.flatnonzero((new_key != key) | (new_cid != cid))
        for k, c, sign in ((key[ch], cid[ch], -1), (new_key[ch], new_cid[ch], +1)):
            inn = k != -1
            k, c = k[inn], c[inn]
            cls = acc._classes(index, c)
            pf = k >= 0
            if sign < 0:
                frames.remove(k[pf]), slots.remove(-2 - k[~pf]), contents.remove(c)
            else:
                frames.add(k[pf], cls[pf]), slots.add(-2 - k[~pf], cls[~pf]), contents.add(c, cls)
        key, cid = new_key, new_cid
        inn = key != -1
        fr = np.where(key[inn] >= 0, key[inn], 1000 - key[inn]).astype(np.uint64)
        want = acc.figures(fr, index.hashes[cid[inn]], disk_set=index.disk_set)
        got_f = frames.live + slots.live
        got_c = contents.live
        for k, name in enumerate(("all", "nonzero", "disk")):
            assert (want[name].F, want[name].C) == (int(got_f[k]), int(got_c[k])), name
        assert frames.refs.min() >= 0 and slots.refs.min() >= 0


def test_hash_pages_and_zero():
    buf = np.zeros(3 * 4096, np.uint8)
    buf[4096] = 1
    h = oracle.hash_pages(buf)
    assert h.shape == (3, 2)
    assert oracle.is_zero_hash(h).tolist() == [True, False, True]
    assert oracle.distinct_count(h) == 2
    import xxhash

    d = xxhash.xxh3_128_digest(bytes(buf[4096:8192]))
    assert int(h[1, 0]) == int.from_bytes(d[:8], "big") and int(h[1, 1]) == int.from_bytes(d[8:], "big")


def test_in_set_handles_equal_high_halves():
    s = oracle.unique_hashes(np.array([[5, 1], [5, 3], [7, 2], [1, 9]], dtype=np.uint64))
    q = np.array([[5, 3], [5, 2], [7, 2], [7, 1], [0, 0], [1, 9]], dtype=np.uint64)
    assert oracle.in_set(q, s).tolist() == [True, False, True, False, False, True]
    assert oracle.in_set(q, np.zeros((0, 2), np.uint64)).tolist() == [False] * 6


def test_runs():
    st, ln = oracle.runs(np.array([1, 2, 3, 7, 9, 10]))
    assert st.tolist() == [1, 7, 9] and ln.tolist() == [3, 1, 2]


def test_hash_fd_pages_reads_only_given_pages(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(10 * 4096)
    p.write_bytes(data)
    with open(p, "rb") as f:
        h = oracle.hash_fd_pages(f.fileno(), 0, np.array([0, 1, 5, 9]))
    assert (h == oracle.hash_pages(np.frombuffer(data, np.uint8).reshape(10, 4096)[[0, 1, 5, 9]])).all()


def test_disk_block_set_skips_holes_and_zero_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_CACHE", str(tmp_path / "cache"))
    img = tmp_path / "disk.raw"
    blocks = [os.urandom(4096) for _ in range(3)]
    with open(img, "wb") as f:
        f.truncate(64 << 20)  # sparse
        f.seek(0)
        f.write(blocks[0] + bytes(4096) + blocks[1])
        f.seek(40 << 20)
        f.write(blocks[2] + blocks[0])
    s = oracle.disk_block_set(img, key="k1")
    assert len(s) == 3  # three distinct non-zero blocks
    assert oracle.in_set(oracle.hash_pages(b"".join(blocks)), s).all()
    assert not oracle.in_set(oracle.hash_pages(bytes(4096)), s).any()
    cached = tmp_path / "cache" / "diskhash" / "k1.npy"
    assert cached.is_file()
    assert (np.load(cached) == s).all()
    img.unlink()
    img.write_bytes(b"x")  # a cached key is used without reading the image again
    assert len(oracle.disk_block_set(img, key="k1")) == 3


def test_resident_pages_never_allocates_holes():
    from harness import memfd

    mfd = memfd.create("satori-test-store", 64 * 4096)  # 64 pages, all holes
    shm = f"/proc/{os.getpid()}/fd/{mfd}"
    try:
        os.pwrite(mfd, os.urandom(4096) + bytes(4096), 3 * 4096)  # pages 3 (data) and 4 (zero, but written)
        os.pwrite(mfd, os.urandom(4096), 40 * 4096)
        before = os.stat(shm).st_blocks
        fd = os.open(shm, os.O_RDONLY)
        try:
            res = acc.resident_pages(fd, 64)
            assert np.flatnonzero(res).tolist() == [3, 4, 40]
            h = oracle.hash_fd_pages(fd, 0, np.flatnonzero(res))
        finally:
            os.close(fd)
        assert os.stat(shm).st_blocks == before
        assert oracle.is_zero_hash(h).tolist() == [False, True, False]
    finally:
        os.close(mfd)


def test_parse_gpa2hva():
    assert acc.parse_gpa2hva("Host virtual address for 0x0 (pc.ram) is 0x7f1234560000\r\n") == 0x7F1234560000
    with pytest.raises(Exception, match="gpa2hva"):
        acc.parse_gpa2hva("No memory is mapped at address 0x0")


def test_count_distinct_and_member():
    assert acc.count_distinct(F(5, 1, 5, 2, 1)) == 3 and acc.count_distinct(F()) == 0
    assert acc.member(F(1, 4, 9, 2), F(9, 2, 2)).tolist() == [False, False, True, True]
    assert acc.member(F(1), F()).tolist() == [False]


CHILD = r"""
import ctypes, mmap, os, sys
size, path = int(sys.argv[1]), sys.argv[2]
if path == "-":
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
else:
    m = mmap.mmap(os.open(path, os.O_RDWR), size, mmap.MAP_SHARED)
for spec in sys.argv[3:]:  # page:byte writes one byte into a page (the rest stays zero)
    page, byte = map(int, spec.split(":"))
    m[page * 4096] = byte
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs need root")
@pytest.mark.parametrize("anon", [False, True])
def test_measure_on_processes_without_qemu(tmp_path, anon):
    """measure() end to end on two helper processes standing in for QEMU: a sparse RAM file
    (holes never allocated by measuring) or anonymous memory (/proc/<pid>/mem)."""
    import subprocess
    import sys

    from harness import memfd

    npages = 64
    writes = [["1:7", "2:8", "5:9", "9:0"], ["1:7", "3:8", "6:5"]]  # page 9 of A: written zero
    files, procs, targets = [], [], []
    try:
        for i, w in enumerate(writes):
            path = "-"
            if not anon:
                fd = memfd.create(f"satori-test-acct-{i}", npages * 4096)
                path = f"/proc/{os.getpid()}/fd/{fd}"
                files.append(path)
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(npages * 4096), path, *w],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            hva = int(proc.stdout.readline())
            targets.append(acc.Target(f"p{i}", proc.pid, hva, npages * 4096,
                                      ram_file=None if anon else Path(path)))
        blocks = [os.stat(f).st_blocks for f in files]
        page7 = np.zeros(4096, np.uint8)
        page7[0] = 7
        disk = oracle.unique_hashes(oracle.hash_pages(page7))
        s = acc.measure(targets, disk_set=disk)
        assert [os.stat(f).st_blocks for f in files] == blocks
        assert [v.G for v in s.vms] == [4, 3]  # the written pages only, holes not counted
        assert s.F == 7 and s.R == 0
        assert s.C == 5  # contents 7, 8, 9, 5 and zero (page 9 of A)
        assert s.M == 2 and s.E == 0.0
        assert s.zero_pages == 1 and s.G_nonzero == 6 and s.M_nonzero == 2
        assert (s.G_disk, s.M_disk, s.E_disk) == (2, 1, 0.0)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for f in files:
            os.close(int(f.rsplit("/", 1)[1]))


def test_content_index_ids_are_stable_and_classified():
    idx = oracle.ContentIndex(S(1, 2))
    a = idx.intern(H(3, 1, 0, 3))
    assert a[0] == a[3] and len(set(a.tolist())) == 3 and len(idx) == 3
    b = idx.intern(H(2, 1, 4, 0))
    assert b[1] == a[1] and b[3] == a[2] and len(idx) == 5
    assert idx.zero[a[2]] and not idx.zero[a[0]]
    assert idx.disk[a[1]] and idx.disk[b[0]] and not idx.disk[a[0]] and not idx.disk[b[2]]
    # two contents with the same high half stay two contents
    h = np.array([[77, 1], [77, 2], [77, 1]], np.uint64)
    c = idx.intern(h)
    assert c[0] == c[2] != c[1]
    assert (idx.intern(h[[1]]) == c[1]).all()
    # many, in batches that cross merges of the new contents into the sorted array, and a
    # compaction, against a dict of the full 128 bits
    idx.DELTA = 16
    rng = np.random.default_rng(2)
    seen: dict = {}
    for k in range(30):
        many = rng.integers(0, 50, (100, 2)).astype(np.uint64)
        ids = idx.intern(many)
        for (hi, lo), i in zip(many.tolist(), ids.tolist(), strict=True):
            assert seen.setdefault((hi, lo), i) == i
        assert (idx.hashes[ids] == many).all()
        if k == 20:
            live = np.array(sorted(set(seen.values()))[::2])
            remap = idx.compact(live)
            seen = {h: int(remap[i]) for h, i in seen.items() if remap[i] >= 0}
            assert len(idx) == len(live) == len(seen)
    assert len(set(seen.values())) == len(seen) == len(idx)
