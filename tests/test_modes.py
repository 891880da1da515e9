"""The mode table: one entry per mode drives the config schema, the VMs' build, KSM's settings
and the runner; ksm-advisor's settings on a fake sysfs (a choice file, a value the kernel changes
by itself), and a mode this host cannot run is skipped with its reason. Pure unit tests."""

from __future__ import annotations

import pytest

from harness import config, ksm, modes
from harness.errors import HarnessError


def test_every_mode_is_consistent() -> None:
    assert modes.NAMES[:2] == ("none", "ksm")
    for m in modes.MODES.values():
        assert m.ram_backend in ("file", "ram-merge")
        assert m.hints in ("guest", "host", None)
        # KSM scans only mergeable anonymous RAM; the merge agent needs hints to act on
        assert not m.scans or m.ram_backend == "ram-merge", m.name
        assert not m.engine or m.hints is not None, m.name
        assert m.ksm is None or list(m.ksm)[-1] == "run", m.name
        assert m.summary
    assert not modes.get("none").shares and modes.get("ksm").shares and modes.get("satori").shares
    assert modes.get("ksm-advisor").ksm["advisor_mode"] == "scan-time"
    with pytest.raises(HarnessError, match="unknown sharing mode 'fast'"):
        modes.get("fast")


def test_config_takes_its_modes_from_the_table() -> None:
    assert config.MODES == modes.NAMES
    data = {"name": "x", "vms": {"count": 2}, "modes": ["none", "ksm-advisor"],
            "workloads": [{"name": "identical-readers"}]}
    assert config.validate(data, host_mem_mb=4096).modes == ["none", "ksm-advisor"]
    data["modes"] = ["ksm-slow"]
    with pytest.raises(config.ConfigError, match="unknown mode 'ksm-slow' .*ksm-advisor"):
        config.validate(data, host_mem_mb=4096)


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "ksm"
    root.mkdir()
    for k, v in {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "smart_scan": "0",
                 "advisor_mode": "[none] scan-time", "advisor_target_scan_time": "200"}.items():
        (root / k).write_text(v + "\n")
    return root


class ChoiceFile:
    """What the kernel does with advisor_mode: shows the choice in brackets, and switching it
    resets pages_to_scan."""

    def __init__(self, root):
        self.root = root

    def sync(self) -> None:
        f = self.root / "advisor_mode"
        text = f.read_text().strip()
        if "[" not in text:  # the harness wrote a bare word
            f.write_text(" ".join(f"[{w}]" if w == text else w for w in ("none", "scan-time")) + "\n")
            (self.root / "pages_to_scan").write_text("500\n" if text == "scan-time" else "100\n")


def test_ksm_advisor_set_and_restored(sysfs, tmp_path, monkeypatch) -> None:
    kernel = ChoiceFile(sysfs)
    real_write = ksm._write

    def write(root, name, value):
        real_write(root, name, value)
        kernel.sync()

    monkeypatch.setattr(ksm, "_write", write)
    before = {p.name: p.read_text() for p in sysfs.iterdir()}
    with ksm.KSMControl("ksm-advisor", root=sysfs, state_dir=tmp_path) as k:
        cur = k.current()
        assert cur["advisor_mode"] == "scan-time" and cur["smart_scan"] == 1 and cur["run"] == 1
        assert cur["advisor_target_scan_time"] == 20
        (sysfs / "pages_to_scan").write_text("7000\n")  # the advisor tuned the rate meanwhile
    assert {p.name: p.read_text() for p in sysfs.iterdir()} == before


def test_a_mode_this_host_cannot_run_says_why(tmp_path) -> None:
    (tmp_path / "run").write_text("0\n")
    assert modes.ksm_files(root=tmp_path)() is None
    why = modes.ksm_files("smart_scan", "advisor_mode", root=tmp_path)()
    assert why and "smart_scan, advisor_mode" in why and "6.8" in why
    why = modes.ksm_files(root=tmp_path / "none")()
    assert why and "KSM is not available" in why


def test_runner_skips_what_the_host_cannot_run(monkeypatch, tmp_path) -> None:
    from harness import experiment

    monkeypatch.setitem(modes.MODES, "ksm-advisor", modes.Mode(
        "ksm-advisor", "test", ram_backend="ram-merge", ksm={"run": 1}, hints=None, engine=False,
        requires=(lambda: "no advisor on this kernel",)))
    cfg = config.validate({"name": "x", "vms": {"count": 1}, "modes": ["ksm-advisor"],
                           "workloads": [{"name": "identical-readers"}]}, host_mem_mb=4096)
    runner = experiment.Runner(cfg, out=tmp_path / "out", log=lambda m: None)
    monkeypatch.setattr(experiment, "ensure_image", lambda log: None)
    runner.run()
    res = runner.results()
    assert res["modes"]["ksm-advisor"]["skipped"] == "no advisor on this kernel"
    assert res["status"] == "complete"


def test_ksm_keys_cover_every_mode() -> None:
    keys = modes.ksm_keys()
    assert {"run", "pages_to_scan", "advisor_mode", "smart_scan"} <= keys
    assert set(ksm.CHANGED_BY["advisor_mode"]) <= keys
