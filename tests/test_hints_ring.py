"""Unit tests of the hint ring reader (harness.hints) against a Python model of the guest
producer (guest_patches/satori_ring/satori_ring.c), plus a garbage-guest fuzz loop and one
integration test that builds the guest modules for real."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness import hints, memfd
from harness.hints import (
    FLAG_VALID,
    HEADER_SIZE,
    OFF_CAPACITY,
    OFF_CONSUMER,
    OFF_DROPPED,
    OFF_GUEST_STATE,
    OFF_PARTIAL,
    OFF_PRODUCER,
    RECORD_DTYPE,
    RECORD_SIZE,
    HintRing,
    create_ring_file,
    create_ring_memfd,
)

RAM = 64 << 20


class GuestWriter:
    """What satori_ring_push() does, in Python: check the header, write the record, then
    publish the producer position; drop (and count) when the ring is full."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)
        hdr = np.frombuffer(self.mm, dtype="<u8", count=HEADER_SIZE // 8)
        assert int(hdr[0]) == hints.MAGIC
        self.capacity = int(np.frombuffer(self.mm, "<u4", 1, OFF_CAPACITY)[0])
        self.producer = int(hdr[OFF_PRODUCER // 8])
        self.dropped = 0

    def u64(self, off: int) -> int:
        return int.from_bytes(self.mm[off : off + 8], "little")

    def put64(self, off: int, v: int) -> None:
        self.mm[off : off + 8] = (v % (1 << 64)).to_bytes(8, "little")

    def push(self, gpa: int, h: int, sector: int, disk: int = 0) -> bool:
        cons = self.u64(OFF_CONSUMER)
        if (self.producer - cons) % (1 << 64) >= self.capacity:
            self.dropped += 1
            self.put64(OFF_DROPPED, self.u64(OFF_DROPPED) + 1)
            return False
        rec = np.zeros(1, RECORD_DTYPE)
        rec[0] = (gpa, h, sector, disk, FLAG_VALID, self.producer & 0xFFFFFFFF)
        off = HEADER_SIZE + (self.producer % self.capacity) * RECORD_SIZE
        self.mm[off : off + RECORD_SIZE] = rec.tobytes()
        self.producer += 1
        self.put64(OFF_PRODUCER, self.producer)
        return True

    def close(self) -> None:
        self.mm.close()


@pytest.fixture
def ring_path(tmp_path: Path) -> Path:
    return tmp_path / "ring"


def test_create_ring_file_header(ring_path: Path) -> None:
    cap = create_ring_file(ring_path, 1 << 20)
    assert cap == ((1 << 20) - HEADER_SIZE) // RECORD_SIZE
    assert ring_path.stat().st_size == 1 << 20
    data = ring_path.read_bytes()
    assert data[:8] == b"SATORIHR"
    with HintRing(ring_path, RAM) as ring:
        assert ring.header_ok()
        assert ring.capacity == cap
        assert ring.guest_state() == hints.GUEST_STATE_NONE
        assert ring.stats() == ring.stats() | {
            "records": 0,
            "dropped": 0,
            "rejected": 0,
            "partial": 0,
        }


@pytest.mark.parametrize("size", [0, 4096, 12288, 3 << 20])
def test_create_ring_file_rejects_bad_size(ring_path: Path, size: int) -> None:
    with pytest.raises(hints.HarnessError):
        create_ring_file(ring_path, size)


def test_round_trip(ring_path: Path) -> None:
    create_ring_file(ring_path, 1 << 16)
    w = GuestWriter(ring_path)
    with HintRing(ring_path, RAM) as ring:
        assert len(ring.poll()) == 0
        for i in range(100):
            assert w.push(i * 4096, 0x1000 + i, 8 * i, disk=i % 3)
        assert ring.pending() == 100
        got = ring.poll()
        assert len(got) == 100
        assert got["gpa"].tolist() == [i * 4096 for i in range(100)]
        assert got["hash"].tolist() == [0x1000 + i for i in range(100)]
        assert got["sector"].tolist() == [8 * i for i in range(100)]
        assert got["disk"].tolist() == [i % 3 for i in range(100)]
        assert (
            int.from_bytes(ring_path.read_bytes()[OFF_CONSUMER : OFF_CONSUMER + 8], "little") == 100
        )
        recs = hints.to_records(got[:2])
        assert recs[1] == hints.HintRecord(gpa=4096, hash=0x1001, sector=8, disk=1, seq=1)
        assert len(ring.poll()) == 0
        s = ring.stats()
        assert (s["records"], s["rejected"], s["dropped"]) == (100, 0, 0)
    w.close()


def test_wraparound_and_full(ring_path: Path) -> None:
    create_ring_file(ring_path, 1 << 13, capacity=7)
    w = GuestWriter(ring_path)
    seen: list[int] = []
    with HintRing(ring_path, RAM) as ring:
        assert ring.capacity == 7
        n = 0
        for rnd in range(50):
            k = 1 + rnd % 9  # sometimes more than fits: those are dropped
            for _ in range(k):
                if w.push(n * 4096 % RAM, n, n):
                    pass
                n += 1
            got = ring.poll(max_records=None if rnd % 2 else 5)
            seen.extend(got["hash"].tolist())
        seen.extend(ring.poll()["hash"].tolist())
        s = ring.stats()
        assert s["rejected"] == 0
        assert s["records"] == len(seen)
        assert s["dropped"] == w.dropped > 0
        assert len(seen) + w.dropped == n
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
    w.close()


def test_validation_rejects(ring_path: Path) -> None:
    create_ring_file(ring_path, 1 << 13)
    w = GuestWriter(ring_path)
    with HintRing(ring_path, ram_size=1 << 20) as ring:
        w.push(4096, 1, 0)  # fine
        w.push(4097, 2, 0)  # unaligned
        w.push(1 << 20, 3, 0)  # just past RAM
        w.push((1 << 20) - 4096, 4, 0)  # last page: fine
        w.push(2**64 - 4096, 5, 0)  # huge
        # a record whose seq word disagrees with its position
        w.push(8192, 6, 0)
        off = HEADER_SIZE + 5 * RECORD_SIZE + 28
        w.mm[off : off + 4] = (12345).to_bytes(4, "little")
        # a record with unknown flags
        w.push(8192, 7, 0)
        off = HEADER_SIZE + 6 * RECORD_SIZE + 26
        w.mm[off : off + 2] = (0x8001).to_bytes(2, "little")
        got = ring.poll()
        assert got["hash"].tolist() == [1, 4]
        assert ring.stats()["rejected"] == 5
    w.close()


def test_producer_garbage_resyncs(ring_path: Path) -> None:
    create_ring_file(ring_path, 1 << 13, capacity=16)
    w = GuestWriter(ring_path)
    with HintRing(ring_path, RAM) as ring:
        w.push(0, 1, 0)
        assert len(ring.poll()) == 1
        w.put64(OFF_PRODUCER, 10**15)  # far ahead
        assert len(ring.poll()) == 0
        assert ring.stats()["resyncs"] == 1
        w.put64(OFF_PRODUCER, 3)  # behind the consumer
        assert len(ring.poll()) == 0
        assert ring.stats()["resyncs"] == 2
        # a well-behaved guest that continues from the published position works again
        w.producer = 3
        w.push(4096, 2, 0)
        assert ring.poll()["hash"].tolist() == [2]
    w.close()


def test_header_capacity_untrusted(ring_path: Path) -> None:
    create_ring_file(ring_path, 1 << 13, capacity=16)
    with HintRing(ring_path, RAM, capacity=16) as ring:
        w = GuestWriter(ring_path)
        w.mm[OFF_CAPACITY : OFF_CAPACITY + 4] = (0xFFFFFFFF).to_bytes(4, "little")
        w.capacity = 16
        for i in range(16):
            w.push(i * 4096, i, i)
        assert len(ring.poll()) == 16
        assert ring.capacity == 16
        w.close()
    # a reader opened on a header whose capacity is absurd clamps it to the file
    with HintRing(ring_path, RAM) as ring2:
        assert ring2.capacity == hints.max_capacity(1 << 13)


def test_readonly_observer(ring_path: Path) -> None:
    create_ring_file(ring_path, 1 << 13)
    w = GuestWriter(ring_path)
    w.put64(OFF_PARTIAL, 4)
    w.mm[OFF_GUEST_STATE : OFF_GUEST_STATE + 4] = (1).to_bytes(4, "little")
    with HintRing(ring_path, RAM) as ring, HintRing(ring_path, RAM, readonly=True) as obs:
        for i in range(5):
            w.push(i * 4096, i, i)
        w.push(3, 9, 9)  # rejected
        ring.poll()
        s = obs.stats()
        assert (s["records"], s["rejected"], s["partial"], s["guest_state"]) == (5, 1, 4, 1)
        with pytest.raises(hints.HarnessError):
            obs.poll()
    w.close()


@pytest.mark.parametrize("seed", range(8))
def test_garbage_fuzz(ring_path: Path, seed: int) -> None:
    """A guest writing random bytes anywhere: no exception, bounded output, rejects counted."""
    rng = np.random.default_rng(seed)
    size = 1 << 14
    create_ring_file(ring_path, size)
    fd = os.open(ring_path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    os.close(fd)
    ram = 1 << 24
    with HintRing(ring_path, ram) as ring:
        cap = ring.capacity
        total_out = 0
        for it in range(400):
            mode = rng.integers(0, 6)
            if mode == 0:  # random bytes over the whole file
                mm[:] = rng.bytes(size)
            elif mode == 1:  # random header only
                mm[:HEADER_SIZE] = rng.bytes(HEADER_SIZE)
            elif mode == 2:  # random records, producer slightly ahead (plausible)
                mm[HEADER_SIZE:] = rng.bytes(size - HEADER_SIZE)
                cons = int.from_bytes(mm[OFF_CONSUMER : OFF_CONSUMER + 8], "little")
                prod = cons + int(rng.integers(0, cap + 1))
                mm[OFF_PRODUCER : OFF_PRODUCER + 8] = (prod % 2**64).to_bytes(8, "little")
            elif mode == 3:  # producer far ahead / behind / extreme
                choices = [0, 2**64 - 1, 2**63, int(rng.integers(0, 2**62))]
                v = choices[int(rng.integers(0, len(choices)))]
                mm[OFF_PRODUCER : OFF_PRODUCER + 8] = v.to_bytes(8, "little")
            elif mode == 4:  # capacity / record size changed
                mm[OFF_CAPACITY : OFF_CAPACITY + 4] = rng.bytes(4)
                mm[16:20] = rng.bytes(4)
            else:  # consumer overwritten by the guest
                mm[OFF_CONSUMER : OFF_CONSUMER + 8] = rng.bytes(8)
            got = ring.poll(max_records=None if it % 3 else int(rng.integers(0, 50)))
            assert len(got) <= cap
            total_out += len(got)
            if len(got):
                assert (got["gpa"] % 4096 == 0).all()
                assert (got["gpa"] + 4096 <= ram).all()
                assert (got["flags"] == FLAG_VALID).all()
            s = ring.stats()
            assert all(isinstance(v, int) and v >= 0 for v in s.values())
        s = ring.stats()
        assert s["records"] == total_out
        assert s["rejected"] > 0
    mm.close()


def test_garbage_hypothesis(tmp_path_factory: pytest.TempPathFactory) -> None:
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    size = 1 << 13
    path = tmp_path_factory.mktemp("hyp") / "ring"

    @hyp.settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[hyp.HealthCheck.too_slow],
    )
    @hyp.given(
        st.binary(min_size=256, max_size=256),  # the header's live part
        st.integers(0, 2**32 - 1),  # seed of the random records
        st.integers(0, 2**64 - 1),  # producer position
        st.integers(0, 2**64 - 1),  # consumer position the guest scribbles
    )
    def run(head: bytes, seed: int, producer: int, consumer: int) -> None:
        path.unlink(missing_ok=True)
        create_ring_file(path, size)
        with HintRing(path, 1 << 30) as ring:
            blob = head + np.random.default_rng(seed).bytes(size - len(head))
            fd = os.open(path, os.O_RDWR)
            os.pwrite(fd, blob, 0)
            os.pwrite(fd, producer.to_bytes(8, "little"), OFF_PRODUCER)
            os.pwrite(fd, consumer.to_bytes(8, "little"), OFF_CONSUMER)
            os.close(fd)
            for _ in range(3):
                got = ring.poll()
                assert len(got) <= ring.capacity
            s = ring.stats()
            assert s["records"] + s["rejected"] <= ring.capacity

    run()


# -- the real guest modules --------------------------------------------------------------


def _abi() -> str:
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        name = line.split(":")[-1].strip()
        if name.startswith("linux-image-") and name != "linux-image-amd64":
            return name.removeprefix("linux-image-")
    pytest.skip("no linux-image-amd64 dependency known to apt")


@pytest.mark.integration
def test_build_guest_modules(tmp_path: Path) -> None:
    if not shutil.which("apt-get") or not shutil.which("modinfo"):
        pytest.skip("needs apt-get and modinfo (Debian host)")
    from harness.guestmod import build_guest_modules

    abi = _abi()
    out = build_guest_modules(abi, tmp_path / "out", log=lambda s: None)
    assert set(out) == {"satori_ring", "virtio_blk"}
    for name, path in out.items():
        assert path.exists() and path.suffix == ".ko" and path.parent == tmp_path / "out"
        vermagic = subprocess.run(
            ["modinfo", "-F", "vermagic", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert vermagic[0] == abi, (name, vermagic)
    depends = subprocess.run(
        ["modinfo", "-F", "depends", str(out["virtio_blk"])], capture_output=True, text=True
    ).stdout
    assert "satori_ring" in depends
    parms = subprocess.run(
        ["modinfo", "-F", "parm", str(out["satori_ring"])], capture_output=True, text=True
    ).stdout
    for p in ("records", "dropped", "partial"):
        assert p in parms


# -- a real guest under TCG: the patched driver reports cold reads ----------------------------

_GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
insmod /lib/modules/satori_ring.ko
insmod /lib/modules/virtio_blk.ko
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
echo 3 > /proc/sys/vm/drop_caches
echo "SUM $(md5sum /dev/vda)"
P=/sys/module/satori_ring/parameters
echo "PARAMS $(cat $P/records) $(cat $P/dropped) $(cat $P/partial) $(cat $P/attached)"
echo DONE
poweroff -f
"""


def _guest_kit(tmp: Path, abi: str) -> tuple[Path, Path]:
    """(vmlinuz, initramfs) of a busybox guest that loads the patched driver and reads vda."""
    from harness import guestmod
    from harness.paths import cache_dir

    if not shutil.which("qemu-system-x86_64") or not shutil.which("cpio"):
        pytest.skip("needs qemu-system-x86_64 and cpio")
    busybox = shutil.which("busybox")
    if (
        not busybox
        or "statically linked"
        not in subprocess.run(["file", "-L", busybox], capture_output=True, text=True).stdout
    ):
        pytest.skip("needs a static busybox (busybox-static)")
    mods = guestmod.build_guest_modules(abi, tmp / "mods", log=lambda s: None)
    version = guestmod._apt_candidate(f"linux-image-{abi}")
    assert version
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = guestmod._download(debs, f"linux-image-{abi}", version, lambda s: None)
    k = tmp / "k"
    k.mkdir()
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    subprocess.run(
        [
            "tar",
            "-x",
            "-C",
            str(k),
            "--wildcards",
            "./boot/vmlinuz-*",
            f"./lib/modules/{abi}/kernel/drivers/virtio/*",
        ],
        stdin=tar.stdout,
        check=True,
    )
    tar.wait()
    ir = tmp / "ir"
    for d in ("bin", "dev", "proc", "sys", "lib/modules"):
        (ir / d).mkdir(parents=True)
    shutil.copy2(busybox, ir / "bin" / "busybox")
    for ko in (k / "lib" / "modules" / abi / "kernel" / "drivers" / "virtio").glob("*.ko*"):
        data = ko.read_bytes()
        if ko.name.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif ko.name.endswith(".zst"):
            pytest.skip("zstd-compressed modules: not handled by this test")
        (ir / "lib" / "modules" / (ko.name.split(".ko")[0] + ".ko")).write_bytes(data)
    for name, path in mods.items():
        shutil.copy2(path, ir / "lib" / "modules" / f"{name}.ko")
    (ir / "init").write_text(_GUEST_INIT)
    (ir / "init").chmod(0o755)
    initrd = tmp / "initrd.cpio"
    files = subprocess.run(["find", "."], cwd=ir, capture_output=True, text=True, check=True).stdout
    with open(initrd, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=ir,
            input=files.encode(),
            stdout=f,
            check=True,
        )
    return k / "boot" / f"vmlinuz-{abi}", initrd


@pytest.mark.integration
@pytest.mark.parametrize("tiny", [False, True], ids=["ring", "tiny-ring-no-reader"])
def test_guest_reports_cold_reads(tmp_path: Path, tiny: bool) -> None:
    """A TCG guest reads a 16 MiB disk of random bytes cold.  Normal ring: records for >= 99%
    of its 4 KiB blocks, every hash equal to xxh64 of the disk block and (checked as the
    records arrive) of the page in the host RAM file.  Tiny ring, nobody reading: the dropped
    counter rises and the guest still reads the right bytes."""
    import hashlib
    import time
    import uuid

    import xxhash

    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        pytest.skip("needs a Debian host")
    abi = _abi()
    vmlinuz, initrd = _guest_kit(tmp_path, abi)
    disk = tmp_path / "disk.raw"
    disk_bytes = np.random.default_rng(7).bytes(16 << 20)
    disk.write_bytes(disk_bytes)
    ram_size = 256 << 20
    tag = uuid.uuid4().hex[:8]
    # guest RAM and ring as the harness makes them: memfds QEMU inherits, no name anywhere
    ram_fd = memfd.create(f"satori-test-{tag}-ram", ram_size)
    ring_bytes = 1 << 20
    ring_fd, cap = create_ring_memfd(f"satori-test-{tag}-ring", ring_bytes, 64 if tiny else None)
    console = tmp_path / "console.log"
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-smp", "2", "-m", "256M",
        "-object", f"memory-backend-file,id=ram0,size={ram_size},mem-path=/proc/self/fd/{ram_fd},share=on",
        "-machine", "memory-backend=ram0",
        "-object",
        f"memory-backend-file,id=hintring,size={ring_bytes},mem-path=/proc/self/fd/{ring_fd},share=on",
        "-device", "ivshmem-plain,memdev=hintring",
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        "-drive", f"file={disk},format=raw,if=virtio,readonly=on",
        "-display", "none", "-serial", f"file:{console}", "-no-reboot", "-nic", "none",
    ]  # fmt: skip
    q = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         pass_fds=(ram_fd, ring_fd))
    got: list[np.ndarray] = []
    live_bad = 0
    try:
        with HintRing(f"/proc/self/fd/{ring_fd}", ram_size, capacity=cap) as ring:
            deadline = time.monotonic() + 600
            with open(ram_fd, "rb", closefd=False) as rf:
                rmm = mmap.mmap(rf.fileno(), 0, prot=mmap.PROT_READ)

                def take() -> None:
                    nonlocal live_bad
                    b = ring.poll()
                    for g, h in zip(b["gpa"].tolist(), b["hash"].tolist(), strict=True):
                        live_bad += xxhash.xxh64_intdigest(rmm[g : g + 4096]) != h
                    if len(b):
                        got.append(b)

                while q.poll() is None and time.monotonic() < deadline:
                    if not tiny:
                        take()
                    time.sleep(0.005)
                if not tiny:
                    take()
                rmm.close()
            stats = ring.stats()
    finally:
        if q.poll() is None:
            q.kill()
        q.wait()
        os.close(ram_fd)
        os.close(ring_fd)
    log = console.read_text(errors="replace")
    assert "DONE" in log, log[-3000:]
    assert f"SUM {hashlib.md5(disk_bytes).hexdigest()}" in log, log[-3000:]
    params = next(line.split()[1:] for line in log.splitlines() if line.startswith("PARAMS"))
    g_records, g_dropped, _g_partial, attached = map(int, params)
    assert attached == 1 and stats["guest_state"] == 1
    assert stats["rejected"] == 0
    if tiny:
        assert g_dropped > 0 and stats["dropped"] == g_dropped
        assert g_records <= cap
        return
    recs = np.concatenate(got)
    assert stats["records"] == len(recs) >= g_records
    bad_disk = 0
    sectors = set()
    for s, h in zip(recs["sector"].tolist(), recs["hash"].tolist(), strict=True):
        off = s * 512
        bad_disk += xxhash.xxh64_intdigest(disk_bytes[off : off + 4096]) != h
        sectors.add(s)
    nblocks = len(disk_bytes) // 4096
    covered = sum(1 for i in range(nblocks) if i * 8 in sectors)
    assert bad_disk == 0
    assert live_bad == 0
    assert covered >= 0.99 * nblocks, (covered, nblocks)
    assert g_dropped == 0
