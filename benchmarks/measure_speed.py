"""How long one accounting sample (``harness.accounting.measure``) takes.

Two ways to get guest-like memory:

- real VMs (default): ``--vms N`` guests of ``--memory`` MB boot from the image (``SATORI_IMAGE``
  or the built one), read the dataset and ``/usr`` so most of their RAM is populated, then
  ``measure()`` is timed ``--repeat`` times (file backend, or ``--backend ram-merge``).
- ``--synthetic N``: N helper processes each map a fully populated ``--memory`` MB region (a
  memfd like a VM's RAM, or anonymous memory with ``--backend ram-merge``) holding
  a mix of contents: 40 % shared by all (the same disk blocks), 20 % zero, 40 % unique. No
  QEMU: this is the worst case for the reader (every page present) on a quiet CPU.

Prints, per run: pages in G, distinct frames read, wall and CPU milliseconds, µs per page.
Run as root: ``python3 benchmarks/measure_speed.py --synthetic 4``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import accounting, memfd, oracle  # noqa: E402

CHILD = r"""
import mmap, os, sys
size, path = int(sys.argv[1]), sys.argv[2]
if path == "-":
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = open(sys.argv[3], "rb")
    pos = 0
    while pos < size:
        chunk = src.read(16 << 20)
        m[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    m.madvise(mmap.MADV_NOHUGEPAGE)
else:
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    for off in range(0, size, 4096):
        m[off]
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
sys.stdin.read()
"""


def synthetic(n: int, memory_mb: int, anon: bool, repeat: int) -> None:
    size = memory_mb << 20
    npages = size // 4096
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 256, size=(int(npages * 0.4), 4096), dtype=np.uint8)
    disk = oracle.unique_hashes(oracle.hash_pages(shared))
    files, procs, targets = [], [], []
    try:
        for i in range(n):
            fd = memfd.create(f"satori-bench-{i}", size)
            files.append(fd)
            path = f"/proc/{os.getpid()}/fd/{fd}"
            uniq = rng.integers(0, 256, size=(npages - len(shared) - int(npages * 0.2), 4096), dtype=np.uint8)
            pages = np.concatenate([shared, np.zeros((int(npages * 0.2), 4096), np.uint8), uniq])
            pages = pages[rng.permutation(npages)]
            os.pwrite(fd, pages.tobytes(), 0)
            del pages, uniq
            argv = [sys.executable, "-c", CHILD, str(size)] + (["-", path] if anon else [path])
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            hva = int(p.stdout.readline())
            if anon:
                os.close(fd)  # the content now lives in the helper's anonymous memory
                files.remove(fd)
            targets.append(accounting.Target(f"syn{i}", p.pid, hva, size, ram_file=None if anon else Path(path)))
        kind = "anonymous (process_vm_readv)" if anon else "RAM files (read-only mapping)"
        print(f"synthetic: {n} x {memory_mb} MB, every page present, {kind}")
        run(targets, disk, repeat)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in files:
            os.close(f)


def run(targets, disk_set, repeat: int) -> None:
    accounting.measure(targets, disk_set=disk_set)  # warm: disk set, imports, buffers
    walls, cpus = [], []
    s = None
    for _ in range(repeat):
        s = accounting.measure(targets, disk_set=disk_set)
        walls.append(s.seconds)
        cpus.append(s.cpu_seconds)
    assert s is not None
    print("  " + accounting.format_sample(s))
    w, c = statistics.median(walls), statistics.median(cpus)
    print(
        f"  G={s.G} pages ({s.G * 4096 >> 20} MB), frames read={s.frames_read}: "
        f"median wall {w * 1000:.0f} ms, CPU {c * 1000:.0f} ms "
        f"({w / max(s.G, 1) * 1e6:.2f} / {c / max(s.G, 1) * 1e6:.2f} µs per page), "
        f"min wall {min(walls) * 1000:.0f} ms, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


def real_vms(n: int, memory_mb: int, backend: str, repeat: int) -> None:
    from harness.image import Image, ensure_image
    from harness.vm import VM, VMSpec, start_all

    env = os.environ.get("SATORI_IMAGE")
    image = Image.load(Path(env)) if env else ensure_image(log=print)
    vms = [VM(VMSpec(f"mbench{i}", memory_mb=memory_mb, ram_backend=backend), image) for i in range(n)]
    try:
        t = time.monotonic()
        start_all(vms)
        print(f"booted {n} VMs in {time.monotonic() - t:.0f} s; reading dataset and /usr in each ...")
        cmd = "cat /data/set1/*.bin > /dev/null; find /usr -type f -exec cat {} + > /dev/null 2>&1; free -m | sed -n 2p"
        chans = [vm.ssh.client.exec_command(cmd, timeout=900) for vm in vms]
        for vm, (_, out, _) in zip(vms, chans, strict=True):
            print(f"  {vm.name}: {out.read().decode().strip()}")
        print(f"real VMs: {n} x {memory_mb} MB, backend {backend}")
        targets = [accounting.target(vm) for vm in vms]
        run(targets, accounting.domain_disk_set(targets), repeat)
    finally:
        for vm in vms:
            vm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=2, help="real VMs to boot (default 2)")
    ap.add_argument("--synthetic", type=int, metavar="N", help="N helper processes instead of VMs")
    ap.add_argument("--memory", type=int, default=512, help="MB per VM (default 512)")
    ap.add_argument("--backend", choices=("file", "ram-merge"), default="file")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (pagemap PFNs)")
    if a.synthetic:
        synthetic(a.synthetic, a.memory, a.backend == "ram-merge", a.repeat)
    else:
        real_vms(a.vms, a.memory, a.backend, a.repeat)


if __name__ == "__main__":
    main()
