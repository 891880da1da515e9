"""The sharing engine's CPU priority: ``engine_priority: realtime`` in an experiment.

On a host whose cores are all busy running guests (2 cores, 4 TCG VMs here), the engine
thread and the merge agents' threads wait for a CPU like any other thread: measured, a 4-VM
run's slow engine steps (> 0.1 s) are 5-6% CPU, the rest waiting in the run queue or blocked
on the agents (whose threads wait in the same run queue), and that wait is the 4-VM merge lag
p99 of ~1 s (README, "Merge lag and priority"). ``realtime`` puts the engine thread and every
``satori-agent`` / ``satori-uffd`` thread in QEMU at SCHED_RR priority 1: they run as soon as
they are runnable, ahead of every vCPU.

What it costs (same section): the engine wakes sooner and so sends more,
smaller batches (its CPU per page saved rises), and every microsecond it spends is taken from
a guest at once, a flooding guest's included. Hence opt-in. The kernel's RT throttling
(``kernel.sched_rt_runtime_us``, 0.95 s of every 1 s by default) keeps a runaway RT thread
from taking a CPU whole; ``realtime`` is refused on a host where it is off (-1).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import HarnessError

AGENT_THREADS = ("satori-agent", "satori-uffd")  # pthread_setname_np in agent.c
RT_PRIORITY = 1  # the lowest SCHED_RR priority: above every normal thread, below the kernel's
RT_RUNTIME = Path("/proc/sys/kernel/sched_rt_runtime_us")


def check_throttled(runtime_file: Path = RT_RUNTIME) -> None:
    """A HarnessError unless the kernel throttles real-time threads (sched_rt_runtime_us >= 0)."""
    try:
        v = int(runtime_file.read_text().strip())
    except (OSError, ValueError) as e:
        raise HarnessError(f"engine_priority realtime: cannot read {runtime_file} ({e}); "
                           "without RT throttling a real-time engine could take a CPU whole") from e
    if v < 0:
        raise HarnessError(f"engine_priority realtime: {runtime_file} is {v} (RT throttling off): a "
                           "real-time engine could take a CPU whole; set it to e.g. 950000 or use "
                           "engine_priority normal")


def make_realtime(tid: int = 0, who: str = "the engine thread") -> None:
    """SCHED_RR at RT_PRIORITY for thread ``tid`` (0: the calling thread), named ``who`` in the
    error. ProcessLookupError (the thread ended) is the caller's; any other failure is a
    HarnessError."""
    try:
        os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(RT_PRIORITY))
    except ProcessLookupError:
        raise
    except OSError as e:
        raise HarnessError(f"engine_priority realtime: sched_setscheduler of {who}: "
                           f"{e.strerror} (root, and a cgroup with RT runtime, are needed)") from e


def agent_threads(pid: int, names: tuple[str, ...] = AGENT_THREADS) -> list[int]:
    """The thread ids of process ``pid`` named like a merge agent's threads ([] if it is gone)."""
    tids = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for t in tasks:
        try:
            if (t / "comm").read_text().strip() in names and t.name.isdigit():
                tids.append(int(t.name))
        except OSError:
            continue  # the thread ended meanwhile
    return sorted(tids)


def make_agents_realtime(pids: list[int]) -> dict[int, int]:
    """Every merge-agent thread of each process in ``pids`` at SCHED_RR; {pid: threads set}.
    A thread that ends meanwhile is skipped; any other failure is a HarnessError."""
    done: dict[int, int] = {}
    for pid in pids:
        n = 0
        for tid in agent_threads(pid):
            try:
                make_realtime(tid, f"agent thread {tid} of process {pid}")
            except ProcessLookupError:
                continue
            n += 1
        done[pid] = n
    return done
