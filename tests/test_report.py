"""Results and report from synthetic runs (no QEMU): results.json written by the real runner
code, round trip, CSV, valid PNG plots, summary.md with spread, failures and reasons, the
comparison, and the CLI function."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
from synthetic import MODES, runner

from harness import report
from harness.errors import HarnessError
from harness.report import collect_meta, compare, write_csv, write_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "run-a"
    runner(d).write()
    return d


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert b"IHDR" in data[:32] and data.rstrip().endswith(b"IEND\xaeB`\x82")


def test_write_results_round_trip_and_is_atomic(tmp_path: Path) -> None:
    import numpy as np

    p = write_results(tmp_path / "r", {"name": "x", "modes": {"none": {"figures": {"E_final": [np.float64(0.5)]},
                                                                      "runs": [], "n": np.int64(3)}}})
    data = json.loads(p.read_text())
    assert data["version"] == 2 and data["modes"]["none"]["figures"]["E_final"] == [0.5]
    assert [f.name for f in p.parent.iterdir()] == ["results.json"]  # no temporary left
    with pytest.raises(ValueError):
        write_results(tmp_path / "r", {"modes": {"none": {"E_final": float("nan")}}})
    assert json.loads(p.read_text())["modes"]["none"]["n"] == 3  # old file intact
    assert [f.name for f in p.parent.iterdir()] == ["results.json"]


def test_load_results_errors(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no results.json"):
        report.load_results(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(HarnessError, match="not valid JSON"):
        report.load_results(tmp_path)
    (tmp_path / "results.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(HarnessError, match="not valid JSON"):
        report.load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"version": 1, "modes": {}}))
    with pytest.raises(HarnessError, match="format version 1"):
        report.load_results(tmp_path)
    (tmp_path / "results.json").unlink()
    (tmp_path / "results.json").mkdir()
    with pytest.raises(HarnessError, match="is a folder"):
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
    assert "Cost: host CPU on one yardstick" in md and "CPU/page saved" in md
    row = next(line for line in md.splitlines() if line.startswith("| satori |") and "%" in line)
    assert "99.0%" in row  # E_disk at the last sample
    assert "1.00 s" in row  # time to 90%: first read at 3 s, E_disk 0.99 at 4 s
    # slowdown against none of the same repetition
    slow = next(line for line in md.splitlines() if line.startswith("| satori |") and "x" in line)
    assert "1.191x [1.182x–1.200x]" in slow  # 12/10 and 13/11
    # none: no CPU figure (—), no slowdown against itself; no macro gain on identical readers
    assert "macro gain" not in md
    none_cost = [line for line in md.splitlines() if line.startswith("| none |")]
    assert any("—" in line for line in none_cost)
    assert "tcg" not in md or "accelerator" in md


def test_a_spread_across_one_is_within_noise(tmp_path: Path) -> None:
    r = runner(tmp_path, times={"none": [10.0, 10.0], "ksm": [9.0, 11.0], "satori": [12.0, 12.5],
                                "satori+ksm": [10.0, 10.1]})
    r.write()
    md = report.summary_markdown(report.load_results(tmp_path))
    ksm = next(line for line in md.splitlines() if line.startswith("| ksm |") and "x" in line)
    assert "within noise (1.000x [0.900x–1.100x])" in ksm
    sat = next(line for line in md.splitlines() if line.startswith("| satori |") and "x" in line)
    assert "1.225x [1.200x–1.250x]" in sat and "within noise" not in sat


def test_one_repetition_claims_no_ratio(tmp_path: Path) -> None:
    runner(tmp_path, reps=1).write()
    md = report.summary_markdown(report.load_results(tmp_path))
    assert "(1 rep)" in md and "one repetition: no spread, no claim" in md


def test_csv_has_one_row_per_sample_per_mode_and_rep(folder: Path) -> None:
    path = write_csv(folder)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(MODES) * 2 * 60
    assert {r["mode"] for r in rows} == set(MODES) and {r["rep"] for r in rows} == {"0", "1"}
    first = list(rows[0])
    assert first[:11] == ["mode", "rep", "status", "t", "G", "F", "C", "R", "M", "E", "E_disk"]
    assert "surplus_mb.vm1" in first and "balloon_mb.vm2" in first and "cpu.engine_s" in first


def test_killed_run_is_shown_partial_with_its_failure(tmp_path: Path) -> None:
    r = runner(tmp_path, reps=1)
    run = r.runs[2]  # satori
    run.status, run.error = "failed", "workload identical-readers: SSH connection lost"
    run.failures = [{"vm": "vm2", "domain": "default", "t": 6.5, "pid": 4242, "signal": "SIGKILL",
                     "exit_status": None, "console_tail": "line 1\nsatori: guest up", "qemu_output": ""}]
    r.runs[3].status, r.runs[3].error = "interrupted", "interrupted"
    r.write()
    res = report.load_results(tmp_path)
    assert res["status"] == "partial" and res["partial"] is True
    assert res["failures"][0]["vm"] == "vm2" and res["failures"][0]["mode"] == "satori"
    md = report.summary_markdown(res)
    assert "**Partial run**" in md
    assert "satori repetition 1: **failed**: workload identical-readers: SSH connection lost" in md
    assert "satori+ksm repetition 1: **interrupted**" in md
    assert "VM vm2 (QEMU pid 4242) killed by SIGKILL at t=6.5 s" in md and "satori: guest up" in md
    assert res["modes"]["satori"]["figures_from"] == "runs that did not complete"
    table, _ = report.report(tmp_path)
    assert "Runs that did not complete" in table


def test_skipped_mode_says_why(tmp_path: Path) -> None:
    r = runner(tmp_path, reps=1, modes_=["none", "satori"])
    r.skipped["ksm-advisor"] = "this kernel's KSM has no smart_scan"
    r.write()
    md = report.summary_markdown(report.load_results(tmp_path))
    assert "mode ksm-advisor was skipped: this kernel's KSM has no smart_scan" in md


def test_na_reasons_are_listed(folder: Path) -> None:
    md = report.summary_markdown(report.load_results(folder))
    assert "### Figures without a value" in md
    assert "- none, E: n/a (E undefined" not in md  # none has E = 0.0, a value
    assert "- ksm, merge lag" not in md  # not a figure of ksm at all
    assert "idle CPU" in md


def test_compare_names_both_folders(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "run-b"
    runner(other, reps=1, scale=0.5).write()
    text = compare([folder, other])
    assert "run-a" in text and "run-b" in text
    assert "| mode | figure | run-a | run-b |" in text
    assert "| satori | E_disk | 99.0% | 49.5% |" in text
    assert "| satori | CPU/page saved |" in text
    same = compare([folder, folder])  # same name twice: labelled by path
    assert str(folder) in same


def test_cmd_report(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "run-b"
    runner(other, reps=1).write()
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


def test_plots_need_matplotlib(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(HarnessError, match="cannot make plots: matplotlib does not load"):
        report.write_plots(folder)
    with pytest.raises(HarnessError, match="matplotlib"):
        report.report(folder)


def test_meta_records_the_commit_a_run_started_on(monkeypatch):
    """A long run records the commit it measured, not the one HEAD points to when it ends."""
    from harness import report as rep

    monkeypatch.setattr(rep, "git_state", lambda: ("b" * 40, ""))  # HEAD moved meanwhile
    meta = rep.collect_meta({"seed": 1}, "tcg", None, None, git=("a" * 40, " M README.md"))
    assert meta["git_commit"] == "a" * 40 and meta["git_dirty"] is True
    assert rep.collect_meta({}, "tcg", None, None)["git_commit"] == "b" * 40
