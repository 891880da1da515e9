"""One QEMU VM's whole life: command line, files, launch, SSH and QMP, shutdown, cleanup.

A VM owns:

- its work folder ``<runtime>/vms/<run>-<name>/`` (0700): the qcow2 overlay over the image's
  base, the console log, QEMU's own output, two QMP sockets (``qmp.sock`` for the harness,
  ``qmp-manual.sock`` for a person or ``satori vm qmp``: a QMP socket serves one client at a
  time), ``state.json``;
- its guest RAM: a memfd (no name anyone could open, see ``harness.memfd``) passed to QEMU as
  ``memory-backend-file,share=on,mem-path=/proc/self/fd/<n>``, reached by other processes as
  :attr:`VM.ram` (a :class:`harness.memfd.ProcFile`: ``/proc/<qemu pid>/fd/<n>``, checked);
  or ``memory-backend-ram,merge=on`` in KSM modes (no file at all);
- whatever its *attachments* add. The VM knows nothing of sharing: the hint ring, the merge
  agent or any preload are :class:`Attachment` objects the sharing package hands it. Before
  launch each adds QEMU arguments, environment, kernel arguments and memfds (passed to QEMU,
  recorded in ``state.json``, reachable as :meth:`VM.memfile`), like ``QEMUMachine.add_args``
  and its pre-launch/post-shutdown hooks.

:class:`VM` is a context manager: leaving it (normally, on error, on Ctrl-C) shuts QEMU down
and removes every one of those files. A VM that does not boot raises one :class:`BootError`
with the command line, QEMU's exit status and the console tail.

Background VMs (``satori vm up``) are found again through their ``state.json``, which is
validated before anything in it is used (:func:`load_states`), and a pid from it is only ever
signalled after checking that it is still that VM's QEMU (:func:`is_vm_qemu`: start time,
program and work folder).
"""

from __future__ import annotations

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

from harness import memfd
from harness import qmp as qmp_mod
from harness.accel import AccelChoice, choose_accel
from harness.errors import BootError, HarnessError, QMPError, SSHError, ToolMissing
from harness.image import Image
from harness.memfd import ProcFile
from harness.paths import read_private, runtime_dir, write_private
from harness.ssh import SSH, wait_banner

QEMU = "qemu-system-x86_64"
PAGE = 4096
MAX_LOWMEM_MB = 3072  # guest-physical address == RAM offset below the PCI hole of `pc`
QMP_TIMEOUT_S = 10.0  # every QMP request of the harness (a stuck monitor cannot hold a lock)
NAME_MAX = 32


def check_name(name: str) -> str:
    """A VM name: letters, digits, '-' and '_' (it becomes part of paths and QEMU options)."""
    if (not isinstance(name, str) or not name or len(name) > NAME_MAX
            or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name)):
        raise HarnessError(f"VM name {name!r}: use 1..{NAME_MAX} letters, digits, '-' and '_' only")
    return name


def qemu_opt(value: str | os.PathLike) -> str:
    """A value inside a QEMU ``key=value,...`` option: ``,`` is written ``,,``."""
    return os.fspath(value).replace(",", ",,")


@dataclasses.dataclass
class VMSpec:
    """What one VM is: everything the base command line is derived from."""

    name: str
    memory_mb: int = 512
    vcpus: int = 1
    ram_backend: str = "file"  # "file" (a shared memfd the host can read) or "ram-merge" (KSM modes)
    disk_iops: int | None = None  # QEMU throttle group on the root disk
    disk_bps: int | None = None
    append: str = ""  # extra kernel command line
    kernel: Path | None = None  # override the image's kernel (tests)
    boot_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 64 <= self.memory_mb <= MAX_LOWMEM_MB:
            raise HarnessError(f"VM {self.name}: memory_mb must be 64..{MAX_LOWMEM_MB}, not {self.memory_mb}")
        if self.ram_backend not in ("file", "ram-merge"):
            raise HarnessError(f"VM {self.name}: ram_backend must be 'file' or 'ram-merge'")


class Attachment:
    """Something a VM carries without understanding it (the hint ring, the merge agent, a
    preload, a device). Subclasses override the hooks they need:

    - :meth:`pre_launch`: the work folder exists, QEMU does not; add arguments
      (:meth:`VM.add_args`), environment (:meth:`VM.set_env`), kernel arguments
      (:meth:`VM.set_kernel_arg`), memfds (:meth:`VM.add_memfd`), files in the work folder;
    - :meth:`post_launch`: QEMU runs (the guest may not be up yet);
    - :meth:`post_shutdown`: QEMU is gone; remove what :meth:`pre_launch` made outside the work
      folder (the work folder itself is removed by the VM);
    - :meth:`state`: strings and integers recorded in ``state.json`` under ``attached[key]``,
      for other processes (an agent's socket path).
    """

    key = "attachment"

    def pre_launch(self, vm: VM) -> None:  # noqa: B027 - optional hook
        pass

    def post_launch(self, vm: VM) -> None:  # noqa: B027 - optional hook
        pass

    def post_shutdown(self, vm: VM) -> None:  # noqa: B027 - optional hook
        pass

    def state(self, vm: VM) -> dict[str, str | int | None]:
        return {}

    def host_memory(self, vm: VM) -> int:
        """Bytes of host memory this attachment may take (checked before boot)."""
        return 0


HOST_RESERVE = 256 << 20  # host memory left free for the harness and the system
DISK_PER_VM = 256 << 20  # room for one VM's qcow2 overlay (its guest's writes) and logs


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def check_host_room(vms: list[VM]) -> None:
    """Before boot: the host has the memory these VMs may use (guest RAM, the attachments'
    memfds such as hint rings, a content store estimate) and the runtime folder room for their
    overlays; else one clear :class:`HarnessError` (a guest that runs out later dies by SIGBUS
    or the OOM killer, in the middle of a measurement)."""
    if not vms:
        return
    need = sum(vm.host_memory() for vm in vms)
    avail = _mem_available()
    if need + HOST_RESERVE > avail:
        parts = ", ".join(f"{vm.name} {vm.host_memory() >> 20} MB" for vm in vms)
        raise HarnessError(
            f"not enough host memory: the VMs need {need >> 20} MB ({parts}: guest RAM, hint rings, "
            f"a content store estimate) and {HOST_RESERVE >> 20} MB stay free, but only "
            f"{avail >> 20} MB are available (MemAvailable); stop other VMs or use less memory_mb")
    folder = vms[0].paths.work.parent
    st = os.statvfs(folder)
    free, want = st.f_bavail * st.f_frsize, DISK_PER_VM * len(vms)
    if free < want:
        raise HarnessError(
            f"not enough room in {folder}: {free >> 20} MB free, {want >> 20} MB wanted for "
            f"{len(vms)} VM overlays and logs (SATORI_RUNTIME chooses the folder)")


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
    qemu_log: Path
    qmp: Path
    qmp_manual: Path
    state: Path

    @classmethod
    def make(cls, run_id: str, name: str) -> VMPaths:
        return cls.in_folder(vms_dir() / f"{run_id}-{name}")

    @classmethod
    def in_folder(cls, work: Path) -> VMPaths:
        return cls(
            work=work,
            overlay=work / "disk.qcow2",
            console=work / "console.log",
            qemu_log=work / "qemu.log",
            qmp=work / "qmp.sock",
            qmp_manual=work / "qmp-manual.sock",
            state=work / "state.json",
        )


def build_cmdline(
    spec: VMSpec,
    image: Image,
    paths: VMPaths,
    accel: str,
    ssh_port: int,
    ram_fd: int | None = None,
    kernel_args: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    device_memory: int = 0,
) -> list[str]:
    """The QEMU command line of one VM (pure: unit tested). ``ram_fd``: the fd number of the
    guest RAM memfd QEMU inherits (``ram_backend="file"``). ``device_memory``: bytes of memory
    devices (virtio-pmem) the attachments plug: ``-m`` then has one slot and ``maxmem``
    (QEMU places device memory above 4 GiB: guest RAM keeps gpa == RAM offset)."""
    mem = f"{spec.memory_mb}M"
    mem_opt = mem
    if device_memory:
        mem_opt += f",slots=1,maxmem={(spec.memory_mb << 20) + device_memory}"
    if spec.ram_backend == "file":
        if ram_fd is None:
            raise HarnessError(f"VM {spec.name}: a shared RAM backend needs its memfd")
        backend = f"memory-backend-file,id=ram0,size={mem},mem-path=/proc/self/fd/{ram_fd},share=on,prealloc=off"
    else:
        backend = f"memory-backend-ram,id=ram0,size={mem},merge=on"
    append = [
        "console=ttyS0", "root=/dev/vda", "rw", "quiet", "loglevel=4", "panic=-1",
        f"satori.name={spec.name}",
    ]
    append += [f"{k}={v}" for k, v in (kernel_args or {}).items()]
    if spec.append:
        append.append(spec.append)
    drive = f"file={qemu_opt(paths.overlay)},if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap"
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
        "-m", mem_opt,
        "-object", backend,
        "-kernel", str(spec.kernel or image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(append),
        "-drive", drive,
        "-device", "virtio-blk-pci,drive=disk0,id=vda",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-chardev", f"socket,id=qmp0,path={qemu_opt(paths.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=qmp1,path={qemu_opt(paths.qmp_manual)},server=on,wait=off",
        "-mon", "chardev=qmp1,mode=control",
        "-chardev", f"file,id=con0,path={qemu_opt(paths.console)}",
        "-serial", "chardev:con0",
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
    ]
    return cmd + list(extra_args or [])


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
        attachments: list[Attachment] | None = None,
    ) -> None:
        self.spec = spec
        self.image = image
        self.run_id = run_id or new_run_id()
        self.paths = VMPaths.make(self.run_id, spec.name)
        self.accel = accel
        self.detach = detach
        self.log = log
        self.attachments = list(attachments or [])
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.start_time: int | None = None  # of the QEMU process (with pid: its identity)
        self.ssh_port: int | None = None
        self.cmdline: list[str] = []
        self._qmp: qmp_mod.QMPConnection | None = None
        self._ssh: SSH | None = None
        self.boot_seconds: float | None = None
        self._qmp_lock = threading.Lock()  # the engine, the sampler and the surplus manager share QMP
        # what attachments (and the RAM backend) add before launch
        self._args: list[str] = []
        self._env: dict[str, str] = {}
        self._kernel_args: dict[str, str] = {"satori.hints": "0"}  # the image's stock disk driver
        self._preloads: list[str] = []  # libraries QEMU preloads, in order
        self._device_memory = 0  # bytes of memory devices (virtio-pmem)
        self._memfds: dict[str, tuple[int, str, int]] = {}  # key -> (our fd, memfd name, size)
        self.memfiles: dict[str, ProcFile] = {}  # key -> how other processes reach it
        self._launched_attachments: list[Attachment] = []
        self._room_checked = False  # start_all checks all its VMs at once

    # ------------------------------------------------------------ attachments' API
    def add_args(self, *args: str) -> None:
        """Extra QEMU arguments (before launch)."""
        self._args.extend(args)

    def set_env(self, name: str, value: str) -> None:
        """An environment variable of the QEMU process (before launch)."""
        self._env[name] = value

    def add_preload(self, lib: str | os.PathLike) -> None:
        """A shared library QEMU preloads: ``LD_PRELOAD`` is the attachments' libraries in the
        order they were added, then any ``LD_PRELOAD`` set with :meth:`set_env` or inherited."""
        path = os.fspath(lib)
        if ":" in path or any(c.isspace() for c in path):
            raise HarnessError(f"preload {path}: no ':' or spaces in the path")
        self._preloads.append(path)

    def launch_env(self) -> dict[str, str]:
        """QEMU's environment: the harness's, the attachments' variables, ``LD_PRELOAD``."""
        env = dict(os.environ) | self._env
        if self._preloads:
            env["LD_PRELOAD"] = ":".join([*self._preloads, *filter(None, [env.get("LD_PRELOAD")])])
        return env

    def add_device_memory(self, size: int) -> None:
        """Room for a memory device (virtio-pmem) of ``size`` bytes (before launch)."""
        if size <= 0 or size % PAGE:
            raise HarnessError(f"VM {self.name}: device memory must be whole pages, not {size}")
        self._device_memory += size

    def set_kernel_arg(self, key: str, value: str) -> None:
        """``key=value`` on the guest kernel command line (replaces an earlier value of key)."""
        if not key or any(c.isspace() for c in key + value):
            raise HarnessError(f"kernel argument {key}={value}: no spaces")
        self._kernel_args[key] = value

    def add_memfd(self, key: str, size: int) -> int:
        """A new memfd of ``size`` bytes that QEMU inherits at the same fd number (name it
        ``/proc/self/fd/<n>`` in QEMU options). Returns the fd (the VM owns and closes it);
        after launch other processes reach it as :meth:`memfile` ``(key)``."""
        check_name(key)
        if key in self._memfds:
            raise HarnessError(f"VM {self.name}: memfd {key} exists")
        name = f"satori-{self.run_id}-{self.name}-{key}"
        fd = memfd.create(name, size)
        self._memfds[key] = (fd, name, size)
        return fd

    def memfd_number(self, key: str) -> int | None:
        """The fd number QEMU has (or will have) for memfd ``key``."""
        entry = self._memfds.get(key)
        return entry[0] if entry else None

    def memfile(self, key: str) -> ProcFile | None:
        """Memfd ``key`` as any process reaches it (``/proc/<qemu pid>/fd/<n>``), once launched."""
        return self.memfiles.get(key)

    def attached(self, key: str) -> Attachment | None:
        return next((a for a in self.attachments if a.key == key), None)

    # ------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ram(self) -> ProcFile | None:
        """The guest RAM memfd (None for an anonymous RAM backend)."""
        return self.memfiles.get("ram")

    @property
    def ram_size(self) -> int:
        return self.spec.memory_mb << 20

    def host_memory(self) -> int:
        """Host memory this VM may take: its RAM and what its attachments add."""
        return self.ram_size + sum(a.host_memory(self) for a in self.attachments)

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
        if os.path.lexists(self.paths.work):
            raise BootError(f"VM {self.name}: work folder {self.paths.work} exists (a VM of this name runs?)")

    def start(self) -> None:
        """Launch QEMU and wait until the guest's sshd answers."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Create the VM's files and start QEMU (detached in its own session); do not wait."""
        self._check_inputs()
        if not self._room_checked:
            check_host_room([self])
        if self.accel is None:
            self.accel = choose_accel(self.image.kernel, self.image.initrd)
        try:
            os.mkdir(self.paths.work, 0o700)  # exclusive: never a folder someone made before
        except FileExistsError:
            raise BootError(f"VM {self.name}: work folder {self.paths.work} exists") from None
        r = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.rootfs),
             str(self.paths.overlay)],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            raise BootError(f"VM {self.name}: qemu-img create failed: {r.stderr.strip()}")
        os.chmod(self.paths.overlay, 0o600)
        if self.spec.ram_backend == "file":
            self.add_memfd("ram", self.ram_size)
        for a in self.attachments:
            self._launched_attachments.append(a)
            a.pre_launch(self)
        from harness.oracle import tracker_env

        # the oracle's write tracker (harness/wptrack.c) in every QEMU, after the attachments' preloads
        env = tracker_env(self.launch_env())
        fds = tuple(fd for fd, _, _ in self._memfds.values())
        for attempt in range(3):
            self.ssh_port = free_port()
            self.cmdline = build_cmdline(self.spec, self.image, self.paths, self.accel.accel,
                                         self.ssh_port, self.memfd_number("ram"),
                                         self._kernel_args, self._args, self._device_memory)
            fd_log = os.open(self.paths.qemu_log,
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                self._t_launch = time.monotonic()
                self.proc = subprocess.Popen(
                    self.cmdline,
                    stdin=subprocess.DEVNULL,
                    stdout=fd_log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=fds,
                    start_new_session=True,  # Ctrl-C at the terminal reaches the harness, not QEMU
                    umask=0o077,  # sockets, console log: QEMU's files are the user's only
                    preexec_fn=None if self.detach else _pdeathsig,
                    cwd=self.paths.work,
                )
            finally:
                os.close(fd_log)
            self.pid = self.proc.pid
            self.start_time = memfd.start_time(self.pid)
            self.memfiles = {k: ProcFile(self.pid, fd, name, self.start_time or 0, size)
                             for k, (fd, name, size) in self._memfds.items()}
            self._save_state()
            time.sleep(0.3)
            if self.proc.poll() is not None and "hostfwd" in self._qemu_log() and attempt < 2:
                continue  # the free port was taken meanwhile: try another
            break
        for a in self.attachments:
            a.post_launch(self)

    def wait_ready(self) -> None:
        """Wait for the SSH banner, then log in; a dead or silent VM raises :class:`BootError`."""
        assert self.proc is not None and self.ssh_port is not None, "launch() first"
        try:
            wait_banner(self.ssh_port, self.spec.boot_timeout_s, alive=lambda: self.proc.poll() is None)
            # a loaded host's guest sends its banner, then takes long over key exchange: the
            # login gets what is left of the boot timeout (at least a minute), not 30 s
            left = self.spec.boot_timeout_s - (time.monotonic() - self._t_launch)
            self.ssh.connect(timeout=max(60.0, left))
        except SSHError as e:
            raise self._boot_error(str(e)) from None
        self.boot_seconds = time.monotonic() - self._t_launch
        self._save_state()

    def _qemu_log(self) -> str:
        try:
            return self.paths.qemu_log.read_text(errors="replace")
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
            "version": STATE_VERSION,
            "name": self.name,
            "run_id": self.run_id,
            "pid": self.pid,
            "start": self.start_time,
            "exe": memfd.exe(self.pid) if self.pid else None,
            "ssh_port": self.ssh_port,
            "ram_size": self.ram_size,
            "memfiles": {k: v.as_dict() for k, v in self.memfiles.items()},
            "attached": {a.key: a.state(self) for a in self.attachments},
            "key": str(self.image.key),
            "image": str(self.image.root),
            "accel": self.accel.accel if self.accel else None,
            "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.spec).items()},
            "cmdline": self.cmdline,
            "boot_seconds": self.boot_seconds,
        }
        write_private(self.paths.state, json.dumps(state, indent=2))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------ QMP
    def qmp(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Run a QMP command on the harness's socket; return its ``return`` value. Bounded by
        ``timeout`` (default :data:`QMP_TIMEOUT_S`): a stuck QEMU raises
        :class:`harness.qmp.QMPTimeout` and releases the lock."""
        with self._qmp_lock:
            if self._qmp is None:
                self._qmp = qmp_mod.connect(self.paths.qmp, timeout=QMP_TIMEOUT_S, name=f"VM {self.name}")
            reply = self._qmp.cmd_raw(command, args or None, timeout)
        if "error" in reply:
            raise QMPError(f"VM {self.name}: QMP {command}: {reply['error'].get('desc')}", context=json.dumps(reply))
        return reply.get("return")

    def cont(self) -> None:
        """Resume the vCPUs and check they run (``cont`` retried, verified with query-status)."""
        qmp_mod.cont(self.qmp, self.name)

    # ------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove every file of the VM."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp("quit", timeout=3.0)
            _wait_or_kill(self.proc, timeout)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        for fd, _, _ in self._memfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._memfds = {}
        for a in reversed(self._launched_attachments):
            with contextlib.suppress(Exception):
                a.post_shutdown(self)
        self._launched_attachments = []
        shutil.rmtree(self.paths.work, ignore_errors=True)


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
        check_host_room(vms)
        for vm in vms:
            vm._room_checked = True
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


def own_memfds() -> list[str]:
    """The harness memfds (``satori-*``) this process holds open now."""
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            name = memfd.fd_name(int(fd))
            if name and name.startswith("satori-"):
                out.append(f"fd {fd}: {name}")
    return out


def harness_leftovers() -> list[str]:
    """What the harness made and did not remove, for this runtime folder: QEMU processes, VM
    folders, status files of sharing engines, and memfds this process still holds."""
    root = runtime_dir()
    left = []
    vms = root / "vms"
    if vms.exists():
        left += [f"vm folder: {p}" for p in vms.iterdir()]
    left += [f"status file: {p}" for p in root.glob("share-*.json")]
    left += [f"memfd: {m}" for m in own_memfds()]
    # QEMUs of this runtime folder (their QMP sockets live there)
    out = subprocess.run(["pgrep", "-a", "-f", f"^{QEMU} .*{root}/"], capture_output=True,
                         text=True).stdout
    left += [f"process: {line[:160]}" for line in out.splitlines()]
    return left


def qmp_connect(sock: Path, timeout: float = 10.0) -> qmp_mod.QMPConnection:
    """Connect to a QMP unix socket (waiting for QEMU to create it); every request on the
    connection is bounded by :data:`QMP_TIMEOUT_S`."""
    return qmp_mod.connect(sock, timeout=QMP_TIMEOUT_S, wait=timeout)


# ---------------------------------------------------------------- background VMs (CLI)

STATE_VERSION = 2
_STATE_KEYS = {
    "version": int, "name": str, "run_id": str, "pid": int, "start": int, "exe": str,
    "ssh_port": int, "ram_size": int, "memfiles": dict, "attached": dict, "key": str,
    "image": str, "accel": str, "spec": dict, "cmdline": list, "boot_seconds": float,
}
_NULLABLE = {"ssh_port", "accel", "boot_seconds", "exe", "start", "pid"}
_SPEC_KEYS = {
    "name": str, "memory_mb": int, "vcpus": int, "ram_backend": str, "disk_iops": int,
    "disk_bps": int, "append": str, "kernel": str, "boot_timeout_s": float,
}
_SPEC_NULLABLE = {"disk_iops", "disk_bps", "kernel"}


def vms_dir() -> Path:
    d = runtime_dir() / "vms"
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o700)
    if d.is_symlink() or not d.is_dir():
        raise HarnessError(f"{d} is not a folder")
    return d


def _typed(value: Any, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def validate_state(state: Any, work: Path) -> dict:
    """Check a ``state.json`` against what :meth:`VM._save_state` writes: known keys, types,
    the VM name and folder agree, memfd refs well formed, attachment values strings or
    integers. Returns the state with ``work`` (the folder it was found in) added; raises
    :class:`HarnessError` naming the problem."""
    where = f"{work / 'state.json'}"
    if not isinstance(state, dict):
        raise HarnessError(f"{where}: not a JSON object")
    if set(state) != set(_STATE_KEYS):
        extra, missing = set(state) - set(_STATE_KEYS), set(_STATE_KEYS) - set(state)
        raise HarnessError(f"{where}: unexpected keys {sorted(extra)} / missing {sorted(missing)}")
    for k, kind in _STATE_KEYS.items():
        if state[k] is None and k in _NULLABLE:
            continue
        if not _typed(state[k], kind):
            raise HarnessError(f"{where}: {k} must be {kind.__name__}")
    if state["version"] != STATE_VERSION:
        raise HarnessError(f"{where}: state version {state['version']}, expected {STATE_VERSION}")
    check_name(state["name"])
    if work.name != f"{state['run_id']}-{state['name']}":
        raise HarnessError(f"{where}: names VM {state['name']} of run {state['run_id']}, not its folder")
    spec = state["spec"]
    if set(spec) != set(_SPEC_KEYS) or spec.get("name") != state["name"]:
        raise HarnessError(f"{where}: bad spec")
    for k, kind in _SPEC_KEYS.items():
        if not (spec[k] is None and k in _SPEC_NULLABLE) and not _typed(spec[k], kind):
            raise HarnessError(f"{where}: spec.{k} must be {kind.__name__}")
    for k, v in state["memfiles"].items():
        check_name(k)
        ref = ProcFile.from_dict(v, f"{where}: memfile {k}")
        if (ref.pid, ref.start) != (state["pid"], state["start"]):
            raise HarnessError(f"{where}: memfile {k} is not held by the VM's QEMU")
    for k, v in state["attached"].items():
        check_name(k)
        if not isinstance(v, dict) or not all(
                isinstance(kk, str) and (v2 is None or type(v2) in (str, int)) for kk, v2 in v.items()):
            raise HarnessError(f"{where}: attached.{k} must map names to strings or integers")
    if state["pid"] is not None and state["pid"] <= 0:
        raise HarnessError(f"{where}: bad pid")
    if not all(isinstance(a, str) for a in state["cmdline"]):
        raise HarnessError(f"{where}: bad cmdline")
    return state | {"work": str(work)}


def is_vm_qemu(state: dict) -> bool:
    """Whether the pid in a (validated) state is still that VM's QEMU: same start time as at
    launch, a QEMU program, and its command line names the VM's own QMP socket. Never true for
    an unrelated process that got the pid later."""
    pid = state.get("pid")
    if not pid or not memfd.same_process(pid, state.get("start")):
        return False
    exe = memfd.exe(pid)
    if exe is None or not os.path.basename(exe).startswith("qemu-system-") or exe != state.get("exe"):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = qemu_opt(VMPaths.in_folder(Path(state["work"])).qmp).encode()
    return any(want in a for a in argv)


def load_states(problems: list[str] | None = None) -> list[dict]:
    """State of every VM started in the background whose folder still exists, validated.
    A state that fails validation is left out (and described in ``problems`` if given): nothing
    in it is used, no pid in it is signalled."""
    out = []
    for work in sorted(vms_dir().iterdir()):
        f = work / "state.json"
        try:
            if work.is_symlink() or not work.is_dir():
                raise HarnessError(f"{work}: not a folder")
            s = validate_state(json.loads(read_private(f)), work)
        except FileNotFoundError:
            if problems is not None:
                problems.append(f"{work}: no state.json")
            continue
        except (HarnessError, OSError, ValueError) as e:
            if problems is not None:
                problems.append(str(e) if isinstance(e, HarnessError) else f"{f}: {e}")
            continue
        s["alive"] = is_vm_qemu(s)
        out.append(s)
    return out


def find_state(name: str) -> dict:
    matches = [s for s in load_states() if s["name"] == name]
    if not matches:
        raise HarnessError(f"no VM named {name!r} (see 'satori vm ls')")
    return matches[-1]


def state_memfile(state: dict, key: str) -> ProcFile | None:
    """Memfd ``key`` of a background VM (from its validated state)."""
    d = state.get("memfiles", {}).get(key)
    return ProcFile.from_dict(d) if d is not None else None


def state_paths(state: dict) -> VMPaths:
    """The files of a background VM, from the folder its state was found in (never from paths
    written in the state)."""
    return VMPaths.in_folder(Path(state["work"]))


def run_state(state: dict, timeout: float = 3.0) -> str:
    """What QMP says of a background VM: ``running``, ``paused`` (or another QEMU run state),
    or ``no answer`` (QMP did not reply in ``timeout`` s: stopped by a signal, or the manual
    socket is held by someone else)."""
    try:
        q = qmp_mod.connect(state_paths(state).qmp_manual, timeout=timeout, wait=0)
        try:
            st = q.cmd("query-status")
        finally:
            q.close()
    except QMPError:
        return "no answer"
    return "running" if st.get("running") else str(st.get("status", "paused"))


def stop_background(state: dict, timeout: float = 15.0) -> None:
    """Stop a VM started with ``satori vm up`` and remove its files. The pid is signalled only
    while it is still that VM's QEMU (:func:`is_vm_qemu`)."""
    paths = state_paths(state)
    if is_vm_qemu(state):
        with contextlib.suppress(Exception):
            q = qmp_connect(paths.qmp, timeout=3)
            try:
                q.cmd_raw("quit", timeout=3.0)
            finally:
                q.close()
        deadline = time.monotonic() + timeout
        while is_vm_qemu(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not is_vm_qemu(state):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["pid"], sig)
            end = time.monotonic() + 5
            while is_vm_qemu(state) and time.monotonic() < end:
                time.sleep(0.1)
    if is_vm_qemu(state):
        raise HarnessError(f"VM {state['name']}: QEMU (pid {state['pid']}) does not stop")
    shutil.rmtree(paths.work, ignore_errors=True)
