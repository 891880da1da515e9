"""The metric registry: the one CPU yardstick on recorded samples (every mode charged the same
way, the oracle never), the windows (until convergence, the idle tail), domains combined, the
spread and "within noise", and the registry driving results.json, summary.md, the comparison and
the scenario table: a figure added in one place appears everywhere. Pure unit tests."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from synthetic import mode_run, runner, samples

from harness import metrics, report
from harness.metrics import NA, RunView, Stat, evaluate, sample_row

REPO = Path(__file__).resolve().parent.parent


def view(mode: str, **kw) -> RunView:
    r = mode_run(mode, **kw)
    return RunView(mode=mode, rep=0, samples=r.samples, events=r.events, t0=r.t0,
                   quiet_since=r.quiet_since, workloads=r.workloads, engine=r.engine,
                   defines=frozenset({"slowdown"}))


# ---------------------------------------------------------------- the CPU yardstick


@pytest.mark.parametrize("mode", ["ksm", "satori", "satori+ksm"])
def test_cpu_per_page_saved_is_total_cpu_over_peak_r_in_every_mode(mode: str) -> None:
    v = view(mode)
    vals, why = evaluate(v)
    last = v.samples[-1]["cpu"]
    total = last["engine_s"] + last["agent_s"] + last["ksmd_s"] + last["hosthints_s"]
    peak = max(s["R"] for s in v.samples)
    assert total > 0 and peak > 0
    assert vals["cpu_s"] == pytest.approx(total)
    assert vals["pages_saved"] == peak
    assert vals["cpu_per_page_saved_s"] == pytest.approx(total / peak)
    assert vals["cpu_total_pct_core"] == pytest.approx(100 * total / 59.0)
    # the oracle's CPU is reported, never charged: doubling it changes nothing charged
    for s in v.samples:
        s["cpu"]["oracle_s"] *= 2
    again, _ = evaluate(v)
    assert again["cpu_per_page_saved_s"] == vals["cpu_per_page_saved_s"]
    assert again["oracle_cpu_pct_core"] == pytest.approx(2 * vals["oracle_cpu_pct_core"])


def test_merge_events_do_not_enter_the_yardstick() -> None:
    v = view("satori")
    a = evaluate(v)[0]["cpu_per_page_saved_s"]
    v.engine["default"]["merged_total"] *= 10  # type: ignore[index]
    assert evaluate(v)[0]["cpu_per_page_saved_s"] == a
    assert "cpu_per_merged_page_s" not in metrics.BY_KEY


def test_windows_until_convergence_and_idle_tail() -> None:
    v = view("satori")
    s = v.samples
    vals, why = evaluate(v)
    # E_disk first >= 0.9 at t=4: the counters there, minus the first row's
    first90 = next(r for r in s if r["E_disk"] is not None and r["E_disk"] >= 0.9)
    assert first90["t"] == 4.0
    assert vals["cpu_until_convergence_s"] == pytest.approx(metrics.charged_cpu(first90))
    # idle: the last 30 s (t 29..59), quiet since t=8
    start = next(r for r in s if r["t"] >= 59 - 30)
    expect = 100 * (metrics.charged_cpu(s[-1]) - metrics.charged_cpu(start)) / (59 - start["t"])
    assert vals["idle_cpu_pct_core"] == pytest.approx(expect)
    # a scanner that keeps paying in the quiet tail and hints that do not
    busy = view("ksm", idle_rate=0.05)
    quiet = view("satori", idle_rate=0.0)
    assert evaluate(busy)[0]["idle_cpu_pct_core"] == pytest.approx(5.0)
    assert evaluate(quiet)[0]["idle_cpu_pct_core"] == 0.0
    # a quiet tail shorter than 30 s has no idle figure, and says why
    short = dataclasses.replace(v, quiet_since=40.0)
    vals, why = evaluate(short)
    assert vals["idle_cpu_pct_core"] is None and why["idle_cpu_pct_core"] == "quiet tail 19 s < 30 s"
    never = dataclasses.replace(v, quiet_since=None)
    assert evaluate(never)[1]["idle_cpu_pct_core"] == "the workload has no quiet tail"


def test_time_to_90_after_the_last_read_and_merge_lag() -> None:
    v = view("satori")  # reads end at t=8, E_disk 0.99 from t=4
    vals, _ = evaluate(v)
    assert vals["time_to_90_after_reads_s"] == 0.0 and vals["time_to_90_s"] == 1.0
    slow = view("ksm")  # R = M * t/60: 0.9 at t=54
    vals, why = evaluate(slow)
    assert vals["time_to_90_after_reads_s"] == 54 - 8 and vals["time_to_90_s"] == 54 - 3
    assert why["merge_lag_p99_s"] == "not a figure of mode ksm"
    vals, _ = evaluate(view("satori"))
    assert (vals["merge_lag_p50_s"], vals["merge_lag_p99_s"], vals["merge_lag_max_s"]) == (0.1, 0.3, 1.0)
    old = view("satori")
    del old.engine["default"]["merge_lag_s"]  # type: ignore[index]
    assert evaluate(old)[1]["merge_lag_p99_s"] == "the engine does not report merge lag"


def test_a_cpu_part_that_cannot_be_read_is_null_with_its_reason() -> None:
    v = view("satori")
    v.samples[-1]["cpu"]["agent_s"] = None
    v.samples[-1]["cpu"]["error"] = "VM vm2: agent stats: connection reset"
    vals, why = evaluate(v)
    assert vals["cpu_per_page_saved_s"] is None
    assert why["cpu_per_page_saved_s"] == "CPU of agent could not be read: VM vm2: agent stats: connection reset"
    bare = view("satori")
    for s in bare.samples:
        del s["cpu"]
    assert evaluate(bare)[1]["cpu_per_page_saved_s"] == "the samples carry no CPU counters"
    with pytest.raises(NA):
        metrics.charged_cpu({"t": 0})


def test_nothing_saved_and_the_baseline() -> None:
    vals, why = evaluate(view("none"))
    assert why["cpu_per_page_saved_s"] == "not a figure of mode none"
    assert why["guest_slowdown"] == "not a figure of mode none"
    assert vals["E_final"] == 0.0 and vals["pages_saved"] == 0
    no_r = view("ksm", scale=0.0)
    assert evaluate(no_r)[1]["cpu_per_page_saved_s"] == "no page saved (peak R = 0)"


def test_ratios_only_where_the_workload_defines_them() -> None:
    base, run = view("none"), view("satori", time_s=12.5)
    vals, why = evaluate(run, base)
    assert vals["guest_slowdown"] == pytest.approx(1.25)
    assert vals["macro_gain"] is None and why["macro_gain"] == "the workload defines no macro gain"
    no_def = dataclasses.replace(run, defines=frozenset())
    assert evaluate(no_def, base)[1]["guest_slowdown"] == "the workload defines no slowdown"
    macro = dataclasses.replace(run, defines=frozenset({"slowdown", "macro_gain"}), surplus=True)
    assert evaluate(macro, base)[0]["macro_gain"] == pytest.approx(10 / 12.5)
    assert evaluate(dataclasses.replace(macro, surplus=False), base)[1]["macro_gain"] == \
        "surplus is off: no gain to give back"
    assert evaluate(run, None)[1]["guest_slowdown"] == "no run of mode none in the same repetition"


def test_domains_are_combined_with_their_ratios_recomputed() -> None:
    a = {"G": 100, "F": 80, "C": 70, "R": 20, "M": 30, "E": 20 / 30, "R_disk": 10, "M_disk": 10,
         "E_disk": 1.0, "R_nonzero": 5, "M_nonzero": 10, "E_nonzero": 0.5}
    b = {"G": 100, "F": 100, "C": 90, "R": 0, "M": 10, "E": 0.0, "R_disk": 0, "M_disk": 30,
         "E_disk": 0.0, "R_nonzero": 0, "M_nonzero": 0, "E_nonzero": None}
    row = sample_row(1.0, {"a": a, "b": b})
    assert row["a.E_disk"] == 1.0 and row["b.R"] == 0
    assert row["R"] == 20 and row["M"] == 40 and row["E"] == 0.5
    assert row["R_disk"] == 10 and row["M_disk"] == 40 and row["E_disk"] == 0.25  # not (1 + 0) / 2
    assert row["E_nonzero"] == 0.5
    assert sample_row(2.0, {"a": a}) == {"t": 2.0, **{k: a[k] for k in metrics.SAMPLE_KEYS if k in a}}
    # a run of two domains keeps its keys when one is no longer sampled
    left = sample_row(3.0, {"a": a}, prefixed=True)
    assert left["a.R"] == 20 and left["R"] == 20 and left["E_disk"] == 1.0 and "b.R" not in left
    b_no_disk = {**b, "R_disk": None, "M_disk": None, "E_disk": None}
    assert "E_disk" not in sample_row(1.0, {"a": a, "b": b_no_disk})


def test_spread_and_within_noise() -> None:
    slow = metrics.get("guest_slowdown")
    assert metrics.format_stat(slow, Stat.of([0.95, 1.02, 1.10])) == "within noise (1.020x [0.950x–1.100x])"
    assert metrics.format_stat(slow, Stat.of([1.10, 1.20, 1.15])) == "1.150x [1.100x–1.200x]"
    assert metrics.format_stat(slow, Stat.of([1.5])) == "1.500x (1 rep)"
    assert metrics.goal_verdict(slow, Stat.of([0.95, 1.05, 1.10])) == "within noise"
    assert metrics.goal_verdict(slow, Stat.of([1.01, 1.01])) == "met"
    e = metrics.get("E_disk_final")
    assert metrics.format_stat(e, Stat.of([0.5, 0.4, None, 0.6])) == "50.0% [40.0%–60.0%]"
    assert metrics.format_stat(e, None) == "n/a"
    assert metrics.goal_verdict(e, Stat.of([0.5])) == "NOT met"


def test_every_metric_is_well_formed() -> None:
    keys = [m.key for m in metrics.METRICS]
    assert len(keys) == len(set(keys))
    for m in metrics.METRICS:
        assert m.label and m.unit and m.how and m.group in metrics.GROUPS
        assert m.fmt(1.0)
        if m.goal and m.goal.modes:
            assert all(m.applies_to(x) for x in m.goal.modes if x in metrics._modes.MODES), m.key


# ---------------------------------------------------------------- one place, everywhere


def test_a_figure_added_to_the_registry_appears_everywhere(tmp_path: Path, monkeypatch, capsys) -> None:
    extra = metrics.Metric(
        "store_peak_pages", "store peak", "pages", "peak resident pages of the content store",
        lambda run, base: max(s.get("store_pages", 0) for s in run.need_samples()),
        metrics.count, "lower", "cost", applies="engine")
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, extra))
    monkeypatch.setitem(metrics.BY_KEY, extra.key, extra)
    r = runner(tmp_path / "a", reps=1)
    for run in r.runs:
        for i, s in enumerate(run.samples):
            s["store_pages"] = 10 * i
    r.write()
    res = report.load_results(tmp_path / "a")
    # results.json: per run and per mode
    assert res["modes"]["satori"]["figures"]["store_peak_pages"] == [590]
    assert res["modes"]["satori"]["runs"][0]["figures"]["store_peak_pages"] == 590
    assert res["modes"]["ksm"]["why"]["store_peak_pages"] == ["not a figure of mode ksm"]
    # summary.md and `satori report`
    table, _ = report.report(tmp_path / "a")
    md = (tmp_path / "a" / "summary.md").read_text()
    assert "store peak" in table and "store peak" in md and "| 590 |" in md
    # the comparison of folders
    assert "| satori | store peak | 590 |" in report.compare([tmp_path / "a"])
    # the scenario benchmark's table
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import scenario
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    text = scenario.yardstick_table(res, keys=[*scenario.YARDSTICK, "store_peak_pages"])
    assert "store peak" in text and "590" in text
    # a metric the results predate is computed from the runs' records when reported
    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS[:-1])
    monkeypatch.delitem(metrics.BY_KEY, extra.key)
    runner(tmp_path / "b", reps=1).write()
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, extra))
    monkeypatch.setitem(metrics.BY_KEY, extra.key, extra)
    res_b = report.load_results(tmp_path / "b")
    assert "store_peak_pages" not in res_b["modes"]["satori"]["figures"]
    assert report.figure_values(res_b, "satori", "store_peak_pages") == [0]


def test_docs_metrics_md_carries_the_registry() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text()
    assert metrics.markdown_table() in doc, "docs/metrics.md is out of date: python3 -m harness.metrics"
    assert metrics.modes_table() in doc, "docs/metrics.md is out of date: python3 -m harness.metrics"
    for m in metrics.METRICS:
        assert f"`{m.key}`" in doc
    for name in metrics._modes.MODES:
        assert f"`{name}`" in doc
    for word in ("G", "F", "C", "R", "M", "E_disk", "merge lag", "idle CPU", "guest-visible stall",
                 "measurement cost", "slowdown", "macro", "hint loss", "opportunity", "within noise"):
        assert word in doc, word


def test_samples_helper_is_consistent() -> None:
    s = samples("satori")
    assert s[0]["cpu"]["engine_s"] == 0.0 and s[-1]["cpu"]["engine_s"] > 0


def test_stall_probe_figures_from_the_workloads() -> None:
    run, base = view("satori"), view("none")
    assert evaluate(run)[1]["stall_max_us"].startswith("no stall probe")
    run.workloads[0]["extra"] = {"stall_max_us": 900.0, "stall_p999_us": 220.0, "stall_over1ms": 0}
    base.workloads[0]["extra"] = {"stall_max_us": 400.0, "stall_p999_us": 200.0, "stall_over1ms": 0}
    vals, _ = evaluate(run, base)
    assert (vals["stall_max_us"], vals["stall_p999_us"], vals["stall_over1ms"]) == (900.0, 220.0, 0.0)
    assert vals["stall_p999_vs_none"] == pytest.approx(1.1)
    assert metrics.goal_verdict(metrics.get("stall_max_us"), Stat.of([900.0])) == "met"


def test_bystander_figures_from_the_collapse_workload() -> None:
    run = view("satori")
    run.workloads[0]["extra"] = {"bystander": {"vm": "c", "job_ratio": 1.38, "p99_ratio": 2.9,
                                               "within_noise": False}}
    vals, _ = evaluate(run, keys=["bystander_job_ratio", "bystander_p99_ratio", "bystander_within_noise"])
    assert vals == {"bystander_job_ratio": 1.38, "bystander_p99_ratio": 2.9, "bystander_within_noise": 0.0}
    m = metrics.get("bystander_within_noise")
    assert metrics.goal_verdict(m, Stat.of([0.0, 1.0, 1.0])) == "met"  # median of the repetitions
    assert metrics.goal_verdict(m, Stat.of([0.0, 0.0, 1.0])) != "met"


def test_web_p99_figures_from_the_web_workload() -> None:
    from harness.workloads.web import parse_latency
    out = ("Running 30s test @ http://127.0.0.1:8080/\n  Latency Distribution\n     50%  635.91us\n"
           "     75%  712.00us\n     90%    1.80ms\n     99%    2.50s\n  1234 requests in 30.00s\n")
    assert parse_latency(out) == {"p50_us": pytest.approx(635.91), "p75_us": 712.0,
                                  "p90_us": pytest.approx(1800.0), "p99_us": pytest.approx(2.5e6)}
    assert parse_latency("Requests/sec: 12.0\n") == {}
    run, base = view("satori"), view("none")
    assert evaluate(run)[1]["web_p99_us"].startswith("no web workload")
    run.workloads[0]["extra"] = {"web_p99_us": 1100.0}
    base.workloads[0]["extra"] = {"web_p99_us": 1000.0}
    vals, _ = evaluate(run, base, keys=["web_p99_us", "web_p99_vs_none"])
    assert vals == {"web_p99_us": 1100.0, "web_p99_vs_none": pytest.approx(1.1)}
    m = metrics.get("web_p99_vs_none")
    assert metrics.goal_verdict(m, Stat.of([1.1, 1.2, 1.15])) != "met"
    assert metrics.goal_verdict(m, Stat.of([1.0, 1.02, 1.04])) == "met"
