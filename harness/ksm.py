"""KSM, the kernel's page scanner, as a baseline: set its rate for a run, sample it, restore it.

Use::

    with KSMControl("ksm-fast") as ksm:        # VMs of this run use VMSpec(ram_backend="ram-merge")
        ...
        s = ksm.sample()                        # pages_sharing, full_scans, ksmd CPU seconds ...

The values each mode writes are the mode table's (:data:`harness.modes.MODES`, ``Mode.ksm``):
``ksm`` is the kernel's default rate, ``ksm-fast`` ten times it, ``ksm-advisor`` lets the kernel's
scan-time advisor (Linux >= 6.8) pick the rate, ``satori+ksm`` scans at ``ksm``'s rate; ``none``
and ``satori`` leave KSM alone (their RAM is not mergeable: no scanner can help them). Values are numbers,
or words for the files that offer a choice (``advisor_mode``: the kernel shows ``[none]
scan-time``, the harness reads ``none``).

Every sysfs value the control writes is read first and written back on exit, whatever ends the
block (an exception, Ctrl-C: SIGINT/SIGTERM are held back while the values are restored). The
saved values are written to ``ksm-saved.json`` in the machine-wide state folder
(:func:`harness.sysstate.system_dir`) before anything is changed: if the harness is killed
outright (SIGKILL, power), the next :class:`KSMControl` or ``satori cleanup`` finds that file,
knows its owner is gone (the owner's lock is free) and restores the values it holds, which are
the machine's real ones. The file is validated first (the keys a mode or override may write, a
number or a word as value): anything else is refused, never written to sysfs. Two controls
never run at once on a machine, whatever their runtime folders: a lock file in the same
machine-wide folder serialises them (``lock_timeout``).

KSM only scans anonymous memory marked mergeable, so VMs of KSM modes need
``memory-backend-ram,merge=on`` (``VMSpec(ram_backend="ram-merge")``: ``Mode.ram_backend``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import signal
import time
from pathlib import Path

from harness import modes, sysstate
from harness.errors import HarnessError
from harness.modes import KSM_SYSFS

Value = int | str
# written first when restoring: switching the advisor resets pages_to_scan
RESTORE_FIRST = ("advisor_mode",)
# values the kernel changes by itself while a mode runs (the advisor sets pages_to_scan): saved
# and restored although the mode does not write them
CHANGED_BY = {"advisor_mode": ("pages_to_scan",)}

# sysfs files a control may write (a mode's or an override): the only keys a saved file may hold
TUNABLES = frozenset({
    "run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
    "merge_across_nodes", "stable_node_chains_prune_millisecs", "smart_scan", "advisor_mode",
    "advisor_max_cpu", "advisor_target_scan_time", "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
})
_WORD = re.compile(r"^[a-z][a-z-]{0,31}$")


def allowed_keys() -> frozenset[str]:
    return TUNABLES | modes.ksm_keys() | {k for ks in CHANGED_BY.values() for k in ks}


def _valid_value(v: object) -> bool:
    return (type(v) is int and 0 <= v < 1 << 63) or (isinstance(v, str) and bool(_WORD.match(v)))


def parse_saved(data: object, where: str) -> dict[str, Value]:
    """The values of a ``ksm-saved.json`` as :class:`KSMControl` writes it; anything else (an
    unknown key, a path, a value that is not a number or a word) is a :class:`HarnessError`."""
    keys = {"pid", "start", "mode", "values"}
    if not isinstance(data, dict) or set(data) != keys:
        raise HarnessError(f"{where}: not a KSM saved-settings file of the harness: not used")
    values = data["values"]
    if not (type(data["pid"]) is int and type(data["start"]) is int and isinstance(data["mode"], str)
            and isinstance(values, dict)):
        raise HarnessError(f"{where}: bad types: not used")
    bad = [k for k in values if k not in allowed_keys()]
    if bad:
        raise HarnessError(f"{where}: unknown KSM settings {sorted(bad)!r}: not used")
    if not all(_valid_value(v) for v in values.values()):
        raise HarnessError(f"{where}: values must be numbers or words: not used")
    return dict(values)


SAMPLE_FIELDS = (
    "pages_sharing", "pages_shared", "pages_unshared", "pages_volatile", "full_scans",
    "pages_scanned", "ksm_zero_pages",
)
# KSM's counts of pages it tracks: not all 0 with no process holding a KSM page means stale
STALE_COUNTERS = ("pages_sharing", "pages_shared", "pages_unshared", "pages_volatile")


@dataclasses.dataclass(frozen=True)
class KSMSample:
    """One reading of KSM's counters (``/sys/kernel/mm/ksm``) and of ksmd's CPU time.

    ``pages_sharing`` is how many page mappings KSM saved (sites sharing a KSM page, beyond the
    first); ``pages_shared`` how many KSM pages back them. Counters a kernel does not have are -1.
    """

    t: float  # time.monotonic() of the reading
    pages_sharing: int
    pages_shared: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int
    pages_scanned: int
    ksm_zero_pages: int
    ksmd_cpu_s: float  # utime + stime of ksmd since boot (seconds)

    def since(self, earlier: KSMSample) -> dict[str, float]:
        """Differences of the cumulative figures (full scans, pages scanned, ksmd CPU, time)."""
        return {
            "seconds": self.t - earlier.t,
            "full_scans": self.full_scans - earlier.full_scans,
            "pages_scanned": self.pages_scanned - earlier.pages_scanned,
            "ksmd_cpu_s": self.ksmd_cpu_s - earlier.ksmd_cpu_s,
        }


def _check_sysfs(root: Path) -> None:
    if not (root / "run").exists():
        raise HarnessError(
            f"KSM is not available: {root} is missing (host kernel built without CONFIG_KSM?); "
            f"the modes that scan ({', '.join(m.name for m in modes.MODES.values() if m.scans)}) "
            "cannot run on this host"
        )


def _read_int(root: Path, name: str) -> int:
    try:
        return int((root / name).read_text().split()[0])
    except FileNotFoundError:
        return -1
    except (OSError, ValueError, IndexError) as e:
        raise HarnessError(f"cannot read {root / name}: {e}") from None


def _read_value(root: Path, name: str) -> Value:
    """A sysfs value: a number, or the chosen word of a choice file (``[none] scan-time``)."""
    try:
        text = (root / name).read_text().strip()
    except OSError as e:
        raise HarnessError(f"cannot read {root / name}: {e.strerror or e}") from None
    if "[" in text:
        chosen = text[text.index("[") + 1:text.find("]")]
        return chosen
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return text


def _write(root: Path, name: str, value: Value) -> None:
    try:
        (root / name).write_text(f"{value}\n")
    except PermissionError:
        raise HarnessError(f"cannot write {root / name}: run the harness as root") from None
    except OSError as e:
        raise HarnessError(f"cannot write {value} to {root / name}: {e}") from None


_ksmd_pid: int | None = None


def ksmd_pid() -> int | None:
    """The pid of the ksmd kernel thread (None if there is none)."""
    global _ksmd_pid
    if _ksmd_pid is not None and _comm(_ksmd_pid) == "ksmd":
        return _ksmd_pid
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _comm(int(d.name)) == "ksmd":
            _ksmd_pid = int(d.name)
            return _ksmd_pid
    return None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (or kernel thread) from ``/proc/<pid>/stat``, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(root: Path = KSM_SYSFS) -> KSMSample:
    """Read KSM's counters and ksmd's CPU time now."""
    _check_sysfs(root)
    values = {f: _read_int(root, f) for f in SAMPLE_FIELDS}
    pid = ksmd_pid()
    cpu = process_cpu_seconds(pid) if pid else 0.0
    return KSMSample(t=time.monotonic(), ksmd_cpu_s=cpu, **values)


class KSMControl:
    """Set KSM for a sharing mode while the ``with`` block runs; restore it exactly afterwards.

    ``overrides`` adds or changes sysfs values (e.g. ``{"use_zero_pages": 1}``); they are saved
    and restored like the others.
    """

    def __init__(
        self,
        mode: str,
        overrides: dict[str, Value] | None = None,
        root: Path = KSM_SYSFS,
        state_dir: Path | None = None,
        lock_timeout: float = 300.0,
    ) -> None:
        m = modes.get(mode)
        if m.ksm is None:
            raise HarnessError(f"mode {mode!r} leaves KSM alone: nothing to control")
        self.mode = mode
        self.root = Path(root)
        values = dict(m.ksm)
        run = values.pop("run")
        bad = [k for k, v in (overrides or {}).items() if k not in allowed_keys() or not _valid_value(v)]
        if bad:
            raise HarnessError(f"KSM overrides {bad}: not KSM settings the harness may change")
        values.update(overrides or {})
        values["run"] = run  # start (or stop) the scanner after its rate is set
        self.values: dict[str, Value] = values
        # what is saved and restored: what the mode writes and what the kernel then changes
        self.keys = list(values) + [k for w in values for k in CHANGED_BY.get(w, ()) if k not in values]
        self.state_dir = Path(state_dir) if state_dir else None
        self.lock_timeout = lock_timeout
        self.saved: dict[str, Value] | None = None
        self._lock_fd: int | None = None
        self._stopped_ksm = False  # ksmd was stopped before this control started it

    # -- files
    def _dir(self) -> Path:
        return self.state_dir if self.state_dir else sysstate.system_dir()

    @property
    def saved_file(self) -> Path:
        return self._dir() / "ksm-saved.json"

    def _lock(self, timeout: float | None = None) -> None:
        path = self._dir() / "ksm.lock"
        wait = self.lock_timeout if timeout is None else timeout
        self._lock_fd = sysstate.acquire_lock(
            path, wait,
            lambda: (f"KSM is controlled by another harness process (pid {self._stale_owner()}) "
                     f"for more than {wait:.0f} s (lock {path})"))

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _stale_owner(self) -> int | None:
        try:
            d = sysstate.load_json(self.saved_file)
            return int(d["pid"]) if isinstance(d, dict) else None
        except (HarnessError, KeyError, TypeError, ValueError):
            return None

    def _recover_stale(self) -> list[str]:
        """A run that was killed left its saved values: put them back first (under the lock, so
        their owner is gone). A file that is not what the harness writes is refused."""
        state = sysstate.load_json(self.saved_file)
        if state is None:
            return []
        values = parse_saved(state, str(self.saved_file))
        errors = self._restore(values)
        if errors:
            raise HarnessError(f"could not restore KSM's saved settings from {self.saved_file}",
                               "\n".join(errors))
        self.saved_file.unlink(missing_ok=True)
        return [f"KSM settings of a killed run (pid {state['pid']}, mode {state['mode']}) restored: "
                + ", ".join(f"{k}={v}" for k, v in values.items())]

    # -- apply / restore
    def _restore(self, saved: dict[str, Value]) -> list[str]:
        """Write saved values back (run first when it stops ksmd, last when it starts it; the
        advisor before the rate it resets)."""
        errors = []
        order = [k for k in RESTORE_FIRST if k in saved] + [k for k in saved if k not in RESTORE_FIRST
                                                             and k != "run"]
        if "run" in saved:
            order = (["run"] + order) if int(saved["run"]) == 0 else (order + ["run"])
        for name in order:
            try:
                if _read_value(self.root, name) != saved[name]:
                    _write(self.root, name, saved[name])
            except HarnessError as e:
                errors.append(str(e))
        return errors

    def __enter__(self) -> KSMControl:
        _check_sysfs(self.root)
        self._lock()
        try:
            self._recover_stale()
            missing = [k for k in self.keys if not (self.root / k).exists()]
            if missing:
                raise HarnessError(f"KSM on this kernel has no {', '.join(missing)} in {self.root}")
            self.saved = {k: _read_value(self.root, k) for k in self.keys}
            self._stopped_ksm = int(self.saved.get("run", 0)) == 0 and int(self.values.get("run", 0)) != 0
            sysstate.save_json(self.saved_file, {**sysstate.me(), "mode": self.mode, "values": self.saved})
            for name, value in self.values.items():
                _write(self.root, name, value)
        except BaseException:
            self._exit_restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit_restore()

    def _exit_restore(self) -> None:
        if self._lock_fd is None:
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            errors = self._restore(self.saved) if self.saved is not None else []
            if not errors and self.saved is not None:  # only the file this control wrote
                self.saved_file.unlink(missing_ok=True)
            self.saved = None
            self._unlock()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if errors:
            raise HarnessError(
                "could not restore KSM's settings (they stay in " f"{self.saved_file}):",
                "\n".join(errors),
            )

    def flush_exited(self, timeout_s: float = 5.0, poll_s: float = 0.02) -> bool:
        """After this control's ``with`` block and after its VMs exited: if it had started ksmd
        (the saved ``run`` was 0) and KSM still counts pages, let ksmd make two passes and stop
        it again. Why: the settings are restored while the VMs still run (their shutdown comes
        later), and the KSM items of a process that exits are freed only by ksmd's next pass
        over it; with ``run`` back at 0 that pass never comes, and every later run (and test)
        starts from stale counters (pages_sharing 43,742 with no process holding a KSM page,
        seen on this project's machine). Two passes: ksmd resumes a pass it was stopped in.
        Under the KSM lock, with a saved file (``run`` 0) so that a kill meanwhile is repaired
        by the next start or ``satori cleanup``; at most ``timeout_s``, then ``run`` is 0 again
        whatever ksmd did. Returns True if it ran ksmd."""
        if not self._stopped_ksm:
            return False
        if not any(_read_int(self.root, k) for k in STALE_COUNTERS if (self.root / k).exists()):
            return False
        try:
            self._lock(timeout=0.0)
        except HarnessError:
            return False  # another run controls KSM now: its ksmd runs, or it will do this
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if _read_int(self.root, "run") != 0:
                return False  # someone else started it meanwhile: theirs
            sysstate.save_json(self.saved_file, {**sysstate.me(), "mode": self.mode, "values": {"run": 0}})
            scans = _read_int(self.root, "full_scans")
            _write(self.root, "run", 1)
            try:
                end = time.monotonic() + timeout_s
                while _read_int(self.root, "full_scans") < scans + 2 and time.monotonic() < end:
                    time.sleep(poll_s)
            finally:
                _write(self.root, "run", 0)
            self.saved_file.unlink(missing_ok=True)
            return True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            self._unlock()

    # -- reading
    def sample(self) -> KSMSample:
        return sample(self.root)

    def current(self) -> dict[str, Value]:
        """The sysfs values this control manages, as they are now."""
        return {k: _read_value(self.root, k) for k in self.keys}


def recover(root: Path = KSM_SYSFS, state_dir: Path | None = None) -> list[str]:
    """``satori cleanup``: if no control holds KSM now and a killed one left its saved values,
    restore them. Returns what was done."""
    if not (root / "run").exists():
        return []
    ctl = KSMControl("ksm", root=root, state_dir=state_dir, lock_timeout=0)  # its lock and saved file only: nothing is set
    try:
        ctl._lock()
    except HarnessError:
        return []  # a live control holds it: its values are its own business
    try:
        return ctl._recover_stale()
    finally:
        ctl._unlock()
