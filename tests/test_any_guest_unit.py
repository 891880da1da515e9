"""Unit tests (no QEMU): what host hints and dax attach to a VM, who reports a VM's reads, the
command line with device memory, LD_PRELOAD composed from several preloads, results setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import config
from harness.dax import PmemAttachment, PmemImage
from harness.errors import HarnessError
from harness.image import Image
from harness.modes import MODES
from harness.sharing.attach import hint_source, mode_attachments, sharing_attachments
from harness.sharing.hosthints import HostHintsAttachment
from harness.vm import VM, VMPaths, VMSpec, build_cmdline


def fake_image(hints: bool) -> Image:
    root = Path("/img")
    return Image(root, root / "vmlinuz", root / "initrd.img", root / "rootfs.raw", root / "key",
                 "6.1.0-1-amd64", "abc", hints, name="bookworm-satori" if hints else "trixie-stock")


def opt(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


@pytest.fixture()
def vm(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_RUNTIME", str(tmp_path / "rt"))
    v = VM(VMSpec("hh"), fake_image(False), run_id="r0")
    v.add_memfd("ram", 1 << 20)  # what launch() makes first for a shared RAM backend
    yield v
    v.shutdown()


def test_hint_source_defaults_to_the_guest_driver_else_the_host():
    patched, stock = fake_image(True), fake_image(False)
    assert hint_source(None, patched) == "guest" and hint_source(None, stock) == "host"
    assert hint_source("host", patched) == "host" and hint_source("off", patched) is None
    assert hint_source("guest", patched) == "guest"
    with pytest.raises(HarnessError, match="no hint driver.*hints: host"):
        hint_source("guest", stock)
    with pytest.raises(HarnessError, match="guest, host, off"):
        hint_source("bogus", patched)


def test_mode_attachments_per_mode_and_vm_setting():
    patched, stock = fake_image(True), fake_image(False)
    keys = lambda atts: [a.key for a in atts]  # noqa: E731
    atts, src = mode_attachments(MODES["satori"], patched)
    assert (keys(atts), src) == (["hint-ring", "merge-agent"], "guest")
    atts, src = mode_attachments(MODES["satori"], stock)  # a stock guest in a satori run
    assert (keys(atts), src) == (["host-hints", "merge-agent"], "host")
    atts, src = mode_attachments(MODES["satori-host"], patched)  # host hints even with the driver
    assert (keys(atts), src) == (["host-hints", "merge-agent"], "host")
    atts, src = mode_attachments(MODES["satori-host"], patched, hints="off")  # left out of sharing
    assert (atts, src) == ([], None)
    atts, src = mode_attachments(MODES["none"], stock, hints="host")  # a mode without hints
    assert (atts, src) == ([], None)
    assert [a.key for a in sharing_attachments(hints="host")] == ["host-hints"]
    with pytest.raises(HarnessError, match="hints must be"):
        sharing_attachments(hints="sideways")


def test_host_hints_attachment_ring_preload_and_stock_driver(vm):
    ram_fd = vm.memfd_number("ram")
    HostHintsAttachment(1 << 16).pre_launch(vm)
    ring = vm.memfd_number("ring")
    assert ring is not None and os.pread(ring, 8, 0) == b"SATORIHR"
    assert not any("ivshmem" in a for a in vm._args)  # the guest never sees the ring
    assert vm._kernel_args["satori.hints"] == "0"  # its stock driver
    assert vm._env["SATORI_HOSTHINTS_RING"] == f"/proc/self/fd/{ring}"
    assert vm._env["SATORI_HOSTHINTS_RAM"] == f"/proc/self/fd/{ram_fd}"
    assert vm._env["SATORI_HOSTHINTS_DISKS"] == f"{vm.paths.overlay}:/img/rootfs.raw"
    assert len(vm._preloads) == 1 and vm._preloads[0].endswith("satori_hosthints.so")
    assert HostHintsAttachment(1 << 16).host_memory(vm) == 1 << 16  # the ring counts against the host's room


def test_host_hints_need_shared_ram(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_RUNTIME", str(tmp_path / "rt"))
    v = VM(VMSpec("hk", ram_backend="ram-merge"), fake_image(False), run_id="r0")
    with pytest.raises(HarnessError, match="shared memfd"):
        HostHintsAttachment().pre_launch(v)


def test_pmem_attachment_device_memory_and_kernel_arg(vm, tmp_path):
    pmem = PmemImage(tmp_path / "d.ext4", 226 << 20, "/data/set1", 50, 200 << 20)
    PmemAttachment(pmem).pre_launch(vm)
    assert vm._device_memory == 226 << 20
    assert PmemAttachment(pmem).host_memory(vm) == 0  # the image's page cache: one copy for every VM
    assert vm._kernel_args["satori.pmem"] == "/data/set1"
    assert "-device" in vm._args and "virtio-pmem-pci,memdev=pmem0,id=pmemdev0" in vm._args
    paths = VMPaths.in_folder(Path("/r/vms/r1-a"))
    cmd = build_cmdline(VMSpec("a", memory_mb=512), fake_image(False), paths, "tcg", 1, ram_fd=3,
                        device_memory=vm._device_memory)
    assert opt(cmd, "-m") == [f"512M,slots=1,maxmem={(512 << 20) + (226 << 20)}"]
    assert opt(build_cmdline(VMSpec("a"), fake_image(False), paths, "tcg", 1, ram_fd=3), "-m") == ["512M"]
    with pytest.raises(HarnessError, match="whole pages"):
        vm.add_device_memory(1000)


def test_preloads_compose(vm, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/caller/own.so")
    vm.add_preload("/lib/a.so")
    vm.add_preload("/lib/b.so")
    vm.set_env("LD_PRELOAD", "/agent/agent.so:/caller/own.so")  # as agent_env writes it
    assert vm.launch_env()["LD_PRELOAD"] == "/lib/a.so:/lib/b.so:/agent/agent.so:/caller/own.so"
    with pytest.raises(HarnessError, match="no ':'"):
        vm.add_preload("/x:/y.so")


def test_config_hints_per_vm_and_recipes(tmp_path):
    cfg = config.validate({
        "name": "x", "vms": [{"name": "a"}, {"name": "b", "image": "trixie", "hints": "host"}],
        "sharing_domains": {"d": ["a", "b"]}, "modes": ["satori", "satori-host", "dax"],
        "workloads": [{"name": "identical-readers"}]}, host_mem_mb=4096)
    a, b = cfg.vm_list()
    assert (a.hints, b.hints) == (None, "host")
    assert config.recipe_path(b.image).name == "trixie.yaml" and config.recipe_path(None) is None
    with pytest.raises(Exception, match="hints"):
        config.validate({"name": "x", "vms": [{"name": "a", "hints": "sometimes"}], "modes": ["none"],
                         "workloads": [{"name": "identical-readers"}]}, host_mem_mb=4096)
