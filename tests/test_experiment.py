"""`satori run` end to end with real guests: results (every registry figure, the one CPU
yardstick), plots, summary, surplus, Ctrl-C (partial), a QEMU killed mid-run (recorded, the other
domain goes on)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default

from harness import metrics
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
engine_priority: realtime   # the option end to end; every other run test keeps the default
sample_interval_s: 1
repetitions: 1
seed: 3
"""



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
    assert "| satori |" in r.stdout and "sharing.png" in r.stdout and "CPU/page saved" in r.stdout
    res = load_results(out)
    assert res["status"] == "complete" and res["partial"] is False and res["failures"] == []
    for mode in ("none", "satori"):
        assert set(res["modes"][mode]["figures"]) == {m.key for m in metrics.METRICS}, mode
        assert res["modes"][mode]["runs"][0]["samples"]
    meta = res["meta"]
    for k in ("host_kernel", "cpu", "qemu", "accel", "guest_kernel", "recipe_hash", "config", "commit"):
        assert any(k in key for key in meta), (k, sorted(meta))
    sat, none = res["modes"]["satori"]["figures"], res["modes"]["none"]["figures"]
    assert sat["E_disk_final"][0] > 0.8 and none["E_disk_final"][0] in (0, 0.0, None)
    assert sat["E_final"][0] > (none["E_final"][0] or 0)
    # the one yardstick on this real run: charged CPU over the window / peak R of the oracle
    s = res["modes"]["satori"]["runs"][0]["samples"]
    charged = [sum(row["cpu"][k] for k in metrics.CPU_PARTS) for row in s]
    assert all(b >= a for a, b in zip(charged, charged[1:], strict=False))
    assert s[-1]["cpu"]["engine_s"] > 0 and s[-1]["cpu"]["agent_s"] > 0
    peak = max(row["R"] for row in s)
    assert peak > 1000
    assert sat["cpu_per_page_saved_s"][0] == pytest.approx((charged[-1] - charged[0]) / peak)
    assert sat["cpu_s"][0] == pytest.approx(charged[-1] - charged[0])
    assert sat["merge_lag_p99_s"][0] is None or sat["merge_lag_p99_s"][0] >= 0
    assert res["modes"]["none"]["why"]["cpu_per_page_saved_s"] == ["not a figure of mode none"]
    assert res["modes"]["satori"]["why"]["macro_gain"] == ["the workload defines no macro gain"]
    # plots are real PNGs, the CSV has rows, the summary has a row per mode
    for png in ("sharing.png", "workload_times.png", "surplus.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert len((out / "samples.csv").read_text().splitlines()) > 10
    summary = (out / "summary.md").read_text()
    assert "| none |" in summary and "| satori |" in summary
    # surplus: balloons held the VMs at their entitlement, and the saving was lent in satori only
    sat_run, none_run = res["modes"]["satori"]["runs"][0], res["modes"]["none"]["runs"][0]
    assert none_run["surplus"] and all(max(d["surplus"].values()) == 0 for d in none_run["surplus"])
    lent = [sum(d["surplus"].values()) for d in sat_run["surplus"]]
    assert max(lent) > 0, sat_run["surplus"][-3:]
    for d in sat_run["surplus"]:
        assert sum(d["surplus"].values()) <= max(d["saving"], 0) or d["reason"].startswith("end")
    # engine_priority realtime: the engine thread and both agent threads of each VM were set
    assert sat_run["cpu"]["realtime"] == {"engine": True, "agent_threads": {"vm1": 2, "vm2": 2}}
    assert none_run["cpu"]["realtime"] is None  # no engine in mode none: nothing to raise
    assert "engine priority: realtime" in summary
    assert not new_leftovers(before)


def test_ctrl_c_mid_run_cleans_up_and_keeps_partial_results(image, tmp_path: Path):
    before = set(harness_leftovers())
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(CONFIG.replace("keep_s: 6", "keep_s: 60"))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(cfg), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=sigint_default)
    lines = []
    deadline = time.monotonic() + 900  # boots are slow on a loaded machine
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
    assert res["status"] == "partial" and res["partial"] is True
    run = res["modes"]["none"]["runs"][0]
    assert run["status"] == "interrupted" and run["error"] == "interrupted" and run["samples"], \
        (run["status"], run["error"], run["failures"], log[-2000:])
    assert "**Partial run**" in (out / "summary.md").read_text()
    json.dumps(res)


KILL_CONFIG = """\
name: ci-kill
vms:
  - {name: a, memory_mb: 384}
  - {name: b, memory_mb: 384}
sharing_domains: {left: [a], right: [b]}
modes: [satori]
workloads:
  - name: identical-readers
    params: {files: 4, keep_s: 25}
sample_interval_s: 1
repetitions: 1
seed: 5
"""


def _qemu_pid(name: str) -> int:
    import os

    states = list((Path(os.environ["SATORI_RUNTIME"]) / "vms").glob(f"*-{name}/state.json"))
    assert len(states) == 1, states
    return int(json.loads(states[0].read_text())["pid"])


def test_qemu_killed_mid_run_is_recorded_and_the_other_domain_goes_on(image, tmp_path: Path):
    import os

    before = set(harness_leftovers())
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(KILL_CONFIG)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(cfg), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    lines = []
    deadline = time.monotonic() + 600
    for line in p.stdout:
        lines.append(line)
        if "workload 1/1" in line or time.monotonic() > deadline:
            break
    assert "workload 1/1" in lines[-1], "".join(lines)[-3000:]
    time.sleep(8)  # reading or keeping: either way the run must record the death and go on
    pid = _qemu_pid("b")
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    rest, _ = p.communicate(timeout=300)
    log = "".join(lines) + rest
    assert p.returncode == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "did not complete" in log and "VM b (QEMU pid" in log
    res = load_results(out)
    assert res["status"] == "partial"
    (f,) = res["failures"]
    assert (f["vm"], f["domain"], f["signal"], f["pid"], f["mode"]) == ("b", "right", "SIGKILL", pid, "satori")
    assert f["console_tail"].strip()
    run = res["modes"]["satori"]["runs"][0]
    assert run["status"] == "failed" and run["failures"][0]["vm"] == "b"
    # the other domain was still sampled after the kill
    after = [s for s in run["samples"] if s["t"] > f["t"] + 1]
    assert after, "no sample after the kill"
    assert all("left.G" in s and "right.G" not in s and s["lost_domains"] == ["right"] for s in after)
    assert time.monotonic() - t_kill < 300
    summary = (out / "summary.md").read_text()
    assert "**Partial run**" in summary and "VM b (QEMU pid" in summary and "killed by SIGKILL" in summary
    assert not new_leftovers(before), new_leftovers(before)
