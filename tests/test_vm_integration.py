"""A real guest under QEMU: boot, SSH, QMP, the guest's page seen through the RAM file,
clean shutdown, and a clear error for a VM that cannot boot."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import find_in_ram
from harness.errors import BootError, HarnessError
from harness.vm import VM, VMSpec

pytestmark = pytest.mark.integration


def test_boot_ssh_qmp_and_ram_file(image):
    with VM(VMSpec("itest", memory_mb=384), image) as vm:
        assert vm.ssh.check("uname -r").strip() == image.abi
        assert vm.qmp("query-status")["status"] == "running"
        # the guest keeps a random page in its page cache (tmpfs); the host finds it in the RAM file
        marker = secrets.token_bytes(4096)
        vm.ssh.put(marker, "/tmp/marker")
        assert vm.ssh.get("/tmp/marker") == marker
        # the tmpfs page holds all 4096 bytes (transient copies may share only the start)
        assert find_in_ram(vm.ram, marker), "marker page not found whole in the guest RAM memfd"
        fd = vm.ram.open()
        assert os.fstat(fd).st_size == 384 << 20
        os.close(fd)
        pid, files = vm.pid, [vm.paths.qmp, vm.paths.work]
        assert all(p.exists() for p in files)
    # shut down: no process, no socket, no memfd (it had no name; its last holder is gone)
    assert not Path(f"/proc/{pid}").exists()
    assert not any(p.exists() for p in files)
    with pytest.raises(HarnessError):
        vm.ram.open()


def test_missing_kernel_fails_fast_with_clear_error(image, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(BootError) as ei:
        with VM(VMSpec("nokernel", kernel=tmp_path / "vmlinuz-missing"), image):
            pass
    assert time.monotonic() - t0 < 5
    assert "kernel not found" in str(ei.value) and "vmlinuz-missing" in str(ei.value)


def test_guest_that_does_not_boot_reports_console_and_cmdline(image, tmp_path):
    # a kernel that is not a kernel: QEMU refuses it at once; the error carries everything
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(b"\0" * 4096)
    t0 = time.monotonic()
    with pytest.raises(BootError) as ei:
        with VM(VMSpec("bogus", kernel=bogus, boot_timeout_s=60), image):
            pass
    msg = str(ei.value)
    assert time.monotonic() - t0 < 30
    assert "did not boot" in msg and "command line: qemu-system-x86_64" in msg
    assert "exit status" in msg


def test_cli_vm_up_ssh_qmp_down(image, tmp_path):
    # this tree's CLI (the `satori` script may point at another checkout)
    env_run = lambda *a: subprocess.run([sys.executable, "-m", "harness.cli", *a], capture_output=True,  # noqa: E731
                                        text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    try:
        r = env_run("vm", "up", "clitest", "--memory", "320")
        assert r.returncode == 0, r.stderr + r.stdout
        assert "accelerator:" in r.stdout
        r = env_run("vm", "ssh", "clitest", "--", "uname", "-r")
        assert r.returncode == 0 and r.stdout.strip() == image.abi, r.stderr
        r = env_run("vm", "qmp", "clitest", "query-status")
        assert r.returncode == 0 and json.loads(r.stdout)["status"] == "running"
        r = env_run("vm", "qmp", "clitest", "query-balloon")
        assert json.loads(r.stdout)["actual"] == 320 << 20
        r = env_run("vm", "ls", "--json")
        assert [s["name"] for s in json.loads(r.stdout)] == ["clitest"]
    finally:
        r = env_run("vm", "down", "clitest")
    assert r.returncode == 0, r.stderr
    assert json.loads(env_run("vm", "ls", "--json").stdout) == []
