"""What a killed harness leaves, found and undone: ``satori cleanup`` (and, quietly, every start
of ``satori run``, ``satori share`` and ``satori vm up``).

Guest RAM, rings and stores are memfds: they die with their last holder and need nothing. What
can be left after a ``kill -9`` at any moment, and what :func:`cleanup` does about it:

- a background VM folder whose QEMU is gone (its state still says it runs): removed;
- a background VM paused by a ``satori share`` engine that died between QMP ``stop`` and
  ``cont`` (``paused-by.json`` names a process that is gone): resumed (``cont``, checked with
  ``query-status``);
- a VM folder with no ``state.json`` (a kill between its creation and QEMU's start, or before
  the state was written) older than a minute, whose QMP socket no process names: removed (one
  that a process still names is reported and left alone);
- ``share-<domain>.json`` of an engine that is gone: removed;
- half-written state files (``.*.tmp``) older than a minute: removed;
- KSM settings and ``vm.max_map_count`` changed by a run that is gone: restored from the state
  saved before the change (:mod:`harness.ksm`, :mod:`harness.sysstate`).

Anything that does not look like what the harness writes (a state file that fails validation)
is reported and left alone: nothing in it is trusted, no pid in it is signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from harness import ksm, sysstate
from harness import qmp as qmp_mod
from harness.errors import HarnessError, QMPError
from harness.memfd import same_process
from harness.paths import read_private, runtime_dir
from harness.vm import VMPaths, load_states, qemu_opt, state_paths, vms_dir


def cleanup(log: Callable[[str], None] | None = None) -> list[str]:
    """Undo what killed harness processes left (see the module docstring); return what was done
    (and what was left alone, prefixed ``left alone:``)."""
    did: list[str] = []
    problems: list[str] = []
    root = runtime_dir()
    did += _stateless_folders()
    for s in load_states(problems):
        paths = state_paths(s)
        if not s["alive"]:
            shutil.rmtree(paths.work, ignore_errors=True)
            did.append(f"VM {s['name']}: QEMU (pid {s['pid']}) is gone; removed {paths.work}")
            continue
        marker = paths.work / "paused-by.json"
        if marker.exists():
            did += _resume_orphan(s, marker)
    for f in sorted(root.glob("share-*.json")):
        try:
            st = json.loads(read_private(f))
            owner = (int(st["pid"]), int(st["start"]))
        except (OSError, ValueError, KeyError, TypeError, HarnessError):
            owner = None
        if owner is None or not same_process(*owner):
            f.unlink(missing_ok=True)
            did.append(f"removed {f} (its sharing engine is gone)")
    now = time.time()
    for d in (root, vms_dir()):
        for f in d.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - f.lstat().st_mtime > 60:
                    f.unlink()
                    did.append(f"removed half-written {f}")
    for what, fn in (("KSM", ksm.recover), ("vm.max_map_count", sysstate.recover_max_map_count)):
        try:
            did += fn()
        except (HarnessError, OSError) as e:
            did.append(f"left alone: {what}: {e}")
    did += [f"left alone: {p}" for p in problems]
    if log:
        for line in did:
            log(line)
    return did


def _resume_orphan(state: dict, marker) -> list[str]:
    """A VM whose pausing engine may be gone: resume it if that engine is dead and it is paused."""
    try:
        owner = json.loads(read_private(marker))
        alive = same_process(int(owner["pid"]), int(owner["start"]))
    except (OSError, ValueError, KeyError, TypeError, HarnessError):
        owner, alive = None, False
    if alive:
        return []  # its engine still runs: its pause is its own
    try:
        q = qmp_mod.connect(state_paths(state).qmp, timeout=5.0, wait=2.0, name=f"VM {state['name']}")
    except QMPError as e:
        return [f"left alone: VM {state['name']} may be paused by a dead engine; QMP: {e}"]
    try:
        running = q.cmd("query-status").get("running")
        if not running:
            qmp_mod.cont(q.cmd, state["name"])
        marker.unlink(missing_ok=True)
    except QMPError as e:
        return [f"left alone: VM {state['name']} is paused and does not resume: {e}"]
    finally:
        q.close()
    who = f"engine pid {owner['pid']}" if owner else "an engine"
    return [] if running else [f"VM {state['name']}: resumed (paused by {who}, which is gone)"]


def _named_by_a_process(needle: bytes) -> bool:
    """Whether any process's command line contains ``needle``."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
    return False


def _stateless_folders() -> list[str]:
    """VM folders a kill left before their ``state.json`` was written (see the module docstring)."""
    did: list[str] = []
    now = time.time()
    for work in sorted(vms_dir().iterdir()):
        if work.is_symlink() or not work.is_dir() or (work / "state.json").exists():
            continue
        with contextlib.suppress(OSError):
            if now - work.lstat().st_mtime < 60:
                continue  # a VM being launched right now
        if _named_by_a_process(qemu_opt(VMPaths.in_folder(work).qmp).encode()):
            continue  # a QEMU whose harness was killed while starting it: load_states reports it
        shutil.rmtree(work, ignore_errors=True)
        did.append(f"removed {work} (a VM folder without state; no process uses it)")
    return did
