"""Results and report from synthetic results (no QEMU): the metric arithmetic on hand-made
series, results.json round trip, CSV, valid PNG plots, summary.md and the comparison."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest

from harness import report
from harness.errors import HarnessError
from harness.report import (
    collect_meta,
    compare,
    figures_from_samples,
    opportunity_captured,
    time_to_threshold,
    trapezoid,
    write_csv,
    write_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODES = ["none", "ksm", "satori", "satori+ksm"]


def s(t, **kw):
    return {"t": t, **kw}


# ---------------------------------------------------------------- arithmetic


def test_time_to_threshold() -> None:
    series = [s(0, E=None), s(1, E=0.2), s(2, E=0.85), s(3, E=0.9), s(4, E=0.95)]
    assert time_to_threshold(series, "E", 0.9) == 3.0
    assert time_to_threshold(series, "E", 0.9, t0=1.0) == 2.0
    assert time_to_threshold(series, "E", 0.99) is None
    assert time_to_threshold(list(reversed(series)), "E", 0.5) == 2.0  # order does not matter
    # samples before t0 do not count, even if above the threshold
    assert time_to_threshold([s(0, E=1.0), s(5, E=0.1), s(6, E=0.95)], "E", 0.9, t0=2) == 4.0


def test_trapezoid_and_opportunity_on_the_metrics_example() -> None:
    # METRICS.md: a page shared 10 s after it appeared and dropped 12 s after it appeared
    # scores 2/12 (step functions sampled finely enough to make the trapezoids exact)
    series = []
    for i in range(0, 241):
        t = i * 0.05
        M = 1.0 if t < 12 else 0.0
        R = 1.0 if 10 <= t < 12 else 0.0
        series.append(s(t, M=M, R=R))
    assert opportunity_captured(series) == pytest.approx(2 / 12, abs=0.01)


def test_trapezoid_exact_values() -> None:
    series = [s(0, M=0), s(2, M=4), s(3, M=4), s(5, M=None), s(6, M=2)]
    # [0,2]: 4, [2,3]: 4, [3,5] and [5,6] touch a missing value: 0
    assert trapezoid(series, "M") == 8.0
    assert trapezoid(series, "M", t0=2, t1=3) == 4.0
    series = [s(0, R=0, M=10), s(10, R=10, M=10)]
    assert opportunity_captured(series) == pytest.approx(0.5)
    assert opportunity_captured([s(0, R=0, M=0), s(1, R=0, M=0)]) is None
    assert opportunity_captured([]) is None


def test_figures_from_samples() -> None:
    series = [s(0, E=0, E_disk=0, R=0, M=0), s(1, E=0.5, E_disk=0.95, R=5, M=10),
              s(2, E=0.6, E_disk=0.99, R=10, M=10)]
    f = figures_from_samples(series, t0=0.5)
    assert f["E_final"] == 0.6 and f["E_disk_final"] == 0.99
    assert f["time_to_90_s"] == 0.5
    assert f["opportunity_captured"] == pytest.approx((7.5) / 10)


# ---------------------------------------------------------------- synthetic result folders


def synthetic_results(name: str = "synth", reps: int = 2, scale: float = 1.0) -> dict:
    modes = {}
    for k, m in enumerate(MODES):
        samples = []
        for rep in range(reps):
            for i in range(30):
                t = float(i)
                M = 50_000 if i >= 3 else 0
                frac = {"none": 0.0, "ksm": min(1.0, i / 60), "satori": 0.99 if i >= 4 else 0.0,
                        "satori+ksm": 0.995 if i >= 4 else 0.0}[m]
                R = int(M * frac * scale)
                samples.append({
                    "rep": rep, "t": t, "G": 260_000, "F": 260_000 - R, "C": 260_000 - M,
                    "R": R, "M": M, "E": (R / M) if M else None, "E_disk": (R / M) if M else None,
                    "R_disk": R, "M_disk": M,
                    "balloon_mb": {"vm1": 256 + R / 512, "vm2": 256 + R / 512},
                    "surplus_mb": {"vm1": R / 512, "vm2": R / 512},
                })
        modes[m] = {
            "E_final": [0.0 + 0.3 * k, 0.01 + 0.3 * k][:reps],
            "E_disk_final": None,  # derived from the samples
            "time_to_90_s": None,
            "opportunity_captured": None,
            "cpu_per_merged_page_s": None if m == "none" else [3e-6 * (k + 1)] * reps,
            "guest_slowdown": 1.0 if m == "none" else [1.01, 1.02][:reps],
            "workload_time_s": [10.0 + k, 11.0 + k][:reps],
            "macro_gain": None,
            "hint_drops": [{"vm1": 0, "vm2": 1}] * reps,
            "hint_rejects": 0,
            "t0": 3.0,
            "samples": samples,
        }
    meta = collect_meta({"name": name, "seed": 7}, "tcg", "6.1.0-test-amd64", "abc123")
    return {"name": name, "partial": False, "meta": meta, "modes": modes}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "run-a"
    write_results(d, synthetic_results("run-a"))
    return d


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert b"IHDR" in data[:32] and data.rstrip().endswith(b"IEND\xaeB`\x82")


def test_write_results_round_trip_and_is_atomic(tmp_path: Path) -> None:
    import numpy as np

    p = write_results(tmp_path / "r", {"name": "x", "modes": {"none": {"E_final": np.float64(0.5),
                                                                      "hint_drops": np.int64(3)}}})
    data = json.loads(p.read_text())
    assert data["version"] == 1 and data["modes"]["none"]["E_final"] == 0.5
    assert [f.name for f in p.parent.iterdir()] == ["results.json"]  # no temporary left
    with pytest.raises(ValueError):
        write_results(tmp_path / "r", {"modes": {"none": {"E_final": float("nan")}}})
    assert json.loads(p.read_text())["modes"]["none"]["hint_drops"] == 3  # old file intact
    assert [f.name for f in p.parent.iterdir()] == ["results.json"]


def test_load_results_errors(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no results.json"):
        report.load_results(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(HarnessError, match="not valid JSON"):
        report.load_results(tmp_path)


def test_report_writes_plots_csv_and_summary(folder: Path) -> None:
    table, files = report.report(folder)
    names = {f.name for f in files}
    assert names == {"summary.md", "samples.csv", "sharing.png", "surplus.png", "workload_times.png"}
    for png in ("sharing.png", "surplus.png", "workload_times.png"):
        assert_png(folder / png)
    md = (folder / "summary.md").read_text()
    for m in MODES:
        assert f"| {m} |" in md and f"| {m} |" in table
    assert "median [min–max]" in md and "![sharing](sharing.png)" in md
    assert "tcg" in md and "abc123" in md
    # the figures: medians with their spread, derived ones from the samples
    row = next(line for line in md.splitlines() if line.startswith("| satori |"))
    assert "99.0%" in row  # E_disk derived from the last sample
    assert "1.00 s" in row  # time to 90%: first read at 3 s, E_disk 0.99 at 4 s
    assert "[1.010x–1.020x]" in row  # slowdown spread over the two repetitions
    none_row = next(line for line in md.splitlines() if line.startswith("| none |"))
    assert "n/a" in none_row  # no CPU per merged page, opportunity 0 is still a number
    assert " 1 |" in none_row  # hint drops summed over VMs


def test_csv_has_one_row_per_sample_per_mode_and_rep(folder: Path) -> None:
    path = write_csv(folder)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(MODES) * 2 * 30
    assert {r["mode"] for r in rows} == set(MODES) and {r["rep"] for r in rows} == {"0", "1"}
    first = list(rows[0])
    assert first[:10] == ["mode", "rep", "t", "G", "F", "C", "R", "M", "E", "E_disk"]
    assert "surplus_mb.vm1" in first and "balloon_mb.vm2" in first


def test_samples_as_a_list_per_repetition(tmp_path: Path) -> None:
    r = {"name": "lol", "modes": {"satori": {"samples": [[s(0, R=0, M=10, E_disk=0.0), s(1, R=10, M=10, E_disk=1.0)],
                                                        [s(0, R=0, M=10, E_disk=0.0), s(2, R=10, M=10, E_disk=1.0)]]}}}
    write_results(tmp_path, r)
    stats = report.summarize(report.load_results(tmp_path))["satori"]
    assert stats["time_to_90_s"] == (1.5, 1.0, 2.0, 2)
    assert stats["workload_time_s"] is None


def test_partial_results_without_samples_still_report(tmp_path: Path) -> None:
    write_results(tmp_path, {"name": "cut", "partial": True, "modes": {"none": {"workload_time_s": 3.0},
                                                                        "ksm": {}}})
    table, files = report.report(tmp_path)
    assert "| none |" in table and "| ksm |" in table
    assert "Partial run" in (tmp_path / "summary.md").read_text()
    assert {f.name for f in files} == {"summary.md", "samples.csv", "workload_times.png"}


def test_surplus_plot_from_manager_decisions(tmp_path: Path) -> None:
    from harness.surplus import Budget, SurplusManager

    m = SurplusManager([Budget.from_mb("a", 256, 512), Budget.from_mb("b", 256, 512)],
                       {"a": lambda *a, **k: None, "b": lambda *a, **k: None})
    m.start()
    for r in (0, 10_000, 30_000, 20_000, 0):
        m.update(r, {"a": r * 0.7, "b": r * 0.3})
    write_results(tmp_path, {"name": "sp", "modes": {"satori": {"surplus": m.series()}}})
    out = report.plot_surplus(report.load_results(tmp_path), tmp_path / "surplus.png")
    assert out is not None
    assert_png(out)


def test_compare_names_both_folders(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "run-b"
    write_results(other, synthetic_results("run-b", reps=1, scale=0.5))
    text = compare([folder, other])
    assert "run-a" in text and "run-b" in text
    assert "| mode | figure | run-a | run-b |" in text
    assert "| satori | E_disk | 99.0% | 49.5% |" in text
    same = compare([folder, folder])  # same name twice: labelled by path
    assert str(folder) in same


def test_cmd_report(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "run-b"
    write_results(other, synthetic_results("run-b", reps=1))
    assert report.cmd_report(argparse.Namespace(dirs=[str(folder), str(other)])) == 0
    out = capsys.readouterr().out
    assert out.count("| satori |") >= 2 and "# Comparison" in out
    assert (other / "summary.md").exists() and (folder / "sharing.png").exists()
    with pytest.raises(HarnessError):
        report.cmd_report(argparse.Namespace(dirs=[]))


def test_collect_meta() -> None:
    meta = collect_meta({"name": "x", "seed": 3}, "kvm", "6.1.0-28-amd64", "deadbeef")
    json.dumps(meta)
    assert meta["accel"] == "kvm" and meta["seed"] == 3 and meta["image_recipe_hash"] == "deadbeef"
    assert meta["host_kernel"].startswith("Linux ")
    assert meta["python"].count(".") == 2
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40
    assert meta["git_dirty"] in (True, False, None)
    assert meta["config"] == {"name": "x", "seed": 3}


def test_format_figure() -> None:
    assert report.format_figure(None, report._pct) == "n/a"
    assert report.format_figure((0.5, 0.5, 0.5, 1), report._pct) == "50.0%"
    assert report.format_figure((0.5, 0.4, 0.6, 3), report._pct) == "50.0% [40.0%–60.0%]"
    assert report.format_figure((3e-6, 3e-6, 3e-6, 2), report._us) == "3.00 µs"
    assert math.isnan(report._mb(None))
