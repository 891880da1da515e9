"""The figures, defined once: every figure a run reports is an entry of :data:`METRICS`.

An entry says what the figure is (key, label, unit, a one-line definition), how one run's value
is computed from what the runner recorded (:class:`RunView`: the samples, the workload events,
the engines' statistics), how repetitions aggregate (median with min-max), which way is better,
the goal it is held to (METRICS.md) and the modes and workloads it means something for. The
runner writes every entry's value per run into ``results.json``; ``summary.md``, ``satori
report`` and ``benchmarks/scenario.py`` print the entries; ``docs/metrics.md`` carries the table
:func:`markdown_table` makes (a test keeps the two equal). Adding a figure is one entry here.

The sample rows are defined here too (:data:`SAMPLE_FIGURES`, :func:`sample_row`): per sharing
domain ``<domain>.G`` ... and the totals over the domains, with the ratios (E, E_disk, ...)
recomputed from the summed counts, never averaged.

One CPU yardstick for every mode: host CPU spent on sharing (the engine's thread, the merge
agents' threads inside QEMU, ksmd, host-hint work) over the sampling window, divided by the
pages saved, the peak of R over the same samples (the oracle, all memory). Sample rows carry the
cumulative counters (``row["cpu"]``: ``engine_s``, ``agent_s``, ``ksmd_s``, ``hosthints_s``,
``oracle_s``; ``None`` when one cannot be read) so windows (until convergence, the idle tail)
are computed afterwards. The oracle's own CPU is the measurement cost, reported on its own and
never charged to a mode.

A figure that cannot be measured, or means nothing for a run, is ``None`` with a reason
(:class:`NA`), never a silent stand-in.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from harness import modes as _modes

PAGES_PER_MB = 256
IDLE_WINDOW_S = 30.0  # idle CPU: the last 30 s of a run whose workload has been quiet that long
CONVERGED = 0.9  # "converged": E_disk first at 90%
CPU_PARTS = ("engine_s", "agent_s", "ksmd_s", "hosthints_s")  # charged to a mode
ORACLE_PART = "oracle_s"  # the measurement's own cost: reported, never charged


class NA(Exception):
    """A figure that has no value for a run, and why (raised by a metric's ``compute``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- sample rows


@dataclasses.dataclass(frozen=True)
class SampleFigure:
    """One figure of a sample row (accounting's Sample), per domain and in total."""

    key: str
    unit: str
    how: str
    ratio_of: tuple[str, str] | None = None  # a ratio: recomputed from the summed counts


SAMPLE_FIGURES: tuple[SampleFigure, ...] = (
    SampleFigure("G", "pages", "populated guest pages (present, or mapped from the store untouched)"),
    SampleFigure("F", "pages", "host frames paid: distinct frames behind G, plus store pages no guest maps"),
    SampleFigure("C", "pages", "distinct contents among G (all-zero pages are one content)"),
    SampleFigure("R", "pages", "realized saving, G - F"),
    SampleFigure("M", "pages", "maximum possible saving, G - C"),
    SampleFigure("E", "fraction", "sharing efficiency R / M", ("R", "M")),
    SampleFigure("G_nonzero", "pages", "G without all-zero pages"),
    SampleFigure("R_nonzero", "pages", "R without all-zero pages"),
    SampleFigure("M_nonzero", "pages", "M without all-zero pages"),
    SampleFigure("E_nonzero", "fraction", "E without all-zero pages", ("R_nonzero", "M_nonzero")),
    SampleFigure("G_disk", "pages", "pages of G whose content is a 4 KiB block of a disk image"),
    SampleFigure("R_disk", "pages", "R restricted to disk-content pages"),
    SampleFigure("M_disk", "pages", "M restricted to disk-content pages"),
    SampleFigure("E_disk", "fraction", "R_disk / M_disk: what reads can reveal", ("R_disk", "M_disk")),
    SampleFigure("zero_pages", "pages", "all-zero pages in G"),
    SampleFigure("store_pages", "pages", "resident pages of the content store"),
)
SAMPLE_KEYS = tuple(f.key for f in SAMPLE_FIGURES)


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def sample_row(t: float, per_domain: Mapping[str, Mapping[str, Any]], *,
               prefixed: bool | None = None) -> dict[str, Any]:
    """A sample row from each domain's figures (``accounting.Sample.as_dict()``): with one domain
    its figures as they are; with several, ``<domain>.<key>`` for each and the totals (counts
    summed, ratios recomputed from the sums; a count some domain lacks leaves the total out).
    ``prefixed``: whether the run has several domains (default: ``per_domain`` has several), so
    the keys stay the same when a domain stops being sampled (its VM died)."""
    row: dict[str, Any] = {"t": t}
    if not (len(per_domain) > 1 if prefixed is None else prefixed) and len(per_domain) == 1:
        (d,) = per_domain.values()
        row.update({k: d[k] for k in SAMPLE_KEYS if k in d})
        return row
    for dom, d in per_domain.items():
        row.update({f"{dom}.{k}": d[k] for k in SAMPLE_KEYS if k in d})
    for f in SAMPLE_FIGURES:
        if f.ratio_of is None:
            vals = [d.get(f.key) for d in per_domain.values()]
            if all(v is not None for v in vals):
                row[f.key] = sum(vals)
    for f in SAMPLE_FIGURES:
        if f.ratio_of is not None:
            r, m = row.get(f.ratio_of[0]), row.get(f.ratio_of[1])
            if r is not None and m is not None:
                row[f.key] = (r / m) if m else None
    return row


def cpu_counters(row: Mapping[str, Any]) -> dict[str, float | None]:
    """The cumulative CPU counters of a sample row (``row["cpu"]``, or flat ``cpu.<part>``
    keys): a part the row does not name is 0 (that mode has no such thread), a part named with
    ``None`` could not be read. Raises :class:`NA` for a row without counters."""
    nested = row.get("cpu")
    if isinstance(nested, Mapping):
        src: Mapping[str, Any] = nested
    else:
        src = {k.removeprefix("cpu."): v for k, v in row.items() if k.startswith("cpu.")}
        if not src:
            raise NA("the samples carry no CPU counters")
    return {k: (_num(src[k]) if src[k] is not None else None) if k in src else 0.0
            for k in (*CPU_PARTS, ORACLE_PART)}


def charged_cpu(row: Mapping[str, Any]) -> float:
    """Host CPU charged to the mode up to this row (engine + agents + ksmd + host hints), s.
    Raises :class:`NA` when a part could not be read (with the row's ``cpu["error"]``)."""
    c = cpu_counters(row)
    missing = [k for k in CPU_PARTS if c[k] is None]
    if missing:
        nested = row.get("cpu")
        why = nested.get("error") if isinstance(nested, Mapping) else row.get("cpu.error")
        raise NA(f"CPU of {', '.join(m.removesuffix('_s') for m in missing)} could not be read"
                 + (f": {why}" if why else ""))
    return float(sum(c[k] or 0.0 for k in CPU_PARTS))


# ---------------------------------------------------------------- one run, as the metrics see it


@dataclasses.dataclass
class RunView:
    """What the metrics read of one (mode, repetition) run."""

    mode: str
    rep: int
    samples: list[dict[str, Any]]
    events: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    t0: float | None = None  # the workload's first read, s from the mode's start
    quiet_since: float | None = None  # the workload has done nothing since (None: never quiet)
    workloads: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    engine: dict[str, dict[str, Any]] | None = None  # per domain: SharingEngine.stats()
    defines: frozenset[str] = frozenset()  # ratio figures the workloads define: slowdown, macro_gain
    surplus: bool = False  # the config lends the saving back
    status: str = "ok"
    entitlements_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    decisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the surplus manager's

    @classmethod
    def from_record(cls, rec: Mapping[str, Any], mode: str) -> RunView:
        """From a run record of ``results.json`` (``modes[m]["runs"][i]``)."""
        return cls(
            mode=mode, rep=int(rec.get("rep", 0)),
            samples=sorted(rec.get("samples") or [], key=lambda s: s["t"]),
            events=[(float(t), str(lab)) for t, lab in rec.get("events") or []],
            t0=_num(rec.get("t0")), quiet_since=_num(rec.get("quiet_since")),
            workloads=list(rec.get("workloads") or []), engine=rec.get("engine"),
            defines=frozenset(rec.get("defines") or ()), surplus=bool(rec.get("surplus_on")),
            status=str(rec.get("status") or "ok"),
            entitlements_mb=dict(rec.get("entitlements_mb") or {}), decisions=list(rec.get("surplus") or []),
        )

    @property
    def m(self) -> _modes.Mode | None:
        return _modes.MODES.get(self.mode)

    def need_samples(self) -> list[dict[str, Any]]:
        if not self.samples:
            raise NA("no samples")
        return self.samples

    def last_read_end(self) -> float:
        ends = [t for t, lab in self.events if lab == "reads end"]
        if not ends:
            raise NA("the workload marks no end of its reads")
        return max(ends)

    def workload_time(self) -> float:
        ts = [_num(w.get("time_s")) for w in self.workloads]
        if not ts or any(t is None for t in ts):
            raise NA("no workload time")
        return float(sum(ts))  # type: ignore[arg-type]


# ---------------------------------------------------------------- arithmetic on samples


def value(s: Mapping[str, Any], key: str) -> float | None:
    return _num(s.get(key))


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
        v = value(s, key)
        if v is not None and v >= thr:
            return float(s["t"]) - t0
    return None


def trapezoid(samples: Sequence[Mapping[str, Any]], key: str, t0: float | None = None,
              t1: float | None = None) -> float:
    """Integral of ``key`` over ``t`` (trapezoid rule) between ``t0`` and ``t1`` (sample times);
    an interval with a missing value at either end counts as 0."""
    pts = sorted((float(s["t"]), value(s, key)) for s in samples
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


# ---------------------------------------------------------------- the compute functions

Compute = Callable[[RunView, "RunView | None"], float | None]


def _final(key: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        v = value(run.need_samples()[-1], key)
        if v is None:
            raise NA(f"{key} undefined at the last sample (nothing to share: M = 0)")
        return v
    return f


def _time_to_90(run: RunView, base: RunView | None) -> float | None:
    if run.t0 is None:
        raise NA("the workload marks no first read")
    t = time_to_threshold(run.need_samples(), "E_disk", CONVERGED, run.t0)
    if t is None:
        raise NA("E_disk never reached 90%")
    return t


def _time_to_90_after_reads(run: RunView, base: RunView | None) -> float | None:
    t_end = run.last_read_end()
    samples = run.need_samples()
    before = [s for s in samples if s["t"] <= t_end and value(s, "E_disk") is not None]
    if before and value(before[-1], "E_disk") >= CONVERGED:  # type: ignore[operator]
        return 0.0
    t = time_to_threshold(samples, "E_disk", CONVERGED, t_end)
    if t is None:
        raise NA("E_disk never reached 90%")
    return t


def _opportunity(r_key: str, m_key: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        v = opportunity_captured(run.need_samples(), r_key, m_key, t0=run.t0)
        if v is None:
            raise NA(f"no opportunity (∫{m_key} dt = 0)")
        return v
    return f


def _peak_r(run: RunView, key: str = "R") -> float:
    vals = [value(s, key) for s in run.need_samples()]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else 0.0


def _window(run: RunView) -> float:
    s = run.need_samples()
    w = float(s[-1]["t"]) - float(s[0]["t"])
    if w <= 0:
        raise NA("fewer than two samples")
    return w


def _cpu_total(run: RunView) -> float:
    """Charged CPU over the sampling window: the counters' last minus first row."""
    s = run.need_samples()
    return charged_cpu(s[-1]) - charged_cpu(s[0])


def _pages_saved(run: RunView, base: RunView | None) -> float | None:
    return _peak_r(run)


def _cpu_s(run: RunView, base: RunView | None) -> float | None:
    return _cpu_total(run)


def _cpu_per_page_saved(run: RunView, base: RunView | None) -> float | None:
    peak = _peak_r(run)
    if peak <= 0:
        raise NA("no page saved (peak R = 0)")
    return _cpu_total(run) / peak


def _cpu_until_convergence(run: RunView, base: RunView | None) -> float | None:
    s = run.need_samples()
    for row in s:
        v = value(row, "E_disk")
        if v is not None and v >= CONVERGED:
            return charged_cpu(row) - charged_cpu(s[0])
    raise NA("E_disk never reached 90%")


def _idle_cpu(run: RunView, base: RunView | None) -> float | None:
    s = run.need_samples()
    t_end = float(s[-1]["t"])
    if run.quiet_since is None:
        raise NA("the workload has no quiet tail")
    quiet = t_end - run.quiet_since
    if quiet < IDLE_WINDOW_S:
        raise NA(f"quiet tail {quiet:.0f} s < {IDLE_WINDOW_S:.0f} s")
    start = next(row for row in s if row["t"] >= t_end - IDLE_WINDOW_S)
    span = t_end - float(start["t"])
    if span <= 0:
        raise NA("fewer than two samples in the idle window")
    return 100.0 * (charged_cpu(s[-1]) - charged_cpu(start)) / span


def _cpu_pct_core(run: RunView, base: RunView | None) -> float | None:
    return 100.0 * _cpu_total(run) / _window(run)


def _cpu_per_page_second(key: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        area = trapezoid(run.need_samples(), key)
        if area <= 0:
            raise NA(f"nothing saved (∫{key} dt = 0)")
        return _cpu_total(run) / area
    return f


def _oracle_pct_core(run: RunView, base: RunView | None) -> float | None:
    s = run.need_samples()
    a, b = cpu_counters(s[0])[ORACLE_PART], cpu_counters(s[-1])[ORACLE_PART]
    if a is None or b is None:
        raise NA("the oracle's CPU was not recorded")
    return 100.0 * (b - a) / _window(run)


def _oracle_most(key: str) -> Compute:
    """The most of a per-sample oracle figure (``row["oracle"][key]``) over the run."""
    def f(run: RunView, base: RunView | None) -> float | None:
        vals = [_num(r["oracle"].get(key)) for r in run.need_samples() if isinstance(r.get("oracle"), Mapping)]
        vals = [v for v in vals if v is not None]
        if not vals:
            raise NA("the samples carry no oracle figures")
        return max(vals)
    return f


def _merge_lag(stat: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        if not run.engine:
            raise NA("no sharing engine")
        lags = [st.get("merge_lag_s") for st in run.engine.values()]
        if any(not isinstance(x, Mapping) for x in lags):
            raise NA("the engine does not report merge lag")
        vals = [_num(x.get(stat)) for x in lags if x.get("n")]  # type: ignore[union-attr]
        vals = [v for v in vals if v is not None]
        if not vals:
            raise NA("no page merged")
        return max(vals)  # with several domains: the worst one
    return f


def _hint_counter(*fields: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        if not run.engine:
            raise NA("no sharing engine")
        return float(sum(int(v.get(k) or 0) for st in run.engine.values()
                         for v in (st.get("vms") or {}).values() for k in fields))
    return f


def _workload_time(run: RunView, base: RunView | None) -> float | None:
    return run.workload_time()


def _against_none(invert: bool, needs: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        if needs not in run.defines:
            raise NA(f"the workload defines no {needs.replace('_', ' ')}")
        if needs == "macro_gain" and not run.surplus:
            raise NA("surplus is off: no gain to give back")
        if run.mode == "none":
            raise NA("the baseline")
        if base is None:
            raise NA("no run of mode none in the same repetition")
        mine, theirs = run.workload_time(), base.workload_time()
        if mine <= 0 or theirs <= 0:
            raise NA("a workload time of 0")
        return theirs / mine if invert else mine / theirs
    return f


def _budget(key: str) -> Compute:
    """A host-budget figure of harness.budget (sample rows carry ``host`` readings)."""
    def f(run: RunView, base: RunView | None) -> float | None:
        from harness import budget

        s = run.need_samples()
        if not any(isinstance(r.get("host"), Mapping) for r in s):
            raise NA("no host memory readings in the samples")
        v = budget.run_figures(s, [list(e) for e in run.events], run.entitlements_mb, run.decisions).get(key)
        if v is None:
            raise NA("no collapse in the run" if key == "reclaim_s" else "not measured")
        return float(v)
    return f


def _bystander(key: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        by = next((w["extra"]["bystander"] for w in run.workloads
                   if isinstance(w.get("extra"), Mapping) and w["extra"].get("bystander")), None)
        if by is None or by.get(key) is None:
            raise NA("no bystander in the workloads")
        return float(by[key])
    return f


_NO_STALL = "no stall probe in the workloads (identical-readers stall_probe: true)"
_NO_WEB = "no web workload in the run"


def _worst_extra(run: RunView, key: str, missing: str) -> float:
    """The worst VM's figure ``key`` that a workload put in its ``extra`` (the stall probe's,
    the web workload's p99); NA(``missing``) when no workload has it."""
    vals = [_num(w["extra"].get(key)) for w in run.workloads
            if isinstance(w.get("extra"), Mapping) and w["extra"].get(key) is not None]
    vals = [v for v in vals if v is not None]
    if not vals:
        raise NA(missing)
    return max(vals)


def _extra(key: str, missing: str) -> Compute:
    def f(run: RunView, base: RunView | None) -> float | None:
        return _worst_extra(run, key, missing)
    return f


def _extra_vs_none(key: str, missing: str, zero: str) -> Compute:
    """This run's worst ``key`` / mode none's, same repetition."""
    def f(run: RunView, base: RunView | None) -> float | None:
        if run.mode == "none":
            raise NA("the baseline")
        if base is None:
            raise NA("no run of mode none in the same repetition")
        mine, theirs = _worst_extra(run, key, missing), _worst_extra(base, key, missing)
        if theirs <= 0:
            raise NA(zero)
        return mine / theirs
    return f


# ---------------------------------------------------------------- formatting


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def secs(x: float) -> str:
    return f"{x:.2f} s" if abs(x) < 10 else f"{x:.1f} s"


def us(x: float) -> str:
    return f"{x * 1e6:.2f} µs" if abs(x) < 1e-4 else f"{x * 1e6:.0f} µs"


def pct_core(x: float) -> str:
    return f"{x:.2f}% core" if abs(x) < 10 else f"{x:.1f}% core"


def ratio(x: float) -> str:
    return f"{x:.3f}x"


def count(x: float) -> str:
    return f"{x:,.0f}"


def mb(x: float) -> str:
    return f"{x / PAGES_PER_MB:.1f} MB"


def micros(x: float) -> str:
    return f"{x:,.0f} µs"


def megabytes(x: float) -> str:
    return f"{x:.0f} MB"


def plain(x: float) -> str:
    return f"{x:.2f}"


# ---------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Goal:
    """A goal of METRICS.md: ``op`` ``target`` for the median of ``modes`` (None: every mode
    the figure applies to), on ``workloads`` (None: any)."""

    op: Literal["<=", ">="]
    target: float
    modes: tuple[str, ...] | None = None
    workloads: tuple[str, ...] | None = None
    text: str = ""

    def met(self, v: float) -> bool:
        return v <= self.target if self.op == "<=" else v >= self.target


Applies = Literal["all", "sharing", "engine", "hints"]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One figure of a run (see the module docstring)."""

    key: str
    label: str
    unit: str
    how: str
    compute: Compute
    fmt: Callable[[float], str]
    direction: Literal["higher", "lower"] | None
    group: Literal["sharing", "cost", "guest", "hints", "isolation"]
    applies: Applies = "all"  # the modes it means something for
    workloads: tuple[str, ...] | None = None  # the workload kinds that define it (None: any)
    goal: Goal | None = None
    ratio: bool = False  # a ratio against mode none: a spread across 1.0 is "within noise"
    aggregate: Literal["median"] = "median"  # repetitions: median [min-max]

    def applies_to(self, mode: str) -> bool:
        m = _modes.MODES.get(mode)
        if m is None or self.applies == "all":
            return True
        if self.applies == "sharing":
            return m.shares
        if self.applies == "engine":
            return m.engine
        return m.hints is not None


METRICS: tuple[Metric, ...] = (
    # ---- sharing
    Metric("E_final", "E", "fraction", "R / M over all guest memory at the last sample",
           _final("E"), pct, "higher", "sharing",
           goal=Goal(">=", 0.99, ("satori+ksm",), ("identical-readers",), "E over all memory >= 99%")),
    Metric("E_nonzero_final", "E nonzero", "fraction", "E without all-zero pages, at the last sample",
           _final("E_nonzero"), pct, "higher", "sharing"),
    Metric("E_disk_final", "E_disk", "fraction", "R_disk / M_disk (disk-content pages) at the last sample",
           _final("E_disk"), pct, "higher", "sharing",
           goal=Goal(">=", 0.99, ("satori", "satori-host"), ("identical-readers",), "E_disk after the reads >= 99%")),
    Metric("time_to_90_s", "time to 90%", "s", "from the workload's first read until E_disk >= 0.9",
           _time_to_90, secs, "lower", "sharing"),
    Metric("time_to_90_after_reads_s", "90% after reads", "s",
           "from the end of the last read until E_disk >= 0.9 (0 if it was already)",
           _time_to_90_after_reads, secs, "lower", "sharing", workloads=("identical-readers",),
           goal=Goal("<=", 0.5, ("satori", "satori-host"), ("identical-readers",),
                     "time to 90% after the last read <= 0.5 s")),
    Metric("opportunity_captured", "opportunity", "fraction", "∫R dt / ∫M dt from the first read",
           _opportunity("R", "M"), pct, "higher", "sharing"),
    Metric("opportunity_disk", "opportunity disk", "fraction", "∫R_disk dt / ∫M_disk dt from the first read",
           _opportunity("R_disk", "M_disk"), pct, "higher", "sharing",
           goal=Goal(">=", 0.8, ("satori",), ("short-lived",), "opportunity captured on disk pages >= 80%")),
    Metric("pages_saved", "pages saved", "pages", "peak R over the run (the CPU yardstick's denominator)",
           _pages_saved, mb, "higher", "sharing"),
    # ---- cost: one CPU yardstick
    Metric("cpu_per_page_saved_s", "CPU/page saved", "s/page",
           "host CPU (engine + agents + ksmd + host hints) over the run / peak R",
           _cpu_per_page_saved, us, "lower", "cost", applies="sharing",
           goal=Goal("<=", 5e-6, ("satori", "satori-host"), None, "CPU per page saved <= 5 µs")),
    Metric("cpu_until_convergence_s", "CPU to 90%", "s",
           "the same host CPU from the mode's start until E_disk first reaches 0.9",
           _cpu_until_convergence, secs, "lower", "cost", applies="sharing"),
    Metric("idle_cpu_pct_core", "idle CPU", "% of a core",
           f"the same host CPU over the last {IDLE_WINDOW_S:.0f} s, when the workload has been quiet that long",
           _idle_cpu, pct_core, "lower", "cost", applies="sharing",
           goal=Goal("<=", 0.2, ("satori", "satori-host"), None, "idle CPU <= 0.2% of a core")),
    Metric("cpu_total_pct_core", "CPU total", "% of a core", "the same host CPU / the run's sampling window",
           _cpu_pct_core, pct_core, "lower", "cost", applies="sharing"),
    Metric("cpu_s", "CPU", "s", "the same host CPU over the run's sampling window, seconds",
           _cpu_s, secs, "lower", "cost", applies="sharing"),
    Metric("cpu_per_page_second_s", "CPU/page-s", "s/(page·s)", "the same host CPU / ∫R dt (all memory)",
           _cpu_per_page_second("R"), us, "lower", "cost", applies="sharing"),
    Metric("cpu_per_disk_page_second_s", "CPU/disk page-s", "s/(page·s)", "the same host CPU / ∫R_disk dt",
           _cpu_per_page_second("R_disk"), us, "lower", "cost", applies="sharing"),
    Metric("merge_lag_p50_s", "merge lag p50", "s", "per merged page: engine read its hint -> page merged, median",
           _merge_lag("p50"), secs, "lower", "cost", applies="engine"),
    Metric("merge_lag_p99_s", "merge lag p99", "s", "the same, 99th percentile (worst domain)",
           _merge_lag("p99"), secs, "lower", "cost", applies="engine",
           goal=Goal("<=", 0.5, ("satori", "satori-host"), ("identical-readers",), "merge lag p99 <= 0.5 s")),
    Metric("merge_lag_max_s", "merge lag max", "s", "the same, maximum", _merge_lag("max"), secs, "lower",
           "cost", applies="engine"),
    Metric("oracle_cpu_pct_core", "oracle CPU", "% of a core",
           "the measurement's own CPU (accounting + oracle) / the sampling window; never charged to a mode",
           _oracle_pct_core, pct_core, "lower", "cost",
           goal=Goal("<=", 5.0, None, None, "oracle cost <= 5% of a core")),
    Metric("oracle_untracked_pages", "oracle untracked", "pages",
           "most pages in one sample the oracle could not track writes to and re-read in full",
           _oracle_most("untracked_pages"), count, "lower", "cost"),
    Metric("oracle_stale_pages", "oracle stale", "pages",
           "pages the oracle's background re-check found changed behind the write tracker "
           "(cumulative, at the last sample; the oracle missed them until then)",
           _oracle_most("stale"), count, "lower", "cost",
           goal=Goal("<=", 0, None, None, "the oracle misses no write (stale pages = 0)")),
    # ---- guest
    Metric("workload_time_s", "workload time", "s", "the workloads' own time figure, summed",
           _workload_time, secs, "lower", "guest"),
    Metric("guest_slowdown", "slowdown", "x", "workload time / the same in mode none, same repetition",
           _against_none(False, "slowdown"), ratio, "lower", "guest", applies="sharing", ratio=True,
           goal=Goal("<=", 1.02, ("satori", "satori-host"), None, "guest slowdown <= 2% or within noise")),
    Metric("macro_gain", "macro gain", "x",
           "mode none's workload time / this mode's, saving lent back (surplus on), same repetition",
           _against_none(True, "macro_gain"), ratio, "higher", "guest", applies="sharing",
           workloads=("macro",), ratio=True,
           goal=Goal(">=", 2.0, ("satori",), ("macro",), "macrobenchmark gain >= 2x")),
    Metric("stall_max_us", "stall max", "µs",
           "longest gap an in-guest loop saw in CLOCK_MONOTONIC (worst VM; stall probe)",
           _extra("stall_max_us", _NO_STALL), micros, "lower", "guest",
           goal=Goal("<=", 1000, ("satori", "satori-host"), None, "guest-visible stall max <= 1 ms")),
    Metric("stall_p999_us", "stall p99.9", "µs", "the same gaps, 99.9th percentile (worst VM)",
           _extra("stall_p999_us", _NO_STALL), micros, "lower", "guest"),
    Metric("stall_p999_vs_none", "stall p99.9 vs none", "x",
           "the p99.9 gap / mode none's, same repetition (the probe's own noise in mode none)",
           _extra_vs_none("stall_p999_us", _NO_STALL, "mode none's p99.9 stall is 0"), ratio, "lower", "guest", applies="sharing", ratio=True,
           goal=Goal("<=", 1.10, ("satori", "satori-host"), None, "stall p99.9 within 10% of mode none")),
    Metric("stall_over1ms", "stalls > 1 ms", "count", "gaps longer than 1 ms (worst VM)",
           _extra("stall_over1ms", _NO_STALL), count, "lower", "guest"),
    Metric("web_p99_us", "web p99", "µs", "p99 request latency wrk measured in the guest (worst VM; web workload)",
           _extra("web_p99_us", _NO_WEB), micros, "lower", "guest", workloads=("web",)),
    Metric("web_p99_vs_none", "web p99 vs none", "x", "the web p99 / mode none's, same repetition",
           _extra_vs_none("web_p99_us", _NO_WEB, "mode none's p99 is 0"), ratio, "lower", "guest", applies="sharing", workloads=("web",), ratio=True,
           goal=Goal("<=", 1.05, ("satori", "satori-host"), ("web",), "web p99 request latency <= 1.05x none")),
    # ---- hints
    Metric("hint_drops", "hint drops", "records", "records the guests dropped (ring full)",
           _hint_counter("dropped"), count, "lower", "hints", applies="engine"),
    Metric("hint_rejects", "hint rejects", "records",
           "records refused by the ring reader or by verification (page changed, wrong hash, bad address)",
           _hint_counter("rejected", "changed"), count, "lower", "hints", applies="engine"),
    # ---- isolation: when sharing collapses (harness/budget.py; budget = the sum of entitlements)
    Metric("budget_mb", "host budget", "MB", "the host memory promised to the guests: the sum of their entitlements",
           _budget("budget_mb"), megabytes, None, "isolation"),
    Metric("peak_used_mb", "peak host use", "MB",
           "most host memory the guests used (the frames their QEMUs map, plus store and RAM-file pages no guest maps)",
           _budget("peak_used_mb"), megabytes, "lower", "isolation"),
    Metric("peak_overshoot_mb", "peak overshoot", "MB",
           "most host memory the guests used above the budget (the sum of their entitlements)",
           _budget("peak_overshoot_mb"), megabytes, "lower", "isolation"),
    Metric("peak_overshoot_pct", "% of budget", "%", "the peak overshoot as % of the budget",
           _budget("peak_overshoot_pct"), lambda x: f"{x:.1f}%", "lower", "isolation",
           goal=Goal("<=", 5.0, ("satori",), ("collapse",), "peak overshoot of the host budget <= 5%")),
    Metric("overshoot_s", "overshoot time", "s", "seconds the guests used more than the budget",
           _budget("overshoot_s"), secs, "lower", "isolation"),
    Metric("reclaim_s", "reclaim time", "s",
           "from the collapse until the surplus still in the guests is back within the saving",
           _budget("reclaim_s"), secs, "lower", "isolation", workloads=("collapse",),
           goal=Goal("<=", 5.0, ("satori",), ("collapse",), "reclaim time after the collapse <= 5 s")),
    Metric("entitlement_violations", "violations", "count",
           "samples x VMs (and surplus decisions) with a balloon below the VM's entitlement",
           _budget("entitlement_violations"), count, "lower", "isolation",
           goal=Goal("<=", 0, ("satori",), ("collapse",), "entitlement violations = 0")),
    Metric("bystander_job_ratio", "bystander time", "x",
           "a bystander VM's job time after the collapse / with the sharers idle",
           _bystander("job_ratio"), ratio, "lower", "isolation", workloads=("collapse",)),
    Metric("bystander_p99_ratio", "bystander p99", "x",
           "the bystander's p99 read latency after the collapse / with the sharers idle",
           _bystander("p99_ratio"), ratio, "lower", "isolation", workloads=("collapse",)),
    Metric("bystander_within_noise", "bystander within noise", "0/1",
           "1 when the bystander's median job time after the collapse lies inside the spread (min-max) "
           "of its jobs alone, else 0",
           _bystander("within_noise"), lambda x: f"{x:.2g}", "higher", "isolation", workloads=("collapse",),
           goal=Goal(">=", 1.0, ("satori",), ("collapse",), "bystander's time within noise of its time alone")),
)

BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}
GROUPS = {"sharing": "Sharing", "cost": "Cost: host CPU on one yardstick", "guest": "Guest",
          "hints": "Hints", "isolation": "When sharing collapses: the host budget"}


def get(key: str) -> Metric:
    return BY_KEY[key]


def evaluate(run: RunView, base: RunView | None = None,
             keys: Iterable[str] | None = None) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every metric's value for one run (``None`` where it has none) and the reasons for those.
    ``base``: the run of mode ``none`` in the same repetition (for the ratios)."""
    values: dict[str, float | None] = {}
    why: dict[str, str] = {}
    for m in METRICS if keys is None else [BY_KEY[k] for k in keys]:
        if not m.applies_to(run.mode):
            values[m.key], why[m.key] = None, f"not a figure of mode {run.mode}"
            continue
        try:
            v = m.compute(run, base)
        except NA as e:
            values[m.key], why[m.key] = None, e.reason
            continue
        values[m.key] = None if v is None or math.isnan(v) else float(v)
        if values[m.key] is None:
            why[m.key] = "not measured"
    return values, why


# ---------------------------------------------------------------- repetitions


@dataclasses.dataclass(frozen=True)
class Stat:
    """A figure over repetitions: median [min-max] of ``n`` values."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, vals: Iterable[float | None]) -> Stat | None:
        v = [x for x in vals if x is not None]
        return cls(statistics.median(v), min(v), max(v), len(v)) if v else None

    def within_noise(self) -> bool:
        """A ratio whose spread crosses 1.0: neither a gain nor a loss can be claimed."""
        return self.n > 1 and self.lo <= 1.0 <= self.hi


def format_stat(metric: Metric, stat: Stat | None) -> str:
    """``n/a``; one value; ``median [min–max]``; a ratio whose spread crosses 1.0 is
    ``within noise (...)``; a ratio of one repetition says so."""
    if stat is None:
        return "n/a"
    if metric.ratio:
        return format_ratio(stat)
    f = metric.fmt
    return f(stat.median) if stat.n == 1 or stat.lo == stat.hi else f"{f(stat.median)} [{f(stat.lo)}–{f(stat.hi)}]"


def format_ratio(stat: Stat | None) -> str:
    """A ratio of two modes' figures (paired by repetition), as :func:`format_stat` prints one."""
    if stat is None:
        return "n/a"
    text = ratio(stat.median) if stat.n == 1 or stat.lo == stat.hi else \
        f"{ratio(stat.median)} [{ratio(stat.lo)}–{ratio(stat.hi)}]"
    if stat.within_noise():
        return f"within noise ({text})"
    return f"{text} (1 rep)" if stat.n == 1 else text


def goal_verdict(metric: Metric, stat: Stat | None) -> str | None:
    """``met`` / ``NOT met`` / ``within noise`` for a figure with a goal (None without one)."""
    if metric.goal is None:
        return None
    if stat is None:
        return "n/a"
    if metric.goal.met(stat.median):
        return "met"
    if metric.ratio and stat.within_noise():
        return "within noise"
    return "NOT met"


# ---------------------------------------------------------------- the documentation table


def markdown_table() -> str:
    """The registry as the markdown table of ``docs/metrics.md`` (a test keeps them equal)."""
    rows = ["| key | label | unit | how | better | modes | goal |", "|---|---|---|---|---|---|---|"]
    for m in METRICS:
        goal = ""
        if m.goal:
            g = m.goal
            goal = f"{g.op} {m.fmt(g.target)}"
            if g.modes:
                goal += f" ({', '.join(g.modes)}"
                goal += f"; {', '.join(g.workloads)})" if g.workloads else ")"
            elif g.workloads:
                goal += f" ({', '.join(g.workloads)})"
        applies = {"all": "all", "sharing": "all but none", "engine": "with the engine",
                   "hints": "with hints"}[m.applies]
        if m.workloads:
            applies += f"; {', '.join(m.workloads)}"
        rows.append(f"| `{m.key}` | {m.label} | {m.unit} | {m.how} | {m.direction or ''} | {applies} | {goal} |")
    return "\n".join(rows)


def modes_table() -> str:
    """The mode table as markdown (``docs/metrics.md``)."""
    rows = ["| mode | what | RAM | KSM | hints | engine |", "|---|---|---|---|---|---|"]
    for m in _modes.MODES.values():
        ksm = ", ".join(f"{k}={v}" for k, v in (m.ksm or {}).items()) or "untouched"
        rows.append(f"| `{m.name}` | {m.summary} | {m.ram_backend} | {ksm} | {m.hints or 'off'} | "
                    f"{'on' if m.engine else 'off'} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python3 -m harness.metrics: the tables of docs/metrics.md
    print(markdown_table())
    print()
    print(modes_table())
