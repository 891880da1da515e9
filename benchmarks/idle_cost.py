"""Idle means idle: host CPU of the sharing engine and the merge agents while no hint comes.

Two guests with the hint ring and the merge agent read the same files cold (so thousands of
pages are merged and the break checker has something to watch), then sit idle while one sharing
engine keeps running in this process's thread, as ``satori run`` does. Prints, for the idle
window, the engine thread's CPU, the agents' threads' CPU (request + uffd threads, from STATS)
and the break looks the agents skipped because QEMU took no page fault, as % of one core.

    python3 benchmarks/idle_cost.py [--files 20] [--idle 60]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.image import ensure_image  # noqa: E402
from harness.sharing.attach import sharing_attachments  # noqa: E402
from harness.sharing.engine import Member, SharingEngine  # noqa: E402
from harness.vm import VM, VMSpec, new_run_id, start_all  # noqa: E402
from harness.workloads import dataset_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20, help="dataset files each guest reads (4 MiB each)")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle measured")
    a = ap.parse_args()
    image = ensure_image(log=lambda m: None)
    run = new_run_id()
    vms = [VM(VMSpec(n, memory_mb=512, boot_timeout_s=600), image, run_id=run,
              attachments=sharing_attachments(hints=True, agent=True))
           for n in ("ia", "ib")]
    try:
        start_all(vms)
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"idle-{run}") as eng:
            stop = threading.Event()
            cpu = {"engine": 0.0}

            def loop() -> None:
                c0 = time.thread_time()
                eng.run(stop.is_set)
                cpu["engine"] = time.thread_time() - c0

            files = " ".join(dataset_files(0, a.files))
            for vm in vms:
                vm.ssh.check(f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {files} > /dev/null")
            t = threading.Thread(target=loop, daemon=True)
            t.start()
            time.sleep(15)  # hints of the reads (and of the SSH sessions) drain, merges settle
            ag0 = {link.name: link.agent.stats() for link in eng.links if link.agent}
            c_start = cpu_now(t)
            w0 = time.monotonic()
            time.sleep(a.idle)
            wall = time.monotonic() - w0
            c_end = cpu_now(t)
            ag1 = {link.name: link.agent.stats() for link in eng.links if link.agent}
            stop.set()
            t.join()
            merged = sum(int(s["merged_pages"]) for s in ag1.values())
            print(f"merged pages watched: {merged}; idle window {wall:.1f} s")
            print(f"engine thread: {100 * (c_end - c_start) / wall:.3f} % of a core")
            for name in ag1:
                d = (int(ag1[name]["thread_cpu_ns"]) - int(ag0[name]["thread_cpu_ns"])) / 1e9
                looks = int(ag1[name]["breaks_looks"]) - int(ag0[name]["breaks_looks"])
                skipped = int(ag1[name]["breaks_skipped"]) - int(ag0[name]["breaks_skipped"])
                print(f"agent {name}: {100 * d / wall:.3f} % of a core; break checks: "
                      f"{looks} looked, {skipped} skipped (no page fault)")
    finally:
        for v in vms:
            v.shutdown()
    return 0


def cpu_now(t: threading.Thread) -> float:
    """CPU seconds of thread ``t`` so far."""
    assert t.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


if __name__ == "__main__":
    sys.exit(main())
