"""KSMControl on a fake sysfs folder: values set per mode, restored exactly on exit, on error,
on Ctrl-C and after a killed run; a clear error without KSM; sampling."""

from __future__ import annotations

import json
import os

import pytest

from harness import ksm, modes
from harness.errors import HarnessError

START = {"run": 0, "pages_to_scan": 37, "sleep_millisecs": 200, "use_zero_pages": 0,
         "pages_sharing": 5, "pages_shared": 2, "full_scans": 9}


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "ksm"
    root.mkdir()
    for k, v in START.items():
        (root / k).write_text(f"{v}\n")
    return root


def values(root):
    return {p.name: int(p.read_text()) for p in root.iterdir()}


@pytest.mark.parametrize(
    "mode,expect",
    [("ksm", (1, 100, 20)), ("ksm-fast", (1, 1000, 20)), ("satori+ksm", (1, 100, 20))],
)
def test_modes_set_and_restore(sysfs, tmp_path, mode, expect):
    with ksm.KSMControl(mode, root=sysfs, state_dir=tmp_path) as k:
        v = values(sysfs)
        assert (v["run"], v["pages_to_scan"], v["sleep_millisecs"]) == expect
        assert (tmp_path / "ksm-saved.json").is_file()
        assert k.current()["run"] == expect[0]
    assert values(sysfs) == START
    assert not (tmp_path / "ksm-saved.json").exists()


def test_restored_on_error_and_ctrl_c(sysfs, tmp_path):
    with pytest.raises(RuntimeError):
        with ksm.KSMControl("ksm-fast", root=sysfs, state_dir=tmp_path):
            raise RuntimeError("boom")
    assert values(sysfs) == START
    with pytest.raises(KeyboardInterrupt):
        with ksm.KSMControl("ksm", overrides={"use_zero_pages": 1}, root=sysfs, state_dir=tmp_path):
            assert values(sysfs)["use_zero_pages"] == 1
            raise KeyboardInterrupt
    assert values(sysfs) == START


def test_killed_run_is_repaired_by_the_next(sysfs, tmp_path):
    # a run that died (its pid is gone) left ksm-fast values and its saved file behind
    (sysfs / "run").write_text("1\n")
    (sysfs / "pages_to_scan").write_text("1000\n")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (tmp_path / "ksm-saved.json").write_text(json.dumps(
        {"pid": dead, "start": 1, "mode": "ksm-fast",
         "values": {"pages_to_scan": 37, "sleep_millisecs": 200, "run": 0}}))
    with ksm.KSMControl("ksm", root=sysfs, state_dir=tmp_path):
        assert values(sysfs)["pages_to_scan"] == 100
    assert values(sysfs) == START  # the machine's real values, not the dead run's


@pytest.mark.parametrize("saved", [
    {"pid": 1, "start": 1, "mode": "ksm", "values": {"../../../proc/sys/kernel/core_pattern": 1}},
    {"pid": 1, "start": 1, "mode": "ksm", "values": {"run": "|/tmp/evil"}},
    {"pid": 1, "start": 1, "mode": "ksm", "values": {"run": 0}, "extra": 1},
    {"pid": "1", "start": 1, "mode": "ksm", "values": {}},
    [1, 2],
])
def test_hostile_saved_file_is_refused_and_nothing_written(sysfs, tmp_path, saved):
    (tmp_path / "ksm-saved.json").write_text(json.dumps(saved))
    with pytest.raises(HarnessError, match="not used"):
        with ksm.KSMControl("ksm", root=sysfs, state_dir=tmp_path):
            pass
    with pytest.raises(HarnessError, match="not used"):
        ksm.recover(sysfs, tmp_path)
    assert values(sysfs) == START
    assert sorted(p.name for p in sysfs.iterdir()) == sorted(START)  # nothing planted either


def test_saved_file_writable_by_others_or_symlink_is_refused(sysfs, tmp_path):
    good = {"pid": 1, "start": 1, "mode": "ksm", "values": {"run": 0}}
    f = tmp_path / "ksm-saved.json"
    f.write_text(json.dumps(good))
    os.chmod(f, 0o666)
    with pytest.raises(HarnessError, match="not a private file"):
        ksm.recover(sysfs, tmp_path)
    f.unlink()
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps(good))
    f.symlink_to(other)
    with pytest.raises(HarnessError, match="unreadable"):
        ksm.recover(sysfs, tmp_path)
    assert values(sysfs) == START


def test_recover_restores_a_killed_runs_values_and_says_so(sysfs, tmp_path):
    (sysfs / "run").write_text("1\n")
    (tmp_path / "ksm-saved.json").write_text(json.dumps(
        {"pid": 1, "start": 1, "mode": "ksm-fast", "values": {"run": 0, "pages_to_scan": 37}}))
    did = ksm.recover(sysfs, tmp_path)
    assert values(sysfs) == START and len(did) == 1 and "ksm-fast" in did[0]
    assert not (tmp_path / "ksm-saved.json").exists()
    assert ksm.recover(sysfs, tmp_path) == []


def test_lock_is_machine_wide(sysfs, tmp_path, monkeypatch):
    """The KSM lock and saved values do not depend on the runtime folder (two test sessions
    with different SATORI_RUNTIME must not control KSM at once); a second control waits."""
    import subprocess
    import sys

    dirs = set()
    for rt in ("a", "b"):
        monkeypatch.setenv("SATORI_RUNTIME", str(tmp_path / rt))
        dirs.add(ksm.KSMControl("ksm")._dir())
    assert len(dirs) == 1
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    code = ("import sys; from pathlib import Path; from harness import ksm\n"
            "try:\n"
            "    with ksm.KSMControl('ksm', root=Path(sys.argv[1]), state_dir=Path(sys.argv[2]), lock_timeout=1): pass\n"
            "except Exception as e: print(e); sys.exit(3)\n")
    with ksm.KSMControl("ksm-fast", root=sysfs, state_dir=state):
        env = {**os.environ, "SATORI_RUNTIME": str(tmp_path / "other")}
        r = subprocess.run([sys.executable, "-c", code, str(sysfs), str(state)], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3 and "controlled by another" in r.stdout, r.stdout + r.stderr
        assert ksm.recover(sysfs, state) == []  # a live control holds it: left alone
        assert values(sysfs)["pages_to_scan"] == 1000
    assert values(sysfs) == START


def test_missing_ksm_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="KSM is not available"):
        with ksm.KSMControl("ksm", root=tmp_path / "nope", state_dir=tmp_path):
            pass
    with pytest.raises(HarnessError, match="KSM is not available"):
        ksm.sample(tmp_path / "nope")
    with pytest.raises(HarnessError, match="unknown sharing mode"):
        ksm.KSMControl("fast")
    with pytest.raises(HarnessError, match="leaves KSM alone"):
        ksm.KSMControl("none")


def test_sample_and_ram_backend(sysfs):
    s = ksm.sample(sysfs)
    assert (s.pages_sharing, s.pages_shared, s.full_scans) == (5, 2, 9)
    assert s.pages_unshared == -1  # not in the fake sysfs
    assert s.ksmd_cpu_s >= 0
    assert modes.get("ksm-fast").ram_backend == "ram-merge" and modes.get("satori").ram_backend == "file"


def test_process_cpu_seconds_of_self():
    x = sum(range(2_000_000))
    assert x and ksm.process_cpu_seconds(os.getpid()) > 0


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/ksm/run") or os.geteuid() != 0,
                    reason="needs the host's KSM and root")
@pytest.mark.parametrize("mode", ["ksm-fast", "ksm-advisor"])
def test_real_sysfs_roundtrip(mode):
    if modes.get(mode).unavailable():
        pytest.skip(modes.get(mode).unavailable())
    root = ksm.KSM_SYSFS
    names = [n for n in ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode", "smart_scan",
                         "advisor_target_scan_time") if (root / n).exists()]
    before = {n: (root / n).read_text() for n in names}
    with ksm.KSMControl(mode) as k:
        assert k.current() == {**k.current(), **modes.get(mode).ksm}
        assert int((root / "run").read_text()) == 1
        assert ksm.ksmd_pid() is not None
    assert {n: (root / n).read_text() for n in names} == before


def test_ksmd_frees_what_exited_vms_left_before_it_is_stopped_again(sysfs, tmp_path):
    """After the run (settings restored, VMs gone), a control that started ksmd lets it make two
    passes so the exited processes' KSM items are freed (not stale counters for the next run),
    then stops it: run is 0 again, the saved file gone, the lock free. Nothing is done when KSM
    counts nothing, or when ksmd was running before the run (its owner's business)."""
    import threading
    import time

    stop = threading.Event()

    def put(name, value):  # as sysfs is read: never half written (the readers run meanwhile)
        tmp = sysfs.parent / f".{name}.tmp"
        tmp.write_text(f"{value}\n")
        os.replace(tmp, sysfs / name)

    def ksmd():  # the kernel's part: while run is 1, passes go by and the dead items are freed
        while not stop.is_set():
            if (sysfs / "run").read_text().strip() == "1":
                put("full_scans", int((sysfs / "full_scans").read_text()) + 1)
                for k in ("pages_sharing", "pages_shared"):
                    put(k, 0)
            time.sleep(0.01)

    t = threading.Thread(target=ksmd)
    t.start()
    try:
        ctl = ksm.KSMControl("ksm", root=sysfs, state_dir=tmp_path)
        with ctl:
            pass
        scans = values(sysfs)["full_scans"]
        assert ctl.flush_exited() is True
        v = values(sysfs)
        assert v["run"] == 0 and v["pages_sharing"] == 0 and v["pages_shared"] == 0
        assert v["full_scans"] >= scans + 2
        assert not (tmp_path / "ksm-saved.json").exists()
        assert ctl.flush_exited() is False  # nothing counted any more: nothing to do
        with ksm.KSMControl("ksm", root=sysfs, state_dir=tmp_path):  # the lock was released
            pass
        (sysfs / "run").write_text("1\n")  # ksmd was running before: left as it was
        (sysfs / "pages_sharing").write_text("5\n")
        ctl = ksm.KSMControl("ksm", root=sysfs, state_dir=tmp_path)
        with ctl:
            pass
        assert ctl.flush_exited() is False and values(sysfs)["run"] == 1
    finally:
        stop.set()
        t.join()
