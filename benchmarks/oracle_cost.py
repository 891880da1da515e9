"""What measuring costs: the oracle's full scan against the incremental meter, on real guests.

Boots ``--vms`` guests of ``--memory`` MB (``--backend file``: the RAM file satori modes use;
``ram-merge``: the anonymous RAM of KSM modes), fills their page cache (``--fill`` MB of the
dataset each), starts a writer in every guest that rewrites ``--write-rate`` pages per second
(``dd`` over the same tmpfs file, once a second), then for each method samples every
``--interval`` seconds for ``--seconds`` seconds:

- ``full``: :func:`harness.accounting.measure` (every present page read and hashed);
- ``incremental``: a :class:`harness.accounting.MeterProcess`, the meter in a process of its
  own as the runner uses it (its first sample, which reads everything, is reported apart:
  "cold"); % of a core is that process's whole CPU;
- ``incremental-thread``: the same meter in a thread of the benchmark's process.

Samples are taken from a sampler thread, as in a run. A probe thread standing in for the sharing
engine (wakes every 20 ms, does ~0.2 ms of Python) records how late it wakes: what sampling does
to the engine (the GIL, when measuring runs in the same process). Printed per method: CPU per sample (median,
max), % of one core, pages read per sample, the probe's lateness (p50, p99, max), and the same
probe with no sampling at all as the baseline. "% of a core at one sample per interval" is the
median CPU per sample over the interval (the full scan may not keep up with 1 s samples at all:
then the measured % is lower than what it would cost). ``--json FILE`` writes it all.

The figures are only meaningful on a quiet machine. Run as root, e.g.
``python3 benchmarks/oracle_cost.py --vms 4 --memory 512 --write-rate 1000 --seconds 60``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import accounting  # noqa: E402


class Probe(threading.Thread):
    """An engine-like thread: sleep 20 ms, do a little Python work, note how late it woke."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_evt = threading.Event()
        self.late: list[float] = []

    def run(self) -> None:
        while not self.stop_evt.is_set():
            t = time.monotonic()
            time.sleep(0.02)
            self.late.append(time.monotonic() - t - 0.02)
            x = 0
            for i in range(3000):  # ~0.2 ms of interpreter work
                x += i * i


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def probe_only(seconds: float) -> dict:
    p = Probe()
    p.start()
    time.sleep(seconds)
    p.stop_evt.set()
    p.join()
    return _late(p)


def _late(p: Probe) -> dict:
    return {"probe_late_ms": {"p50": round(_pct(p.late, 0.5) * 1000, 2), "p99": round(_pct(p.late, 0.99) * 1000, 2),
                              "max": round(max(p.late, default=0) * 1000, 2)}}


def sample_for(method: str, vms, seconds: float, interval: float, scrub: int) -> dict:
    """Sample every ``interval`` s for ``seconds`` s from a sampler thread; the probe runs alongside.

    ``full``: :func:`harness.accounting.measure` in the thread; ``incremental``: a
    :class:`harness.accounting.MeterProcess` (as the runner samples); ``incremental-thread``: a
    :class:`harness.accounting.Meter` in the thread itself (what the GIL costs the probe)."""
    out: dict = {"method": method, "samples": []}
    meter = mp = None
    if method == "incremental":
        mp = accounting.MeterProcess({"all": (vms, None)}, scrub=scrub)
    elif method == "incremental-thread":
        meter = accounting.Meter(vms, scrub=scrub)
    elif method != "full":
        raise SystemExit(f"unknown method {method!r}")
    err: list[BaseException] = []
    window: dict = {}

    def one() -> accounting.Sample:
        if mp is not None:
            return mp.sample()["all"]
        return meter.sample() if meter is not None else accounting.measure(vms)

    def loop() -> None:
        try:
            if method != "full":
                cold = one()
                out["cold"] = {"cpu_ms": round(cold.cpu_seconds * 1000, 1), "read": cold.frames_read}
                out["untracked"] = mp.untracked["all"] if mp is not None else meter.untracked
            window["t0"], window["cpu0"] = time.monotonic(), mp.cpu_s() if mp is not None else 0.0
            end = time.monotonic() + seconds
            nxt = time.monotonic()
            while time.monotonic() < end:
                nxt += interval
                s = one()
                out["samples"].append({"cpu_ms": s.cpu_seconds * 1000, "wall_ms": s.seconds * 1000,
                                       "read": s.frames_read, "G": s.G, "stale": s.stale})
                time.sleep(max(0.0, nxt - time.monotonic()))
            window["t1"], window["cpu1"] = time.monotonic(), mp.cpu_s() if mp is not None else 0.0
        except BaseException as e:  # noqa: BLE001 - raised below
            err.append(e)

    p = Probe()
    p.start()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    t.join()
    p.stop_evt.set()
    p.join()
    if meter is not None:
        meter.close()
    if mp is not None:
        mp.close()
    if err:
        raise err[0]
    cpu = [s["cpu_ms"] for s in out["samples"]]
    span = max(window["t1"] - window["t0"], 1e-9)
    # % of a core: the meter process's whole CPU when there is one (IPC included), else the
    # samples' own CPU
    used = (window["cpu1"] - window["cpu0"]) if mp is not None else sum(cpu) / 1000
    out.update({
        "n": len(cpu), "cpu_ms_median": round(statistics.median(cpu), 2) if cpu else None,
        "cpu_ms_max": round(max(cpu), 2) if cpu else None,
        "pct_core": round(100 * used / span, 2),
        # what one sample per interval costs, whether or not sampling kept up with the interval
        "pct_core_at_interval": round(100 * statistics.median(cpu) / 1000 / interval, 2) if cpu else None,
        "read_median": int(statistics.median([s["read"] for s in out["samples"]])) if cpu else None,
        "G": out["samples"][-1]["G"] if cpu else None,
        "stale": out["samples"][-1]["stale"] if cpu else None,
        **_late(p),
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=2)
    ap.add_argument("--memory", type=int, default=512, help="MB per VM (default 512)")
    ap.add_argument("--backend", choices=("file", "ram-merge"), default="file")
    ap.add_argument("--fill", type=int, default=200, help="MB of dataset each guest reads first (default 200)")
    ap.add_argument("--write-rate", type=int, default=1000, help="pages each guest rewrites per second")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of sampling per method")
    ap.add_argument("--scrub", type=int, default=256, help="incremental re-check: cached pages per VM per sample")
    ap.add_argument("--methods", default="full,incremental,incremental-thread")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()

    from harness.image import Image, ensure_image
    from harness.vm import VM, VMSpec, start_all

    env = os.environ.get("SATORI_IMAGE")
    image = Image.load(Path(env)) if env else ensure_image(log=print)
    vms = [VM(VMSpec(f"ocost{i}", memory_mb=a.memory, ram_backend=a.backend, boot_timeout_s=900), image)
           for i in range(a.vms)]
    result: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "load_before": os.getloadavg()[0]}
    try:
        t = time.monotonic()
        start_all(vms)
        print(f"booted {a.vms} x {a.memory} MB ({a.backend}) in {time.monotonic() - t:.0f} s; filling page caches")
        files = max(1, a.fill // 4)
        fill = f"ls /data/set1/*.bin | head -n {files} | xargs cat > /dev/null; free -m | sed -n 2p"
        chans = [vm.ssh.client.exec_command(fill, timeout=1800) for vm in vms]
        for vm, (_, out, _) in zip(vms, chans, strict=True):
            print(f"  {vm.name}: {out.read().decode().strip()}")
        if a.write_rate:
            w = (f"nohup sh -c 'while :; do dd if=/dev/urandom of=/dev/shm/wr bs=4k count={a.write_rate} "
                 f"conv=notrunc status=none; sleep 1; done' > /dev/null 2>&1 &")
            for vm in vms:
                vm.ssh.check(w)
        result["baseline"] = probe_only(min(10.0, a.seconds))
        print(f"probe alone: {result['baseline']}")
        for m in a.methods.split(","):
            r = sample_for(m, vms, a.seconds, a.interval, a.scrub)
            result[m] = r
            cold = f", cold {r['cold']['cpu_ms']} ms reading {r['cold']['read']}" if "cold" in r else ""
            print(f"{m:12} {r['n']} samples: CPU/sample median {r['cpu_ms_median']} ms max {r['cpu_ms_max']} ms "
                  f"({r['pct_core_at_interval']} % of a core at one sample per {a.interval:g} s; measured "
                  f"{r['pct_core']} %), read/sample {r['read_median']} of G={r['G']}, stale {r['stale']}, "
                  f"probe late {r['probe_late_ms']}{cold}")
        result["load_after"] = os.getloadavg()[0]
        print(f"load average {result['load_before']:.1f} -> {result['load_after']:.1f} on {os.cpu_count()} CPUs "
              "(figures from a busy machine are not claims)")
    finally:
        for vm in vms:
            vm.shutdown()
    if a.json:
        for m in a.methods.split(","):
            result[m].pop("samples", None)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
