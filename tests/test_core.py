"""The native sharing core against its Python reference, on replayed hint streams.

A small simulated world stands in for the guests and their agents (pure logic: no QEMU): per VM
a RAM file (a memfd) whose pages come from a pool of contents, and a fake agent that merges a
pair only if the guest page equals the store page (as ``agent.c`` memcmps) and LISTs what it
merged and the guest has not written since. Seeded streams of hint records are replayed into
the native core and into ``harness.sharing.reference.ReferenceCore``: honest records in runs
(files read in order), the same content in several VMs and several times in one VM, forged
records (wrong hashes, addresses outside RAM, unaligned), stale ones (the page changed after
the hint), pages rewritten and hinted again, copy-on-write breaks, lost agent replies. Both
must plan the same merges, store the same bytes in the same slots and count the same.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import xxhash

from harness.hints import RECORD_DTYPE
from harness.oracle import RamMirror
from harness.sharing import core as core_mod
from harness.sharing import index
from harness.sharing.core import NativeCore
from harness.sharing.reference import ReferenceCore
from harness.sharing.store import punch_hole

PAGE = 4096
P1, P2 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F
M64 = (1 << 64) - 1


# ------------------------------------------------------------------ hashes


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 9, 31, 32, 33, 64, 100, 4095, 4096, 10_000])
def test_xxh64_matches_the_reference(n):
    data = random.Random(n).randbytes(n)
    for seed in (0, 1, 2**63 + 12345, 2**64 - 1):
        assert core_mod.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed), (n, seed)


def test_keyed_hash_is_the_specified_one():
    rng = random.Random(3)
    key = rng.randbytes(index.KEY_BYTES)
    fd = os.memfd_create("store")
    try:
        with NativeCore(key, fd) as c:
            pages = [bytes(PAGE), b"\xff" * PAGE, rng.randbytes(PAGE)] + [rng.randbytes(PAGE) for _ in range(20)]
            for pg in pages:
                assert c.keyed(pg) == index.keyed_hash(pg, key)
                h = xxhash.xxh64_intdigest(pg)
                assert c.verify_key(pg, h) == c.keyed(pg) and c.verify_key(pg, h ^ 1) is None
                if core_mod.has_avx2():
                    assert c.nh(pg, True) == c.nh(pg, False)
            # another key gives other keys; one bit of a page changes the key
            other = NativeCore(rng.randbytes(index.KEY_BYTES), fd)
            assert all(c.keyed(pg) != other.keyed(pg) for pg in pages)
            other.close()
            flipped = bytearray(pages[2])
            flipped[1000] ^= 4
            assert c.keyed(bytes(flipped)) != c.keyed(pages[2])
    finally:
        os.close(fd)


def xxh64_collision(y: bytes) -> bytes:
    """A page other than ``y`` with the same XXH64 (seed 0): change the first word of lane 1,
    then correct lane 1's state with its next word (each XXH64 round is invertible)."""
    def rnd(acc: int, w: int) -> int:
        acc = (acc + w * P2) & M64
        acc = ((acc << 31) | (acc >> 33)) & M64
        return (acc * P1) & M64

    w0, w1 = int.from_bytes(y[0:8], "little"), int.from_bytes(y[32:40], "little")
    init = (P1 + P2) & M64
    w0x = w0 ^ 0x5A5A5A5A
    w1x = (w1 + (rnd(init, w0) - rnd(init, w0x)) * pow(P2, -1, 1 << 64)) & M64
    x = bytearray(y)
    x[0:8] = w0x.to_bytes(8, "little")
    x[32:40] = w1x.to_bytes(8, "little")
    x = bytes(x)
    assert x != y and xxhash.xxh64_intdigest(x) == xxhash.xxh64_intdigest(y)
    return x


# ------------------------------------------------------------------ the simulated world


class World:
    """VMs (RAM memfds), a content pool, one core under test, fake agents."""

    def __init__(self, make_core, nvms: int = 3, npages: int = 256, batch: int = 64, quota: float = 1.0,
                 key: bytes | None = None, stage: int = 8, max_slots: int = 1 << 20, view: bool = False) -> None:
        self.npages = npages
        self.store_fd = os.memfd_create("store")
        self.ram = [os.memfd_create(f"ram{i}") for i in range(nvms)]
        for fd in self.ram:
            os.ftruncate(fd, npages * PAGE)
        self.key = key or random.Random(11).randbytes(index.KEY_BYTES)
        self.core = make_core(self.key, self.store_fd, stage, max_slots)
        self.mapped: list[dict[int, int]] = [{} for _ in range(nvms)]  # fake agents: page -> slot
        self.broke: list[dict[int, int]] = [{} for _ in range(nvms)]  # breaks not reported yet
        self.status_mode = False  # agents answer per pair and report breaks (BREAKS, MAPPED)
        self.pairs: list[np.ndarray] = []  # every batch taken, for comparison
        self.results: list[tuple] = []
        self.views: list[RamMirror] = []
        for i, fd in enumerate(self.ram):
            # fd_mem = the RAM file too (hva 0): QEMU's view and the file agree in this world
            self.core.add_vm(fd, fd, 0, npages * PAGE, index.candidate_quota(npages * PAGE, quota), batch)
            if view:  # as the engine does: RAM-file pages copied from a guarded view, not pread
                self.views.append(RamMirror(f"/proc/self/fd/{fd}", npages, f"ram{i}"))
                self.core.set_view(i, self.views[-1].addr)

    def close(self) -> None:
        self.core.close()
        for v in self.views:
            v.close()
        for fd in [*self.ram, self.store_fd]:
            os.close(fd)

    # -- the guest
    def write(self, vm: int, page: int, data: bytes) -> None:
        os.pwrite(self.ram[vm], data, page * PAGE)
        sl = self.mapped[vm].pop(page, None)  # a write to a merged page: copy-on-write, private now
        if sl is not None:
            self.broke[vm][page] = sl

    def read(self, vm: int, page: int) -> bytes:
        return os.pread(self.ram[vm], PAGE, page * PAGE)

    # -- the agent
    def merge(self, vm: int, pairs: np.ndarray) -> tuple[int, int]:
        st = self.merge_status(vm, pairs)
        return int(np.count_nonzero(st == 0)), int(np.count_nonzero(st))

    def merge_status(self, vm: int, pairs: np.ndarray) -> np.ndarray:
        status = np.zeros(len(pairs), dtype=np.uint8)
        for i, (g, so) in enumerate(pairs.tolist()):
            if self.read(vm, g // PAGE) == os.pread(self.store_fd, PAGE, so):
                self.mapped[vm][g // PAGE] = so // PAGE
                self.broke[vm].pop(g // PAGE, None)  # a re-merged page: its old break is moot
            else:
                status[i] = 1
        return status

    def breaks(self, vm: int) -> np.ndarray:
        out = np.array([(p * PAGE, s * PAGE, 1) for p, s in sorted(self.broke[vm].items())],
                       dtype=np.uint64).reshape(-1, 3)
        self.broke[vm] = {}
        return out

    def mapped_by_anyone(self, slots: np.ndarray) -> np.ndarray:
        held = {s for m in self.mapped for s in m.values()}
        return np.array([int(s) in held for s in slots.tolist()], dtype=bool)

    def list(self, vm: int) -> np.ndarray:
        return np.array([(p * PAGE, s * PAGE, 1) for p, s in sorted(self.mapped[vm].items())],
                        dtype=np.uint64).reshape(-1, 3)

    # -- the engine's side
    def ingest(self, vm: int, recs: np.ndarray, t: int, lose_reply: bool = False) -> None:
        done = 0
        while done < len(recs):
            done += self.core.ingest(vm, recs[done:], t)
            if done < len(recs):
                self.flush_all(lose_reply)

    def flush(self, vm: int, lose_reply: bool = False) -> None:
        pairs, times = self.core.take(vm)
        self.pairs.append(np.concatenate([pairs.reshape(-1), times]))
        if not len(pairs):
            return
        self.core.sync()
        status = self.merge_status(vm, pairs)
        merged, mismatched = int(np.count_nonzero(status == 0)), int(np.count_nonzero(status))
        self.results.append((vm, merged, mismatched))
        if lose_reply:
            return  # the reply never came: the books keep the pages unconfirmed
        if self.status_mode:
            self.core.settle(vm, pairs, status)
        elif mismatched:
            self.core.reconcile(vm, self.list(vm))
        else:
            self.core.confirm(vm, pairs)

    def flush_all(self, lose_reply: bool = False) -> None:
        for vm in range(len(self.ram)):
            self.flush(vm, lose_reply)

    def check(self) -> int:
        if self.status_mode:  # breaks as the agents report them, freeing on their MAPPED word
            broken = sum(self.core.apply_breaks(vm, self.breaks(vm)) for vm in range(len(self.ram)))
            cand = self.core.unreferenced()
            self.core.free_slots(cand[~self.mapped_by_anyone(cand)])
            return broken
        lists = [self.list(vm) for vm in range(len(self.ram))]
        broken = sum(self.core.reconcile(vm, lists[vm]) for vm in range(len(self.ram)))
        self.core.free_unused(lists)
        return broken


def records(pairs: list[tuple[int, int]]) -> np.ndarray:
    r = np.zeros(len(pairs), dtype=RECORD_DTYPE)
    if pairs:
        r["gpa"] = [g for g, _ in pairs]
        r["hash"] = [h for _, h in pairs]
    r["flags"] = 1
    return r


def native(key, fd, stage, max_slots):
    return NativeCore(key, fd, stage, max_slots)


def reference(key, fd, stage, max_slots):
    return ReferenceCore(key, fd, stage, max_slots)


def scenario(world: World, seed: int, rounds: int = 30) -> None:
    """Replay a seeded stream: files read in runs by several VMs, rewrites, forged and stale
    records, breaks, lost replies, checks."""
    rng = random.Random(seed)
    nvms, npages = len(world.ram), world.npages
    pool = [rng.randbytes(PAGE) for _ in range(400)] + [bytes(PAGE)]
    t = 1_000_000
    for _ in range(rounds):
        t += rng.randrange(1, 10**8)
        vm = rng.randrange(nvms)
        kind = rng.random()
        recs: list[tuple[int, int]] = []
        if kind < 0.5:  # read a "file": a run of pool contents into a run of pages, hint it
            start, n = rng.randrange(npages - 40), rng.randrange(1, 40)
            first = rng.randrange(len(pool) - n)
            for k in range(n):
                world.write(vm, start + k, pool[first + k])
                recs.append(((start + k) * PAGE, xxhash.xxh64_intdigest(pool[first + k])))
        elif kind < 0.6:  # forged: wrong hashes, outside RAM, unaligned
            for _ in range(rng.randrange(1, 30)):
                g = rng.choice([rng.randrange(npages) * PAGE, npages * PAGE + rng.randrange(10) * PAGE,
                                rng.randrange(npages * PAGE) | 1])
                recs.append((g, rng.getrandbits(64)))
        elif kind < 0.7:  # stale: hinted, then written before the engine reads it
            for _ in range(rng.randrange(1, 20)):
                p = rng.randrange(npages)
                c = rng.choice(pool)
                world.write(vm, p, c)
                recs.append((p * PAGE, xxhash.xxh64_intdigest(c)))
                world.write(vm, p, rng.randbytes(PAGE))
        elif kind < 0.8:  # guests write merged pages (copy-on-write breaks), no hint; at times
            # every VM drops the same run (a file deleted everywhere: its slots are freed)
            start, n = rng.randrange(npages - 40), rng.randrange(1, 40)
            for w in range(nvms) if rng.random() < 0.5 else [vm]:
                for p in range(start, start + n):
                    world.write(w, p, rng.choice(pool) if rng.random() < 0.3 else rng.randbytes(PAGE))
        elif kind < 0.9:  # re-hint what is there (honest), some records twice
            for p in rng.sample(range(npages), rng.randrange(1, 30)):
                h = xxhash.xxh64_intdigest(world.read(vm, p))
                recs += [(p * PAGE, h)] * rng.choice((1, 1, 2))
        else:
            world.check()
        if recs:
            world.ingest(vm, records(recs), t, lose_reply=rng.random() < 0.1)
        if rng.random() < 0.3:
            world.flush_all(lose_reply=rng.random() < 0.1)
        if rng.random() < 0.2:
            world.check()
    world.flush_all()
    world.check()


COMPARED = ("hinted", "skipped", "changed", "broken", "planned", "candidates", "evicted", "merged",
            "pending", "adopted", "unconfirmed", "bad_list")
CORE_COMPARED = ("slots_hw", "slots_live", "slots_freed", "slots_reused", "appended", "entries", "lost",
                 "kept_listed", "unreferenced", "slot_limit")


def compare(a: World, b: World) -> None:
    assert len(a.pairs) == len(b.pairs)
    for i, (x, y) in enumerate(zip(a.pairs, b.pairs, strict=True)):
        assert np.array_equal(x, y), f"batch {i} differs"
    assert a.results == b.results
    for vm in range(len(a.ram)):
        ca, cb = a.core.vm_counters(vm), b.core.vm_counters(vm)
        assert {k: ca[k] for k in COMPARED} == {k: cb[k] for k in COMPARED}, vm
    ca, cb = a.core.counters(), b.core.counters()
    assert {k: ca[k] for k in CORE_COMPARED} == {k: cb[k] for k in CORE_COMPARED}
    assert ca["lost"] == 0
    for sl in range(ca["slots_hw"]):
        sa, sb = a.core.slot(sl), b.core.slot(sl)
        assert sa == sb, sl
        if not sa.free:
            assert os.pread(a.store_fd, PAGE, sl * PAGE) == os.pread(b.store_fd, PAGE, sl * PAGE), sl


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("quota", [1.0, 0.05])
@pytest.mark.parametrize("view", [False, True], ids=["pread", "view"])
def test_core_plans_as_the_reference(seed, quota, view):
    """``view``: the native core copies RAM-file pages from guarded views of the files (as the
    engine runs it) while the reference preads them: the same plans all the same."""
    worlds = [World(native, quota=quota, view=view), World(reference, quota=quota)]
    try:
        for w in worlds:
            scenario(w, seed)
        compare(*worlds)
        n = worlds[0]
        merged = sum(m for _, m, _ in n.results)
        assert merged > 0 and n.core.counters()["appended"] > 0
        # every page an agent maps holds its store slot's bytes, and no mapped slot was freed
        for vm in range(len(n.ram)):
            for p, sl in n.mapped[vm].items():
                info = n.core.slot(sl)
                assert info is not None and not info.free, (vm, p, sl)
                assert os.pread(n.store_fd, PAGE, sl * PAGE) == n.read(vm, p)
    finally:
        for w in worlds:
            w.close()


@pytest.mark.parametrize("seed", range(6))
def test_core_settles_breaks_and_frees_as_the_reference(seed):
    """The same, with agents that answer per pair, report breaks and say which slots they map
    (the pause-free agent's MERGE status, BREAKS and MAPPED), and with replies lost at times
    (then the books wait for a LIST: reconcile)."""
    worlds = [World(native), World(reference)]
    try:
        for w in worlds:
            w.status_mode = True
            scenario(w, 100 + seed)
            w.status_mode = False
            w.check()  # a full LIST reconcile settles what lost replies left unconfirmed
        compare(*worlds)
        n = worlds[0]
        assert sum(n.core.vm_counters(vm)["broken"] for vm in range(3)) > 0
        for vm in range(len(n.ram)):
            for p, sl in n.mapped[vm].items():
                assert not n.core.slot(sl).free and os.pread(n.store_fd, PAGE, sl * PAGE) == n.read(vm, p)
    finally:
        for w in worlds:
            w.close()


def test_small_stage_and_slot_limit_match_too():
    worlds = [World(native, stage=1, max_slots=20), World(reference, stage=1, max_slots=20)]
    try:
        for w in worlds:
            scenario(w, 99, rounds=60)
        compare(*worlds)
        assert worlds[0].core.counters()["slot_limit"] > 0
        assert worlds[0].core.counters()["slots_hw"] <= 20
    finally:
        for w in worlds:
            w.close()


# ------------------------------------------------------------------ targeted behaviour


def test_identical_readers_merge_once_per_pair_and_store_once():
    w = World(native, nvms=2, npages=128, batch=4096)
    try:
        rng = random.Random(5)
        pool = [rng.randbytes(PAGE) for _ in range(100)]
        for vm in (0, 1):
            for k, c in enumerate(pool):
                w.write(vm, k, c)
        hints = records([(k * PAGE, xxhash.xxh64_intdigest(c)) for k, c in enumerate(pool)])
        w.core.profile(True)
        w.ingest(0, hints, 1)
        w.ingest(1, hints, 2)
        w.flush_all()
        c = w.core.counters()
        assert c["appended"] == 100 and c["slots_live"] == 100
        assert [r[1:] for r in w.results] == [(100, 0), (100, 0)]
        # every page was read exactly once (no re-read of the first holder), keyed once
        assert c["n_read"] == 200 and c["n_key"] == 200
        # merged pages hinted again with the same content: nothing is read
        w.ingest(0, hints, 3)
        assert w.core.counters()["n_read"] == 200 and w.core.vm_counters(0)["skipped"] == 100
    finally:
        w.close()


def test_planted_xxh64_collision_only_hurts_an_xxh64_index():
    """A guest stores, under the XXH64 of honest content Y, a page X != Y (two copies of it,
    so it becomes a store slot). Indexed by XXH64, every honest holder of Y is then planned
    against X and never merges; indexed by the secret key, the honest pair merges."""
    rng = random.Random(8)
    ys = [rng.randbytes(PAGE) for _ in range(50)]
    xs = [xxh64_collision(y) for y in ys]
    out = {}
    for name, make in (("xxh64", lambda k, f, s, m: ReferenceCore(k, f, s, m, keyed=False)),
                       ("keyed", native)):
        w = World(make, nvms=3, npages=128, batch=4096)
        try:
            for k in range(50):  # the attacker (VM 2) holds two copies of each X
                w.write(2, k, xs[k])
                w.write(2, 64 + k, xs[k])
                for vm in (0, 1):
                    w.write(vm, k, ys[k])
            h = [xxhash.xxh64_intdigest(y) for y in ys]
            w.ingest(2, records([(k * PAGE, h[k]) for k in range(50)] + [((64 + k) * PAGE, h[k]) for k in range(50)]), 1)
            w.flush_all()
            w.ingest(0, records([(k * PAGE, h[k]) for k in range(50)]), 2)
            w.ingest(1, records([(k * PAGE, h[k]) for k in range(50)]), 3)
            w.flush_all()
            out[name] = sum(1 for vm in (0, 1) for k in range(50) if k in w.mapped[vm])
        finally:
            w.close()
    assert out == {"xxh64": 0, "keyed": 100}


def test_quota_bounds_a_flooding_guest():
    """A guest rewriting its pages with ever new content and hinting them again: its first
    holders stay within its quota (and one per page), the memory within the bound, and an
    honest pair still merges."""
    npages = 1024
    w = World(native, nvms=3, npages=npages, batch=512, quota=0.05)
    try:
        rng = random.Random(1)
        quota = index.candidate_quota(npages * PAGE, 0.05)
        for r in range(40):
            recs = []
            for p in range(0, npages, 3):
                c = rng.randbytes(PAGE)
                w.write(2, p, c)
                recs.append((p * PAGE, xxhash.xxh64_intdigest(c)))
            w.ingest(2, records(recs), r)
        c2 = w.core.vm_counters(2)
        assert c2["candidates"] <= quota and c2["evicted"] >= 40 * (npages // 3) - quota
        c = w.core.counters()
        bound = index.memory_bound([npages * PAGE] * 3, [quota] * 3, 512, 8, w.core.max_slots,
                                   core_mod.base_bytes())
        assert c["entries"] <= 3 * quota and c["mem_bytes"] <= bound
        honest = [rng.randbytes(PAGE) for _ in range(30)]
        for vm in (0, 1):
            for k, pg in enumerate(honest):
                w.write(vm, k, pg)
            w.ingest(vm, records([(k * PAGE, xxhash.xxh64_intdigest(pg)) for k, pg in enumerate(honest)]), 99)
        w.flush_all()
        assert all(k in w.mapped[vm] for vm in (0, 1) for k in range(30))
    finally:
        w.close()


def test_a_lost_reply_never_frees_a_mapped_slot():
    """The agent of VM 1 merges its batch but the reply is lost; VM 0 (the other holder) then
    writes its page. The slot must stay: VM 1 still maps it."""
    w = World(native, nvms=2, npages=64)
    try:
        pg = random.Random(2).randbytes(PAGE)
        h = xxhash.xxh64_intdigest(pg)
        for vm in (0, 1):
            w.write(vm, 5, pg)
        w.ingest(0, records([(5 * PAGE, h)]), 1)
        w.ingest(1, records([(5 * PAGE, h)]), 2)
        w.flush(0)
        w.flush(1, lose_reply=True)
        assert w.mapped[1] == {5: 0}  # the merge was done
        w.write(0, 5, random.Random(3).randbytes(PAGE))  # the other holder breaks
        w.check()
        info = w.core.slot(0)
        assert info is not None and not info.free and info.refs == 1
        assert os.pread(w.store_fd, PAGE, 0) == pg
        # once VM 1 writes too, nobody maps it: freed
        w.write(1, 5, bytes(PAGE))
        w.check()
        assert w.core.slot(0).free and w.core.counters()["lost"] == 0
    finally:
        w.close()


def test_free_waits_for_every_list():
    """A slot some agent's LIST names is never freed, even if the books hold no reference."""
    w = World(native, nvms=2, npages=64)
    try:
        pg = random.Random(4).randbytes(PAGE)
        h = xxhash.xxh64_intdigest(pg)
        for vm in (0, 1):
            w.write(vm, 1, pg)
            w.ingest(vm, records([(PAGE, h)]), 1)
        w.flush_all()
        # VM 0's books let go (a break), but its agent still maps the slot in this LIST
        w.write(0, 1, bytes(PAGE))
        w.write(1, 1, bytes(PAGE))
        still = np.array([(PAGE, 0, 1)], dtype=np.uint64)
        w.core.reconcile(0, np.zeros((0, 3), np.uint64))
        w.core.reconcile(1, np.zeros((0, 3), np.uint64))
        assert w.core.free_unused([still, np.zeros((0, 3), np.uint64)]) == 0
        assert w.core.counters()["kept_listed"] == 1 and not w.core.slot(0).free
        assert w.core.free_unused([np.zeros((0, 3), np.uint64)] * 2) == 1
    finally:
        w.close()


def test_view_reads_a_punched_page_as_zeros_and_leaves_it_a_hole():
    """A page punched out of the RAM file between its hint and the engine's read (an agent's
    merge, a balloon) faults in the engine's guarded view: it reads as zeros, as pread of a hole
    does (the record is refused unless it hashed zeros), and the hole is not filled."""
    w = World(native, nvms=2, view=True)
    try:
        rng = random.Random(5)
        pages = [rng.randbytes(PAGE) for _ in range(8)]
        for vm in range(2):
            for p, pg in enumerate(pages):
                w.write(vm, p, pg)
        hints = [(p * PAGE, xxhash.xxh64_intdigest(pg)) for p, pg in enumerate(pages)]
        for p in (2, 5):  # punched after the hint
            punch_hole(w.ram[1], p * PAGE, PAGE)
        w.ingest(0, records(hints), 1)
        w.ingest(1, records(hints + [(2 * PAGE, xxhash.xxh64_intdigest(bytes(PAGE)))]), 2)
        c = w.core.vm_counters(1)
        assert c["changed"] == 2 and c["planned"] == 6
        for p in (2, 5):
            assert os.lseek(w.ram[1], p * PAGE, os.SEEK_DATA) != p * PAGE, f"page {p} filled"
        with open("/proc/self/pagemap", "rb") as f:  # the view keeps no page-table entries (a
            f.seek(w.views[1].addr // PAGE * 8)  # punch would have to unmap them here too)
            assert not any(int.from_bytes(f.read(8), "little") >> 63 for _ in range(8))
        w.flush_all()
        assert sorted(g // PAGE for g, _, _ in w.list(1).tolist()) == [0, 1, 3, 4, 6, 7]
    finally:
        w.close()


def test_ram_file_pages_are_read_through_the_view():
    """With a view set, the core reads a never-merged page from the view, not the RAM file: a
    view of another file (VM 1's RAM given as VM 0's view) makes VM 0's honest records fail
    and records of VM 1's bytes pass."""
    w = World(native, nvms=2)
    try:
        rng = random.Random(9)
        a, b = rng.randbytes(PAGE), rng.randbytes(PAGE)
        w.write(0, 0, a)
        w.write(1, 0, b)
        with RamMirror(f"/proc/self/fd/{w.ram[1]}", w.npages, "ram1") as other:
            w.core.set_view(0, other.addr)
            w.ingest(0, records([(0, xxhash.xxh64_intdigest(a)), (0, xxhash.xxh64_intdigest(b))]), 1)
            w.core.set_view(0, 0)
        c = w.core.vm_counters(0)
        assert (c["changed"], c["candidates"]) == (1, 1)
        assert w.core.find(w.core.keyed(b)) == ("candidate", 0, 0)  # the view's bytes
        assert w.core.find(w.core.keyed(a)) is None
    finally:
        w.close()
