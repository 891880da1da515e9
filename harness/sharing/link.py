"""One VM as the sharing engine holds it: its hint ring, its merge agent, its memory, its counters.

A :class:`Member` says what the engine needs of a VM (files, sockets, QMP); a :class:`VMLink`
is the open connection to it (ring reader, agent client, the file descriptors the native core
reads guest pages through) plus the counters the engine reports for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import sysstate
from harness.accounting import ram_hva
from harness.errors import HarnessError, QMPError
from harness.hints import HintRing
from harness.memfd import ProcFile
from harness.oracle import RamMirror, TrackerUnavailable
from harness.paths import write_private
from harness.qmp import cont
from harness.sharing.agent import AgentClient


@dataclasses.dataclass
class Member:
    """What the engine needs of one VM: files, sockets, a way to run QMP."""

    name: str
    pid: int
    ram: ProcFile | None  # the guest RAM memfd (None: anonymous RAM, read through /proc/<pid>/mem)
    ram_size: int
    ring: ProcFile
    agent_socket: Path
    qmp: Callable[..., Any]
    close: Callable[[], None] | None = None  # what to release with the engine (its QMP connection)

    @classmethod
    def from_vm(cls, vm) -> Member:
        from harness.sharing.attach import agent_socket_of, ring_of

        ring, sock = ring_of(vm), agent_socket_of(vm)
        if ring is None or sock is None:
            raise HarnessError(
                f"VM {vm.name} has no hint ring or no merge agent: start it with sharing on "
                "(sharing_attachments(agent=True), 'satori vm up NAME --sharing'), on an image with hints"
            )
        return cls(vm.name, vm.pid, vm.ram, vm.ram_size, ring, sock, vm.qmp)

    @classmethod
    def from_state(cls, state: dict) -> Member:
        """A VM started in the background (``satori vm up NAME --sharing``), from its validated
        state (:func:`harness.vm.load_states`)."""
        from harness.sharing.attach import agent_socket_of_state, ring_of_state
        from harness.vm import qmp_connect, state_memfile, state_paths

        if not state.get("alive"):
            raise HarnessError(f"VM {state['name']} is not running")
        ring, sock = ring_of_state(state), agent_socket_of_state(state)
        if ring is None or sock is None:
            raise HarnessError(
                f"VM {state['name']} was not started with sharing (satori vm up {state['name']} --sharing)"
            )
        conn = qmp_connect(state_paths(state).qmp)
        marker = pause_marker(state)

        def qmp(command: str, timeout: float | None = None, **args: Any) -> Any:
            # a background VM outlives this engine: say who paused it before pausing it, so
            # `satori cleanup` resumes it if the engine is killed before its 'cont'
            if command == "stop":
                write_private(marker, json.dumps(sysstate.me()))
            ret = conn.cmd(command, timeout, **args)
            if command == "query-status" and ret.get("running"):
                marker.unlink(missing_ok=True)
            return ret

        return cls(state["name"], int(state["pid"]), state_memfile(state, "ram"), int(state["ram_size"]),
                   ring, sock, qmp, conn.close)


def pause_marker(state: dict) -> Path:
    """``paused-by.json`` in a background VM's folder: the engine that may have paused it."""
    from harness.vm import state_paths

    return state_paths(state).work / "paused-by.json"


@dataclasses.dataclass
class VMCounters:
    """Per-VM counters the engine keeps in Python (the core keeps the per-hint ones);
    ``merged`` is pages merged now, the rest are totals."""

    merged_total: int = 0  # pages the agent merged
    mismatched: int = 0  # agent memcmp said no (page changed before the merge)
    failed: int = 0  # agent could not map (e.g. ENOMEM)
    batches: int = 0
    paused_s: float = 0.0  # vCPUs held by QMP stop/cont (only without pause-free merging)
    paused_max_s: float = 0.0  # the longest such hold (the guest's own clock does not see it)
    agent_ns: int = 0  # wall time of the agent's merges
    agent_errors: int = 0  # batches or LISTs whose reply was lost or refused
    relists: int = 0  # LISTs asked because an agent's word was lost
    qmp_errors: int = 0  # QMP stop/cont that failed or timed out (the VM is resumed later)
    not_stored: int = 0  # batches not sent: no memory to write their store pages


def resume(link, log: Callable[[str], None] | None = None) -> bool:
    """Resume a VM the engine paused (``cont`` retried and checked with query-status). On
    failure the error is recorded and ``link.resume_due`` stays set: the engine tries again a
    second later (:meth:`SharingEngine.step`), and at close."""
    try:
        cont(link.m.qmp, link.name)
        link.resume_due = False
    except QMPError as e:
        qmp_failed(link, "cont", e, log)
    link.resume_at = time.monotonic() + 1.0
    return not link.resume_due


def qmp_failed(link, what: str, e: Exception, log: Callable[[str], None] | None = None) -> None:
    """Record a QMP failure on a VM; it may be paused now (a 'stop' QEMU reads late): resume due."""
    link.c.qmp_errors += 1
    link.last_error = f"QMP {what}: {e}"
    link.resume_due = True
    if log:
        log(f"VM {link.name}: QMP {what} failed: {e}")


class VMLink:
    """An open VM of a sharing engine: ``idx`` is its number in the native core."""

    def __init__(self, idx: int, m: Member) -> None:
        self.idx = idx
        self.m = m
        self.ring: HintRing | None = None
        self.agent: AgentClient | None = None
        self.ram_fd = -1
        self.mem_fd = -1
        # the engine's own guarded view of the RAM file: hinted pages are copied from it, no
        # system call per page (None: read with pread; view_error says why)
        self.view: RamMirror | None = None
        self.view_error = ""
        self.c = VMCounters()
        self.needs_list = False  # the agent's word on some pages was lost: LIST before any free
        self.listed: tuple[int, bytes] | None = None  # (books version, LIST digest) last reconciled
        self.last_error: str | None = None
        self.resume_due = False  # a stop was sent and no 'cont' verified yet: make sure it runs
        self.resume_at = 0.0
        self.wp = False  # the agent merges pause-free (PING wp=1); else stop/cont per batch
        self.delta = False  # the agent answers BREAKS and MAPPED; else its LIST every look
        try:
            self.ring = HintRing(m.ring, m.ram_size)
            self.agent = AgentClient(m.agent_socket)
            self.ram_fd = m.ram.open(os.O_RDONLY) if m.ram is not None else -1
            if m.ram is not None:
                try:
                    self.view = RamMirror(m.ram, m.ram_size // 4096, f"VM {m.name}'s RAM")
                except TrackerUnavailable as e:
                    self.view_error = str(e)
            self.mem_fd = os.open(f"/proc/{m.pid}/mem", os.O_RDONLY)
            self.hva = ram_hva(m)  # HMP gpa2hva: where QEMU maps guest offset 0
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self.m.name

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.agent is not None:
            self.agent.close()
        if self.view is not None:
            self.view.close()
            self.view = None
        for fd in (self.ram_fd, self.mem_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.ram_fd = self.mem_fd = -1
        if self.m.close is not None:
            with contextlib.suppress(Exception):
                self.m.close()
