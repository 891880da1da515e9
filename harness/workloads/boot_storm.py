"""Boot storm: the VMs of the experiment boot together (scenario 4).

The runner boots every VM at once anyway; this workload records how long each took and then
keeps them idle for ``keep_s`` so the sharing of their boot-time pages (kernel, libraries read
from the same image) is sampled.
"""

from __future__ import annotations

import time

from harness.workloads import RunContext, Workload, WorkloadResult


class BootStorm(Workload):
    kind = "boot-storm"
    PARAMS = {"keep_s": 20.0}

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        ctx.mark("idle start", activity=False)
        ctx.quiet()
        ctx.settle()
        end = time.monotonic() + float(self.p["keep_s"])
        while time.monotonic() < end and not ctx.stop.is_set():
            time.sleep(0.2)
        boots = {vm.name: {"boot_s": round(vm.boot_seconds or 0.0, 2)} for vm in vms}
        return WorkloadResult(self.kind, max(b["boot_s"] for b in boots.values()), boots)
