"""Run one METRICS scenario and print its figures on the one CPU yardstick, against the goals.

    python3 benchmarks/scenario.py                                   # identical readers, 2 VMs
    python3 benchmarks/scenario.py configs/short-lived.yaml --reps 3
    python3 benchmarks/scenario.py configs/macro.yaml --modes none satori
    python3 benchmarks/scenario.py --report results/identical-readers-2vm-...   # no new run

Defaults: ``configs/identical-readers-2vm.yaml``, 3 interleaved repetitions, the config's modes
(that config's: none ksm ksm-advisor ksm-fast satori satori+ksm). Every figure is the registry's (harness/metrics.py,
docs/metrics.md), median [min-max] over the repetitions; the goals are the registry's. Then,
for each scanner in the run, where satori stands against it on CPU per page saved (paired by
repetition: a ratio whose spread crosses 1.0 is "within noise"), idle CPU, E and E_disk.
With a collapse workload (configs/collapse.yaml) the host-budget figures (group "isolation" of
the registry) get their own table. Overrides (--reps, --modes, --keep, --vms, --surplus,
--policy, --priority) change the config before validation, so the config recorded in results.json is the
one that ran.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from harness import metrics, modes, report  # noqa: E402
from harness.config import load_yaml, read_text, validate  # noqa: E402
from harness.errors import HarnessError  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "identical-readers-2vm.yaml"
DEFAULT_MODES = ["none", "ksm", "ksm-advisor", "ksm-fast", "satori", "satori+ksm"]
YARDSTICK = ["cpu_per_page_saved_s", "cpu_until_convergence_s", "idle_cpu_pct_core", "merge_lag_p50_s",
             "merge_lag_p99_s", "E_final", "E_disk_final", "oracle_cpu_pct_core"]
SCANNERS = [m for m in modes.NAMES if modes.get(m).scans and not modes.get(m).engine]
HINTED = [m for m in modes.NAMES if modes.get(m).engine]


def yardstick_table(res: Mapping[str, Any], keys: Sequence[str] = YARDSTICK) -> str:
    """The one-yardstick table (median [min-max]) with the registry's goals as the last row."""
    return report.table(res, keys=list(keys), goals=True)


def goals(res: Mapping[str, Any]) -> list[str]:
    """Every registry goal that applies to a mode of this run and its workloads: met or not."""
    kinds = {w["name"] for w in (res.get("meta") or {}).get("config", {}).get("workloads", [])}
    stats = report.summarize(res)
    out = []
    for m in metrics.METRICS:
        g = m.goal
        if g is None or (g.workloads and not kinds & set(g.workloads)):
            continue
        for mode in (g.modes or list(stats)):
            if mode not in stats or not m.applies_to(mode):
                continue
            st = stats[mode][m.key]
            out.append(f"  {g.text} [{mode}]: {metrics.format_stat(m, st)} -> {metrics.goal_verdict(m, st)}")
    return out


def _paired(res: Mapping[str, Any], key: str, a: str, b: str) -> list[float]:
    """Per repetition (same rep in both modes): a's figure / b's figure."""
    def by_rep(mode: str) -> dict[int, float]:
        entry = res["modes"][mode]
        vals = report.figure_values(res, mode, key)
        return {rep: v for rep, v in zip(entry.get("reps") or [], vals, strict=False) if v}
    va, vb = by_rep(a), by_rep(b)
    return [va[r] / vb[r] for r in sorted(va.keys() & vb.keys())]


def standing(res: Mapping[str, Any]) -> list[str]:
    """Where each hinted mode stands against each scanner of the run, honestly."""
    present = [m for m in res["modes"] if not res["modes"][m].get("skipped") and res["modes"][m].get("runs")]
    lines = []
    cpu = metrics.get("cpu_per_page_saved_s")
    for h in [m for m in HINTED if m in present]:
        for s in [m for m in SCANNERS if m in present]:
            r = metrics.Stat.of(_paired(res, "cpu_per_page_saved_s", h, s))
            hs = report.summarize(res)[h]
            ss = report.summarize(res)[s]
            if r is None:
                why = report.figure_reasons(res, h, cpu.key) + report.figure_reasons(res, s, cpu.key)
                lines.append(f"  {h} vs {s}: CPU per page saved not comparable ({'; '.join(why) or 'no value'})")
                continue
            text = metrics.format_ratio(r)
            if r.within_noise():
                verdict = "no difference that the spread allows to claim"
            elif r.n < 2:
                verdict = "one repetition: no spread, no claim"
            elif r.hi < 1.0:
                verdict = f"{h} spends less CPU per page saved (1/{1 / r.median:.1f} of {s}); goal <= 1/10: " \
                          + ("met" if r.hi <= 0.1 else "NOT met")
            else:
                verdict = f"{h} spends MORE CPU per page saved than {s} ({r.median:.2f}x)"
            lines.append(f"  {h} vs {s}: CPU per page saved {metrics.format_stat(cpu, hs[cpu.key])} vs "
                         f"{metrics.format_stat(cpu, ss[cpu.key])}, ratio {text}: {verdict}")
            for key in ("idle_cpu_pct_core", "E_disk_final", "E_final", "time_to_90_after_reads_s"):
                m = metrics.get(key)
                lines.append(f"      {m.label}: {metrics.format_stat(m, hs[key])} vs {metrics.format_stat(m, ss[key])}")
    return lines


def resize_vms(vms: dict, data: dict, n: int) -> dict:
    """``--vms N`` on a config of ``count`` VMs (named vm1..vmK): N VMs; a sharing domain that held
    all K default-named VMs holds all N (so the scaled run shares as the original did), any other
    domain layout is refused (say which VMs share in a config of its own)."""
    old = int(vms.get("count") or 0)
    doms = data.get("sharing_domains")
    if isinstance(doms, dict):
        every = [f"vm{i + 1}" for i in range(old)]
        for name, members in doms.items():
            if list(members or []) == every:
                doms[name] = [f"vm{i + 1}" for i in range(n)]
            else:
                raise HarnessError(f"--vms {n}: sharing domain {name!r} ({members}) is not all of the "
                                   f"config's {old} VMs; write a config with the domains you want")
    return {**vms, "count": n}


def print_report(out: Path) -> None:
    table, files = report.report(out)
    res = report.load_results(out)
    meta = res.get("meta") or {}
    print()
    print(table)
    print(f"\nresults: {out}; files: {', '.join(f.name for f in files)}")
    print(f"measured on: {meta.get('cpu_model')} x{meta.get('cpus')}, accelerator {meta.get('accel')}, "
          f"host {meta.get('host_kernel')}, commit {(meta.get('git_commit') or '?')[:10]}"
          + (" (dirty)" if meta.get("git_dirty") else ""))
    reps = max((len(v.get("runs") or []) for v in res["modes"].values()), default=0)
    print(f"\nthe one yardstick (docs/metrics.md), median [min-max] over {reps} repetition(s):\n")
    print(yardstick_table(res))
    iso = report.table(res, "isolation")
    if iso and any(w.get("name") == "collapse" for w in meta.get("config", {}).get("workloads", [])):
        print("\nwhen sharing collapses (host budget = sum of entitlements; median [min-max]):\n")
        print(iso)
    print("\ngoals (docs/metrics.md):")
    print("\n".join(goals(res)) or "  (none applies to this run)")
    lines = standing(res)
    if lines:
        print("\nwhere the hinted modes stand against each scanner (ratios paired by repetition):")
        print("\n".join(lines))
    if reps < 3:
        print(f"\n{reps} repetition(s): figures without spread are not claims (use --reps 3 or more)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    ap.add_argument("--reps", type=int, default=3, help="repetitions, interleaved (default 3)")
    ap.add_argument("--modes", nargs="+",
                    help="modes (default: the config's; identical-readers-2vm.yaml has "
                         f"{' '.join(DEFAULT_MODES)})")
    ap.add_argument("--keep", type=float, help="override keep_s of every workload that has it")
    ap.add_argument("--vms", type=int, help="override vms.count")
    ap.add_argument("--surplus", choices=["on", "off"], help="override surplus")
    ap.add_argument("--policy", nargs="+", metavar="KEY=VALUE",
                    help="override surplus_policy entries, e.g. guard=false reserve=0.2")
    ap.add_argument("--priority", choices=["normal", "realtime"],
                    help="override engine_priority (realtime: engine and agent threads at SCHED_RR)")
    ap.add_argument("--out")
    ap.add_argument("--report", metavar="RESULTS", help="print the tables of an existing result folder")
    a = ap.parse_args(argv)
    try:
        if a.report:
            print_report(Path(a.report))
            return 0
        if a.reps < 1:
            raise HarnessError("--reps must be at least 1")
        path = Path(a.config)
        data, lines, dups = load_yaml(read_text(path, "config"), str(path))
        if not isinstance(data, dict):
            raise HarnessError(f"{path}: not an experiment config (a YAML mapping)")
        data["repetitions"] = a.reps
        if a.modes:
            data["modes"] = a.modes
        if a.vms and isinstance(data.get("vms"), dict):
            data["vms"] = resize_vms(data["vms"], data, a.vms)
            data["name"] = f"{data['name']}-{a.vms}vm"
        if a.surplus:
            data["surplus"] = a.surplus == "on"
            data["name"] = f"{data['name']}-surplus-{a.surplus}"
        if a.policy:
            pol = dict(data.get("surplus_policy") or {})
            for kv in a.policy:
                k, _, v = kv.partition("=")
                pol[k] = yaml.safe_load(v)
            data["surplus_policy"] = pol
            data["name"] = re.sub(r"[^A-Za-z0-9_-]", "", f"{data['name']}-" + "-".join(a.policy).replace(".", "p"))
        if a.priority:
            data["engine_priority"] = a.priority
            data["name"] = f"{data['name']}-{a.priority}"
        if a.keep is not None:
            for w in data.get("workloads") or []:
                if "keep_s" in (w.get("params") or {}):
                    w["params"]["keep_s"] = a.keep
        cfg = validate(data, source=str(path), lines=lines, config_dir=path.parent, extra_problems=dups)
        report.require_plotting()
        from harness.experiment import Runner

        t0 = time.monotonic()
        runner = Runner(cfg, path, Path(a.out) if a.out else None,
                        log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True))
        out = runner.run()
        print(f"\n{cfg.name}: {time.monotonic() - t0:.0f} s")
        print_report(out)
    except HarnessError as e:
        print(f"scenario: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scenario: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
