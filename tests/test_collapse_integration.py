"""A short real collapse (issue 12): two sharing VMs earn the surplus and overwrite what they
share, a bystander of its own domain reads its disk throughout. No VM is ever below its
entitlement, and the host budget figures are there and add up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.report import load_results
from harness.vm import harness_leftovers

pytestmark = pytest.mark.integration

CONFIG = """\
name: ci-collapse
vms:
  - {name: a, memory_mb: 384, entitlement_mb: 256, disk: {iops: 400}}
  - {name: b, memory_mb: 384, entitlement_mb: 256, disk: {iops: 400}}
  - {name: c, memory_mb: 256, entitlement_mb: 256, disk: {iops: 200}}
sharing_domains:
  shared: [a, b]
  solo: [c]
modes: [satori]
surplus: true
surplus_policy: {guard: true, budget_cap: true}
workloads:
  - name: collapse
    params: {bystander: c, files: 24, ios: 500, earn_s: 4, how: files, collapse_mb: 96,
             after_s: 8, solo_s: 5, window_s: 5, job_ios: 50, bystander_files: 4, bystander_fill: 8}
sample_interval_s: 1
repetitions: 1
seed: 5
"""

BUDGET_MB = 3 * 256


def test_short_collapse_keeps_entitlements_and_reports_the_budget(image, tmp_path: Path):
    before = set(harness_leftovers())
    cfg = tmp_path / "collapse.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(cfg), "--out", str(out)],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = load_results(out)
    run = res["modes"]["satori"]["runs"][0]
    samples = run["samples"]
    fig = run["figures"]  # the registry's figures of this run (harness/metrics.py)
    assert run["error"] is None and run["status"] == "ok"

    # no VM was ever asked for, or shrunk to, less than its entitlement
    assert fig["entitlement_violations"] == 0
    for s in samples:
        assert all(v >= 256 for v in s["balloon_mb"].values()), s["balloon_mb"]
        assert all(v >= 256 - 1e-6 for v in s["balloon_actual_mb"].values()), s["balloon_actual_mb"]

    # the budget figures are there and consistent with the samples they come from
    assert fig["budget_mb"] == BUDGET_MB
    host = [s["host"] for s in samples]
    assert len(host) == len(samples) > 10
    ram_mb = 384 + 384 + 256
    for h in host:
        assert h["budget_mb"] == BUDGET_MB
        assert 0 < h["used_mb"] <= ram_mb + h["store_mb"]  # frames of guest RAM, plus the store
        assert h["over_mb"] == pytest.approx(max(0.0, h["used_mb"] - BUDGET_MB), abs=0.02)
    assert fig["peak_overshoot_mb"] == pytest.approx(max(h["over_mb"] for h in host))
    assert fig["peak_overshoot_pct"] == pytest.approx(100 * fig["peak_overshoot_mb"] / BUDGET_MB, abs=0.01)
    assert 0 <= fig["overshoot_s"] <= samples[-1]["t"]
    assert fig["peak_used_mb"] == pytest.approx(max(h["used_mb"] for h in host))

    # the collapse happened: the sharers wrote their shared pages and the saving fell
    t_c = next(t for t, label in run["events"] if label == "collapse start")
    peak_r = max(s["R"] for s in samples if s["t"] <= t_c)
    assert peak_r > 24 * 256  # the working set was shared (pages)
    assert samples[-1]["R"] < 0.5 * peak_r
    per_vm = run["workloads"][0]["per_vm"]
    assert per_vm["a"]["pages"] > 0 and per_vm["b"]["pages"] > 0
    # the sharers held surplus before the collapse; no sample lent more than the saving it saw
    assert max(sum(s["surplus_mb"].values()) for s in samples if s["t"] <= t_c) > 0
    for s in samples:
        assert sum(s["surplus_mb"].values()) <= max(0.0, s["R"] / 256) + 0.01, s
    # the bystander was measured alone and during the collapse
    by = run["workloads"][0]["extra"]["bystander"]
    assert by["vm"] == "c" and by["solo"]["ios"] > 0 and by["collapse"]["ios"] > 0
    assert by["solo"]["p99_ms"] > 0 and by["collapse"]["p99_ms"] > 0
    assert fig["bystander_job_ratio"] is not None
    assert not [x for x in harness_leftovers() if x not in before]
