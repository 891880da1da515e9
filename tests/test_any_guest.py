"""Any guest: sharing for stock kernels through host-observed hints, a second image, and dax.

- A second, stock image (Debian trixie, 6.12, no guest patch) is built like the first and boots.
- Two stock-kernel VMs of DIFFERENT images (bookworm booted with its stock driver, trixie) with
  host hints (the preload in QEMU reports QEMU's own disk reads) share one engine, module scoped;
  the tests run in order on them: records cover a cold read; identical files merge across the
  images; a copy at other sectors merges with the originals; a page the guest overwrites right
  after the read is never merged wrongly.
- ``dax``: two VMs map the dataset from one read-only virtio-pmem image mounted with FS-DAX;
  their RAM holds no copy of it, and their QEMUs map the same host frames.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xxhash

from harness import accounting, dax, oracle
from harness.hints import HEADER_SIZE, RECORD_DTYPE, HintRing
from harness.image import IMAGES_DIR, ensure_image
from harness.memfd import open_file
from harness.modes import MODES
from harness.sharing import hosthints
from harness.sharing.attach import mode_attachments, ring_of
from harness.sharing.engine import Member, SharingEngine
from harness.vm import VM, VMSpec, new_run_id, start_all

pytestmark = pytest.mark.integration

TRIXIE = IMAGES_DIR / "trixie.yaml"
PAGE = 4096


def dataset_file(i: int) -> bytes:
    return hashlib.shake_256(f"satori-dataset:/data/set1:1:{i}".encode()).digest(4 << 20)


def dataset_md5(files: range) -> str:
    h = hashlib.md5()
    for i in files:
        h.update(dataset_file(i))
    return h.hexdigest()


def files(a: int, b: int) -> str:
    return " ".join(f"/data/set1/f{i:04d}.bin" for i in range(a, b))


def vda_blocks_read(vm: VM) -> int:
    """4 KiB blocks the guest has read from its disk (512-byte sectors / 8)."""
    return int(vm.ssh.check("cat /sys/block/vda/stat").split()[2]) // 8


def peek_ring(ring) -> np.ndarray:
    """The records between the consumer and the producer, without consuming them."""
    fd = open_file(ring)
    try:
        hdr = os.pread(fd, HEADER_SIZE, 0)
        cap, prod, cons = (struct.unpack_from("<I", hdr, 20)[0], struct.unpack_from("<Q", hdr, 64)[0],
                           struct.unpack_from("<Q", hdr, 128)[0])
        recs = np.frombuffer(os.pread(fd, cap * 32, HEADER_SIZE), dtype=RECORD_DTYPE)
    finally:
        os.close(fd)
    idx = (np.arange(cons, prod, dtype=np.uint64) % np.uint64(cap)).astype(np.int64)
    return recs[idx]


@pytest.fixture(scope="session")
def trixie():
    return ensure_image(TRIXIE, log=lambda m: print(m, flush=True))


# ---------------------------------------------------------------- host hints, two stock images


@pytest.fixture(scope="module")
def stock_pair(image, trixie):
    """A: the bookworm image on its STOCK driver, B: trixie; both with host hints and agents."""
    run = new_run_id()
    vms = []
    for name, img in (("hosta", image), ("hostb", trixie)):
        atts, source = mode_attachments(MODES["satori-host"], img)
        assert source == "host"
        vms.append(VM(VMSpec(name, memory_mb=512), img, run_id=run, attachments=atts))
    try:
        start_all(vms)
        yield vms
    finally:
        for v in vms:
            v.shutdown()


def test_second_image_builds_and_boots(trixie, image, stock_pair):
    assert trixie.recipe_hash != image.recipe_hash and not trixie.hints
    assert trixie.name == "trixie-stock" and trixie.abi.startswith("6.12.")
    vm = stock_pair[1]  # the module's trixie VM: one boot less
    assert vm.image is trixie
    assert vm.ssh.check("uname -r").strip() == trixie.abi
    assert "13" in vm.ssh.check("cat /etc/debian_version")
    # the stock driver, no ring module: nothing of satori in the guest kernel
    assert "satori" not in vm.ssh.check("cat /proc/modules")
    assert "satori.hints=0" in vm.ssh.check("cat /proc/cmdline")
    # the dataset is the same bytes as in the first image
    assert vm.ssh.check("cat /data/set1/f000[0-2].bin | md5sum").split()[0] == dataset_md5(range(3))


def test_host_hints_cover_a_cold_read(stock_pair):
    a, _ = stock_pair
    assert "satori" not in a.ssh.check("cat /proc/modules")  # the stock virtio_blk
    assert hosthints.read_counters(ring_of(a)).attached
    a.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
    with HintRing(ring_of(a), a.ram_size) as ring:
        ring.poll()
        before = vda_blocks_read(a)
        a.ssh.check(f"cat {files(0, 10)} > /dev/null")
        read = vda_blocks_read(a) - before
        recs = ring.poll()
        assert ring.stats()["dropped"] == 0
    assert read >= 10 * 1024
    assert len(recs) >= 0.99 * read, (len(recs), read)
    # each record: its hash is xxh64 of the host's page at gpa (and of the image block it names)
    ram_fd = open_file(a.ram)
    disks = [os.open(a.paths.overlay, os.O_RDONLY), os.open(a.image.rootfs, os.O_RDONLY)]
    try:
        ram_ok = sum(xxhash.xxh64_intdigest(os.pread(ram_fd, PAGE, int(r["gpa"]))) == int(r["hash"])
                     for r in recs)
        disk_ok = sum(xxhash.xxh64_intdigest(os.pread(disks[int(r["disk"])], PAGE, int(r["sector"]) * 512))
                      == int(r["hash"]) for r in recs)
    finally:
        for fd in (ram_fd, *disks):
            os.close(fd)
    assert disk_ok == len(recs)
    assert ram_ok >= 0.999 * len(recs), (ram_ok, len(recs))  # the guest may reuse a page meanwhile
    data = {xxhash.xxh64_intdigest(f[k:k + PAGE]) for f in map(dataset_file, range(10))
            for k in range(0, 4 << 20, PAGE)}
    assert len(data & {int(h) for h in recs["hash"]}) == 10 * 1024  # every data page of the read


@pytest.fixture(scope="module")
def engine(stock_pair):
    run = new_run_id()
    with SharingEngine([Member.from_vm(v) for v in stock_pair], domain=f"test-{run}") as eng:
        yield eng


def e_disk(vms, eng) -> float:
    return accounting.measure(vms, store=eng.store_ref).E_disk


MERGE_WITHIN_S = 5.0  # issue 11: E_disk >= 0.9 within 5 s of the reads


def test_stock_vms_of_two_images_merge_what_they_read(stock_pair, engine):
    """The engine runs while both guests read the same 80 MB; 5 s after the last read it stops
    and the oracle's E_disk must be >= 0.9 (asserted on E_disk, whatever the timing was)."""
    a, b = stock_pair
    for vm in (a, b):
        vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
    engine.drain(quiet_s=0.3)  # what the boots and the drops left in the rings
    stop = threading.Event()
    t = threading.Thread(target=engine.run, args=(stop.is_set,), daemon=True)
    t.start()
    try:
        with ThreadPoolExecutor(2) as pool:  # both guests read at once; a failure is raised here
            list(pool.map(lambda vm: vm.ssh.check(f"cat {files(10, 30)} > /dev/null"), (a, b)))
        stop.wait(MERGE_WITHIN_S)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    e = e_disk(stock_pair, engine)
    st = engine.stats()["vms"]
    assert e >= 0.9, (e, {n: {k: v[k] for k in ("hinted", "merged", "changed", "dropped")} for n, v in st.items()})
    for vm in (a, b):
        assert st[vm.name]["merged"] >= 0.9 * 20 * 1024, st[vm.name]
    assert (a.ssh.check(f"cat {files(10, 30)} | md5sum").split()[0]
            == b.ssh.check(f"cat {files(10, 30)} | md5sum").split()[0] == dataset_md5(range(10, 30)))
    cpu = st[a.name]["hosthints_cpu_ns"]
    assert cpu and cpu > 0  # the host's hashing is measured (the yardstick charges it)


def test_a_copy_at_other_sectors_merges_with_the_originals(stock_pair, engine):
    a, b = stock_pair
    b.ssh.check(f"cat {files(30, 36)} > /dev/null")  # B reads the originals
    engine.drain(quiet_s=0.3)
    # A writes a copy to its own disk (its qcow2 overlay: other sectors, another file) ...
    a.ssh.check(f"mkdir -p /root/copy && cp {files(30, 36)} /root/copy/ && sync")
    engine.drain(quiet_s=0.3)  # (cp's reads of the originals)
    # ... drops its caches and reads the copy back
    a.ssh.check("echo 3 > /proc/sys/vm/drop_caches && cat /root/copy/*.bin > /dev/null")
    recs = peek_ring(ring_of(a))
    data = {xxhash.xxh64_intdigest(f[k:k + PAGE]) for f in map(dataset_file, range(30, 36))
            for k in range(0, 4 << 20, PAGE)}
    copy = recs[np.isin(recs["hash"], np.array(sorted(data), dtype=np.uint64))]
    assert len({int(h) for h in copy["hash"]}) == len(data)
    assert (copy["disk"] == 0).all()  # read from the overlay, not from the base image's sectors
    m0 = engine.stats()["vms"][a.name]["merged_total"]
    engine.drain(quiet_s=0.5, timeout_s=30)
    assert engine.stats()["vms"][a.name]["merged_total"] - m0 >= 0.9 * len(data)
    assert a.ssh.check("cat /root/copy/*.bin | md5sum").split()[0] == dataset_md5(range(30, 36))


OVERWRITE = r"""
import mmap, os, struct, sys, time
n, paths = int(sys.argv[1]), sys.argv[2:]
fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
bufs = []
for i in range(n):
    b = mmap.mmap(-1, 65536)
    os.preadv(fds[i % len(fds)], [b], (i // len(fds)) % 64 * 65536)  # 16 whole pages, O_DIRECT
    for p in range(16):  # overwrite the start of every page at once
        b[p * 4096:p * 4096 + 16] = struct.pack("<QQ", 0x5A70_0000 + i, p)
    bufs.append(b)
time.sleep(float(os.environ.get("HOLD", "4")))  # the host verifies and merges meanwhile
bad = sum(b[p * 4096:p * 4096 + 16] != struct.pack("<QQ", 0x5A70_0000 + i, p)
          for i, b in enumerate(bufs) for p in range(16))
print(bad, n * 16)
"""


def test_a_page_overwritten_right_after_the_read_is_never_merged_wrongly(stock_pair, engine):
    a, b = stock_pair
    b.ssh.check(f"cat {files(40, 44)} > /dev/null")  # the content is known: a merge is possible
    engine.drain(quiet_s=0.3)
    c0 = engine.stats()["vms"][a.name]
    stop = threading.Event()
    t = threading.Thread(target=engine.run, args=(stop.is_set,), daemon=True)
    t.start()
    try:
        out = a.ssh.check(f"python3 -c \"$(cat)\" 256 {files(40, 44)}", stdin=OVERWRITE.encode())
    finally:
        stop.set()
        t.join(30)
    bad, pages = map(int, out.split())
    assert pages == 256 * 16 and bad == 0, out
    c1 = engine.stats()["vms"][a.name]
    hinted = c1["hinted"] - c0["hinted"]
    refused = (c1["changed"] - c0["changed"]) + (c1["mismatched"] - c0["mismatched"])
    assert hinted >= pages  # the host reported every page of the O_DIRECT reads
    assert refused >= 0.9 * pages, (c0, c1)  # and verification refused them: the bytes differ


# ---------------------------------------------------------------- dax


def dataset_pages_in_ram(vm: VM, dset: np.ndarray) -> int:
    """Present guest RAM pages whose content is a dataset page (the oracle's hash)."""
    hva = accounting.ram_hva(vm)
    present, _pfn = accounting.decode_pagemap(accounting.read_pagemap(vm.pid, hva, vm.ram_size // PAGE))
    idx = np.flatnonzero(present)
    return int(oracle.in_set(oracle.hash_process_pages(vm.pid, hva, idx), dset).sum())


def test_dax_maps_one_copy_and_the_guests_hold_none(image):
    mode = MODES["dax"]
    run = new_run_id()
    vms = []
    for name in ("daxa", "daxb"):
        atts, source = mode_attachments(mode, image)
        assert source is None
        vms.append(VM(VMSpec(name, memory_mb=512), image, run_id=run, attachments=atts))
    nfiles = 10
    dset = oracle.unique_hashes(np.concatenate([oracle.hash_pages(dataset_file(i)) for i in range(nfiles)]))
    try:
        start_all(vms)
        for vm in vms:
            assert dax.dax_mounted(vm, "/data/set1"), vm.ssh.check("cat /proc/mounts")
            cached0 = int(vm.ssh.check("grep ^Cached: /proc/meminfo").split()[1])
            assert vm.ssh.check(f"cat {files(0, nfiles)} | md5sum").split()[0] == dataset_md5(range(nfiles))
            cached1 = int(vm.ssh.check("grep ^Cached: /proc/meminfo").split()[1])
            assert cached1 - cached0 < 4096, (cached0, cached1)  # KiB: 40 MB read, no page cache
        # the oracle: no guest holds the data in its RAM (but for freed buffers of cat, the pipe
        # and md5sum: a few dozen pages of the 10,240 read) ...
        for vm in vms:
            assert dataset_pages_in_ram(vm, dset) <= 0.01 * nfiles * 1024
        # ... both QEMUs map the pmem image's pages, and the same host frames
        regions = [dax.device_regions(vm) for vm in vms]
        assert all(len(r) == 1 for r in regions)
        pfns = []
        for vm, [(hva, size)] in zip(vms, regions, strict=True):
            present, pfn = accounting.decode_pagemap(accounting.read_pagemap(vm.pid, hva, size // PAGE))
            pfns.append(np.where(present, pfn, 0))
        both = (pfns[0] != 0) & (pfns[1] != 0)
        assert both.sum() >= nfiles * 1024 * 0.9, both.sum()
        assert (pfns[0][both] == pfns[1][both]).all()
        sh = dax.pmem_sharing(vms)  # one copy on the host for the two guests' reads
        assert sh.G >= 2 * 0.9 * nfiles * 1024 and sh.R >= 0.45 * sh.G
    finally:
        for vm in vms:
            vm.shutdown()
