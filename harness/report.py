"""Results and report: ``results.json`` in, a CSV of the samples, PNG plots and ``summary.md`` out.

A result folder holds one ``results.json`` (written by :func:`write_results`, atomically, so a run
stopped by Ctrl-C still leaves a file that loads)::

    {
      "version": 1,
      "name": "quickstart",
      "partial": false,                  # true when the run was stopped early
      "meta": {...},                     # collect_meta(): what it was measured on
      "modes": {
        "satori": {
          "E_final": 0.97,               # or a list, one value per repetition
          "E_disk_final": 0.99, "time_to_90_s": 1.2, "opportunity_captured": 0.9,
          "cpu_per_merged_page_s": 3e-6, "guest_slowdown": 1.01, "workload_time_s": 14.2,
          "macro_gain": null, "hint_drops": 0, "hint_rejects": {"vm1": 0, "vm2": 3},
          "t0": 5.0,                     # optional: workload's first read, s (or a list per rep)
          "samples": [                   # flat with "rep", or a list of lists (one per rep)
            {"rep": 0, "t": 0.0, "G": 1000, "F": 900, "C": 850, "R": 100, "M": 150,
             "E": 0.66, "E_disk": 0.8, "R_disk": 80, "M_disk": 100,
             "balloon_mb": {"vm1": 256}, "surplus_mb": {"vm1": 0}},
            ...
          ],
          "surplus": [...]               # optional: SurplusManager.series()
        }, ...
      }
    }

G, F, C, R, M (and their ``_disk`` / ``_nonzero`` variants) are in pages of 4 KiB, ``t`` in
seconds from the start of the mode's run. A figure that is missing or ``null`` prints ``n/a``;
``E_final``, ``E_disk_final``, ``time_to_90_s`` and ``opportunity_captured`` missing from a mode
are derived from its samples (:func:`figures_from_samples`). With repetitions every figure is
reported as median [min-max].

The metric arithmetic (:func:`time_to_threshold`, :func:`opportunity_captured`,
:func:`trapezoid`) is pure and unit tested on hand-made series.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import modes as _modes
from harness.errors import HarnessError

log = logging.getLogger(__name__)

RESULTS = "results.json"
SAMPLES_CSV = "samples.csv"
SUMMARY = "summary.md"
PLOT_SHARING = "sharing.png"
PLOT_SURPLUS = "surplus.png"
PLOT_WORKLOAD = "workload_times.png"
PAGES_PER_MB = 256
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- figure formatting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _secs(x: float) -> str:
    return f"{x:.2f} s" if abs(x) < 10 else f"{x:.1f} s"


def _us(x: float) -> str:
    return f"{x * 1e6:.2f} µs"


def _ratio(x: float) -> str:
    return f"{x:.3f}x"


def _count(x: float) -> str:
    return f"{x:.0f}"


# key, column header, formatter: the figures of METRICS.md, in the table's order
FIGURES: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("E_final", "E", _pct),
    ("E_disk_final", "E_disk", _pct),
    ("time_to_90_s", "time to 90%", _secs),
    ("opportunity_captured", "opportunity", _pct),
    ("opportunity_disk", "opportunity disk", _pct),
    ("cpu_per_merged_page_s", "CPU/merged page", _us),
    ("guest_slowdown", "slowdown", _ratio),
    ("workload_time_s", "workload time", _secs),
    ("macro_gain", "macro gain", _ratio),
    ("hint_drops", "hint drops", _count),
    ("hint_rejects", "hint rejects", _count),
)
FIGURE_KEYS = tuple(k for k, _, _ in FIGURES)


# ---------------------------------------------------------------- metric arithmetic


def _value(s: Mapping[str, Any], key: str) -> float | None:
    v = s.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def time_to_threshold(samples: Sequence[Mapping[str, Any]], key: str, thr: float,
                      t0: float = 0.0) -> float | None:
    """Seconds from ``t0`` to the first sample at or after ``t0`` whose ``key`` is >= ``thr``.

    ``None`` if it never gets there. The resolution is the sampling interval: no interpolation
    (the answer is the first time the figure was *seen* at the threshold). Samples whose value
    is missing (E is undefined while M = 0) are skipped.
    """
    for s in sorted(samples, key=lambda s: s["t"]):
        if s["t"] < t0:
            continue
        v = _value(s, key)
        if v is not None and v >= thr:
            return float(s["t"]) - t0
    return None


def trapezoid(samples: Sequence[Mapping[str, Any]], key: str, t0: float | None = None,
              t1: float | None = None) -> float:
    """Integral of ``key`` over ``t`` (trapezoid rule) between ``t0`` and ``t1`` (sample times);
    an interval with a missing value at either end counts as 0."""
    pts = sorted((float(s["t"]), _value(s, key)) for s in samples
                 if (t0 is None or s["t"] >= t0) and (t1 is None or s["t"] <= t1))
    total = 0.0
    for (ta, va), (tb, vb) in zip(pts, pts[1:], strict=False):
        if va is not None and vb is not None:
            total += (tb - ta) * (va + vb) / 2
    return total


def opportunity_captured(samples: Sequence[Mapping[str, Any]], r_key: str = "R", m_key: str = "M",
                         t0: float | None = None, t1: float | None = None) -> float | None:
    """∫R dt / ∫M dt (trapezoid): the share of the sharing opportunity, over time, realized.
    ``None`` when there was no opportunity (∫M dt = 0)."""
    m = trapezoid(samples, m_key, t0, t1)
    if m <= 0:
        return None
    return trapezoid(samples, r_key, t0, t1) / m


def figures_from_samples(samples: Sequence[Mapping[str, Any]], t0: float = 0.0) -> dict[str, float | None]:
    """The figures one run's samples determine: final E and E_disk, time to 90% on E_disk,
    opportunity captured (from ``t0`` on)."""
    ordered = sorted(samples, key=lambda s: s["t"])
    last = ordered[-1] if ordered else {}
    return {
        "E_final": _value(last, "E"),
        "E_disk_final": _value(last, "E_disk"),
        "time_to_90_s": time_to_threshold(ordered, "E_disk", 0.9, t0),
        "opportunity_captured": opportunity_captured(ordered, t0=t0),
    }


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
    data = {"version": 1, **results}
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
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{folder}: no {RESULTS} (is it a result folder of `satori run`?)") from None
    except ValueError as e:
        raise HarnessError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("modes"), dict):
        raise HarnessError(f"{path}: no 'modes' mapping: not a satori result")
    return data


def modes_in_order(results: Mapping[str, Any]) -> list[str]:
    return sorted(results["modes"], key=_modes.order_key)


def runs(mode: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """A mode's samples, one list per repetition, in repetition order."""
    samples = mode.get("samples") or []
    if samples and isinstance(samples[0], list):
        return [list(r) for r in samples]
    reps: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        reps.setdefault(int(s.get("rep", 0)), []).append(s)
    return [sorted(reps[k], key=lambda s: s["t"]) for k in sorted(reps)]


def _per_rep(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v]


def _scalar(v: Any) -> float | None:
    """One repetition's value of a figure; a per-VM mapping (hint counters) is summed."""
    if isinstance(v, Mapping):
        vals = [_scalar(x) for x in v.values()]
        vals = [x for x in vals if x is not None]
        return float(sum(vals)) if vals else None
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def figure_values(mode: Mapping[str, Any], key: str) -> list[float]:
    """Every repetition's value of one figure (missing ones derived from the samples)."""
    if mode.get(key) is not None:
        vals = [_scalar(v) for v in _per_rep(mode[key])]
    elif key in ("E_final", "E_disk_final", "time_to_90_s", "opportunity_captured"):
        t0 = mode.get("t0")
        t0s = t0 if isinstance(t0, list) else None
        vals = []
        for i, r in enumerate(runs(mode)):
            if t0s is not None:
                t0 = t0s[i] if i < len(t0s) else None
            t0 = float(t0) if isinstance(t0, int | float) else 0.0
            vals.append(figures_from_samples(r, t0)[key] if r else None)
    else:
        vals = []
    return [v for v in vals if v is not None]


def summarize(results: Mapping[str, Any]) -> dict[str, dict[str, tuple[float, float, float, int] | None]]:
    """mode -> figure -> (median, min, max, repetitions counted), or None where nothing measured."""
    out: dict[str, dict[str, tuple[float, float, float, int] | None]] = {}
    for m in modes_in_order(results):
        row: dict[str, tuple[float, float, float, int] | None] = {}
        for key in FIGURE_KEYS:
            vals = figure_values(results["modes"][m], key)
            row[key] = (statistics.median(vals), min(vals), max(vals), len(vals)) if vals else None
        out[m] = row
    return out


def format_figure(stat: tuple[float, float, float, int] | None, fmt: Callable[[float], str]) -> str:
    if stat is None:
        return "n/a"
    med, lo, hi, n = stat
    return fmt(med) if n == 1 or lo == hi else f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]"


def summary_table(results: Mapping[str, Any]) -> str:
    """The markdown table: one row per mode, the METRICS.md figures as median [min–max]."""
    stats = summarize(results)
    head = "| mode | " + " | ".join(h for _, h, _ in FIGURES) + " |"
    sep = "|---|" + "---:|" * len(FIGURES)
    rows = [f"| {m} | " + " | ".join(format_figure(stats[m][k], f) for k, _, f in FIGURES) + " |"
            for m in stats]
    return "\n".join([head, sep, *rows])


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
    """``samples.csv``: one row per sample per mode and repetition; nested per-VM mappings
    become columns ``balloon_mb.vm1``..."""
    folder = Path(folder)
    results = results if results is not None else load_results(folder)
    rows: list[dict[str, Any]] = []
    for m in modes_in_order(results):
        for rep, samples in enumerate(runs(results["modes"][m])):
            for s in samples:
                flat = _flatten({k: v for k, v in s.items() if k != "rep"})
                rows.append({"mode": m, "rep": s.get("rep", rep), **flat})
    first = ["mode", "rep", "t", "G", "F", "C", "R", "M", "E", "E_disk"]
    seen = {k for r in rows for k in r}
    columns = [c for c in first if c in seen or c in ("mode", "rep")]
    columns += sorted(seen - set(columns))
    path = folder / SAMPLES_CSV
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mb(v: float | None) -> float:
    return float("nan") if v is None else v / PAGES_PER_MB


def plot_sharing(results: Mapping[str, Any], path: Path) -> Path | None:
    """Sharing over time, one panel per mode: realized saving R against the oracle's maximum M
    (MB; and their disk-content parts), with E_disk on the right axis. Repetitions after the
    first are drawn faint."""
    plt = _pyplot()
    modes = [m for m in modes_in_order(results) if any(runs(results["modes"][m]))]
    if plt is None or not modes:
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
    """(t, surplus MB per VM, saving MB) from the samples, or from the manager's decisions."""
    out = []
    first = runs(mode)[0] if runs(mode) else []
    for s in first:
        if isinstance(s.get("surplus_mb"), Mapping):
            out.append((float(s["t"]), dict(s["surplus_mb"]), _mb(_value(s, "R"))))
    if not out:
        for d in mode.get("surplus") or []:
            if isinstance(d.get("surplus_mb"), Mapping):
                out.append((float(d["t"]), dict(d["surplus_mb"]), d.get("saving_mb")))
    return out


def plot_surplus(results: Mapping[str, Any], path: Path) -> Path | None:
    """Surplus per VM over time (stacked, MB) with the saving R it may never exceed; one panel
    per mode that recorded balloon targets. None when no mode did."""
    plt = _pyplot()
    data = {m: _surplus_series(results["modes"][m]) for m in modes_in_order(results)}
    data = {m: s for m, s in data.items() if s}
    if plt is None or not data:
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
    """Workload time per mode: median bar, min-max whisker, every repetition as a dot."""
    plt = _pyplot()
    modes = [m for m in modes_in_order(results) if figure_values(results["modes"][m], "workload_time_s")]
    if plt is None or not modes:
        return None
    vals = [figure_values(results["modes"][m], "workload_time_s") for m in modes]
    med = [statistics.median(v) for v in vals]
    err = [[md - min(v) for md, v in zip(med, vals, strict=True)], [max(v) - md for md, v in zip(med, vals, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(modes) + 2), 3.2))
    x = range(len(modes))
    ax.bar(x, med, yerr=err, capsize=4, color="tab:blue", alpha=0.7)
    for i, v in enumerate(vals):
        ax.plot([i] * len(v), v, "k.", ms=4)
    ax.set_xticks(list(x), modes)
    ax.set_ylabel("workload time (s)")
    ax.set_title(f"{results.get('name', '')}: workload time per mode (median, min-max)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(folder: str | os.PathLike, results: Mapping[str, Any] | None = None) -> list[Path]:
    folder = Path(folder)
    results = results if results is not None else load_results(folder)
    if _pyplot() is None:
        log.warning("plots skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return []
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
    reps = max((len(runs(results["modes"][m])) for m in results["modes"]), default=0)
    lines = [f"# {results.get('name', 'satori run')}", ""]
    if results.get("partial"):
        lines += ["**Partial run**: stopped before the end; figures cover what was measured.", ""]
    skipped = {m: v["skipped"] for m, v in results["modes"].items() if isinstance(v, Mapping) and v.get("skipped")}
    for m, why in skipped.items():
        lines += [f"- mode {m} was skipped: {why}"]
    if skipped:
        lines.append("")
    lines += _meta_lines(results.get("meta") or {})
    lines += ["", f"Figures of METRICS.md per mode; with {reps} repetitions: median [min–max]." if reps > 1
              else "Figures of METRICS.md per mode.", "", summary_table(results), ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
    return "\n".join(lines).rstrip() + "\n"


def report(folder: str | os.PathLike) -> tuple[str, list[Path]]:
    """Write ``summary.md``, ``samples.csv`` and the plots into a result folder; return the
    summary table and the files written."""
    folder = Path(folder)
    results = load_results(folder)
    plots = write_plots(folder, results)
    csv_path = write_csv(folder, results)
    md = folder / SUMMARY
    md.write_text(summary_markdown(results, plots))
    return summary_table(results), [md, csv_path, *plots]


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
    for r in all_results:
        modes += [m for m in modes_in_order(r) if m not in modes]
    modes.sort(key=_modes.order_key)
    lines += ["", "| mode | figure | " + " | ".join(labels) + " |",
              "|---|---|" + "---:|" * len(labels)]
    for m in modes:
        for key, head, fmt in FIGURES:
            cells = [format_figure(s[m][key], fmt) if m in s else "—" for s in stats]
            if all(c in ("n/a", "—") for c in cells):
                continue
            lines.append(f"| {m} | {head} | " + " | ".join(cells) + " |")
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


def collect_meta(config_dict: Mapping[str, Any] | None, accel: str | None, guest_kernel: str | None,
                 recipe_hash: str | None) -> dict[str, Any]:
    """Everything a reader needs to judge and reproduce a result: host kernel and CPU, QEMU
    version and accelerator, guest kernel, image recipe hash, the config as run, the project's
    commit (and whether the tree had uncommitted changes), Python, seed."""
    u = platform.uname()
    qemu = _run(["qemu-system-x86_64", "--version"])
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    status = _run(["git", "status", "--porcelain"], cwd=REPO_ROOT)
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
