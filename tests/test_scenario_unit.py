"""benchmarks/scenario.py on synthetic results (no QEMU): the one-yardstick table with the
registry's goals, the goals that apply, and where the hinted modes stand against each scanner,
ratios paired by repetition ("within noise" when the spread crosses 1.0)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from synthetic import runner

from harness import metrics, report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import scenario  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture
def res(tmp_path: Path) -> dict:
    r = runner(tmp_path, reps=3, modes_=["none", "ksm", "satori"])
    r.write()
    return report.load_results(tmp_path)


def test_yardstick_table_has_every_column_and_the_goals(res) -> None:
    text = scenario.yardstick_table(res)
    head, _, *rows = text.splitlines()
    for key in scenario.YARDSTICK:
        assert metrics.get(key).label in head
    assert rows[-1].startswith("| goal |") and "<= 5.00 µs (satori, satori-host)" in rows[-1]
    assert any(r.startswith("| ksm |") for r in rows)


def test_goals_and_standing(res) -> None:
    g = "\n".join(scenario.goals(res))
    assert "E_disk after the reads >= 99% [satori]: 99.0% -> met" in g
    assert "CPU per page saved <= 5 µs [satori]" in g
    assert "macrobenchmark" not in g  # the run has no macro workload
    st = "\n".join(scenario.standing(res))
    # synthetic: both charge 0.01 s per s of CPU; satori saves 49,500 pages at peak, ksm 49,166
    assert "satori vs ksm: CPU per page saved" in st
    assert "within noise" not in st and "spends" in st


def test_standing_says_within_noise(tmp_path: Path) -> None:
    r = runner(tmp_path, reps=2, modes_=["none", "ksm", "satori"])
    for run in r.runs:  # satori 0.8x ksm's CPU in one repetition, 1.2x in the other
        if run.mode == "satori":
            f = 0.8 * 49_166 / 49_500 if run.rep == 0 else 1.2 * 49_166 / 49_500
            for s in run.samples:
                s["cpu"] = {k: v * f for k, v in s["cpu"].items()}
    r.write()
    st = "\n".join(scenario.standing(report.load_results(tmp_path)))
    assert "within noise" in st and "no difference that the spread allows to claim" in st


def test_standing_claims_nothing_from_one_repetition(tmp_path: Path) -> None:
    runner(tmp_path, reps=1, modes_=["none", "ksm", "satori"]).write()
    st = "\n".join(scenario.standing(report.load_results(tmp_path)))
    assert "one repetition: no spread, no claim" in st and "spends" not in st


def test_report_only(res, tmp_path: Path, capsys) -> None:
    assert scenario.main(["--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "the one yardstick" in out and "goals" in out and "where the hinted modes stand" in out
    assert scenario.main(["--report", str(tmp_path / "nope")]) == 1


def test_vms_override_scales_the_one_domain_of_all_vms() -> None:
    data = {"vms": {"count": 4, "memory_mb": 512}, "sharing_domains": {"readers": ["vm1", "vm2", "vm3", "vm4"]}}
    vms = scenario.resize_vms(data["vms"], data, 8)
    assert vms == {"count": 8, "memory_mb": 512}
    assert data["sharing_domains"]["readers"] == [f"vm{i}" for i in range(1, 9)]
    odd = {"vms": {"count": 3}, "sharing_domains": {"a": ["vm1", "vm2"], "b": ["vm3"]}}
    with pytest.raises(scenario.HarnessError, match="not all of the config's 3 VMs"):
        scenario.resize_vms(odd["vms"], odd, 6)
