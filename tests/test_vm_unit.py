"""Unit tests of pure logic: the QEMU command line and the accelerator decision."""

import os
from pathlib import Path

import pytest

from harness.accel import decide
from harness.errors import HarnessError
from harness.image import Image
from harness.sharing.attach import HintRingAttachment, sharing_attachments
from harness.vm import VM, VMPaths, VMSpec, build_cmdline, qemu_opt


def fake_image(hints: bool = True) -> Image:
    root = Path("/img")
    return Image(root, root / "vmlinuz", root / "initrd.img", root / "rootfs.raw", root / "key",
                 "6.1.0-1-amd64", "abc", hints)


def opt(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_cmdline_shared_memfd_backend_and_ports():
    paths = VMPaths.in_folder(Path("/run/satori/vms/r1-a"))
    cmd = build_cmdline(VMSpec("a", memory_mb=768, vcpus=2), fake_image(), paths, "tcg", 40022, ram_fd=7)
    objs = opt(cmd, "-object")
    # guest RAM: the memfd QEMU inherits as fd 7, no name in /dev/shm or anywhere
    assert "memory-backend-file,id=ram0,size=768M,mem-path=/proc/self/fd/7,share=on,prealloc=off" in objs
    assert "pc,memory-backend=ram0" in opt(cmd, "-machine")
    assert opt(cmd, "-accel")[0].startswith("tcg")
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22" in opt(cmd, "-netdev")
    assert "virtio-balloon-pci,id=balloon0" in opt(cmd, "-device")
    assert opt(cmd, "-mon") == ["chardev=qmp0,mode=control", "chardev=qmp1,mode=control"]
    assert opt(cmd, "-smp") == ["2"]
    assert "satori.name=a" in opt(cmd, "-append")[0]
    # the VM alone knows nothing of hints
    assert not any("ivshmem" in d for d in opt(cmd, "-device"))
    with pytest.raises(HarnessError, match="memfd"):
        build_cmdline(VMSpec("a"), fake_image(), paths, "tcg", 1)


def test_cmdline_ksm_backend_and_throttle():
    paths = VMPaths.in_folder(Path("/r/vms/r1-b"))
    spec = VMSpec("b", ram_backend="ram-merge", disk_iops=200, disk_bps=10_000_000)
    cmd = build_cmdline(spec, fake_image(), paths, "kvm", 40023, kernel_args={"satori.hints": "0"})
    assert "memory-backend-ram,id=ram0,size=512M,merge=on" in opt(cmd, "-object")
    assert "satori.hints=0" in opt(cmd, "-append")[0]
    assert opt(cmd, "-accel") == ["kvm"] and opt(cmd, "-cpu") == ["host"]
    drive = opt(cmd, "-drive")[0]
    assert "throttling.iops-total=200" in drive and "throttling.bps-total=10000000" in drive


def test_commas_in_paths_cannot_inject_qemu_options():
    paths = VMPaths.in_folder(Path("/tmp/x,readonly=on,y/vms/r-a"))
    cmd = build_cmdline(VMSpec("a"), fake_image(), paths, "tcg", 1, ram_fd=3)
    assert opt(cmd, "-drive")[0].startswith("file=/tmp/x,,readonly=on,,y/vms/r-a/disk.qcow2,if=none")
    assert "socket,id=qmp0,path=/tmp/x,,readonly=on,,y/vms/r-a/qmp.sock,server=on,wait=off" in opt(cmd, "-chardev")
    assert "file,id=con0,path=/tmp/x,,readonly=on,,y/vms/r-a/console.log" in opt(cmd, "-chardev")
    assert qemu_opt("a,b") == "a,,b"


class _Recorder(VM):
    """A VM whose pre-launch hooks run without QEMU (the attachments' additions are recorded)."""

    def __init__(self, image) -> None:
        super().__init__(VMSpec("att"), image, run_id="r0")


def test_hint_ring_attachment_adds_device_memfd_and_kernel_arg(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_RUNTIME", str(tmp_path / "rt"))
    vm = _Recorder(fake_image(hints=True))
    try:
        HintRingAttachment(1 << 16).pre_launch(vm)
        fd = vm.memfd_number("ring")
        assert fd is not None and os.readlink(f"/proc/self/fd/{fd}") == "/memfd:satori-r0-att-ring (deleted)"
        assert os.fstat(fd).st_size == 1 << 16 and os.pread(fd, 8, 0) == b"SATORIHR"
        assert f"memory-backend-file,id=hintring,size=65536,mem-path=/proc/self/fd/{fd},share=on" in vm._args
        assert vm._kernel_args["satori.hints"] == "1"
    finally:
        vm.shutdown()
    assert vm.memfd_number("ring") is None
    # an image without the patched driver: no ring, the stock driver
    vm = _Recorder(fake_image(hints=False))
    HintRingAttachment().pre_launch(vm)
    assert vm._args == [] and vm._kernel_args["satori.hints"] == "0"
    assert [a.key for a in sharing_attachments(hints=True, agent=True)] == ["hint-ring", "merge-agent"]
    assert sharing_attachments(hints=False, agent=False) == []


@pytest.mark.parametrize("kw,match", [
    ({"name": "bad name"}, "letters"),
    ({"name": "a", "memory_mb": 8192}, "memory_mb"),
    ({"name": "../x"}, "letters"),
    ({"name": "a" * 40}, "letters"),
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
