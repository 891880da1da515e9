"""Short-lived sharing: read a set of files, keep it ~10 s, drop it, move on (scenario 2).

Round k reads files ``[first + k*files_per_round, ...)`` in every VM, keeps them cached for
``keep_s``, then drops them (``drop``: ``drop_caches``, or ``overwrite``: the guest overwrites
its cached copy in place, which breaks copy-on-write). Scanners see such pages only if they
happen to pass by during the short window: opportunity captured is the fair score.
"""

from __future__ import annotations

import time

from harness.errors import ConfigError
from harness.workloads import RunContext, Workload, WorkloadResult, dataset_files, on_all, timed


class ShortLived(Workload):
    kind = "short-lived"
    PARAMS = {"rounds": 4, "files_per_round": 10, "first_file": 0, "keep_s": 10.0, "drop": "drop_caches"}

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        if self.p["drop"] not in ("drop_caches", "overwrite"):
            raise ConfigError("short-lived: drop must be drop_caches or overwrite")
        per_vm: dict[str, dict] = {vm.name: {"read_s": []} for vm in vms}
        on_all(vms, lambda vm: vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches; mkdir -p /root/sl"))
        t_start = time.monotonic()
        for k in range(int(self.p["rounds"])):
            if ctx.stop.is_set():
                break
            names = dataset_files(int(self.p["first_file"]) + k * int(self.p["files_per_round"]),
                                  int(self.p["files_per_round"]))
            files = " ".join(names)
            ctx.mark(f"round {k} read")
            times = on_all(vms, lambda vm, files=files: timed(vm, f"cat {files} > /dev/null"))
            for n, t in times.items():
                per_vm[n]["read_s"].append(round(t, 3))
            end = time.monotonic() + float(self.p["keep_s"])
            while time.monotonic() < end and not ctx.stop.is_set():
                time.sleep(0.2)
            ctx.mark(f"round {k} drop")
            if self.p["drop"] == "overwrite":
                # rewrite the cached pages in place (dirties them: copy-on-write breaks), then drop
                cmd = "; ".join(f"dd if=/dev/zero of={f} bs=1M count=4 conv=notrunc status=none" for f in names)
                on_all(vms, lambda vm, cmd=cmd: vm.ssh.check(f"{cmd}; sync; echo 3 > /proc/sys/vm/drop_caches"))
            else:
                on_all(vms, lambda vm: vm.ssh.check("echo 3 > /proc/sys/vm/drop_caches"))
        return WorkloadResult(self.kind, time.monotonic() - t_start, per_vm)
