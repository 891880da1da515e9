"""Host CPU of the sharing engine per merged page, and where it goes.

Two guests with the hint ring and the merge agent read the same files cold at once while one
sharing engine runs in this process (in a thread, as ``satori run`` does). Prints the engine's
thread CPU per merged page, split into the hint path (ring -> verify -> plan), the merge
batches (QMP stop, agent, cont) and the copy-on-write checks, plus the agent's own time.
``--profile`` prints the top functions of the engine thread (cProfile).

    python3 benchmarks/engine_cost.py [--files 30] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.image import ensure_image  # noqa: E402
from harness.sharing import verify  # noqa: E402
from harness.sharing.engine import Member, SharingEngine  # noqa: E402
from harness.vm import VM, VMSpec, new_run_id, start_all  # noqa: E402
from harness.workloads import dataset_files  # noqa: E402


class Timed:
    """Wraps engine methods to add up their thread CPU time."""

    def __init__(self, eng: SharingEngine) -> None:
        self.cpu: dict[str, float] = {}
        self.stack: list[float] = []  # CPU of nested timed calls, per open call (exclusive times)
        for name in ("_ingest", "_flush", "check_breaks"):
            self._wrap(eng, name)
        self._wrap(verify, "verify")  # the C part of _ingest (module function, patched for the run)

    def _wrap(self, obj, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            c0 = time.thread_time()
            self.stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                spent = time.thread_time() - c0
                nested = self.stack.pop()
                self.cpu[name] = self.cpu.get(name, 0.0) + spent - nested
                if self.stack:
                    self.stack[-1] += spent

        setattr(obj, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=30, help="4 MiB dataset files each guest reads")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--keep", type=float, default=1.5,
                    help="seconds the engine keeps running after the reads (idle cost counts too)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    img = ensure_image()
    run = new_run_id()
    vms = [VM(VMSpec(n, memory_mb=args.memory, sharing=True), img, run_id=run) for n in ("ea", "eb")]
    try:
        start_all(vms)
        files = " ".join(dataset_files(0, args.files))
        for vm in vms:
            vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"bench-{run}") as eng:
            t = Timed(eng)
            stop = threading.Event()
            cpu = {}
            prof = cProfile.Profile() if args.profile else None

            def loop() -> None:
                if prof:
                    prof.enable()
                c0 = time.thread_time()
                eng.run(stop.is_set)
                eng.drain(quiet_s=0.5)
                cpu["engine"] = time.thread_time() - c0
                if prof:
                    prof.disable()

            th = threading.Thread(target=loop)
            th.start()
            t0 = time.monotonic()
            readers = [threading.Thread(target=vm.ssh.check, args=(f"cat {files} > /dev/null",)) for vm in vms]
            for r in readers:
                r.start()
            for r in readers:
                r.join()
            read_s = time.monotonic() - t0
            time.sleep(args.keep)
            stop.set()
            th.join()
            st = eng.stats()
        merged = st["merged_total"]
        agent_s = sum(v["agent_cpu_ns"] for v in st["vms"].values()) / 1e9
        agent_merge_s = sum(v["agent_ns"] for v in st["vms"].values()) / 1e9
        hinted = sum(v["hinted"] for v in st["vms"].values())
        print(f"accelerator: {vms[0].accel.line()}")
        print(f"read {args.files * 4} MB in each of 2 guests in {read_s:.1f} s, kept {args.keep:.0f} s; "
              f"{hinted} hints, {merged} pages merged")
        if merged:
            us = 1e6 / merged
            print(f"engine thread CPU {cpu['engine']:.3f} s = {cpu['engine'] * us:.1f} us per merged page")
            for k, v in sorted(t.cpu.items()):
                print(f"  {k:<13} {v:.3f} s = {v * us:.1f} us/page")
            rest = cpu["engine"] - sum(t.cpu.values())
            print(f"  {'poll/other':<13} {rest:.3f} s = {rest * us:.1f} us/page")
            print(f"agent thread (in QEMU) {agent_s:.3f} s = {agent_s * us:.1f} us/page "
                  f"(merging {agent_merge_s * us:.1f} us/page, the rest answers LISTs)")
            print(f"total host CPU per merged page: {(cpu['engine'] + agent_s) * us:.1f} us")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    finally:
        for vm in vms:
            vm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
