"""The incremental meter against the full scan, on helper processes standing in for QEMU (real
kernel behaviour: write-protect tracking through ``wptrack``, copy-on-write, remaps of a store
file over RAM pages, hole punches), and the write tracker's own view of writes.

The same comparison on real guests is in ``test_oracle_vms.py``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from harness import accounting as acc
from harness import oracle
from harness.sharing import store as acc_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PFNs and pidfd_getfd need root")

CHILD = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
size, ram, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if ram == "-":
    rfd = -1
    base = libc.mmap(None, size, 3, 0x22, -1, 0)  # MAP_PRIVATE | MAP_ANONYMOUS
else:
    rfd = os.open(ram, os.O_RDWR)
    base = libc.mmap(None, size, 3, 0x01, rfd, 0)  # MAP_SHARED
sfd = os.open(store, os.O_RDONLY)
mem = (ctypes.c_uint8 * size).from_address(base)
print(base, flush=True)
keep = []
for line in sys.stdin:
    for cmd in line.split():
        op, a, b = cmd.split(":")
        a, b = int(a), int(b)
        if op == "w":  # write byte b at the start of page a
            mem[a * 4096] = b
        elif op == "f":  # fill page a with byte b
            ctypes.memset(base + a * 4096, b, 4096)
        elif op == "r":  # read page a (faults it in)
            _ = mem[a * 4096]
        elif op == "m":  # merge: map store page b over guest page a (private, like the agent)
            libc.mmap(base + a * 4096, 4096, 3, 0x12, sfd, b * 4096)  # MAP_PRIVATE | MAP_FIXED
            if rfd >= 0:
                libc.fallocate(rfd, 3, a * 4096, 4096)  # punch the RAM file page
        elif op == "u":  # register pages [a, a+b) (b=0: the whole RAM) with a userfaultfd of our own (an agent)
            import struct
            libc.syscall.restype = ctypes.c_long
            u = libc.syscall(323, os.O_CLOEXEC)
            api = ctypes.create_string_buffer(struct.pack("QQQ", 0xAA, (1 << 12) | (1 << 13), 0))
            assert libc.ioctl(u, 0xC018AA3F, api) == 0
            reg = ctypes.create_string_buffer(struct.pack("QQQQ", base + a * 4096, b * 4096 or size, 2, 0))
            assert libc.ioctl(u, 0xC020AA00, reg) == 0, ctypes.get_errno()
            keep.append(u)
        elif op == "x":  # close our userfaultfds (their registrations go with them)
            while keep:
                os.close(keep.pop())
        elif op == "d":  # discard page a (a balloon inflating)
            if rfd >= 0:
                libc.fallocate(rfd, 3, a * 4096, 4096)
            libc.madvise(base + a * 4096, 4096, 4)
    print("ok", flush=True)
"""

NPAGES = 256


class Child:
    def __init__(self, tmp: Path, name: str, anon: bool, store: Path, track: bool = True) -> None:
        self.ram = None if anon else tmp / f"{name}-ram"
        if self.ram is not None:
            with open(self.ram, "wb") as f:
                f.truncate(NPAGES * 4096)
        env = oracle.tracker_env(dict(os.environ)) if track else dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(NPAGES * 4096), str(self.ram or "-"), str(store)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.base = int(self.proc.stdout.readline())
        self.target = acc.Target(name, self.proc.pid, self.base, NPAGES * 4096, ram_file=self.ram)

    def do(self, *cmds: str) -> None:
        self.proc.stdin.write(" ".join(cmds) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def shm():
    """A private folder on tmpfs (the guests' RAM files and stores are shmem, like QEMU's):
    made by mkdtemp, 0700, an unpredictable name, so nothing in it can be planted by another
    user; removed with all it holds."""
    d = Path(tempfile.mkdtemp(prefix="satori-test-", dir=os.environ.get("SATORI_SHM", "/dev/shm")))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(shm):
    """A content store of 32 pages: pages 0-15 hold data (page k filled with byte 100 + k),
    16-31 are holes."""
    path = shm / "store"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.truncate(32 * 4096)
        for k in range(16):
            f.seek(k * 4096)
            f.write(bytes([100 + k]) * 4096)
    return path


def _same(a: acc.Sample, b: acc.Sample) -> None:
    keys = ("G", "F", "C", "G_nonzero", "F_nonzero", "C_nonzero", "G_disk", "F_disk", "C_disk",
            "zero_pages", "store_pages", "store_only_pages")
    assert {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}
    assert [(v.name, v.G, v.present, v.store_backed) for v in a.vms] == \
        [(v.name, v.G, v.present, v.store_backed) for v in b.vms]
    assert a.credits == pytest.approx(b.credits)


def _figures_of(meter: acc.Meter) -> dict:
    fr, h, sf, sh = meter.state()
    f = acc.figures(fr, h, sf, sh, meter.index.disk_set)
    return {k: (x.G, x.F, x.C) for k, x in f.items() if x is not None}


@pytest.mark.parametrize("anon", [False, True], ids=["file-ram", "anon-ram"])
def test_incremental_equals_full_scan(shm, store, anon):
    page7 = np.full(4096, 7, np.uint8)
    disk = oracle.unique_hashes(oracle.hash_pages(np.concatenate([page7, np.full(4096, 101, np.uint8)])))
    kids = [Child(shm, f"k{i}", anon, store) for i in range(2)]
    try:
        rounds = [
            # the same data in both, some zero pages, one page read only
            (["f:1:7", "f:2:8", "f:3:0", "r:9:0"], ["f:1:7", "f:2:9", "r:5:0"]),
            # "merges": store pages mapped over guest pages (one never touched afterwards)
            (["m:10:1", "m:11:2", "r:10:0"], ["m:10:1", "m:12:3"]),
            # writes in place, a copy-on-write break of a merged page, a discard
            (["w:1:9", "w:11:5"], ["f:2:7", "d:5:0"]),
            # nothing at all: the incremental meter must read (almost) nothing
            ([], []),
            # a remap over a page already merged, and a write to a page not written since
            (["m:11:4", "f:20:7"], ["w:12:1", "f:1:101"]),
        ]
        with acc.Meter([k.target for k in kids], store, disk_set=disk) as meter:
            meter.compact_slack = 0  # forget dead contents at every sample: renumbering is tested too
            assert meter.untracked == {}
            first = meter.sample()
            assert first.method == "incremental" and first.untracked_pages == 0
            for i, (a, b) in enumerate(rounds):
                kids[0].do(*a) if a else None
                kids[1].do(*b) if b else None
                inc = meter.sample()
                full = acc.measure([k.target for k in kids], store, disk_set=disk)
                _same(inc, full)
                assert inc.stale == 0
                assert _figures_of(meter) == {
                    "all": (full.G, full.F, full.C), "nonzero": (full.G_nonzero, full.F_nonzero, full.C_nonzero),
                    "disk": (full.G_disk, full.F_disk, full.C_disk)}
                if i == 3:  # nothing changed: only the re-check slice was read
                    assert inc.frames_read - inc.scrubbed == 0
                    assert full.frames_read >= full.G - full.store_pages
        assert full.store_only_pages > 0 and any(v.store_backed for v in full.vms)
        assert sum(full.credits.values()) > 0 and full.M > 0  # a store page mapped by both
    finally:
        for k in kids:
            k.close()


def test_tracker_reports_writes_only_once(shm, store):
    kid = Child(shm, "t", False, store)
    try:
        kid.do("f:1:1", "f:2:2")
        with oracle.WriteTracker(kid.proc.pid, kid.base, NPAGES) as tr:
            first = tr.scan()
            assert len(first.untracked) and first.registered == NPAGES  # registered at the first look
            # protected as soon as registered: the writes before the first look are not news
            second = tr.scan()
            assert second.untracked.tolist() == [] and tr.untracked_pages == 0 and second.written.tolist() == []
            kid.do("w:7:1", "w:9:1")
            assert tr.scan().written.tolist() == [[7, 8], [9, 10]]
            kid.do("m:20:1")  # a new mapping: reported as not tracked, then registered
            r = tr.scan()
            assert [20, 21] in r.untracked.tolist() and r.registered >= 1
            assert tr.scan().untracked.tolist() == []
    finally:
        kid.close()


def test_second_tracker_and_untracked_process_are_refused(shm, store):
    kid = Child(shm, "u", False, store)
    plain = Child(shm, "p", False, store, track=False)
    try:
        with oracle.WriteTracker(kid.proc.pid, kid.base, NPAGES) as tr:
            tr.scan()
            with pytest.raises(oracle.TrackerUnavailable, match="another tracker"):
                oracle.WriteTracker(kid.proc.pid, kid.base, NPAGES)
        with oracle.WriteTracker(kid.proc.pid, kid.base, NPAGES) as tr:  # the first one is gone
            assert len(tr.scan().untracked)  # it unregistered what it had: registered again
            kid.do("w:3:1")
            assert tr.scan().written.tolist() == [[3, 4]]
        with pytest.raises(oracle.TrackerUnavailable, match="without wptrack"):
            oracle.WriteTracker(plain.proc.pid, plain.base, NPAGES)
        with acc.Meter([plain.target]) as m:  # no tracker: every sample is a full scan, said so
            assert "without wptrack" in m.untracked["p"]
            assert m.sample().untracked_pages == NPAGES
    finally:
        kid.close()
        plain.close()


def test_recheck_counts_changes_the_tracker_cannot_see(shm, store):
    """A write that bypasses QEMU's page tables (another process writing the RAM file) and a page
    dropped and faulted in again by a read between two samples (same frame, zeros, no write) are
    invisible to write tracking: the re-check finds them, counts them as stale, and the figures
    come back to the full scan's."""
    kid = Child(shm, "s", False, store)
    try:
        kid.do("f:1:7", "f:2:8", "f:3:9")
        with acc.Meter([kid.target], disk_set=None, scrub=NPAGES) as meter:  # re-check everything
            meter.sample()
            meter.sample()
            assert meter.stale == 0
            fd = os.open(kid.ram, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes([5]) * 4096, 1 * 4096)  # behind QEMU's back
            finally:
                os.close(fd)
            kid.do("d:2:0", "r:2:0")  # discarded, read again: zeros, probably the same frame
            meter.sample()  # the re-check reads them: suspects
            s = meter.sample()  # not written since: stale
            assert s.stale >= 1
            full = acc.measure([kid.target], disk_set=None)
            _same(s, full)
    finally:
        kid.close()


def _punch(path: Path, page: int, fill: int | None = None, punch: bool = True) -> None:
    """What the engine does to a store slot it frees and reuses (punch, then write another
    content), or with ``punch=False`` a rewrite in place that the engine never does."""
    fd = os.open(path, os.O_RDWR)
    try:
        if punch:
            acc_store.punch_hole(fd, page * 4096, 4096)
        if fill is not None:
            os.pwrite(fd, bytes([fill]) * 4096, page * 4096)
    finally:
        os.close(fd)


def test_store_watch_sees_punches_and_never_fills_holes(store):
    """The watch's own mapping loses a page when it is punched out of the file (even if written
    again at once), and holding a hole fails without allocating it."""
    fd = os.open(store, os.O_RDONLY)
    try:
        with contextlib.closing(oracle.StoreWatch(store, 8)) as w:  # grows past 8 pages below
            assert not w.present(32).any()
            before = os.fstat(fd).st_blocks
            assert w.hold(np.array([0, 1, 2, 3, 15, 16, 20])).tolist() == [True] * 5 + [False] * 2
            assert os.fstat(fd).st_blocks == before  # the holes stayed holes
            assert np.flatnonzero(w.present(32)).tolist() == [0, 1, 2, 3, 15]
            _punch(store, 1, fill=7)  # freed and reused with another content
            _punch(store, 2)  # freed
            _punch(store, 3, fill=9, punch=False)  # in place: the watch cannot see it
            assert np.flatnonzero(w.present(32)).tolist() == [0, 3, 15]
    finally:
        os.close(fd)


def test_ram_mirror_reads_written_pages_and_never_fills_holes(tmp_path):
    """The incremental meter's view of a RAM file: pages read as ``pread`` reads them, a hole
    (never written, or punched after an earlier read) reads as zeros and stays a hole,
    from any thread, with Python's own SIGBUS handler (faulthandler, on under pytest) in place."""
    import faulthandler
    import threading

    from harness import memfd

    assert faulthandler.is_enabled()
    mfd = memfd.create("satori-test-ram", 64 * 4096)
    path = f"/proc/{os.getpid()}/fd/{mfd}"
    try:
        for p in (0, 1, 2, 9, 40, 63):
            os.pwrite(mfd, os.urandom(4096), p * 4096)
        before = os.fstat(mfd).st_blocks
        every = np.arange(64)
        want = oracle.hash_fd_pages(mfd, 0, every)
        with oracle.RamMirror(path, 64, "test RAM") as m:
            assert (m.hash_pages(every) == want).all()
            assert m.holes == 58 and os.fstat(mfd).st_blocks == before
            with open("/proc/self/pagemap", "rb") as pm:  # a read leaves no entry in the view
                pm.seek(m.addr // 4096 * 8)  # (else every agent's punch must unmap it here too)
                assert not any(int.from_bytes(pm.read(8), "little") >> 63 for _ in range(64))
            _punch(path, 9)
            want[9] = oracle.ZERO_HASH
            got: list[np.ndarray] = []
            readers = [threading.Thread(target=lambda: got.append(m.hash_pages(every))) for _ in range(3)]
            for t in readers:
                t.start()
            for t in readers:
                t.join()
            assert len(got) == 3 and all((g == want).all() for g in got)
            assert m.holes == 58 + 3 * 59 and os.fstat(mfd).st_blocks < before
            assert (m.hash_pages(np.array([0, 40])) == want[[0, 40]]).all()
        assert faulthandler.is_enabled()
    finally:
        os.close(mfd)


def test_reused_store_slot_is_read_again_and_in_place_rewrite_is_stale(shm, store):
    """A store slot punched and written with another content between two samples (the engine
    freeing and reusing it) is read again: the figures equal the full scan's and nothing is
    stale. A store page rewritten in place behind the watch is found by the re-check: stale."""
    kid = Child(shm, "z", False, store)
    try:
        kid.do("f:1:7", "m:10:1", "m:11:2")
        with acc.Meter([kid.target], store, disk_set=None, scrub=4) as meter:
            assert meter.untracked == {}
            meter.sample()
            meter.sample()
            _punch(store, 3, fill=7)  # a store-only slot reused for the content of guest page 1
            _punch(store, 4, fill=101)  # another reused for the content of slot 1, which the
            kid.do("m:12:4")  # guest maps already: C is one less than with slot 4's old content
            s = meter.sample()
            _same(s, acc.measure([kid.target], store, disk_set=None))
            assert meter.store.reread == 2 and s.stale == 0
            for _ in range(32 // 4 + 1):  # the re-check goes round the store: nothing to find
                s = meter.sample()
            assert s.stale == 0
            _punch(store, 5, fill=8, punch=False)  # behind the watch
            for _ in range(32 // 4 + 1):
                s = meter.sample()
            assert s.stale == 1 and meter.store.reread == 2
            _same(s, acc.measure([kid.target], store, disk_set=None))
    finally:
        kid.close()


def test_meter_process_samples_like_a_meter_and_ends_with_close(shm, store):
    kids = [Child(shm, f"m{i}", False, store) for i in range(2)]
    try:
        kids[0].do("f:1:7", "m:4:1")
        kids[1].do("f:1:7", "m:5:1")
        with acc.MeterProcess({"d": ([k.target for k in kids], store)}) as mp:
            assert mp.untracked == {"d": {}}
            pid = mp.proc.pid
            mp.sample()
            kids[0].do("w:1:3")
            s = mp.sample()["d"]
            full = acc.measure([k.target for k in kids], store)
            _same(s, full)
            assert s.method == "incremental" and mp.cpu_s() >= 0
            mp.drop("d")
            assert mp.sample() == {} and mp.errors == {}
        assert not Path(f"/proc/{pid}").exists() or mp.proc.poll() is not None
    finally:
        for k in kids:
            k.close()


def test_mappings_another_userfaultfd_holds_are_reread_and_said_so(shm, store):
    """A merge agent that write-protects guest RAM itself holds its mappings: the oracle cannot
    register them, says so, re-reads them at every sample, and still equals the full scan."""
    kid = Child(shm, "b", False, store)
    try:
        kid.do("f:1:7", "f:2:8", "u:0:0")
        with acc.Meter([kid.target], store, disk_set=None) as meter:
            s = meter.sample()
            assert s.untracked_pages == NPAGES and "another userfaultfd" in meter.untracked["b"]
            kid.do("w:1:9")
            s = meter.sample()
            _same(s, acc.measure([kid.target], store, disk_set=None))
            assert s.frames_read >= s.G  # every present page read again
    finally:
        kid.close()


def test_a_chunk_another_userfaultfd_holds_leaves_only_that_chunk_untracked(shm, store):
    """A merge agent holds the <= 64 pages it is merging with its own userfaultfd for a moment:
    the oracle registers the rest of the range around them (half by half) and only the pages held
    stay untracked; once the agent lets them go they are registered at the next sample."""
    kid = Child(shm, "c", False, store)
    try:
        kid.do("f:1:7", "f:100:8", "u:96:64")
        with acc.Meter([kid.target], store, disk_set=None) as meter:
            s = meter.sample()
            assert s.untracked_pages == 64 and "another userfaultfd" in meter.untracked["c"]
            _same(s, acc.measure([kid.target], store, disk_set=None))
            s = meter.sample()
            assert s.untracked_pages == 64 and s.frames_read <= 64 + s.scrubbed  # the rest is tracked
            kid.do("x:0:0", "w:100:9")  # the agent lets go (a write meanwhile)
            s = meter.sample()
            assert s.untracked_pages == 0 and meter.untracked == {}
            _same(s, acc.measure([kid.target], store, disk_set=None))
            s = meter.sample()
            assert s.frames_read == s.scrubbed
    finally:
        kid.close()


def test_meter_process_reports_a_domain_it_cannot_measure_and_goes_on(shm, store):
    kids = [Child(shm, f"x{i}", False, store) for i in range(2)]
    try:
        with acc.MeterProcess({"a": ([kids[0].target], None), "b": ([kids[1].target], None)}) as mp:
            assert set(mp.sample()) == {"a", "b"}
            kids[1].close()  # its "QEMU" dies
            samples = mp.sample()
            assert set(samples) == {"a"} and "b" in mp.errors
            mp.drop("b")
            assert set(mp.sample()) == {"a"} and mp.errors == {}
    finally:
        kids[0].close()


def test_registering_new_mappings_never_swallows_other_writes(shm, store):
    """A write that lands while a look registers new mappings (after it read the written pages,
    before it protects what it registered) still shows at the next look."""
    kid = Child(shm, "w", False, store)
    try:
        kid.do("f:1:1", "f:7:1")
        with oracle.WriteTracker(kid.proc.pid, kid.base, NPAGES) as tr:
            tr.scan()
            tr.scan()
            kid.do("m:20:1")  # a new mapping: the next look registers it
            real = tr._scan
            calls = []

            def scan_then_write(*a, **k):
                out = real(*a, **k)
                calls.append(1)
                if len(calls) == 1:  # right after the look read the written pages
                    kid.do("w:7:5")
                return out

            tr._scan = scan_then_write
            r = tr.scan()
            assert r.registered >= 1 and [7, 8] not in r.written.tolist()
            tr._scan = real
            assert [7, 8] in tr.scan().written.tolist()
    finally:
        kid.close()


def test_remap_between_scan_and_read_is_not_stale(shm, store):
    """A merge agent remaps a page (MAP_FIXED of a store page) after the sample's write-tracker
    scan and before its pagemap read: the re-check slice sees the page on another frame with no
    write reported. That is no miss (the next scan reports the new mapping untracked): the page is
    read at once and not counted stale, while a move the next scan cannot explain still is
    (test_recheck_counts_changes_the_tracker_cannot_see)."""
    kid = Child(shm, "r", False, store)
    try:
        kid.do("f:10:101", "f:11:7")
        with acc.Meter([kid.target], store, disk_set=None, scrub=NPAGES) as meter:  # re-check all
            meter.sample()
            meter.sample()
            tracker = meter.views[0].tracker
            real_scan = tracker.scan

            def scan_then_remap():
                r = real_scan()
                kid.do("m:10:1", "r:10:0")  # the agent merges page 10 right after the scan (mapped in)
                return r

            tracker.scan = scan_then_remap
            s1 = meter.sample()
            tracker.scan = real_scan
            # read as QEMU maps it now (the store page), not from its punched RAM-file page
            _same(s1, acc.measure([kid.target], store, disk_set=None))
            s2 = meter.sample()
            assert (s1.stale, s2.stale, meter.stale) == (0, 0, 0)
            _same(s2, acc.measure([kid.target], store, disk_set=None))
    finally:
        kid.close()


def test_store_slot_freed_during_sample_is_not_stale(shm, store):
    """The engine frees (punches, maybe reuses) a store slot after the sample's look at the
    store watch and before its re-check reads the slot: the re-check sees another content, but
    the punch took the watch's entry, so the next sample re-reads the slot. Not stale (it was
    counted as stale, 179 pages at once in an adversary run while slots were freed in runs)."""
    kid = Child(shm, "q", False, store)
    try:
        kid.do("f:1:7", "m:10:1")
        with acc.Meter([kid.target], store, disk_set=None, scrub=NPAGES) as meter:
            meter.sample()
            meter.sample()  # store pages read twice: in the re-check from now on
            w = meter.store.watch
            real = w.present
            calls = []

            def look_then_free(n):
                out = real(n)
                if not calls:
                    _punch(store, 3, fill=7)  # freed and reused
                    _punch(store, 4)  # freed
                calls.append(n)
                return out

            w.present = look_then_free
            s1 = meter.sample()
            w.present = real
            s2 = meter.sample()
            assert (s1.stale, s2.stale, meter.stale) == (0, 0, 0)
            assert meter.store.reread >= 1
            _same(s2, acc.measure([kid.target], store, disk_set=None))
    finally:
        kid.close()


def test_ksm_unshare_moves_pages_unseen_by_the_tracker_and_counts_cow_ksm(tmp_path):
    """Why ``cow_ksm`` is one of the accounting's frame-move counters: ksmd's unshare of a KSM
    page (MADV_UNMERGEABLE here; ksmd's own give-up path, break_cow, is the same break_ksm)
    copies the page to a new frame and keeps its uffd-wp bit, so the write tracker reports no
    write while every frame changed; ``cow_ksm`` counts the copies, and the accounting's move
    count with it."""
    from harness import ksm

    src = Path(__file__).parent / "helpers" / "ksm_unshare.c"
    exe = tmp_path / "ksm_unshare"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    with ksm.KSMControl("ksm-fast"):
        before = acc._moves()
        out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout
        after = acc._moves()
    got = dict(kv.split("=") for kv in out.split())
    assert got["merged"] == "1", out
    assert int(got["moved"]) == 64 and int(got["written"]) == 0, out  # unseen by the tracker
    assert int(got["cow_ksm"]) >= 64, out
    assert after - before >= 64  # ... but seen by the accounting's move counters
