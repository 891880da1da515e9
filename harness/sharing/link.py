"""One VM as the sharing engine holds it: its hint ring, its merge agent, its memory, its counters.

A :class:`Member` says what the engine needs of a VM (files, sockets, QMP); a :class:`VMLink`
is the open connection to it (ring reader, agent client, the file descriptors the native core
reads guest pages through) plus the counters the engine reports for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.accounting import ram_hva
from harness.errors import HarnessError
from harness.hints import HintRing
from harness.sharing.agent import AgentClient


@dataclasses.dataclass
class Member:
    """What the engine needs of one VM: files, sockets, a way to run QMP."""

    name: str
    pid: int
    ram_path: Path
    ram_size: int
    ring_path: Path
    agent_socket: Path
    qmp: Callable[..., Any]

    @classmethod
    def from_vm(cls, vm) -> Member:
        if vm.ring_path is None or vm.agent_socket is None:
            raise HarnessError(
                f"VM {vm.name} has no hint ring or no merge agent: start it with sharing on "
                "(VMSpec(sharing=True), 'satori vm up NAME --sharing'), on an image with hints"
            )
        return cls(vm.name, vm.pid, vm.ram_path, vm.ram_size, vm.ring_path, vm.agent_socket, vm.qmp)

    @classmethod
    def from_state(cls, state: dict) -> Member:
        """A VM started in the background (``satori vm up NAME --sharing``)."""
        from harness.vm import qmp_connect

        if not state.get("alive"):
            raise HarnessError(f"VM {state['name']} is not running")
        if not state.get("ring") or not state.get("agent"):
            raise HarnessError(
                f"VM {state['name']} was not started with sharing (satori vm up {state['name']} --sharing)"
            )
        conn = qmp_connect(Path(state["qmp"]))

        def qmp(command: str, **args: Any) -> Any:
            reply = conn.cmd_raw(command, args or None)
            if "error" in reply:
                raise HarnessError(f"VM {state['name']}: QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

        return cls(state["name"], int(state["pid"]), Path(state["ram"]), int(state["ram_size"]),
                   Path(state["ring"]), Path(state["agent"]), qmp)


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


class VMLink:
    """An open VM of a sharing engine: ``idx`` is its number in the native core."""

    def __init__(self, idx: int, m: Member) -> None:
        self.idx = idx
        self.m = m
        self.ring: HintRing | None = None
        self.agent: AgentClient | None = None
        self.ram_fd = -1
        self.mem_fd = -1
        self.c = VMCounters()
        self.needs_list = False  # the agent's word on some pages was lost: LIST before any free
        self.listed: tuple[int, bytes] | None = None  # (books version, LIST digest) last reconciled
        self.last_error: str | None = None
        self.wp = False  # the agent merges pause-free (PING wp=1); else stop/cont per batch
        self.delta = False  # the agent answers BREAKS and MAPPED; else its LIST every look
        try:
            self.ring = HintRing(m.ring_path, m.ram_size)
            self.agent = AgentClient(m.agent_socket)
            self.ram_fd = os.open(m.ram_path, os.O_RDONLY) if m.ram_path.exists() else -1
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
        for fd in (self.ram_fd, self.mem_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.ram_fd = self.mem_fd = -1
