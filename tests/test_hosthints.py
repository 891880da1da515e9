"""The host-hints preload (``harness/sharing/hosthints.c``) in a real process, without QEMU.

A child Python process runs with the library preloaded: a shared mapping of a file stands in
for guest RAM (the preload finds it in /proc/self/maps by inode, as in QEMU), a file stands in
for a disk image, and ``os.preadv``/``os.pread`` are the calls QEMU's thread pool makes. The
records it pushes are read back with the harness's own ring reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xxhash

from harness import hints
from harness.sharing import hosthints

PAGE = 4096
RAM_PAGES = 64

CHILD = textwrap.dedent(r"""
    import json, mmap, os, sys, errno
    ram_path, disk, other, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    fd = os.open(ram_path, os.O_RDWR)
    ram = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
    mv = memoryview(ram)
    dfd, ofd = os.open(disk, os.O_RDONLY), os.open(other, os.O_RDONLY)
    heap = bytearray(8 * 4096)
    out = []
    for step in plan:
        kind = step[0]
        if kind == "preadv":  # [(ram offset, length), ...], file offset
            _, iovs, off = step
            out.append(os.preadv(dfd, [mv[a:a + n] for a, n in iovs], off))
        elif kind == "pread":  # pread64 into RAM, looked up as QEMU's would be (global scope)
            _, a, n, off = step
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.pread64.restype = ctypes.c_ssize_t
            libc.pread64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
            addr = ctypes.addressof(ctypes.c_char.from_buffer(ram, a))
            out.append(libc.pread64(dfd, addr, n, off))
        elif kind == "other":
            _, a, n, off = step
            out.append(os.preadv(ofd, [mv[a:a + n]], off))
        elif kind == "heap":
            _, n, off = step
            out.append(os.preadv(dfd, [memoryview(heap)[:n]], off))
        elif kind == "badfd":
            try:
                os.preadv(12345, [mv[0:4096]], 0)
                out.append("no error")
            except OSError as e:
                out.append(errno.errorcode[e.errno])
    print(json.dumps(out))
""")


@pytest.fixture()
def rig(tmp_path: Path):
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * RAM_PAGES * PAGE)
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(256 * PAGE + 1000))  # a tail: reads at the end come up short
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(16 * PAGE))
    ring = tmp_path / "ring"
    return tmp_path, ram, disk, other, ring


def run_child(rig, plan, capacity: int | None = None) -> tuple[list, np.ndarray, hosthints.HostHintCounters]:
    tmp, ram, disk, other, ring = rig
    hints.create_ring_file(ring, 1 << 16, capacity=capacity)
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(hosthints.preload_env(ring, ram, [tmp / "nothing-here.qcow2", disk]))
    p = subprocess.run([sys.executable, "-c", CHILD, str(ram), str(disk), str(other), json.dumps(plan)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with hints.HintRing(ring, RAM_PAGES * PAGE) as r:
        recs = r.poll()
    return json.loads(p.stdout), recs, hosthints.read_counters(ring)


def expect(ram: Path, disk: Path, recs: np.ndarray) -> None:
    """Every record names a RAM page whose bytes are the disk file's at ``sector``."""
    data, img = ram.read_bytes(), disk.read_bytes()
    for r in recs:
        gpa, sector = int(r["gpa"]), int(r["sector"])
        page = data[gpa:gpa + PAGE]
        assert page == img[sector * 512:sector * 512 + PAGE], (gpa, sector)
        assert int(r["hash"]) == xxhash.xxh64_intdigest(page)
        assert int(r["disk"]) == 1  # the second file listed


def test_whole_pages_of_a_scatter_read_are_reported(rig):
    _, ram, disk, _, _ = rig
    # three iovecs: two adjacent ones that split a page between them, one elsewhere; the first
    # starts half-way into a page (its first partial page is not reported)
    plan = [["preadv", [[2 * PAGE + 2048, 2048 + PAGE + 1024], [4 * PAGE + 1024, 3072 + 2 * PAGE],
                        [20 * PAGE, 3 * PAGE]], 8 * PAGE]]
    out, recs, c = run_child(rig, plan)
    assert out == [2048 + PAGE + 1024 + 3072 + 2 * PAGE + 3 * PAGE]
    gpas = sorted(int(g) // PAGE for g in recs["gpa"])
    # run 1: bytes 2.5 .. 7 pages -> whole pages 3, 4, 5, 6; run 2: pages 20, 21, 22
    assert gpas == [3, 4, 5, 6, 20, 21, 22]
    expect(ram, disk, recs)
    assert c.attached and c.calls == 1 and c.pages == 7 and c.records == 7 and c.dropped == 0
    assert c.partial == 1 and c.other == 0 and c.cpu_ns > 0
    # file offsets: the run's first byte came from 8 pages into the file
    by_gpa = {int(r["gpa"]) // PAGE: int(r["sector"]) * 512 for r in recs}
    assert by_gpa[3] == 8 * PAGE + (3 * PAGE - (2 * PAGE + 2048))


def test_short_read_reports_only_what_was_read(rig):
    _, ram, disk, _, _ = rig
    size = disk.stat().st_size
    off = size - 1000 - 2 * PAGE  # 2 whole pages and 1000 bytes left in the file
    out, recs, c = run_child(rig, [["pread", 10 * PAGE, 4 * PAGE, off]])
    assert out == [2 * PAGE + 1000]
    assert sorted(int(g) // PAGE for g in recs["gpa"]) == [10, 11]
    expect(ram, disk, recs)
    assert c.partial == 1 and c.calls == 1


def test_reads_outside_ram_or_from_other_files_push_nothing(rig):
    out, recs, c = run_child(rig, [["heap", 4 * PAGE, 0], ["other", 0, 4 * PAGE, 0], ["badfd"]])
    assert out == [4 * PAGE, 4 * PAGE, "EBADF"]  # the caller still sees the real result and errno
    assert len(recs) == 0
    assert c.calls == 1 and c.other == 1 and c.pages == 0


def test_full_ring_drops_and_counts(rig):
    _, ram, disk, _, _ = rig
    out, recs, c = run_child(rig, [["preadv", [[0, 32 * PAGE]], 0]], capacity=10)
    assert len(recs) == 10 and c.records == 10 and c.dropped == 22 and c.pages == 32
    expect(ram, disk, recs)


def test_inert_without_a_ring(rig, tmp_path):
    # preloaded without SATORI_HOSTHINTS_RING: every call passes straight through
    env = dict(os.environ, LD_PRELOAD=str(hosthints.ensure_library()))
    code = "import os; fd = os.open(%r, os.O_RDONLY); print(len(os.pread(fd, 8192, 0)), os.environ.get('LD_PRELOAD'))"
    p = subprocess.run([sys.executable, "-c", code % str(rig[2])], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["8192", "None"]  # and it removed itself from LD_PRELOAD
