"""Which accelerator a VM gets: KVM when it really boots a guest here, else TCG.

``/dev/kvm`` existing is not enough: on a nested PVM host (the ``kvm_pvm`` module) standard
guest kernels hang. So the decision is: the user's choice (``SATORI_ACCEL=kvm|tcg``) if any;
else no usable ``/dev/kvm`` -> TCG; ``kvm_pvm`` loaded -> TCG; else a short probe boots the
guest kernel under KVM and must see it reach user space within a few seconds. The probe's
verdict is cached per host boot (keyed by ``/proc/sys/kernel/random/boot_id``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import read_private, runtime_dir, write_private

PROBE_TIMEOUT_S = 20.0


@dataclasses.dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str

    def line(self) -> str:
        return f"accelerator: {self.accel.upper()} ({self.reason})"


def decide(
    override: str | None,
    kvm_usable: bool,
    pvm_loaded: bool,
    probe_ok: bool | None,
) -> AccelChoice:
    """Pure decision logic (unit tested). ``probe_ok`` None means no probe was run."""
    if override:
        o = override.strip().lower()
        if o not in ("kvm", "tcg", "auto"):
            raise ValueError(f"SATORI_ACCEL must be kvm, tcg or auto, not {override!r}")
        if o != "auto":
            return AccelChoice(o, "set by SATORI_ACCEL")
    if not kvm_usable:
        return AccelChoice("tcg", "/dev/kvm missing or not accessible")
    if pvm_loaded:
        return AccelChoice(
            "tcg", "/dev/kvm is a nested PVM (kvm_pvm loaded), which hangs standard guest kernels"
        )
    if probe_ok is None:
        return AccelChoice("kvm", "/dev/kvm present, not probed")
    if probe_ok:
        return AccelChoice("kvm", "KVM probe booted the guest kernel")
    return AccelChoice("tcg", f"KVM probe: the guest kernel did not boot within {PROBE_TIMEOUT_S:.0f} s")


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def pvm_loaded() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


def probe_kvm(kernel: Path, initrd: Path, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Boot ``kernel`` under KVM with ``rdinit`` powering off at once; True if it got to user space."""
    with tempfile.TemporaryDirectory(prefix="satori-kvm-probe-") as tmp:
        log = Path(tmp) / "console.log"
        cmd = [
            "qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none",
            "-no-user-config", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 rdinit=/bin/busybox -- echo satori-kvm-probe-ok",
            "-serial", f"file:{log}", "-no-reboot",
        ]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            return False
        deadline = time.monotonic() + timeout
        ok = False
        try:
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace") if log.exists() else ""
                if "Run /bin/busybox" in text or "satori-kvm-probe-ok" in text:
                    ok = True
                    break
                if proc.poll() is not None:
                    text = log.read_text(errors="replace") if log.exists() else ""
                    ok = "Run /bin/busybox" in text
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        return ok


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose_accel(kernel: Path | None = None, initrd: Path | None = None) -> AccelChoice:
    """The accelerator for VMs on this host (probing KVM once per host boot when needed)."""
    override = os.environ.get("SATORI_ACCEL")
    usable = kvm_usable()
    pvm = pvm_loaded()
    probe: bool | None = None
    if (not override or override.lower() == "auto") and usable and not pvm and kernel and initrd:
        cache = runtime_dir() / "kvm-probe.json"
        try:
            saved = json.loads(read_private(cache))
            if saved.get("boot_id") == _boot_id() and saved.get("kernel") == str(kernel):
                probe = bool(saved["ok"])
        except (OSError, ValueError, KeyError, AttributeError, HarnessError):
            pass
        if probe is None:
            probe = probe_kvm(kernel, initrd)
            write_private(cache, json.dumps({"boot_id": _boot_id(), "kernel": str(kernel), "ok": probe}))
    return decide(override, usable, pvm, probe)
