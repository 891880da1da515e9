"""Experiment config validation: the bad-config corpus (exact messages), the shipped configs,
defaults, the JSON schema export and the CLI functions. Pure unit tests: no QEMU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from harness import config
from harness.config import ConfigError, ExperimentConfig, json_schema, load_config, validate

HERE = Path(__file__).parent
BAD = sorted((HERE / "bad_configs").glob("*.yaml"))
SHIPPED = sorted((HERE.parent / "configs").glob("*.yaml"))
HOST_MB = 23000  # the bad-config messages are written for this much free host memory


def expected_message(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("# expect: "):
            break
        lines.append(line.removeprefix("# expect: "))
    assert lines, f"{path.name} has no '# expect: ' line at the top"
    return "\n".join(lines)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_config_gives_the_exact_message(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(path.parent)
    with pytest.raises(ConfigError) as exc:
        load_config(path.name, host_mem_mb=HOST_MB)
    assert exc.value.message == expected_message(path)


def test_corpus_covers_every_kind_of_error() -> None:
    text = "\n".join(expected_message(p) for p in BAD)
    for needle in ("unknown key", "expected a whole number", "more than this host can give",
                   "is above the VM's max memory", "unknown mode", "no VM named",
                   "is used twice", "unknown workload", "key given twice", "not valid YAML"):
        assert needle in text, needle


def test_shipped_configs_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "identical-readers-2vm.yaml", "identical-readers-4vm.yaml",
            "short-lived.yaml", "macro.yaml", "boot-storm.yaml", "integrity.yaml",
            "adversary.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_is_valid_on_a_small_host(path: Path) -> None:
    cfg = load_config(path, host_mem_mb=4096)
    vms = cfg.vm_list()
    assert sum(v.entitlement_mb for v in vms) <= 4096
    assert cfg.modes and cfg.workloads
    for names in cfg.domains().values():
        assert set(names) <= {v.name for v in vms}


def test_quickstart_is_what_the_readme_promises() -> None:
    cfg = load_config(HERE.parent / "configs" / "quickstart.yaml", host_mem_mb=4096)
    assert [v.memory_mb for v in cfg.vm_list()] == [512, 512]
    assert cfg.modes == ["none", "ksm", "satori"]
    assert cfg.repetitions == 1
    assert cfg.workloads[0].name == "identical-readers"
    assert cfg.workloads[0].params.files == 25


def test_macro_entitlement_is_below_the_working_set() -> None:
    cfg = load_config(HERE.parent / "configs" / "macro.yaml", host_mem_mb=4096)
    ws = 4 * cfg.workloads[0].params.files  # MB: 4 MiB files
    guest = 100  # MB the guest itself needs (kernel, init, sshd, fio and its libraries), roughly
    for v in cfg.vm_list():
        # the page cache left at the entitlement is too small for the working set; at max it fits
        assert v.entitlement_mb - guest < ws <= v.memory_mb - guest
        assert v.disk_iops and v.disk_bps
    assert cfg.surplus


def test_defaults_and_resolution() -> None:
    cfg = validate({"name": "d", "vms": {"count": 3, "memory_mb": 256},
                    "sharing_domains": {"d1": ["vm1", "vm2", "vm3"]},
                    "workloads": [{"name": "boot-storm"}]}, host_mem_mb=HOST_MB)
    vms = cfg.vm_list()
    assert [v.name for v in vms] == ["vm1", "vm2", "vm3"]
    assert all(v.entitlement_mb == 256 and v.vcpus == 1 and v.disk_iops is None for v in vms)
    assert cfg.domains() == cfg.groups() == {"d1": ["vm1", "vm2", "vm3"]}
    assert cfg.modes == list(config.MODES)
    assert cfg.sample_interval_s == 1.0 and cfg.repetitions == 1 and not cfg.surplus
    assert cfg.workloads[0].params.keep_s == 20.0  # the workload module's default
    import datetime as dt

    out = cfg.output_dir(dt.datetime(2026, 1, 2, 3, 4, 5))
    assert out == Path("results/d-20260102-030405")


def test_list_form_with_entitlement_and_disk() -> None:
    cfg = validate({"name": "l", "vms": [{"name": "a", "memory_mb": 1024, "entitlement_mb": 256,
                                          "disk": {"iops": 100}}, {"name": "b"}],
                    "sharing_domains": {"x": ["a"], "y": ["b"]},
                    "workloads": [{"name": "macro", "params": {"ios": 100}}]}, host_mem_mb=HOST_MB)
    a, b = cfg.vm_list()
    assert (a.memory_mb, a.entitlement_mb, a.disk_iops, a.disk_bps) == (1024, 256, 100, None)
    assert (b.name, b.memory_mb, b.entitlement_mb) == ("b", 512, 512)
    assert cfg.domains() == {"x": ["a"], "y": ["b"]}
    assert config.config_as_run(cfg)["vm_list"][0]["entitlement_mb"] == 256


def test_validate_without_a_file_names_the_source() -> None:
    with pytest.raises(ConfigError) as exc:
        validate({"name": "x", "vms": {"count": 1}, "modes": ["none"], "workloads": [], "bogus": 1},
                 source="<test>", host_mem_mb=HOST_MB)
    assert sorted(exc.value.message.splitlines()) == [
        "<test>:1: bogus: unknown key (known: " + ", ".join(ExperimentConfig.model_fields) + ")",
        "<test>:1: workloads: must not be empty",
    ]


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"e.yaml:1: the file is empty"):
        load_config(tmp_path / "e.yaml", host_mem_mb=HOST_MB)
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"l.yaml:1: expected a mapping"):
        load_config(tmp_path / "l.yaml", host_mem_mb=HOST_MB)
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_config(tmp_path / "missing.yaml", host_mem_mb=HOST_MB)


def test_lowmem_limit_matches_the_vm_module() -> None:
    from harness import vm

    assert config.MAX_LOWMEM_MB == vm.MAX_LOWMEM_MB
    with pytest.raises(ConfigError, match=r"vms.memory_mb: memory 4096 MB is above the 3072 MB"):
        validate({"name": "x", "vms": {"count": 1, "memory_mb": 4096},
                  "workloads": [{"name": "web"}]}, host_mem_mb=HOST_MB)


def test_host_memory_from_meminfo(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       32000000 kB\nMemAvailable:   23552000 kB\n")
    assert config.host_mem_available_mb(f) == 23000
    assert config.host_mem_available_mb() > 0


def test_json_schema_export(capsys: pytest.CaptureFixture[str]) -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert schema["type"] == "object"
    assert {"name", "vms", "sharing_domains", "modes", "workloads", "surplus",
            "sample_interval_s", "repetitions", "output", "seed"} <= set(schema["properties"])
    assert set(schema["required"]) == {"name", "vms", "workloads"}
    assert config.cmd_config_schema(argparse.Namespace()) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "satori experiment"


def test_cmd_config_check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "host_mem_available_mb", lambda: HOST_MB)
    ok = str(HERE.parent / "configs" / "quickstart.yaml")
    assert config.cmd_config_check(argparse.Namespace(file=ok)) == 0
    assert "ok: quickstart: 2 VMs" in capsys.readouterr().out
    bad = str(HERE / "bad_configs" / "unknown-mode.yaml")
    with pytest.raises(ConfigError, match="unknown mode 'kms'"):
        config.cmd_config_check(argparse.Namespace(file=[ok, bad]))


@pytest.mark.parametrize("content,expect", [
    (b"\x7fELF\x02\x01\x01\x00" + bytes(64), "binary data (a NUL byte at offset 7), not a config"),
    (b"name: x\nvms: caf\xe9\n", "bad.yaml:2: not UTF-8 text (byte 0xe9 at offset 16)"),
])
def test_a_binary_or_non_utf8_config_is_one_clear_error(tmp_path: Path, content: bytes, expect: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(p, host_mem_mb=HOST_MB)
    assert expect in exc.value.message and "\n" not in exc.value.message


def test_a_folder_or_fifo_config_is_one_clear_error(tmp_path: Path) -> None:
    import os

    with pytest.raises(ConfigError, match="a folder: a config must be"):
        load_config(tmp_path)
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):  # and does not block on open
        load_config(tmp_path / "pipe.yaml")
    with pytest.raises(ConfigError, match="cannot read the config: No such file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["quickstart", "identical-readers-2vm", "identical-readers-4vm", "boot-storm"])
def test_configs_that_report_idle_cpu_have_a_quiet_tail_long_enough(name: str) -> None:
    from harness.metrics import IDLE_WINDOW_S

    cfg = load_config(HERE.parent / "configs" / f"{name}.yaml", host_mem_mb=4096)
    last = cfg.workloads[-1]
    # the last workload ends in a quiet phase (ctx.quiet()) of keep_s seconds
    assert last.name in ("identical-readers", "boot-storm")
    assert last.params.keep_s >= IDLE_WINDOW_S + 5, f"{name}: keep_s {last.params.keep_s}"
