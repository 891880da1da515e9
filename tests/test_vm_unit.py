"""Unit tests of pure logic: the QEMU command line and the accelerator decision."""

from pathlib import Path

import pytest

from harness.accel import decide
from harness.errors import HarnessError
from harness.image import Image
from harness.paths import shm_dir
from harness.vm import VMPaths, VMSpec, build_cmdline


def fake_image(hints: bool = True) -> Image:
    root = Path("/img")
    return Image(root, root / "vmlinuz", root / "initrd.img", root / "rootfs.raw", root / "key",
                 "6.1.0-1-amd64", "abc", hints)


def opt(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_cmdline_shared_file_backend_and_ports():
    paths = VMPaths.make("r1", "a")
    cmd = build_cmdline(VMSpec("a", memory_mb=768, vcpus=2), fake_image(), paths, "tcg", 40022)
    objs = opt(cmd, "-object")
    assert f"memory-backend-file,id=ram0,size=768M,mem-path={paths.ram},share=on,prealloc=off" in objs
    assert "pc,memory-backend=ram0" in opt(cmd, "-machine")
    assert opt(cmd, "-accel")[0].startswith("tcg")
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22" in opt(cmd, "-netdev")
    assert "virtio-balloon-pci,id=balloon0" in opt(cmd, "-device")
    assert len(opt(cmd, "-qmp")) == 2
    assert opt(cmd, "-smp") == ["2"]
    assert paths.ram == shm_dir() / "satori-r1-a-ram"
    # the hint ring: an ivshmem-plain device over its own shared file
    assert any(o.startswith("memory-backend-file,id=hintring") and f"mem-path={paths.ring}" in o for o in objs)
    assert "ivshmem-plain,memdev=hintring,id=hintdev" in opt(cmd, "-device")
    assert "satori.hints=1" in opt(cmd, "-append")[0]


def test_cmdline_hints_off_and_ksm_backend_and_throttle():
    paths = VMPaths.make("r1", "b")
    spec = VMSpec("b", hints=False, ram_backend="ram-merge", disk_iops=200, disk_bps=10_000_000)
    cmd = build_cmdline(spec, fake_image(), paths, "kvm", 40023)
    assert "memory-backend-ram,id=ram0,size=512M,merge=on" in opt(cmd, "-object")
    assert not any("ivshmem" in d for d in opt(cmd, "-device"))
    assert "satori.hints=0" in opt(cmd, "-append")[0]
    assert opt(cmd, "-accel") == ["kvm"] and opt(cmd, "-cpu") == ["host"]
    drive = opt(cmd, "-drive")[0]
    assert "throttling.iops-total=200" in drive and "throttling.bps-total=10000000" in drive


def test_cmdline_image_without_hints_gets_no_ring():
    cmd = build_cmdline(VMSpec("c"), fake_image(hints=False), VMPaths.make("r", "c"), "tcg", 1)
    assert not any("ivshmem" in d for d in opt(cmd, "-device"))


@pytest.mark.parametrize("kw,match", [
    ({"name": "bad name"}, "letters"),
    ({"name": "a", "memory_mb": 8192}, "memory_mb"),
    ({"name": "a", "ring_bytes": 12345}, "power of two"),
    ({"name": "a", "ram_backend": "hugepages"}, "ram_backend"),
])
def test_spec_validation(kw, match):
    with pytest.raises(HarnessError, match=match):
        VMSpec(**kw)


def test_accel_decision():
    assert decide("tcg", True, False, True).accel == "tcg"
    assert decide("kvm", False, True, None).accel == "kvm"
    assert decide(None, False, False, None).accel == "tcg"
    pvm = decide(None, True, True, None)
    assert pvm.accel == "tcg" and "PVM" in pvm.reason
    assert decide(None, True, False, True).accel == "kvm"
    hung = decide("auto", True, False, False)
    assert hung.accel == "tcg" and "did not boot" in hung.reason
    assert hung.line().startswith("accelerator: TCG (")
    with pytest.raises(ValueError):
        decide("xen", True, False, None)
