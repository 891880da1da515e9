"""Macrobenchmark: random 4 KiB reads (fio) over a file set larger than a VM's own allocation.

The working set (``files`` x 4 MiB) does not fit in the page cache a VM has at its entitlement,
but fits with the surplus that sharing frees (the files are identical in every VM, so a warm-up
read merges them and the saving goes back to the VMs through their balloons). The disk is
throttled (config ``disk.iops``) like a real disk, so every cache miss costs. Figure: seconds
for ``ios`` random reads per VM (fio ``--invalidate=0``: the cache is kept).
"""

from __future__ import annotations

import json
import time

from harness.errors import SSHError
from harness.workloads import RunContext, Workload, WorkloadResult, dataset_files, on_all, timed


class Macro(Workload):
    kind = "macro"
    PARAMS = {"first_file": 0, "files": 50, "ios": 20000, "warmup_passes": 1, "settle_s": 5.0}
    DEFINES = frozenset({"slowdown", "macro_gain"})  # fio's time for a fixed number of reads

    def _fio(self, vm, files: list[str]) -> dict:
        cmd = (
            "fio --name=macro --rw=randread --bs=4k --ioengine=psync --invalidate=0 "
            f"--filename={':'.join(files)} --file_service_type=random --number_ios={int(self.p['ios'])} "
            f"--randrepeat=1 --randseed={self.seed + 1} --norandommap --output-format=json"
        )
        out = vm.ssh.check(cmd, timeout=3600)
        try:
            job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
        except (ValueError, KeyError, IndexError) as e:
            raise SSHError(f"VM {vm.name}: cannot parse fio output: {e}", context=out[-1000:]) from None
        return {"iops": round(job["iops"], 1), "runtime_s": job["runtime"] / 1000.0,
                "ios": job.get("total_ios", int(self.p["ios"]))}

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        files = dataset_files(int(self.p["first_file"]), int(self.p["files"]))
        on_all(vms, lambda vm: vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches"))
        ctx.mark("warm-up")
        for _ in range(int(self.p["warmup_passes"])):
            on_all(vms, lambda vm: timed(vm, f"cat {' '.join(files)} > /dev/null"))
        ctx.settle()
        end = time.monotonic() + float(self.p["settle_s"])
        while time.monotonic() < end and not ctx.stop.is_set():
            time.sleep(0.2)
        ctx.mark("fio start")
        t0 = time.monotonic()
        res = on_all(vms, lambda vm: self._fio(vm, files))
        ctx.mark("fio end")
        wall = time.monotonic() - t0
        return WorkloadResult(self.kind, max(r["runtime_s"] for r in res.values()), res,
                              extra={"wall_s": round(wall, 3),
                                     "iops_total": round(sum(r["iops"] for r in res.values()), 1)})
