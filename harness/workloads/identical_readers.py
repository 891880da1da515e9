"""Identical readers: every VM reads the same files cold (docs/metrics.md scenario 1).

With ``stall_probe: true`` the guest-visible stall probe (:mod:`harness.workloads.stall`) runs
in every VM from before the reads to the end of ``keep_s``; its figures go into the result
(per VM, and the worst VM's as ``stall_max_us``, ``stall_p999_us``, ... in ``extra``).
"""

from __future__ import annotations

import time

from harness.workloads import RunContext, Workload, WorkloadResult, dataset_files, on_all, timed
from harness.workloads.stall import StallProbe, worst


class IdenticalReaders(Workload):
    kind = "identical-readers"
    PARAMS = {"first_file": 0, "files": 50, "keep_s": 10.0, "stall_probe": False}
    DEFINES = frozenset({"slowdown"})  # the cold read's own time

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        files = " ".join(dataset_files(int(self.p["first_file"]), int(self.p["files"])))
        on_all(vms, lambda vm: vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches"))
        probe = StallProbe(vms).start() if self.p["stall_probe"] else None
        ctx.mark("reads start")
        t0 = time.monotonic()
        times = on_all(vms, lambda vm: timed(vm, f"cat {files} > /dev/null"))
        wall = time.monotonic() - t0
        ctx.mark("reads end")
        ctx.quiet()
        ctx.settle()
        end = time.monotonic() + float(self.p["keep_s"])
        while time.monotonic() < end and not ctx.stop.is_set():
            time.sleep(0.2)
        ctx.mark("keep end", activity=False)
        stalls = probe.stop() if probe else {}
        per_vm = {n: {"read_s": round(t, 3), "mb": 4 * int(self.p["files"])} for n, t in times.items()}
        for n, f in stalls.items():
            per_vm[n]["stall"] = f
        return WorkloadResult(self.kind, max(times.values()), per_vm,
                              extra={"wall_s": round(wall, 3), **worst(stalls)})
