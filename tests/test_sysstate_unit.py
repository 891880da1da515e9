"""Machine-wide saved settings (vm.max_map_count) on a fake sysctl file: recorded before the
change, shared by several holders, restored by the last one out or after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import sysstate
from harness.errors import HarnessError


@pytest.fixture
def sysctl(tmp_path):
    f = tmp_path / "max_map_count"
    f.write_text("65530\n")
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return f, d


def test_raise_release_restores_the_original(sysctl):
    f, d = sysctl
    assert sysstate.raise_max_map_count(100_000, f, d)
    assert int(f.read_text()) == 100_000
    rec = json.loads((d / "max_map_count.json").read_text())
    assert rec["original"] == 65530 and rec["holders"][0]["pid"] == os.getpid()
    assert (d / "max_map_count.json").stat().st_mode & 0o777 == 0o600
    sysstate.release_max_map_count(f, d)
    assert int(f.read_text()) == 65530 and not (d / "max_map_count.json").exists()
    assert not sysstate.raise_max_map_count(1000, f, d)  # high enough: nothing recorded
    assert not (d / "max_map_count.json").exists()


def test_killed_holder_is_recovered_and_a_live_one_kept(sysctl):
    f, d = sysctl
    code = ("import sys, os; from pathlib import Path; from harness import sysstate\n"
            "sysstate.raise_max_map_count(int(sys.argv[3]), Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(f), str(d), "300000"], capture_output=True)
    assert r.returncode == -9
    assert int(f.read_text()) == 300_000  # a kill -9 left it raised, and recorded
    # a live engine raises next: the dead holder is dropped, the original kept
    assert sysstate.raise_max_map_count(200_000, f, d)
    assert int(f.read_text()) == 200_000
    assert json.loads((d / "max_map_count.json").read_text())["original"] == 65530
    assert sysstate.recover_max_map_count(f, d) == []  # ours is alive: kept
    assert int(f.read_text()) == 200_000
    sysstate.release_max_map_count(f, d)
    assert int(f.read_text()) == 65530
    # the kill alone: cleanup restores and says so
    subprocess.run([sys.executable, "-c", code, str(f), str(d), "300000"], capture_output=True)
    assert sysstate.recover_max_map_count(f, d) == ["vm.max_map_count 300000 -> 65530 (restored)"]
    assert int(f.read_text()) == 65530


def test_hostile_record_is_refused(sysctl):
    f, d = sysctl
    (d / "max_map_count.json").write_text(json.dumps({"original": 1, "holders": "x"}))
    with pytest.raises(HarnessError, match="not used"):
        sysstate.recover_max_map_count(f, d)
    assert int(f.read_text()) == 65530
