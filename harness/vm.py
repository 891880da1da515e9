"""One QEMU VM's whole life: command line, files, launch, SSH and QMP, shutdown, cleanup.

A VM owns:

- its work folder ``<runtime>/vms/<run>-<name>/``: the qcow2 overlay over the image's base,
  the console log, two QMP sockets (``qmp.sock`` for the harness, ``qmp-manual.sock`` for a
  person or ``satori vm qmp``: a QMP socket serves one client at a time), ``state.json``;
- its guest RAM: ``/dev/shm/satori-<run>-<name>-ram``, a ``memory-backend-file,share=on``
  the host can mmap (or ``memory-backend-ram,merge=on`` in KSM modes);
- its hint ring ``/dev/shm/satori-<run>-<name>-ring`` (an ``ivshmem-plain`` BAR) when hints are on;
- the merge agent socket when sharing is on (the agent is LD_PRELOADed into QEMU).

:class:`VM` is a context manager: leaving it (normally, on error, on Ctrl-C) shuts QEMU down
and removes every one of those files. A VM that does not boot raises one :class:`BootError`
with the command line, QEMU's exit status and the console tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.accel import AccelChoice, choose_accel
from harness.errors import BootError, HarnessError, QMPError, SSHError, ToolMissing
from harness.image import Image
from harness.paths import runtime_dir, shm_dir
from harness.ssh import SSH, wait_banner

QEMU = "qemu-system-x86_64"
PAGE = 4096
MAX_LOWMEM_MB = 3072  # guest-physical address == RAM offset below the PCI hole of `pc`


@dataclasses.dataclass
class VMSpec:
    """What one VM is: everything the command line is derived from."""

    name: str
    memory_mb: int = 512
    vcpus: int = 1
    hints: bool = True  # hint ring + patched driver (if the image has it)
    ring_bytes: int = 4 << 20  # power of two: ivshmem needs it
    sharing: bool = False  # preload the merge agent
    ram_backend: str = "file"  # "file" (shared /dev/shm file) or "ram-merge" (KSM modes)
    disk_iops: int | None = None  # QEMU throttle group on the root disk
    disk_bps: int | None = None
    append: str = ""  # extra kernel command line
    kernel: Path | None = None  # override the image's kernel (tests)
    boot_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise HarnessError(f"VM name {self.name!r}: use letters, digits, '-' and '_' only")
        if not 64 <= self.memory_mb <= MAX_LOWMEM_MB:
            raise HarnessError(f"VM {self.name}: memory_mb must be 64..{MAX_LOWMEM_MB}, not {self.memory_mb}")
        if self.ring_bytes & (self.ring_bytes - 1) or self.ring_bytes < 8192:
            raise HarnessError(f"VM {self.name}: ring_bytes must be a power of two >= 8192")
        if self.ram_backend not in ("file", "ram-merge"):
            raise HarnessError(f"VM {self.name}: ram_backend must be 'file' or 'ram-merge'")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_run_id() -> str:
    return time.strftime("%H%M%S") + "-" + secrets.token_hex(2)


def _pdeathsig() -> None:
    """In the child before exec: die with the harness (foreground VMs only)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class VMPaths:
    work: Path
    overlay: Path
    console: Path
    qmp: Path
    qmp_manual: Path
    state: Path
    ram: Path
    ring: Path
    agent: Path

    @classmethod
    def make(cls, run_id: str, name: str) -> VMPaths:
        work = runtime_dir() / "vms" / f"{run_id}-{name}"
        shm = shm_dir()
        return cls(
            work=work,
            overlay=work / "disk.qcow2",
            console=work / "console.log",
            qmp=work / "qmp.sock",
            qmp_manual=work / "qmp-manual.sock",
            state=work / "state.json",
            ram=shm / f"satori-{run_id}-{name}-ram",
            ring=shm / f"satori-{run_id}-{name}-ring",
            agent=work / "agent.sock",
        )


def build_cmdline(
    spec: VMSpec,
    image: Image,
    paths: VMPaths,
    accel: str,
    ssh_port: int,
) -> list[str]:
    """The QEMU command line of one VM (pure: unit tested)."""
    mem = f"{spec.memory_mb}M"
    hints = spec.hints and image.hints
    if spec.ram_backend == "file":
        backend = f"memory-backend-file,id=ram0,size={mem},mem-path={paths.ram},share=on,prealloc=off"
    else:
        backend = f"memory-backend-ram,id=ram0,size={mem},merge=on"
    append = [
        "console=ttyS0", "root=/dev/vda", "rw", "quiet", "loglevel=4", "panic=-1",
        f"satori.name={spec.name}", f"satori.hints={1 if hints else 0}",
    ]
    if spec.append:
        append.append(spec.append)
    drive = f"file={paths.overlay},if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap"
    if spec.disk_iops or spec.disk_bps:
        drive += ",throttling.group=disk0tg"
        if spec.disk_iops:
            drive += f",throttling.iops-total={spec.disk_iops}"
        if spec.disk_bps:
            drive += f",throttling.bps-total={spec.disk_bps}"
    cmd = [
        QEMU,
        "-name", f"satori-{spec.name},process=satori-{spec.name}",
        "-machine", "pc,memory-backend=ram0",
        "-accel", "tcg,thread=multi,tb-size=256" if accel == "tcg" else accel,
        "-cpu", "max" if accel == "tcg" else "host",
        "-smp", str(spec.vcpus),
        "-m", mem,
        "-object", backend,
        "-kernel", str(spec.kernel or image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(append),
        "-drive", drive,
        "-device", "virtio-blk-pci,drive=disk0,id=vda",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.qmp_manual},server=on,wait=off",
        "-serial", f"file:{paths.console}",
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
    ]
    if hints:
        cmd += [
            "-object", f"memory-backend-file,id=hintring,size={spec.ring_bytes},mem-path={paths.ring},share=on",
            "-device", "ivshmem-plain,memdev=hintring,id=hintdev",
        ]
    return cmd


class VM:
    """A QEMU VM as a context manager. ``with VM(spec, image) as vm: vm.ssh.check('uname -r')``."""

    def __init__(
        self,
        spec: VMSpec,
        image: Image,
        run_id: str | None = None,
        accel: AccelChoice | None = None,
        detach: bool = False,
        log=print,
    ) -> None:
        self.spec = spec
        self.image = image
        self.run_id = run_id or new_run_id()
        self.paths = VMPaths.make(self.run_id, spec.name)
        self.accel = accel
        self.detach = detach
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.ssh_port: int | None = None
        self.cmdline: list[str] = []
        self._qmp: QEMUMonitorProtocol | None = None
        self._ssh: SSH | None = None
        self.boot_seconds: float | None = None
        self._qmp_lock = threading.Lock()  # the engine, the sampler and the surplus manager share QMP

    # ------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ram_path(self) -> Path:
        return self.paths.ram

    @property
    def ram_size(self) -> int:
        return self.spec.memory_mb << 20

    @property
    def ring_path(self) -> Path | None:
        return self.paths.ring if (self.spec.hints and self.image.hints) else None

    @property
    def agent_socket(self) -> Path | None:
        return self.paths.agent if self.spec.sharing else None

    @property
    def ssh(self) -> SSH:
        if self._ssh is None:
            if self.ssh_port is None:
                raise SSHError(f"VM {self.name} is not running")
            self._ssh = SSH(self.ssh_port, self.image.key)
        return self._ssh

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _check_inputs(self) -> None:
        if shutil.which(QEMU) is None:
            raise ToolMissing(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        if shutil.which("qemu-img") is None:
            raise ToolMissing("qemu-img is not installed (apt-get install qemu-utils)")
        kernel = self.spec.kernel or self.image.kernel
        for what, p in (("kernel", kernel), ("initrd", self.image.initrd), ("base image", self.image.rootfs)):
            if not Path(p).is_file():
                raise BootError(f"VM {self.name}: {what} not found: {p}")
        if self.paths.work.exists():
            raise BootError(f"VM {self.name}: work folder {self.paths.work} exists (a VM of this name runs?)")

    def start(self) -> None:
        """Launch QEMU and wait until the guest's sshd answers."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Create the VM's files and start QEMU (detached in its own session); do not wait."""
        self._check_inputs()
        if self.accel is None:
            self.accel = choose_accel(self.image.kernel, self.image.initrd)
        self.paths.work.mkdir(parents=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.rootfs),
             str(self.paths.overlay)],
            check=True, capture_output=True,
        )
        env = dict(os.environ)
        if self.spec.hints and self.image.hints:
            from harness import hints

            hints.create_ring_file(self.paths.ring, self.spec.ring_bytes)
        if self.spec.sharing:
            from harness.sharing import agent

            if self.spec.ram_backend == "file":
                env.update(agent.agent_env(self.paths.agent, self.paths.ram))
            else:  # anonymous RAM (satori+ksm): the agent finds the RAM block by its size
                env.update(agent.agent_env(self.paths.agent, None, ram_size=self.ram_size))
        from harness.oracle import tracker_env

        env = tracker_env(env)  # the oracle's write tracker (harness/wptrack.c), every mode
        for attempt in range(3):
            self.ssh_port = free_port()
            self.cmdline = build_cmdline(self.spec, self.image, self.paths, self.accel.accel, self.ssh_port)
            with open(self.paths.work / "qemu.log", "wb") as qemu_log:
                self._t_launch = time.monotonic()
                self.proc = subprocess.Popen(
                    self.cmdline,
                    stdin=subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C at the terminal reaches the harness, not QEMU
                    preexec_fn=None if self.detach else _pdeathsig,
                    cwd=self.paths.work,
                )
            self.pid = self.proc.pid
            self._save_state()
            time.sleep(0.3)
            if self.proc.poll() is not None and "hostfwd" in self._qemu_log() and attempt < 2:
                continue  # the free port was taken meanwhile: try another
            break

    def wait_ready(self) -> None:
        """Wait for the SSH banner, then log in; a dead or silent VM raises :class:`BootError`."""
        assert self.proc is not None and self.ssh_port is not None, "launch() first"
        try:
            wait_banner(self.ssh_port, self.spec.boot_timeout_s, alive=lambda: self.proc.poll() is None)
            self.ssh.connect()
        except SSHError as e:
            raise self._boot_error(str(e)) from None
        self.boot_seconds = time.monotonic() - self._t_launch
        self._save_state()

    def _qemu_log(self) -> str:
        try:
            return (self.paths.work / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.paths.console.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no console output)"

    def _boot_error(self, why: str) -> BootError:
        status = "running" if self.proc and self.proc.poll() is None else f"exit status {self.proc.returncode if self.proc else '?'}"
        ctx = (
            f"command line: {' '.join(self.cmdline)}\n"
            f"QEMU: {status}\n"
            f"QEMU output:\n{self._qemu_log()[-2000:].strip() or '(none)'}\n"
            f"console tail ({self.paths.console}):\n{self.console_tail()}"
        )
        return BootError(f"VM {self.name} did not boot: {why}", context=ctx)

    def _save_state(self) -> None:
        state = {
            "name": self.name,
            "run_id": self.run_id,
            "pid": self.pid,
            "ssh_port": self.ssh_port,
            "qmp": str(self.paths.qmp),
            "qmp_manual": str(self.paths.qmp_manual),
            "console": str(self.paths.console),
            "ram": str(self.paths.ram),
            "ram_size": self.ram_size,
            "ring": str(self.ring_path) if self.ring_path else None,
            "agent": str(self.agent_socket) if self.agent_socket else None,
            "key": str(self.image.key),
            "image": str(self.image.root),
            "accel": self.accel.accel if self.accel else None,
            "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.spec).items()},
            "cmdline": self.cmdline,
            "boot_seconds": self.boot_seconds,
        }
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(self.paths.state)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------ QMP
    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command on the harness's socket; return its ``return`` value."""
        with self._qmp_lock:
            if self._qmp is None:
                self._qmp = qmp_connect(self.paths.qmp)
            try:
                reply = self._qmp.cmd_raw(command, args or None)
            except Exception as e:  # noqa: BLE001 - qemu.qmp raises several types
                raise QMPError(f"VM {self.name}: QMP {command} failed: {e}") from None
        if "error" in reply:
            raise QMPError(f"VM {self.name}: QMP {command}: {reply['error'].get('desc')}", context=json.dumps(reply))
        return reply.get("return")

    # ------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove every file of the VM."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp("quit")
            _wait_or_kill(self.proc, timeout)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        remove_vm_files([self.paths.ram, self.paths.ring], self.paths.work)


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_all(vms: list[VM]) -> None:
    """Boot several VMs at once (launch all, then wait for each); on failure stop them all."""
    try:
        for vm in vms:
            if vm.accel is None and vms[0].accel is not None:
                vm.accel = vms[0].accel
            vm.launch()
        for vm in vms:
            vm.wait_ready()
    except BaseException:
        for vm in vms:
            vm.shutdown()
        raise


def harness_leftovers() -> list[str]:
    """QEMU processes, /dev/shm files and VM folders of the harness that exist now."""
    left = [f"shm: {p}" for p in shm_dir().glob("satori-*")]
    vms = runtime_dir() / "vms"
    if vms.exists():
        left += [f"vm folder: {p}" for p in vms.iterdir()]
    # QEMUs of this runtime folder (their QMP sockets live there)
    out = subprocess.run(["pgrep", "-a", "-f", f"^{QEMU} .*{runtime_dir()}/"], capture_output=True,
                         text=True).stdout
    left += [f"process: {line[:160]}" for line in out.splitlines()]
    return left


def remove_vm_files(shm_files: list[Path | str | None], work: Path | str) -> None:
    """Remove a VM's /dev/shm files (RAM, hint ring) and its work folder; missing ones are fine."""
    for p in shm_files:
        if p:
            with contextlib.suppress(FileNotFoundError):
                Path(p).unlink()
    shutil.rmtree(work, ignore_errors=True)


def qmp_connect(sock: Path, timeout: float = 10.0) -> QEMUMonitorProtocol:
    """Connect to a QMP unix socket (waiting for QEMU to create it) and negotiate."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if sock.exists():
            # the sync shim runs the thread's current event loop: give each connection one of its
            # own, so that connections used from different threads (the engine's stop/cont, the
            # sampler's balloon queries) never run one loop twice at once
            asyncio.set_event_loop(asyncio.new_event_loop())
            q = QEMUMonitorProtocol(str(sock))
            try:
                q.connect(negotiate=True)
                return q
            except Exception as e:  # noqa: BLE001
                last = e
                with contextlib.suppress(Exception):
                    q.close()
        time.sleep(0.1)
    raise QMPError(f"cannot connect to QMP socket {sock}: {last or 'socket never appeared'}")


# ---------------------------------------------------------------- background VMs (CLI)


def vms_dir() -> Path:
    d = runtime_dir() / "vms"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_states() -> list[dict]:
    """State of every VM started in the background whose folder still exists."""
    out = []
    for f in sorted(vms_dir().glob("*/state.json")):
        try:
            s = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        s["alive"] = _pid_alive(s.get("pid"))
        s["work"] = str(f.parent)
        out.append(s)
    return out


def find_state(name: str) -> dict:
    matches = [s for s in load_states() if s["name"] == name]
    if not matches:
        raise HarnessError(f"no VM named {name!r} (see 'satori vm ls')")
    return matches[-1]


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_background(state: dict, timeout: float = 15.0) -> None:
    """Stop a VM started with ``satori vm up`` and remove its files."""
    pid = state.get("pid")
    if _pid_alive(pid):
        with contextlib.suppress(Exception):
            q = qmp_connect(Path(state["qmp"]), timeout=3)
            q.cmd_raw("quit")
            q.close()
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _pid_alive(pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            time.sleep(1)
    remove_vm_files([state.get("ram"), state.get("ring")], state["work"])
