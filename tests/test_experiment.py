"""`satori run` end to end with real guests: results, plots, summary, surplus, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.report import load_results
from harness.vm import harness_leftovers

pytestmark = pytest.mark.integration

CONFIG = """\
name: ci-quick
vms:
  count: 2
  memory_mb: 448
  entitlement_mb: 320
sharing_domains: {pair: [vm1, vm2]}
modes: [none, satori]
workloads:
  - name: identical-readers
    params: {files: 12, keep_s: 6}
surplus: true
sample_interval_s: 1
repetitions: 1
seed: 3
"""

KEYS = ("E_final", "E_disk_final", "time_to_90_s", "opportunity_captured", "cpu_per_merged_page_s",
        "guest_slowdown", "workload_time_s", "macro_gain", "hint_drops", "hint_rejects", "samples")


def satori(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, **kw)


def new_leftovers(before: set[str]) -> list[str]:
    return [x for x in harness_leftovers() if x not in before]


def test_quick_run_results_plots_summary_and_surplus(image, tmp_path: Path):
    before = set(harness_leftovers())
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    r = satori("run", str(cfg), "--out", str(out), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| satori |" in r.stdout and "sharing.png" in r.stdout
    res = load_results(out)
    assert res["complete"] is True
    for mode in ("none", "satori"):
        for k in KEYS:
            assert k in res["modes"][mode], (mode, k)
    meta = res["meta"]
    for k in ("host_kernel", "cpu", "qemu", "accel", "guest_kernel", "recipe_hash", "config", "commit"):
        assert any(k in key for key in meta), (k, sorted(meta))
    sat, none = res["modes"]["satori"], res["modes"]["none"]
    assert sat["E_disk_final"] > 0.8 and none["E_disk_final"] in (0, 0.0, None)
    assert sat["E_final"] > (none["E_final"] or 0)
    # plots are real PNGs, the CSV has rows, the summary has a row per mode
    for png in ("sharing.png", "workload_times.png", "surplus.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert len((out / "samples.csv").read_text().splitlines()) > 10
    summary = (out / "summary.md").read_text()
    assert "| none |" in summary and "| satori |" in summary
    # surplus: balloons held the VMs at their entitlement, and the saving was lent in satori only
    sat_run, none_run = sat["runs"][0], none["runs"][0]
    assert none_run["surplus"] and all(max(d["surplus"].values()) == 0 for d in none_run["surplus"])
    lent = [sum(d["surplus"].values()) for d in sat_run["surplus"]]
    assert max(lent) > 0, sat_run["surplus"][-3:]
    for d in sat_run["surplus"]:
        assert sum(d["surplus"].values()) <= max(d["saving"], 0) or d["reason"].startswith("end")
    assert not new_leftovers(before)


def test_ctrl_c_mid_run_cleans_up_and_keeps_partial_results(image, tmp_path: Path):
    before = set(harness_leftovers())
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(CONFIG.replace("keep_s: 6", "keep_s: 60"))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(cfg), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 300
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if "identical-readers:" in line or time.monotonic() > deadline:
            break
    time.sleep(2)  # in the keep phase of the first mode
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=120)
    log = "".join(lines) + rest
    assert p.returncode == 130, log[-3000:]
    assert "interrupted" in log
    assert not new_leftovers(before), new_leftovers(before)
    res = load_results(out)
    assert res["complete"] is False
    run = res["modes"]["none"]["runs"][0]
    assert run["error"] == "interrupted" and res["modes"]["none"]["samples"]
    json.dumps(res)
