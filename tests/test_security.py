"""Security rules that need no guest: sharing is opt-in (a named domain), domain names are checked
before they reach a path, `satori share` needs --domain, the adversary's attacks are a fixed set
and reach the guest without a shell. (The bad-config corpus holds the exact messages.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import cli, config
from harness.config import ConfigError, check_domain_name, validate
from harness.errors import HarnessError
from harness.workloads import RunContext, make
from harness.workloads.adversary import ARGS_PATH, ATTACKS, Adversary

HOST_MB = 23000


def _cfg(**kw) -> dict:
    return {"name": "t", "vms": {"count": 2}, "workloads": [{"name": "identical-readers"}]} | kw


@pytest.mark.parametrize("modes", [["satori"], ["none", "satori+ksm"], None])
def test_engine_mode_without_domains_is_refused_clearly(modes) -> None:
    data = _cfg() if modes is None else _cfg(modes=modes)
    with pytest.raises(ConfigError) as exc:
        validate(data, source="<t>", host_mem_mb=HOST_MB)
    msg = exc.value.message
    assert "no sharing domain is named: sharing is opt-in" in msg
    assert "A sharing domain is a group of VMs that trust each other" in msg
    assert "`sharing_domains: {trusted: [vm1, vm2]}`" in msg
    assert len(msg.splitlines()) == 1


def test_modes_without_the_engine_need_no_domain() -> None:
    cfg = validate(_cfg(modes=["none", "ksm", "ksm-fast"]), host_mem_mb=HOST_MB)
    assert cfg.domains() == {}
    assert cfg.groups() == {"all": ["vm1", "vm2"]}  # measured together, merged by nobody's engine
    assert config.config_as_run(cfg)["domains"] == {}


def test_named_domains_are_what_the_engine_gets() -> None:
    cfg = validate(_cfg(vms={"count": 3}, sharing_domains={"a": ["vm1", "vm2"]}, modes=["satori"]),
                   host_mem_mb=HOST_MB)
    assert cfg.domains() == cfg.groups() == {"a": ["vm1", "vm2"]}  # vm3 shares with nobody


@pytest.mark.parametrize("name", ["../../x y", "a,share=off", "", "x" * 65, "é", "a/b", ".", "a b", "a\n"])
def test_bad_domain_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="sharing domain name"):
        check_domain_name(name)
    with pytest.raises(ConfigError, match="sharing domain name"):
        validate(_cfg(sharing_domains={name: ["vm1"]}, modes=["satori"]), host_mem_mb=HOST_MB)


@pytest.mark.parametrize("name", ["a", "web-1", "A_b-9", "x" * 64])
def test_good_domain_names_pass(name: str) -> None:
    assert check_domain_name(name) == name
    validate(_cfg(sharing_domains={name: ["vm1", "vm2"]}, modes=["satori"]), host_mem_mb=HOST_MB)


def test_ksm_modes_with_several_domains_say_what_they_cannot_isolate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    two = validate(_cfg(sharing_domains={"a": ["vm1"], "b": ["vm2"]}, modes=["ksm", "satori"]),
                   host_mem_mb=HOST_MB)
    (note,) = two.domain_notes()
    assert "merges across every mergeable process on the host" in note and "a, b apart" in note
    one = validate(_cfg(sharing_domains={"a": ["vm1", "vm2"]}, modes=["ksm", "satori"]), host_mem_mb=HOST_MB)
    assert one.domain_notes() == []
    no_ksm = validate(_cfg(sharing_domains={"a": ["vm1"], "b": ["vm2"]}, modes=["satori"]), host_mem_mb=HOST_MB)
    assert no_ksm.domain_notes() == []
    f = tmp_path / "two.yaml"
    f.write_text("name: two\nvms: {count: 2}\nsharing_domains: {a: [vm1], b: [vm2]}\n"
                 "modes: [none, satori+ksm]\nworkloads: [{name: identical-readers}]\n")
    monkeypatch.setattr(config, "host_mem_available_mb", lambda: HOST_MB)
    assert cli.main(["config", "check", str(f)]) == 0
    out = capsys.readouterr().out
    assert "sharing domains a (1 VMs), b (1 VMs)" in out
    assert "satori+ksm run KSM" in out and "the KSM part does not" in out


def test_share_needs_a_domain(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["share", "a", "b"]) == 1
    err = capsys.readouterr().err
    assert "satori share needs --domain NAME: sharing is opt-in" in err
    assert "satori share a b --domain trusted" in err


@pytest.mark.parametrize("name", ["../../x y", "a,b", "x" * 65])
def test_share_refuses_a_bad_domain_name_before_anything(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.paths import runtime_dir

    before = set(runtime_dir().iterdir()) if runtime_dir().exists() else set()
    # no VM named "nope" exists: the name is refused first, before any VM, store or status file
    assert cli.main(["share", "nope", "--domain", name]) == 1
    assert "sharing domain name" in capsys.readouterr().err
    after = set(runtime_dir().iterdir()) if runtime_dir().exists() else set()
    assert after == before


@pytest.mark.parametrize("bad", [["wrong-hash", "$(reboot)"], ["flood; rm -rf /"], [], "flood", [1]])
def test_adversary_refuses_attacks_outside_the_set(bad) -> None:
    with pytest.raises(ConfigError):
        Adversary({"attacks": bad})
    with pytest.raises(ConfigError):
        validate(_cfg(sharing_domains={"d": ["vm1", "vm2"]}, modes=["satori"],
                      workloads=[{"name": "adversary", "params": {"attacks": bad}}]), host_mem_mb=HOST_MB)


def test_every_known_attack_passes() -> None:
    cfg = validate(_cfg(sharing_domains={"d": ["vm1", "vm2"]}, modes=["satori"],
                        workloads=[{"name": "adversary", "params": {"attacks": list(ATTACKS)}}]),
                   host_mem_mb=HOST_MB)
    assert cfg.workloads[0].params.attacks == list(ATTACKS)


class _FakeSSH:
    """Records what the workload sends to a guest (pure logic: no QEMU)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.files: dict[str, bytes] = {}

    def check(self, command: str, timeout: float | None = None) -> str:  # noqa: ARG002
        self.commands.append(command)
        return '{"sent": 7}\n' if "forge" in command else "d41d8cd98f00b204e9800998ecf8427e  -\n"

    def put(self, data: bytes, path: str) -> None:
        self.files[path] = data


class _FakeVM:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ssh = _FakeSSH()


def test_adversary_parameters_reach_the_guest_as_a_file_not_a_shell_string() -> None:
    wl = make("adversary", {"attacker": "m", "attacks": ["flood", "changed-page"], "rate": 5,
                            "duration_s": 0.1}, seed=3)
    honest, mal = _FakeVM("h"), _FakeVM("m")
    r = wl.run([honest, mal], RunContext(log=lambda m: None))
    assert r.extra["forged"] == 7
    (cmd,) = [c for c in mal.ssh.commands if "forge" in c]
    assert cmd == f"python3 /tmp/forge.py {ARGS_PATH}"  # a constant: nothing from the config
    assert json.loads(mal.ssh.files[ARGS_PATH]) == {"attacks": ["flood", "changed-page"], "rate": 5,
                                                    "duration_s": 0.1, "seed": 3}


# ---------------------------------------------------------------- the side-channel benchmark's probe


def _side_channel():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "side_channel.py"
    spec = importlib.util.spec_from_file_location("side_channel_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_side_channel_probe_builds_and_runs(tmp_path: Path) -> None:
    """The guest timing program builds static with -Wall -Werror and does what the benchmark
    parses (here on the host, on a file of its own: a quick test, not the measurement)."""
    import hashlib
    import subprocess

    sc = _side_channel()
    probe = sc.build_probe(tmp_path)
    assert (probe.stat().st_mode & 0o777) == 0o700
    headers = subprocess.run(["readelf", "-l", str(probe)], capture_output=True, text=True).stdout
    assert "LOAD" in headers and "INTERP" not in headers  # static: runs in any x86-64 guest
    data = os.urandom(16 * 4096)
    f = tmp_path / "cand.bin"
    f.write_bytes(data)
    regions = [sc.Region(str(f), 0, 4), sc.Region(str(f), 8 * 4096, 8)]
    r = subprocess.run([str(probe), *sc.probe_argv("read", 7, regions)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    r = subprocess.run([str(probe), *sc.probe_argv("write", 7, regions)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p = sc.parse_probe(r.stdout, regions)
    assert sorted(zip(p.region.tolist(), p.index.tolist(), strict=True)) == \
        [(0, i) for i in range(4)] + [(1, i) for i in range(8)]
    assert (p.ns > 0).all()
    if os.geteuid() == 0:  # pagemap shows PFNs to root only
        assert (p.pfn > 0).all()
    assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(data).digest()  # unchanged
    for bad in (["write", "1", str(f), "100", "1"], ["write", "x", str(f), "0", "1"], ["scan", "1", str(f), "0", "1"],
                ["read", "1", str(f), "0"]):
        assert subprocess.run([str(probe), *bad], capture_output=True).returncode == 2, bad
    r = subprocess.run([str(probe), "read", "1", str(tmp_path / "missing"), "0", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and "open" in r.stderr


def test_side_channel_output_is_checked_like_any_guest_input() -> None:
    sc = _side_channel()
    regions = [sc.Region("/x", 0, 2)]
    good = "page 0 0 5 100\npage 0 1 6 300\ncalib 0.5\n"
    p = sc.parse_probe(good, regions)
    assert p.ns.tolist() == [50.0, 150.0] and p.pfn.tolist() == [5, 6]
    for bad in ("page 0 0 5 100\ncalib 0.5\n",              # a page missing
                good.replace("page 0 1", "page 1 1"),        # a region that was not asked for
                good.replace("page 0 1 6", "page 0 9 6"),    # a page outside the region
                good + "rm -rf /\n",                         # anything else
                good.replace("calib 0.5", "calib 0")):       # no clock
        with pytest.raises(HarnessError):
            sc.parse_probe(bad, regions)
    fast = np.array([10.0] * 9 + [200.0])  # a slow tail (TCG TLB refills), as seen in guests
    thr, how = sc.threshold_from(fast, np.array([4000.0, 4700.0, 5000.0]))
    assert 200 < thr < 4000 and "own merged" in how
    thr, how = sc.threshold_from(fast, np.array([40.0]))
    assert thr == pytest.approx(4 * np.percentile(fast, 90)) and "did not merge" in how


@pytest.mark.integration
def test_side_channel_probe_runs_in_a_guest(image, tmp_path: Path) -> None:
    """The probe runs in the guest kernel (static binary, MADV_POPULATE_WRITE, pagemap PFNs
    inside the guest's RAM) on a dataset region and leaves the file unchanged. Not the
    measurement: no timing is asserted."""
    from harness.vm import VM, VMSpec

    sc = _side_channel()
    probe = sc.build_probe(tmp_path)
    regions = [sc.Region("/data/set1/f0003.bin", 0, 8), sc.Region("/data/set1/f0004.bin", 65536, 4)]
    with VM(VMSpec("scprobe", memory_mb=384), image) as vm:
        vm.ssh.put(probe.read_bytes(), sc.GUEST_PROBE)
        vm.ssh.check(f"chmod 700 {sc.GUEST_PROBE}")
        before = vm.ssh.check("md5sum /data/set1/f0003.bin /data/set1/f0004.bin")
        vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
        vm.ssh.check(" ".join([sc.GUEST_PROBE, *sc.probe_argv("read", 1, regions)]))
        p = sc.parse_probe(vm.ssh.check(" ".join([sc.GUEST_PROBE, *sc.probe_argv("write", 2, regions)])),
                           regions)
        vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
        after = vm.ssh.check("md5sum /data/set1/f0003.bin /data/set1/f0004.bin")
    assert len(p.ns) == 12 and (p.ns > 0).all()
    assert (p.pfn > 0).all() and (p.pfn * 4096 < 384 << 20).all()  # guest-physical pages of its RAM
    assert len(set(p.pfn.tolist())) == 12
    assert before == after
