"""Immediate merging with real guests: identical readers, copy-on-write, integrity, forged hints.

Two VMs with the hint ring and the merge agent share one module-scoped sharing engine (booting
costs ~20 s under TCG); the tests run in order on them.
"""

from __future__ import annotations

import os
import time

import pytest
import xxhash

from harness.sharing.attach import sharing_attachments
from harness.sharing.engine import Member, SharingEngine
from harness.vm import VM, VMSpec, harness_leftovers, new_run_id, start_all
from harness.workloads import integrity

pytestmark = pytest.mark.integration

FILES = "/data/set1/f00[0-2]?.bin"  # 30 files x 4 MiB = 120 MiB
NFILES = 30
FILE_PAGES = NFILES * 1024


def run_shmem_kb(vms, eng) -> int:
    """Shmem this run holds: the guests' RAM memfds and the content store (other processes on
    the host may allocate Shmem meanwhile, so /proc/meminfo's total would be noisy)."""
    files = [vm.ram.path for vm in vms] + [eng.store_ref.path]
    return sum(os.stat(f).st_blocks for f in files) // 2


@pytest.fixture(scope="module")
def pair(image):
    if not image.hints:
        pytest.fail("the image has no hint ring (guest patch did not build)")
    before = set(harness_leftovers())
    run = new_run_id()
    # iomem=relaxed: the adversary test maps the ring BAR from guest user space
    vms = [VM(VMSpec(n, memory_mb=512, append="iomem=relaxed"), image, run_id=run,
              attachments=sharing_attachments(hints=True, agent=True))
           for n in ("sa", "sb")]
    try:
        start_all(vms)
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"test-{run}") as eng:
            yield vms, eng
    finally:
        for v in vms:
            v.shutdown()
    left = [x for x in harness_leftovers() if x not in before]
    assert not left, f"left behind: {left}"


def read_cold(vm: VM, files: str = FILES) -> None:
    vm.ssh.check(f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {files} > /dev/null")


def test_identical_readers_merge_at_once(pair):
    (a, b), eng = pair
    eng.drain(quiet_s=0.3)
    c0 = eng.stats()["vms"]
    shm0 = run_shmem_kb((a, b), eng)
    for vm in (a, b):
        read_cold(vm)
    t_done = time.monotonic()
    eng.drain(quiet_s=0.5, timeout_s=20)
    elapsed = time.monotonic() - t_done
    st = eng.stats()
    for vm in (a, b):
        v = st["vms"][vm.name]
        d = {k: v[k] - c0[vm.name][k] for k in ("hinted", "changed", "rejected", "dropped")}
        assert d["hinted"] >= 0.99 * FILE_PAGES, (v, d)
        assert v["merged"] >= 0.9 * FILE_PAGES, v
        # static files read cold: (almost) every hint verifies; none is refused or dropped
        assert d["changed"] <= 0.01 * FILE_PAGES and d["rejected"] == 0 and d["dropped"] == 0, (v, d)
    assert elapsed < 5, f"merging took {elapsed:.1f} s after the reads finished"
    # host memory grew by about one copy of the data (the store), not two
    grew_mb = (run_shmem_kb((a, b), eng) - shm0) / 1024
    assert grew_mb < 1.3 * NFILES * 4, f"Shmem grew {grew_mb:.0f} MB for {NFILES * 4} MB read by 2 VMs"
    # the guests still read the right bytes
    sums = {vm.name: vm.ssh.check(f"cat {FILES} | md5sum").split()[0] for vm in (a, b)}
    assert sums[a.name] == sums[b.name]


def test_copy_on_write_keeps_each_side_right(pair):
    (a, b), eng = pair
    path = "/data/set1/f0000.bin"
    orig = a.ssh.check(f"md5sum {path}").split()[0]
    assert len(eng.merged_ranges()[a.name]), "nothing merged in A"
    # A overwrites the file in place (page cache pages merged from the store)
    a.ssh.check(f"dd if=/dev/urandom of={path} bs=4096 count=1024 conv=notrunc status=none; sync")
    eng.run_for(1.5)
    eng.check_breaks()  # (a quiet engine looks for breaks every 1-8 s: look now)
    new_a = a.ssh.check(f"md5sum {path}").split()[0]
    assert new_a != orig
    assert b.ssh.check(f"md5sum {path}").split()[0] == orig
    # every store page a guest still maps (not written since) holds exactly the content it was
    # stored with; a page nobody needs any more may have been freed: that is the engine's job
    checked = 0
    for ranges in eng.merged_ranges(exclude_private=True).values():
        for _g, s, n in ranges.tolist()[:200]:
            for k in range(n):
                slot = s // 4096 + k
                assert xxhash.xxh64_intdigest(eng.store.read(slot)) == eng.core.slot(slot).xxh64, slot
                checked += 1
    assert checked > 0
    assert a.ssh.check(f"echo 3 > /proc/sys/vm/drop_caches; md5sum {path}").split()[0] == new_a
    assert eng.stats()["vms"][a.name]["broken"] > 0


def test_forged_hints_change_nothing(pair):
    (a, b), eng = pair
    eng.drain(quiet_s=0.3)
    # B holds a known buffer; A forges records naming B's... and its own pages with wrong hashes
    before_b = b.ssh.check(f"cat {FILES} | md5sum").split()[0]
    c0 = eng.stats()["vms"][a.name]
    forge = r"""
import mmap, os, struct, glob, random
dev = [d for d in glob.glob('/sys/bus/pci/devices/*') if open(d + '/vendor').read().strip() == '0x1af4'
       and open(d + '/device').read().strip() == '0x1110'][0]
fd = os.open(dev + '/resource2', os.O_RDWR | os.O_SYNC)
m = mmap.mmap(fd, os.fstat(fd).st_size)
cap = struct.unpack_from('<I', m, 20)[0]
prod = struct.unpack_from('<Q', m, 64)[0]
rnd = random.Random(7)
n = 2000
for i in range(n):
    gpa = rnd.randrange(0, 512 << 20) & ~4095 if i % 2 else rnd.randrange(1 << 40)
    struct.pack_into('<QQQHHI', m, 4096 + ((prod + i) % cap) * 32, gpa, rnd.getrandbits(64), 0, 0, 1, (prod + i) & 0xffffffff)
struct.pack_into('<Q', m, 64, prod + n)
print(n)
"""
    a.ssh.check("python3 -c \"$(cat)\"", stdin=forge.encode())
    eng.drain(quiet_s=0.5)
    c1 = eng.stats()["vms"][a.name]
    refused = (c1["changed"] - c0["changed"]) + (c1["rejected"] - c0["rejected"])
    assert refused >= 1900, (c0, c1)
    assert b.ssh.check(f"cat {FILES} | md5sum").split()[0] == before_b


def test_integrity_under_repeated_merging(pair):
    """Guests check every page while the engine merges files they re-read and they rewrite:
    pause-free (the agents protect each chunk themselves; no VM is ever held)."""
    (a, b), eng = pair
    assert all(link.wp for link in eng.links), "the agents cannot merge pause-free here"
    for vm in (a, b):
        integrity.prepare(vm, 32)  # 32 MB of dataset files, identical in both guests
    chans = []
    for i, vm in enumerate((a, b)):
        chan = vm.ssh.client.get_transport().open_session()
        chan.exec_command(f"rm -f /tmp/stop; python3 /tmp/integrity.py /root/integ.bin 300 {i}")
        chans.append(chan)
    m0 = eng.stats()["merged_total"]
    # meanwhile: re-read the dataset cold again and again, so pages merge, break and re-merge,
    # until 100,000 merges (or a time cap; then the assertion below says how far it got)
    end = time.monotonic() + 240
    rounds = 0
    while time.monotonic() < end and eng.stats()["merged_total"] - m0 < 100_000:
        for vm in (a, b):
            vm.ssh.check("echo 3 > /proc/sys/vm/drop_caches; cat /data/set1/f00[0-1]?.bin > /dev/null")
        eng.drain(quiet_s=0.2, timeout_s=10)
        rounds += 1
    for vm in (a, b):
        vm.ssh.check("touch /tmp/stop")
    outs = []
    for chan in chans:
        out = b""
        while not chan.exit_status_ready() or chan.recv_ready():
            if chan.recv_ready():
                out += chan.recv(65536)
            else:
                time.sleep(0.1)
        err = chan.recv_stderr(65536).decode()
        assert chan.recv_exit_status() == 0, err
        outs.append((integrity.parse(out.decode()), err))
    for r, _err in outs:
        assert r["bad_pages"] == 0 and r["rounds"] > 0 and r["checked"] > 0, (outs, eng.stats())
    merges = eng.stats()["merged_total"] - m0
    assert merges >= 100_000, f"only {merges} merges in {rounds} rounds"
    assert all(v["paused_s"] == 0 for v in eng.stats()["vms"].values()), eng.stats()["vms"]
    # every file still reads right in both guests
    sums = {vm.name: vm.ssh.check("cat /data/set1/f00[1-2]?.bin | md5sum").split()[0] for vm in (a, b)}
    assert sums[a.name] == sums[b.name]
