"""Synthetic runs for the unit tests of metrics, results and report: ModeRun records as the
runner makes them (samples with cumulative CPU counters, events, engine statistics), turned into
results by the real Runner.results() (no QEMU)."""

from __future__ import annotations

from pathlib import Path

from harness import config, modes
from harness.experiment import ModeRun, Runner

MODES = ["none", "ksm", "satori", "satori+ksm"]

CONFIG = {"name": "synth", "vms": {"count": 2, "memory_mb": 512}, "modes": MODES,
          "sharing_domains": {"pair": ["vm1", "vm2"]},
          "workloads": [{"name": "identical-readers", "params": {"files": 10, "keep_s": 40}}],
          "repetitions": 2, "seed": 7}


def samples(mode: str, rep: int = 0, scale: float = 1.0, n: int = 60, cpu_rate: float = 0.01,
            idle_rate: float | None = None) -> list[dict]:
    """One sample a second; M appears at t=3 (50,000 pages); R follows the mode's curve; the
    charged CPU grows by ``cpu_rate`` s per s (``idle_rate`` after t=20, the quiet tail)."""
    m = modes.get(mode)
    out, cpu = [], 0.0
    for i in range(n):
        t = float(i)
        M = 50_000 if i >= 3 else 0
        frac = {"none": 0.0, "ksm": min(1.0, i / 60), "ksm-advisor": min(1.0, i / 30),
                "ksm-fast": min(1.0, i / 10), "satori": 0.99 if i >= 4 else 0.0,
                "satori+ksm": 0.995 if i >= 4 else 0.0}[mode]
        R = int(M * frac * scale)
        if i:
            cpu += idle_rate if (idle_rate is not None and t > 20) else cpu_rate
        c = cpu if m.shares else 0.0
        out.append({
            "t": t, "G": 260_000, "F": 260_000 - R, "C": 260_000 - M, "R": R, "M": M,
            "E": (R / M) if M else None, "E_disk": (R / M) if M else None, "R_disk": R, "M_disk": M,
            "balloon_mb": {"vm1": 256 + R / 512, "vm2": 256 + R / 512},
            "surplus_mb": {"vm1": R / 512, "vm2": R / 512},
            "cpu": {"engine_s": c * 0.6 if m.engine else 0.0, "agent_s": c * 0.4 if m.engine else 0.0,
                    "ksmd_s": c if m.scans and not m.engine else 0.0, "hosthints_s": 0.0,
                    "oracle_s": 0.02 * i},
        })
    return out


def mode_run(mode: str, rep: int = 0, scale: float = 1.0, time_s: float = 10.0, **kw) -> ModeRun:
    m = modes.get(mode)
    engine = None
    if m.engine:
        engine = {"default": {"merged_total": 99_000, "merge_lag_s": {"p50": 0.1, "p99": 0.3 + rep, "max": 1.0, "n": 99_000},
                              "vms": {"vm1": {"dropped": 0, "rejected": 1, "changed": 2},
                                      "vm2": {"dropped": 1, "rejected": 0, "changed": 0}}}}
    return ModeRun(
        mode=mode, rep=rep, samples=samples(mode, rep, scale, **kw),
        workloads=[{"kind": "identical-readers", "time_s": time_s, "per_vm": {}}],
        events=[(3.0, "reads start"), (8.0, "reads end"), (8.0, "quiet"), (55.0, "keep end")],
        t0=3.0, engine=engine, ksm=None, cpu={"wall_s": 70.0}, boot_s={"vm1": 15.0, "vm2": 16.0},
        surplus=[], quiet_since=8.0,
    )


def runner(out: Path, reps: int = 2, scale: float = 1.0, modes_: list[str] | None = None,
           times: dict[str, list[float]] | None = None) -> Runner:
    cfg = config.validate({**CONFIG, "modes": modes_ or MODES, "repetitions": reps}, host_mem_mb=4096)
    r = Runner(cfg, out=out, log=lambda m: None)
    for rep in range(reps):
        for k, mode in enumerate(cfg.modes):
            t = (times or {}).get(mode, [10.0 + k, 11.0 + k])[rep % 2]
            r.runs.append(mode_run(mode, rep, scale, time_s=t))
    return r
