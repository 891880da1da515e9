"""The guest-visible stall probe: a small program in each guest (``guest/stallprobe.c``) that
times the gaps in CLOCK_MONOTONIC while the host merges (or does nothing, mode ``none``).

Usage (a workload starts it before its work and stops it after)::

    probe = StallProbe(vms).start()
    ...                                    # the work; the host merges meanwhile
    figures = probe.stop()                 # per VM: max_us, p99_us, p999_us, over1ms, ...

Each period (1 ms) the probe wakes, spins 200 µs reading the clock, and keeps the period's
worst gap (between two reads, or how late the wake-up came), at SCHED_FIFO so that the guest's
own tasks do not count as stalls. Percentiles are over periods.

What it cannot see: a VM held by QMP ``stop`` (the fallback merge path) stops the guest's
clock with it (QEMU stops the guest TSC and virtual timers while the VM is stopped), so the
guest's clock shows no gap; that pause is what the engine records per batch (``paused_s``,
``paused_max_s``). Pause-free merging never stops the clock: a vCPU that waits on a page being
merged loses real time, which the probe sees.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from harness.errors import HarnessError
from harness.workloads import on_all
from harness.workloads.guestbin import install

STOPFILE = "/tmp/stallprobe.stop"
KEYS = ("max_us", "p50_us", "p99_us", "p999_us", "p9999_us", "over100us", "over1ms",
        "stalled_ms", "periods", "rt")


def parse(line: str) -> dict[str, float]:
    """The probe's key=value line -> figures."""
    out: dict[str, float] = {}
    for kv in line.split():
        k, sep, v = kv.partition("=")
        if sep:
            out[k] = float(v)
    missing = [k for k in KEYS if k not in out]
    if missing:
        raise HarnessError(f"stall probe output lacks {', '.join(missing)}: {line!r}")
    return out


@dataclasses.dataclass
class StallProbe:
    """The probe in every VM of ``vms``, from :meth:`start` to :meth:`stop`."""

    vms: list
    spin_us: int = 200
    period_us: int = 1000
    max_s: float = 3600.0
    _chans: dict[str, Any] = dataclasses.field(default_factory=dict)

    def start(self) -> StallProbe:
        paths = on_all(self.vms, lambda vm: install(vm, "stallprobe"))
        for vm in self.vms:
            vm.ssh.check(f"rm -f {STOPFILE}")
            chan = vm.ssh.client.get_transport().open_session()
            chan.exec_command(f"{paths[vm.name]} -r -s {self.spin_us} -p {self.period_us} "
                              f"-t {self.max_s} -f {STOPFILE}")
            self._chans[vm.name] = chan
        return self

    def stop(self, timeout_s: float = 60.0) -> dict[str, dict[str, float]]:
        """Stop every probe; their figures per VM name."""
        for vm in self.vms:
            vm.ssh.check(f"touch {STOPFILE}")
        out: dict[str, dict[str, float]] = {}
        end = time.monotonic() + timeout_s
        for vm in self.vms:
            chan = self._chans.pop(vm.name)
            buf = b""
            while not chan.exit_status_ready() or chan.recv_ready():
                if chan.recv_ready():
                    buf += chan.recv(65536)
                elif time.monotonic() > end:
                    chan.close()
                    raise HarnessError(f"VM {vm.name}: the stall probe did not stop")
                else:
                    time.sleep(0.05)
            if chan.recv_exit_status() != 0:
                raise HarnessError(f"VM {vm.name}: stall probe failed",
                                   chan.recv_stderr(65536).decode(errors="replace"))
            out[vm.name] = parse(buf.decode().strip().splitlines()[-1])
            chan.close()
        return out


def worst(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Across VMs: the worst of each figure (``stall_<key>``) for a run's summary."""
    return {f"stall_{k}": max(f[k] for f in figures.values())
            for k in ("max_us", "p99_us", "p999_us", "over1ms")} if figures else {}
