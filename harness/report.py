"""Results and report: ``results.json`` in, a CSV of the samples, PNG plots and ``summary.md`` out.

A result folder holds one ``results.json`` (written by :func:`write_results`, atomically, so a run
stopped by Ctrl-C or a failure still leaves a file that loads)::

    {
      "version": 2,
      "name": "quickstart",
      "status": "complete",              # or "partial": a run failed, was interrupted or is missing
      "partial": false,
      "failures": [                      # QEMUs that died during a run
        {"mode": "satori", "rep": 0, "vm": "vm2", "domain": "default", "t": 31.2, "pid": 1234,
         "signal": "SIGKILL", "exit_status": null, "console_tail": "...", "qemu_output": "..."}],
      "meta": {...},                     # collect_meta(): what it was measured on
      "modes": {
        "satori": {
          "mode": {...},                 # the mode table's entry (harness.modes)
          "figures": {"E_disk_final": [0.99, 0.98, 0.99], ...},  # every metric, one value per run
          "why": {"macro_gain": ["the workload defines no macro gain", ...]},  # where null
          "figures_from": "completed runs",
          "runs": [{"rep": 0, "status": "ok", "error": null, "figures": {...}, "why": {...},
                    "samples": [{"t": 0.0, "G": ..., "E_disk": ..., "cpu": {"engine_s": ...}}, ...],
                    "events": [[3.1, "reads start"], ...], "engine": {...}, ...}, ...]
        },
        "ksm-advisor": {"mode": {...}, "skipped": "this kernel's KSM has no smart_scan ..."}
      }
    }

The figures are the entries of :mod:`harness.metrics` (the registry): the tables here, the
comparison of several folders and ``benchmarks/scenario.py`` print them from there, as median
[min–max] over the repetitions; a figure the results lack (a metric added after the run) is
computed from the runs' records. G, F, C, R, M are pages of 4 KiB, ``t`` seconds from the start
of the mode's run.

Plots need matplotlib, a main dependency: without it :func:`write_plots` (and ``satori run``,
before it boots anything) fails with one clear error instead of leaving the plots out.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import metrics
from harness import modes as _modes
from harness.errors import HarnessError
from harness.metrics import (  # noqa: F401 - the metric arithmetic, re-exported for callers
    Stat,
    opportunity_captured,
    time_to_threshold,
    trapezoid,
)

log = logging.getLogger(__name__)

RESULTS = "results.json"
RESULTS_VERSION = 2
SAMPLES_CSV = "samples.csv"
SUMMARY = "summary.md"
PLOT_SHARING = "sharing.png"
PLOT_SURPLUS = "surplus.png"
PLOT_WORKLOAD = "workload_times.png"
PAGES_PER_MB = metrics.PAGES_PER_MB
REPO_ROOT = Path(__file__).resolve().parent.parent


def _value(s: Mapping[str, Any], key: str) -> float | None:
    return metrics.value(s, key)


# ---------------------------------------------------------------- results in and out


def _json_default(o: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} to results.json")


def write_results(folder: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` atomically (temporary file + rename): a reader, or a run stopped
    half-way, never sees half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"version": RESULTS_VERSION, **results}
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=_json_default, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / RESULTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / RESULTS


def load_results(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / RESULTS
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise HarnessError(f"{folder}: no {RESULTS} (is it a result folder of `satori run`?)") from None
    except IsADirectoryError:
        raise HarnessError(f"{path}: is a folder, not a results file") from None
    except OSError as e:
        raise HarnessError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # also bytes that are not UTF-8
        raise HarnessError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("modes"), dict):
        raise HarnessError(f"{path}: no 'modes' mapping: not a satori result")
    if data.get("version") != RESULTS_VERSION:
        raise HarnessError(f"{path}: results of format version {data.get('version')!r}; this harness "
                           f"reads version {RESULTS_VERSION} (run the experiment again)")
    for m, v in data["modes"].items():
        if not isinstance(v, dict) or not isinstance(v.get("runs", []), list):
            raise HarnessError(f"{path}: mode {m!r} is not a mapping with a list of runs")
    return data


def modes_in_order(results: Mapping[str, Any]) -> list[str]:
    return sorted(results["modes"], key=_modes.order_key)


def mode_runs(mode: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A mode's run records, in repetition order."""
    return sorted(mode.get("runs") or [], key=lambda r: int(r.get("rep", 0)))


def runs(mode: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """A mode's samples, one list per run, in repetition order."""
    return [sorted(r.get("samples") or [], key=lambda s: s["t"]) for r in mode_runs(mode)]


def _counted(mode: Mapping[str, Any]) -> list[dict[str, Any]]:
    ok = [r for r in mode_runs(mode) if r.get("status", "ok") == "ok"]
    return ok or mode_runs(mode)


def figure_values(results: Mapping[str, Any], mode: str, key: str) -> list[float | None]:
    """One figure of a mode, one value per counted run: as recorded, or computed from the runs'
    records for a metric the results do not hold."""
    entry = results["modes"][mode]
    rec = entry.get("figures") or {}
    if key in rec:
        return list(rec[key])
    none_runs = {int(r.get("rep", 0)): r for r in mode_runs(results["modes"].get("none") or {})}
    out = []
    for r in _counted(entry):
        base = none_runs.get(int(r.get("rep", 0)))
        vals, _ = metrics.evaluate(metrics.RunView.from_record(r, mode),
                                   metrics.RunView.from_record(base, "none") if base else None, [key])
        out.append(vals[key])
    return out


def figure_reasons(results: Mapping[str, Any], mode: str, key: str) -> list[str]:
    """Why a figure has no value in some runs of a mode (distinct reasons)."""
    entry = results["modes"][mode]
    why = (entry.get("why") or {}).get(key)
    if why is None and key not in (entry.get("figures") or {}):
        why = [metrics.evaluate(metrics.RunView.from_record(r, mode), None, [key])[1].get(key)
               for r in _counted(entry)]
    return list(dict.fromkeys(w for w in why or [] if w))


def summarize(results: Mapping[str, Any]) -> dict[str, dict[str, Stat | None]]:
    """mode -> metric key -> median/min/max over the counted runs (None: nothing measured)."""
    out: dict[str, dict[str, Stat | None]] = {}
    for m in modes_in_order(results):
        if results["modes"][m].get("skipped"):
            continue
        out[m] = {k.key: Stat.of(figure_values(results, m, k.key)) for k in metrics.METRICS}
    return out


def format_figure(stat: Stat | None, metric: metrics.Metric | str) -> str:
    return metrics.format_stat(metrics.get(metric) if isinstance(metric, str) else metric, stat)


def shown_metrics(stats: Mapping[str, Mapping[str, Stat | None]], group: str | None = None,
                  keys: Sequence[str] | None = None) -> list[metrics.Metric]:
    """The metrics of ``group`` (or ``keys``) that some mode has a value for."""
    chosen = [metrics.get(k) for k in keys] if keys else [m for m in metrics.METRICS if group in (None, m.group)]
    return [m for m in chosen if keys or any(st.get(m.key) is not None for st in stats.values())]


def _cell(mode: str, m: metrics.Metric, stat: Stat | None) -> str:
    if not m.applies_to(mode):
        return "—"
    return format_figure(stat, m)


def table(results: Mapping[str, Any], group: str | None = None, keys: Sequence[str] | None = None,
          goals: bool = False) -> str:
    """A markdown table, one row per mode, the metrics of ``group`` (or ``keys``) as median
    [min–max]; ``goals``: a last row with each figure's goal. ``—``: not a figure of that mode."""
    stats = summarize(results)
    shown = shown_metrics(stats, group, keys)
    if not shown:
        return ""
    head = "| mode | " + " | ".join(m.label for m in shown) + " |"
    sep = "|---|" + "---:|" * len(shown)
    rows = [f"| {mode} | " + " | ".join(_cell(mode, m, st[m.key]) for m in shown) + " |"
            for mode, st in stats.items()]
    if goals:
        rows.append("| goal | " + " | ".join(goal_text(m) for m in shown) + " |")
    return "\n".join([head, sep, *rows])


def goal_text(m: metrics.Metric) -> str:
    if m.goal is None:
        return ""
    g = m.goal
    return f"{g.op} {m.fmt(g.target)}" + (f" ({', '.join(g.modes)})" if g.modes else "")


def summary_table(results: Mapping[str, Any]) -> str:
    """Every group's table (sharing, cost, guest, hints), each with its heading."""
    parts = []
    for group, title in metrics.GROUPS.items():
        t = table(results, group)
        if t:
            parts += [f"### {title}", "", t, ""]
    return "\n".join(parts).rstrip()


def na_reasons(results: Mapping[str, Any]) -> list[str]:
    """``mode: figure: why`` for each shown figure a mode has no value for although it applies."""
    stats = summarize(results)
    lines = []
    for group in metrics.GROUPS:
        for m in shown_metrics(stats, group):
            for mode, st in stats.items():
                if m.applies_to(mode) and (st[m.key] is None or st[m.key].n < len(_counted(results["modes"][mode]))):
                    why = figure_reasons(results, mode, m.key)
                    if why:
                        lines.append(f"- {mode}, {m.label}: n/a ({'; '.join(why)})")
    return lines


def run_problems(results: Mapping[str, Any]) -> list[str]:
    """One line per run that did not complete, and per VM that died (with its console tail)."""
    lines = []
    for mode in modes_in_order(results):
        for r in mode_runs(results["modes"][mode]):
            if r.get("status", "ok") != "ok":
                lines.append(f"- {mode} repetition {int(r.get('rep', 0)) + 1}: **{r['status']}**"
                             + (f": {r['error']}" if r.get("error") else ""))
    for f in results.get("failures") or []:
        how = f"killed by {f['signal']}" if f.get("signal") else f"exited with status {f.get('exit_status')}"
        tail = "\n".join("      " + x for x in str(f.get("console_tail") or "").splitlines()[-5:])
        lines.append(f"- {f.get('mode')} repetition {int(f.get('rep', 0)) + 1}: VM {f.get('vm')} "
                     f"(QEMU pid {f.get('pid')}) {how} at t={f.get('t')} s; console tail:\n{tail}")
    return lines


# ---------------------------------------------------------------- CSV


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{key}.")
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def write_csv(folder: str | os.PathLike, results: Mapping[str, Any] | None = None) -> Path:
    """``samples.csv``: one row per sample per mode and run; nested mappings become columns
    ``cpu.engine_s``, ``balloon_mb.vm1``..."""
    folder = Path(folder)
    results = results if results is not None else load_results(folder)
    rows: list[dict[str, Any]] = []
    for m in modes_in_order(results):
        for r in mode_runs(results["modes"][m]):
            for s in r.get("samples") or []:
                rows.append({"mode": m, "rep": r.get("rep", 0), "status": r.get("status", "ok"), **_flatten(s)})
    first = ["mode", "rep", "status", "t", "G", "F", "C", "R", "M", "E", "E_disk"]
    seen = {k for r in rows for k in r}
    columns = [c for c in first if c in seen or c in ("mode", "rep", "status")]
    columns += sorted(seen - set(columns))
    path = folder / SAMPLES_CSV
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- plots


def require_plotting() -> None:
    """Fail now, with one clear error, if the plots could not be made (matplotlib missing or
    broken): ``satori run`` calls this before it boots anything."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        raise HarnessError(
            f"cannot make plots: matplotlib does not load ({type(e).__name__}: {e}); it is a "
            "dependency of satori: pip install 'matplotlib>=3.6' (or bash ci/install.sh)") from None
    return plt


def _mb(v: float | None) -> float:
    return float("nan") if v is None else v / PAGES_PER_MB


def plot_sharing(results: Mapping[str, Any], path: Path) -> Path | None:
    """Sharing over time, one panel per mode: realized saving R against the oracle's maximum M
    (MB; and their disk-content parts), with E_disk on the right axis. Runs after the first are
    drawn faint."""
    plt = _pyplot()
    modes = [m for m in modes_in_order(results) if any(runs(results["modes"][m]))]
    if not modes:
        return None
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 2.6 * len(modes)), sharex=True, squeeze=False)
    for ax, m in zip(axes[:, 0], modes, strict=True):
        ax2 = ax.twinx()
        for i, r in enumerate(runs(results["modes"][m])):
            alpha = 1.0 if i == 0 else 0.3
            lab = (lambda s: s) if i == 0 else (lambda s: None)  # noqa: E731
            t = [s["t"] for s in r]
            ax.plot(t, [_mb(_value(s, "M")) for s in r], "k--", lw=1.2, alpha=alpha, label=lab("M (oracle)"))
            ax.plot(t, [_mb(_value(s, "R")) for s in r], color="tab:blue", lw=1.6, alpha=alpha, label=lab("R (realized)"))
            if any("M_disk" in s for s in r):
                ax.plot(t, [_mb(_value(s, "M_disk")) for s in r], color="0.5", ls=":", lw=1, alpha=alpha, label=lab("M disk"))
                ax.plot(t, [_mb(_value(s, "R_disk")) for s in r], color="tab:cyan", lw=1, alpha=alpha, label=lab("R disk"))
            if any(_value(s, "E_disk") is not None for s in r):
                ax2.plot(t, [_value(s, "E_disk") if _value(s, "E_disk") is not None else float("nan") for s in r],
                         color="tab:green", ls="-.", lw=1, alpha=alpha, label=lab("E_disk"))
        ax.set_ylabel("MB saved")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("E_disk")
        ax.set_title(m, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{results.get('name', '')}: sharing over time (R vs the oracle's M)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _surplus_series(mode: Mapping[str, Any]) -> list[tuple[float, dict[str, float], float | None]]:
    """(t, surplus MB per VM, saving MB) from the first run's samples, or its manager's decisions."""
    out = []
    first = mode_runs(mode)[0] if mode_runs(mode) else {}
    for s in first.get("samples") or []:
        if isinstance(s.get("surplus_mb"), Mapping):
            out.append((float(s["t"]), dict(s["surplus_mb"]), _mb(_value(s, "R"))))
    if not out:
        for d in first.get("surplus") or []:
            if isinstance(d.get("surplus_mb"), Mapping):
                out.append((float(d["t"]), dict(d["surplus_mb"]), d.get("saving_mb")))
    return out


def plot_surplus(results: Mapping[str, Any], path: Path) -> Path | None:
    """Surplus per VM over time (stacked, MB) with the saving R it may never exceed; one panel
    per mode that recorded balloon targets. None when no mode did."""
    plt = _pyplot()
    data = {m: _surplus_series(results["modes"][m]) for m in modes_in_order(results)}
    data = {m: s for m, s in data.items() if s}
    if not data:
        return None
    fig, axes = plt.subplots(len(data), 1, figsize=(9, 2.4 * len(data)), sharex=True, squeeze=False)
    for ax, (m, series) in zip(axes[:, 0], data.items(), strict=True):
        t = [x[0] for x in series]
        vms = sorted({vm for x in series for vm in x[1]})
        ax.stackplot(t, [[x[1].get(vm, 0.0) for x in series] for vm in vms], labels=vms, alpha=0.7, step="post")
        saving = [x[2] if x[2] is not None else float("nan") for x in series]
        ax.plot(t, saving, "k--", lw=1, drawstyle="steps-post", label="saving R")
        ax.set_ylabel("surplus (MB)")
        ax.set_title(m, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{results.get('name', '')}: surplus given back per VM", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_workload_times(results: Mapping[str, Any], path: Path) -> Path | None:
    """Workload time per mode: median bar, min-max whisker, every run as a dot."""
    plt = _pyplot()
    vals = {m: [v for v in figure_values(results, m, "workload_time_s") if v is not None]
            for m in modes_in_order(results) if not results["modes"][m].get("skipped")}
    vals = {m: v for m, v in vals.items() if v}
    if not vals:
        return None
    modes = list(vals)
    med = [Stat.of(vals[m]).median for m in modes]  # type: ignore[union-attr]
    err = [[md - min(vals[m]) for md, m in zip(med, modes, strict=True)],
           [max(vals[m]) - md for md, m in zip(med, modes, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(modes) + 2), 3.2))
    x = range(len(modes))
    ax.bar(x, med, yerr=err, capsize=4, color="tab:blue", alpha=0.7)
    for i, m in enumerate(modes):
        ax.plot([i] * len(vals[m]), vals[m], "k.", ms=4)
    ax.set_xticks(list(x), modes)
    ax.set_ylabel("workload time (s)")
    ax.set_title(f"{results.get('name', '')}: workload time per mode (median, min-max)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(folder: str | os.PathLike, results: Mapping[str, Any] | None = None) -> list[Path]:
    """The PNG plots of a result folder; raises :class:`HarnessError` if they cannot be made."""
    folder = Path(folder)
    results = results if results is not None else load_results(folder)
    out = [plot_sharing(results, folder / PLOT_SHARING),
           plot_surplus(results, folder / PLOT_SURPLUS),
           plot_workload_times(results, folder / PLOT_WORKLOAD)]
    return [p for p in out if p is not None]


# ---------------------------------------------------------------- summary and comparison


def _meta_lines(meta: Mapping[str, Any]) -> list[str]:
    if not meta:
        return ["- measured on: not recorded"]
    commit = meta.get("git_commit") or "?"
    if meta.get("git_dirty"):
        commit += " (dirty)"
    return [
        f"- host: {meta.get('host_kernel', '?')}, {meta.get('cpu_model', '?')} x{meta.get('cpus', '?')}",
        f"- QEMU: {meta.get('qemu_version', '?')}, accelerator {meta.get('accel', '?')}",
        f"- guest kernel: {meta.get('guest_kernel', '?')}, image recipe {meta.get('image_recipe_hash', '?')}",
        f"- satori commit {commit}, Python {meta.get('python', '?')}, seed {meta.get('seed', '?')}, "
        f"at {meta.get('time_utc', '?')}",
    ]


def summary_markdown(results: Mapping[str, Any], plots: Iterable[Path] = ()) -> str:
    reps = max((len(mode_runs(results["modes"][m])) for m in results["modes"]), default=0)
    lines = [f"# {results.get('name', 'satori run')}", ""]
    if results.get("partial"):
        lines += ["**Partial run**: not every mode and repetition ran to its end (see below); "
                  "figures count the runs that completed.", ""]
    for m in modes_in_order(results):
        if results["modes"][m].get("skipped"):
            lines.append(f"- mode {m} was skipped: {results['modes'][m]['skipped']}")
    lines += _meta_lines(results.get("meta") or {})
    if any((r.get("cpu") or {}).get("engine_priority") == "realtime"
           for m in results["modes"] for r in mode_runs(results["modes"][m])):
        lines.append("- engine priority: realtime (the engine and merge-agent threads at SCHED_RR, "
                     "ahead of the guests: lower merge lag, more CPU per page saved; README)")
    lines += ["", (f"Figures per mode (definitions: docs/metrics.md); {reps} repetitions: median "
                   "[min–max]; a ratio to mode none whose spread crosses 1.0 is \"within noise\"; "
                   "— where a figure is not one of that mode.") if reps > 1 else
              "Figures per mode (definitions: docs/metrics.md); one repetition: no spread, no claim.",
              "", summary_table(results), ""]
    problems = run_problems(results)
    if problems:
        lines += ["### Runs that did not complete", "", *problems, ""]
    reasons = na_reasons(results)
    if reasons:
        lines += ["### Figures without a value", "", *reasons, ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
    return "\n".join(lines).rstrip() + "\n"


def report(folder: str | os.PathLike) -> tuple[str, list[Path]]:
    """Write ``summary.md``, ``samples.csv`` and the plots into a result folder; return the
    summary tables and the files written."""
    folder = Path(folder)
    results = load_results(folder)
    plots = write_plots(folder, results)
    csv_path = write_csv(folder, results)
    md = folder / SUMMARY
    md.write_text(summary_markdown(results, plots))
    text = summary_table(results)
    problems = run_problems(results)
    if problems:
        text += "\n\nRuns that did not complete:\n" + "\n".join(problems)
    return text, [md, csv_path, *plots]


def _labels(folders: Sequence[Path]) -> list[str]:
    names = [f.resolve().name for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders, strict=True)]


def compare(folders: Sequence[str | os.PathLike]) -> str:
    """Side-by-side markdown of two or more result folders: one row per mode and figure, one
    column per folder (median [min–max]), and what each was measured on."""
    paths = [Path(f) for f in folders]
    all_results = [load_results(p) for p in paths]
    labels = _labels(paths)
    lines = ["# Comparison", ""]
    for lab, p, r in zip(labels, paths, all_results, strict=True):
        meta = r.get("meta") or {}
        commit = (meta.get("git_commit") or "?")[:10] + (" (dirty)" if meta.get("git_dirty") else "")
        lines.append(f"- **{lab}** ({p}): {r.get('name', '?')}, commit {commit}, "
                     f"accel {meta.get('accel', '?')}, host {meta.get('host_kernel', '?')}"
                     + (", partial" if r.get("partial") else ""))
    stats = [summarize(r) for r in all_results]
    modes: list[str] = []
    for st in stats:
        modes += [m for m in st if m not in modes]
    modes.sort(key=_modes.order_key)
    lines += ["", "| mode | figure | " + " | ".join(labels) + " |",
              "|---|---|" + "---:|" * len(labels)]
    for m in modes:
        for metric in metrics.METRICS:
            cells = [format_figure(s[m][metric.key], metric) if m in s else "—" for s in stats]
            if all(c in ("n/a", "—") for c in cells):
                continue
            lines.append(f"| {m} | {metric.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- what a result was measured on


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_state() -> tuple[str | None, str | None]:
    """The project's commit and ``git status --porcelain`` now (None where git cannot tell)."""
    return (_run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT),
            _run(["git", "status", "--porcelain"], cwd=REPO_ROOT))


def collect_meta(config_dict: Mapping[str, Any] | None, accel: str | None, guest_kernel: str | None,
                 recipe_hash: str | None, git: tuple[str | None, str | None] | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge and reproduce a result: host kernel and CPU, QEMU
    version and accelerator, guest kernel, image recipe hash, the config as run, the project's
    commit (and whether the tree had uncommitted changes: ``git``, as :func:`git_state` gave
    it when the run started, since the tree may move during a long run), Python, seed."""
    u = platform.uname()
    qemu = _run(["qemu-system-x86_64", "--version"])
    commit, status = git if git is not None else git_state()
    config_dict = dict(config_dict or {})
    return {
        "host_kernel": f"{u.system} {u.release} {u.version}",
        "host_arch": u.machine,
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "qemu_version": qemu.splitlines()[0] if qemu else None,
        "accel": accel,
        "guest_kernel": guest_kernel,
        "image_recipe_hash": recipe_hash,
        "config": config_dict,
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "seed": config_dict.get("seed"),
        "time_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv,
    }


# ---------------------------------------------------------------- CLI


def cmd_report(args: argparse.Namespace) -> int:
    """``satori report DIR...``: summary table per folder (and summary.md, samples.csv, plots
    written into it); with two or more folders, the side-by-side comparison too."""
    dirs = list(args.dirs)
    if not dirs:
        raise HarnessError("satori report: give at least one result folder")
    for d in dirs:
        table, files = report(d)
        print(f"## {d}\n\n{table}\n")
        print("written: " + ", ".join(str(f) for f in files) + "\n")
    if len(dirs) >= 2:
        print(compare(dirs))
    return 0
