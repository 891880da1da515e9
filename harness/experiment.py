"""One experiment (a YAML config) end to end: for every repetition and mode, boot the VMs, start
the mode, run the workloads, sample the figures of docs/metrics.md, shut down; then results and report.

Modes are the table of :mod:`harness.modes`: how the VMs are built (RAM backend, hints), whether
KSM scans and with which settings, whether the sharing engine runs. A mode this host cannot run
(``Mode.unavailable()``: no KSM, a kernel without the advisor) is skipped and the reason recorded.

Repetitions are interleaved: repetition r runs the modes rotated by r, so drift of the machine
hits every mode alike. While a mode runs, one thread steps the sharing engines and another, every
``sample_interval_s``, takes a sample (incremental accounting + oracle, :class:`_Loop`) and
updates the surplus manager: measuring never delays a hint. Workloads run in the main thread
over SSH.

Results are written after every mode (``results.json``, figures from :mod:`harness.metrics`),
so a run stopped by Ctrl-C keeps what was measured; every QEMU process, socket and memfd is gone
on the way out. Each run has a status: ``ok``, ``interrupted`` or
``failed``. A QEMU that dies during a run is recorded (which VM, its signal or exit status, its
console tail), its sharing domain is no longer stepped nor sampled, the workloads go on with the
VMs left, and the experiment goes on with the next run; so does a run whose VMs did not boot.
``satori run`` then exits with status 1 and the report lists what did not complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import accounting, budget, ksm, metrics, modes, report
from harness.config import ExperimentConfig, config_as_run, recipe_path
from harness.errors import BootError, HarnessError
from harness.image import DEFAULT_RECIPE, Image, ensure_image
from harness.sharing import priority
from harness.sharing.attach import mode_attachments, ring_of
from harness.sharing.engine import IdlePoll, Member, SharingEngine
from harness.surplus import Budget, Policy, SurplusManager
from harness.vm import VM, VMSpec, new_run_id, start_all
from harness.workloads import RunContext, make

SETTLE_TAIL_S = 3.0  # sampling after the last workload
GUARD_INTERVAL_S = 0.25  # host memory read between samples (the surplus guard acts on it)
REALTIME_POLL_S = 0.05  # the engine's poll while hints flow, at engine_priority realtime
SLOW_STEP_S = 0.1  # an engine step this long is split into CPU, run-queue wait and the rest


@dataclasses.dataclass
class ModeRun:
    """What one (mode, repetition) produced."""

    mode: str
    rep: int
    samples: list[dict[str, Any]]
    workloads: list[dict[str, Any]]
    events: list[tuple[float, str]]
    t0: float | None  # seconds from mode start to the first workload read
    engine: dict[str, Any] | None
    ksm: dict[str, float] | None
    cpu: dict[str, float]
    boot_s: dict[str, float]
    surplus: list[dict[str, Any]]
    quiet_since: float | None = None  # the workloads did nothing since (s from mode start)
    status: str = "ok"  # ok | failed (a VM died, an error) | interrupted (Ctrl-C)
    error: str | None = None
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # VMs that died
    entitlements_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    vms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # image, hints per VM


def vm_death(vm: VM, t: float, domain: str | None) -> dict[str, Any]:
    """What is known of a QEMU that exited during a run: which VM, how, its last words."""
    rc = vm.proc.returncode if vm.proc is not None else None
    how: dict[str, Any] = {"exit_status": rc, "signal": None}
    if rc is not None and rc < 0:
        with contextlib.suppress(ValueError):
            how = {"exit_status": None, "signal": signal.Signals(-rc).name}
    qemu_log = ""
    with contextlib.suppress(OSError):
        qemu_log = (vm.paths.work / "qemu.log").read_text(errors="replace")[-2000:].strip()
    return {"vm": vm.name, "domain": domain, "t": round(t, 3), "pid": vm.pid, **how,
            "console_tail": vm.console_tail(30), "qemu_output": qemu_log}


def describe_death(f: dict[str, Any]) -> str:
    how = f"killed by {f['signal']}" if f.get("signal") else f"exited with status {f.get('exit_status')}"
    return f"VM {f['vm']} (QEMU pid {f.get('pid')}) {how} at t={f.get('t')} s"


class _SchedStat:
    """The calling thread's time waiting for a CPU (s), from /proc/thread-self/schedstat (its
    second field, ns; opened by the thread that reads it). 0.0 on a kernel without schedstats."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None

    def runq_s(self) -> float:
        if self.fd is None:
            return 0.0
        try:
            return int(os.pread(self.fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Loop:
    """The engine thread and the sampler thread of one mode.

    The engine thread steps the sharing engines and, every interval, reads their stats (it alone
    talks to the merge agents). The sampler thread, every interval, has each domain measured by an
    incremental :class:`harness.accounting.Meter` in a process of its own
    (:class:`harness.accounting.MeterProcess`: measuring never holds the GIL the engine thread
    needs), reads KSM's counters, updates the surplus manager and appends a sample row:

    - the figures of each domain (``G``, ``F``, ``C``, ``R``, ``M``, ``E``, ...), prefixed by the
      domain's name when there are several;
    - ``cpu``: cumulative CPU seconds since the mode started: ``engine_s`` (the engine thread's
      stepping), ``agent_s`` (the merge agents' threads, from their STATS), ``ksmd_s``,
      ``oracle_s`` (the meter process's: never charged to a mode); a part that cannot be read
      is None and ``cpu["error"]`` says why (never a silent substitute);
    - ``oracle``: what this sample cost (``cpu_ms``, ``hashed`` pages, ``untracked_pages``,
      cumulative ``stale``, ``method``).

    Both threads watch the QEMUs: a VM whose QEMU exits is recorded (:func:`vm_death`), its
    sharing domain is no longer stepped nor sampled, and the other domains go on.
    """

    def __init__(self, vms: list[VM], engines: dict[str, SharingEngine], domains: dict[str, list[str]],
                 interval: float, surplus: SurplusManager | None, t_start: float,
                 ksm_ctl: ksm.KSMControl | None, log: Callable[[str], None], budget_pages: int = 0, *,
                 scrub: int = 256, priority: str = "normal") -> None:
        self.vms = {v.name: v for v in vms}
        self.priority = priority  # engine_priority: "realtime" puts engine + agent threads at SCHED_RR
        self.realtime: dict[str, Any] | None = None  # what realtime set: {"engine": True, "agent_threads": {vm: n}}
        self.engines = dict(engines)
        self.domains = dict(domains)
        self.domain_of = {n: d for d, names in domains.items() for n in names}
        self.interval = interval
        self.surplus = surplus
        self.t_start = t_start
        self.ksm_ctl = ksm_ctl
        self.log = log
        self.budget_pages = budget_pages  # the host's promise: the sum of the entitlements
        self.guard = _Guard(vms, surplus, [e.store_ref.path for e in engines.values() if e.store_ref is not None])
        self.scrub = scrub
        self.samples: list[dict[str, Any]] = []
        self.stop_evt = threading.Event()
        self.errors: list[BaseException] = []
        self.engine_cpu = 0.0  # engine thread: stepping (hints, merges, break checks)
        # engine thread: longest step, stats reading, sleep overrun (s)
        self.loop_max = {"step_s": 0.0, "stats_s": 0.0, "oversleep_s": 0.0}
        # steps over SLOW_STEP_S, summed: wall, the thread's CPU, its wait for a CPU (run queue,
        # /proc/thread-self/schedstat) and the rest (blocked: agents' answers, the GIL, I/O);
        # and the same split of the one longest step. Whether a slow step is work, a host with
        # no core free for the engine, or waiting on something else.
        self.slow_steps = {"n": 0, "wall_s": 0.0, "cpu_s": 0.0, "runq_s": 0.0, "blocked_s": 0.0}
        self.steps = {"n": 0, "with_hints": 0}  # engine steps taken, and those that took records
        self.longest_step = {"wall_s": 0.0, "cpu_s": 0.0, "runq_s": 0.0, "blocked_s": 0.0}
        self.stats_cpu = 0.0  # engine thread: reading the engines' and agents' stats
        self.sample_cpu = 0.0  # sampler thread: everything it does but measuring
        self.oracle_cpu = 0.0  # the meter process (accounting + oracle): all its CPU so far
        self.idle = threading.Event()
        self.stepped = threading.Event()  # the engines took their first step
        self.first_sample = threading.Event()  # the first sample row is there (or the loop failed)
        self._stats: dict[str, dict[str, Any]] = {}  # latest engine stats per domain
        self._stats_lock = threading.Lock()
        self._ksm0 = ksm_ctl.sample().ksmd_cpu_s if ksm_ctl is not None else None
        self._threads = [threading.Thread(target=self._engine_main, daemon=True, name="satori-engine"),
                         threading.Thread(target=self._sampler_main, daemon=True, name="satori-sampler")]
        self.deaths: list[dict[str, Any]] = []
        self.lost: dict[str, str] = {}  # domain -> why it is no longer stepped nor sampled
        self._death_lock = threading.Lock()

    def check_vms(self) -> bool:
        """Record every QEMU that exited since the last look; True if one did (either thread)."""
        died = False
        with self._death_lock:
            dead = {f["vm"] for f in self.deaths}
            for name, vm in self.vms.items():
                if name in dead or vm.proc is None or vm.proc.poll() is None:
                    continue
                dom = self.domain_of.get(name)
                f = vm_death(vm, time.monotonic() - self.t_start, dom)
                self.deaths.append(f)
                died = True
                self.log(describe_death(f) + (f"; domain {dom} is no longer measured" if dom else ""))
                if dom is not None and dom not in self.lost:
                    self.lost[dom] = describe_death(f)
                    self.engines.pop(dom, None)
                    self.domains.pop(dom, None)
        return died

    def _died_under(self, dom: str | None, wait_s: float = 2.0) -> bool:
        """After an error on domain ``dom``: did one of its VMs die (None: did any VM of the run
        die)? A QEMU being killed may fail a read a moment before it can be reaped."""
        end = time.monotonic() + wait_s
        while True:
            self.check_vms()
            if (dom in self.lost) if dom is not None else bool(self.deaths):
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.1)

    @property
    def error(self) -> BaseException | None:
        return self.errors[0] if self.errors else None

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------ engine thread
    def _publish_stats(self) -> None:
        c0 = time.thread_time()
        stats = {}
        for dom, e in list(self.engines.items()):
            try:
                stats[dom] = e.stats()
            except Exception:
                if self._died_under(dom):
                    continue
                raise
        with self._stats_lock:
            self._stats = stats
        self.stats_cpu += time.thread_time() - c0

    def _go_realtime(self) -> None:
        """engine_priority realtime: this (the engine) thread and the merge agents' threads of
        every VM at SCHED_RR (harness/sharing/priority.py). The agents are attached by now (the
        engines are open); a thread an agent starts later inherits its policy."""
        priority.check_throttled()
        priority.make_realtime()
        vms = [vm for vm in self.vms.values() if vm.pid is not None]
        done = priority.make_agents_realtime([vm.pid for vm in vms])  # type: ignore[misc]
        self.realtime = {"engine": True, "agent_threads": {vm.name: done.get(vm.pid, 0) for vm in vms}}
        self.log(f"engine_priority realtime: engine thread and {sum(done.values())} merge-agent "
                 f"threads at SCHED_RR {priority.RT_PRIORITY}")

    def _account_step(self, wall: float, cpu: float, runq: float) -> None:
        """Book one engine step's wall time, CPU and run-queue wait (s) into loop_max,
        slow_steps and longest_step."""
        split = {"wall_s": wall, "cpu_s": cpu, "runq_s": runq, "blocked_s": max(0.0, wall - cpu - runq)}
        self.loop_max["step_s"] = max(self.loop_max["step_s"], round(wall, 3))
        if wall > SLOW_STEP_S:
            self.slow_steps["n"] += 1
            for k, v in split.items():
                self.slow_steps[k] += v
        if wall > self.longest_step["wall_s"]:
            self.longest_step = split

    def _engine_main(self) -> None:
        sched = _SchedStat()  # this thread's run-queue wait
        try:
            if self.priority == "realtime" and self.engines:
                self._go_realtime()
            next_stats = time.monotonic()
            # at realtime the engine wakes on time, so each 20 ms poll finds few records and every
            # step's fixed cost (~0.36 ms on this host) adds up: 50 ms polls measured 11.65 us
            # [11.64-12.56] per page saved against 12.94 [12.84-14.53], merge lag p99 0.27 s
            # [0.26-0.40] against 0.26 [0.24-0.27] (4 VMs, 3 interleaved pairs, README)
            idle = IdlePoll(REALTIME_POLL_S if self.realtime else 0.02, 0.25)
            while not self.stop_evt.is_set():
                self.check_vms()
                c0 = time.thread_time()
                w0 = time.monotonic()
                q0 = sched.runq_s()
                taken = 0
                pending = False
                for dom, e in list(self.engines.items()):
                    try:
                        taken += e.step()
                        pending = e.pending() or pending
                    except Exception:
                        if self._died_under(dom):
                            continue  # its VM died under it: recorded, the others go on
                        raise
                c1, ws, q1 = time.thread_time(), time.monotonic(), sched.runq_s()
                self.engine_cpu += c1 - c0
                self._account_step(ws - w0, c1 - c0, q1 - q0)
                self.steps["n"] += 1
                self.steps["with_hints"] += taken > 0
                if taken == 0:
                    self.idle.set()
                else:
                    self.idle.clear()
                if self.engines and time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self.interval
                    p0 = time.monotonic()
                    self._publish_stats()
                    self.loop_max["stats_s"] = max(self.loop_max["stats_s"], round(time.monotonic() - p0, 3))
                self.stepped.set()  # after the first stats: the first sample row has its counters
                w1 = time.monotonic()
                # 20 ms while hints flow or pairs wait for their flush, backing off to 250 ms when quiet
                asked = idle.wait(taken, pending)
                w2 = time.monotonic()
                # the engine loop's longest step, stats reading and sleep overrun (over the 20 ms
                # or so it asked for): where merge lag beyond the flush interval comes from
                self.loop_max["oversleep_s"] = max(self.loop_max["oversleep_s"], round(w2 - w1 - asked, 3))
            c0 = time.thread_time()
            for e in list(self.engines.values()):
                e.flush_all()
            self.engine_cpu += time.thread_time() - c0
            if self.engines:
                self._publish_stats()
        except BaseException as e:  # noqa: BLE001 - reported by the runner
            self.errors.append(e)
            self.idle.set()
            self.stepped.set()
            self.stop_evt.set()
        finally:
            sched.close()

    def engine_stats(self) -> dict[str, dict[str, Any]]:
        """The latest stats of every engine (as the engine thread last read them)."""
        with self._stats_lock:
            return dict(self._stats)

    # ------------------------------------------------------------ sampler thread
    def _sampler_main(self) -> None:
        meters: accounting.MeterProcess | None = None
        try:
            # merge agents that write-protect guest RAM themselves (pause-free merging) register
            # it at the engine's first step: let them, the oracle must not take it from them (a
            # mapping has one userfaultfd; the oracle then re-reads those pages every sample)
            if self.engines:
                self.stepped.wait(60)
            # the meters run in a process of their own: no GIL shared with the engine thread
            meters = accounting.MeterProcess(
                {dom: ([self.vms[n] for n in names], self.engines[dom].store_ref if dom in self.engines else None)
                 for dom, names in self.domains.items()}, scrub=self.scrub, credits=self.surplus is not None)
            told: set[str] = set()
            next_sample = time.monotonic()
            while not self.stop_evt.wait(max(0.0, next_sample - time.monotonic())):
                next_sample = max(next_sample + self.interval, time.monotonic())
                c0, g0 = time.thread_time(), self.guard.inline_cpu_s
                samples = meters.sample()
                failed = {}
                for dom, why in meters.errors.items():
                    if self._died_under(dom):
                        meters.drop(dom)  # its VM died: recorded, the other domains go on
                    else:
                        failed[dom] = why
                if failed:
                    raise HarnessError("measuring failed: " + "; ".join(
                        f"domain {dom}: {why}" for dom, why in failed.items()))
                samples = {d: x for d, x in samples.items() if d not in self.lost}
                for unt in meters.untracked.values():
                    for name, why in unt.items():
                        if name not in told:
                            told.add(name)
                            self.log(f"VM {name}: the oracle cannot track writes and re-reads pages at "
                                     f"every sample ({why}); see oracle.untracked_pages in the samples")
                self.oracle_cpu = meters.cpu_s()
                try:
                    self.sample(samples)
                except Exception:
                    if not self._died_under(None):
                        raise
                    continue  # a QEMU died under the row (QMP, its maps): recorded, next sample
                # the guard's reading, if taken here, is the guard's CPU (guard_s), not sampling's
                self.sample_cpu += time.thread_time() - c0 - (self.guard.inline_cpu_s - g0)
                self.first_sample.set()
        except BaseException as e:  # noqa: BLE001 - reported by the runner
            self.errors.append(e)
            self.stop_evt.set()
        finally:
            self.first_sample.set()
            if meters is not None:
                meters.close()

    def sample(self, samples: dict[str, accounting.Sample]) -> None:
        """One sample row from one sample of each domain."""
        t = round(time.monotonic() - self.t_start, 3)
        saving = 0
        credits: dict[str, float] = {}
        oracle = {"cpu_ms": 0.0, "hashed": 0, "untracked_pages": 0, "stale": 0, "method": "incremental"}
        for s in samples.values():
            oracle["cpu_ms"] += s.cpu_seconds * 1000
            oracle["hashed"] += s.frames_read
            oracle["untracked_pages"] += s.untracked_pages
            oracle["stale"] += s.stale
            if s.method != "incremental" or s.untracked_pages:
                oracle["method"] = s.method if s.method != "incremental" else "incremental, partly untracked"
            saving += int(s.R or 0)
            # each VM's contribution: (n-1)/n for each of its pages on a frame held n times
            credits.update(s.credits)
        # per domain <dom>.<key> when the run has several, totals with ratios from summed counts
        row = metrics.sample_row(t, {dom: s.as_dict() for dom, s in samples.items()},
                                 prefixed=len(set(self.domain_of.values())) > 1)
        if self.lost:
            row["lost_domains"] = sorted(self.lost)
        # the host memory the guests use against the budget (the guard's reading now, with the
        # pages filled and broken since the last sample), and the balloons' actual sizes
        self.guard.merged = self._store_mappings()
        row["host"] = self.guard.reading().as_dict(self.budget_pages)
        if self.surplus is not None:
            self.surplus.update(saving, credits)
            row.update(self.surplus.snapshot())
            row["balloon_actual_mb"] = {n: int(vm.qmp("query-balloon")["actual"]) / (1 << 20)
                                        for n, vm in self.vms.items() if vm.alive()}
        cpu: dict[str, Any] = {"engine_s": round(self.engine_cpu, 3), "agent_s": None, "ksmd_s": None,
                               "hosthints_s": 0.0, "oracle_s": round(self.oracle_cpu, 3)}
        errors = []
        if self.ksm_ctl is not None:
            k = self.ksm_ctl.sample()
            row["ksm_pages_sharing"] = k.pages_sharing
            row["ksmd_cpu_s"] = round(k.ksmd_cpu_s, 3)
            cpu["ksmd_s"] = round(k.ksmd_cpu_s - (self._ksm0 or 0.0), 3)
        else:
            cpu["ksmd_s"] = 0.0  # ksmd does not run in this mode
        stats = self.engine_stats()
        if self.engines:
            agent_ns = hosthints_ns = 0
            hosthints_ok = True
            for dom, st in stats.items():
                row[("" if len(self.engines) == 1 else f"{dom}.") + "merged_total"] = st["merged_total"]
                for name, v in st["vms"].items():
                    if v.get("agent_cpu_ns") is None:
                        errors.append(f"VM {name}: {v.get('agent_error') or 'agent CPU unknown'}")
                    else:
                        agent_ns += int(v["agent_cpu_ns"])
                    if "hosthints_cpu_ns" in v:  # hints produced on the host (any-guest's preload)
                        if v["hosthints_cpu_ns"] is None:
                            hosthints_ok = False
                            errors.append(f"VM {name}: host hints: {v.get('hosthints_error') or 'CPU unknown'}")
                        else:
                            hosthints_ns += int(v["hosthints_cpu_ns"])
            cpu["hosthints_s"] = round(hosthints_ns / 1e9, 3) if hosthints_ok else None
            if not stats:
                errors.append("no engine stats yet")
            elif not any(e.startswith("VM ") for e in errors):
                cpu["agent_s"] = round(agent_ns / 1e9, 3)
        else:
            cpu["agent_s"] = 0.0  # no merge agent in this mode
        if errors:
            cpu["error"] = "; ".join(errors)
        row["cpu"] = cpu
        oracle["cpu_ms"] = round(oracle["cpu_ms"], 2)
        row["oracle"] = oracle
        self.samples.append(row)

    def _store_mappings(self) -> dict[str, Any]:
        """Per VM of a domain with a content store: where its QEMU maps the store, as
        ``(guest offset, store offset, pages)`` ranges, read from ``/proc/<pid>/maps`` (the
        kernel's word; the merge agents' LIST is what is being measured)."""
        out: dict[str, Any] = {}
        for dom, eng in list(self.engines.items()):
            try:
                fd = eng.store_ref.open(os.O_RDONLY)
            except (HarnessError, AttributeError):
                continue  # no store (yet): nothing maps it
            try:
                fid = accounting.file_id(fd)
            finally:
                os.close(fd)
            for n in self.domains.get(dom, []):
                if n not in self.vms:
                    continue
                t = accounting.target(self.vms[n])
                out[n] = accounting.store_ranges(t.pid, t.hva, t.ram_size, fid)
        return out

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 30.0) -> None:
        """Wait until the engines saw no new hint for ``quiet_s`` (no-op without engines)."""
        if not self.engines:
            return
        end = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < end and self.error is None:
            if self.idle.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet_s:
                    return
            else:
                quiet_since = None
            time.sleep(0.05)


class _Guard(threading.Thread):
    """Reads the host memory the guests use every ``GUARD_INTERVAL_S`` (pagemaps: cheap, no
    hashing) and lets the surplus manager's guard act on it, in a thread of its own: a slow
    sample (the oracle hashes all memory) never delays taking surplus back.

    Without a surplus manager (every VM at its entitlement: nothing is lent, so nothing can be
    taken back) there is nothing to watch between samples: the thread ends at once and each
    sample's ``reading()`` reads the host itself, once a sample instead of four times a second
    (measured: the 4 Hz reads cost 4.5-6 s of CPU in a 90 s 4-VM run, 6-7% of a core taken from
    the guests). Its CPU is still ``cpu_s``; ``inline_cpu_s`` is the part spent in the caller's
    thread."""

    def __init__(self, vms: list[VM], surplus: SurplusManager | None, stores: list[str]) -> None:
        super().__init__(daemon=True, name="satori-guard")
        self.meter = budget.HostMeter(vms)
        self.surplus = surplus
        self.stores = stores
        self.merged: dict[str, Any] = {}  # the merge agents' ranges, as the last sample read them
        self.stop_evt = threading.Event()
        self.error: BaseException | None = None
        self.cpu_s = 0.0
        self.inline_cpu_s = 0.0  # the part of cpu_s spent in reading()'s caller
        self._lock = threading.Lock()
        self._latest: budget.HostUse | None = None
        self._new: dict[str, int] = {}  # per VM, since the last reading() by a sample
        self._broken: dict[str, int] = {}

    def look(self) -> budget.HostUse:
        """One reading (the guard thread's, or the first sample's); the manager acts on it.
        A VM whose QEMU exited is left out (the loop records its death)."""
        c0 = time.thread_time()
        self.meter.vms = [v for v in self.meter.vms if v.alive()]
        with self._lock:
            hu = self.meter.read(self.stores, self.merged)
            self._latest = hu
            for n, v in hu.new.items():
                self._new[n] = self._new.get(n, 0) + v
            for n, v in hu.broken.items():
                self._broken[n] = self._broken.get(n, 0) + v
            dt = self.meter.dt
        if self.surplus is not None and dt > 0:
            self.surplus.observe(hu.used, hu.broken, dt)
        self.cpu_s += time.thread_time() - c0
        return hu

    @property
    def watching(self) -> bool:
        """Whether the thread reads every GUARD_INTERVAL_S (a surplus manager to act for)."""
        return self.surplus is not None

    def reading(self) -> budget.HostUse:
        """The latest reading (at most ``GUARD_INTERVAL_S`` old), with the new and broken pages
        summed since the previous call. Without a surplus manager: a reading taken now."""
        if self._latest is None or not self.watching:
            c0 = self.cpu_s
            self.look()
            self.inline_cpu_s += self.cpu_s - c0
        with self._lock:
            hu = dataclasses.replace(self._latest, new=self._new, broken=self._broken)  # type: ignore[arg-type]
            self._new, self._broken = {}, {}
        return hu

    def run(self) -> None:
        if not self.watching:
            return  # nothing lent, nothing to take back: reading() reads once a sample
        try:
            while not self.stop_evt.wait(GUARD_INTERVAL_S):
                try:
                    self.look()
                except Exception:
                    if all(v.alive() for v in self.meter.vms):
                        raise
                    # a QEMU died under the reading: the next one leaves it out
        except BaseException as e:  # noqa: BLE001 - reported by the runner
            self.error = e


class Runner:
    """``satori run CONFIG``: every mode and repetition, then results and report."""

    def __init__(self, cfg: ExperimentConfig, config_path: Path | None = None,
                 out: Path | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.out = out or cfg.output_dir()
        self.log = log
        self.runs: list[ModeRun] = []
        self.skipped: dict[str, str] = {}  # mode -> why this host cannot run it
        self.git_at_start: tuple[str | None, str | None] | None = None
        self.image: Image | None = None
        self.images: dict[str, Image] = {}  # VM name -> its image (VMs may boot different ones)
        self.accel = None

    # ------------------------------------------------------------ one mode
    def _specs(self, mode: modes.Mode) -> list[VMSpec]:
        # the adversary maps its hint ring BAR from guest user space: the kernel must allow it
        append = "iomem=relaxed" if any(w.name == "adversary" for w in self.cfg.workloads) else ""
        specs = []
        for v in self.cfg.vm_list():
            specs.append(VMSpec(
                name=v.name, memory_mb=v.memory_mb, vcpus=v.vcpus,
                ram_backend=mode.ram_backend, disk_iops=v.disk_iops, disk_bps=v.disk_bps,
                append=append,
            ))
        return specs

    def run_mode(self, mode: str, rep: int) -> ModeRun:
        """One (mode, repetition): boot, share, run the workloads, sample; recorded in
        :attr:`runs` whatever happens. A VM whose QEMU dies is recorded and the workloads go on
        with the VMs left (the run's status is then ``failed``); any other error is recorded
        and raised."""
        assert self.image is not None
        cfg = self.cfg
        m = modes.get(mode)
        run_id = new_run_id()
        t_start = time.monotonic()
        cpu0 = time.process_time()
        with contextlib.ExitStack() as stack:
            # after the VMs are gone (their shutdown callbacks come after this one, so run
            # before it): a KSM control that started ksmd lets it free the exited VMs' items
            ksm_after: list[ksm.KSMControl] = []
            stack.callback(lambda: [c.flush_exited() for c in ksm_after])
            vms, setup = [], {}
            for s, v in zip(self._specs(m), cfg.vm_list(), strict=True):
                img = self.images.get(s.name, self.image)
                atts, source = mode_attachments(m, img, v.hints, self.log)
                vms.append(VM(s, img, run_id=run_id, accel=self.accel, log=self.log, attachments=atts))
                setup[s.name] = {"image": img.name, "recipe_hash": img.recipe_hash, "kernel": img.abi,
                                 "hints": source or "off", "pmem": m.pmem}
            for vm in vms:
                stack.callback(vm.shutdown)
            self.log(f"[{mode} #{rep + 1}] booting {len(vms)} VMs")
            try:
                start_all(vms)
            except BootError as e:  # recorded; the other modes and repetitions still run
                run = ModeRun(mode=mode, rep=rep, samples=[], workloads=[], events=[], t0=None,
                              engine=None, ksm=None, cpu={}, boot_s={}, surplus=[], status="failed",
                              error=f"boot: {e.message}")
                self.runs.append(run)
                self.write()
                self.log(f"[{mode} #{rep + 1}] {e.message}; this run is recorded as failed\n{e.context or ''}")
                return run
            self.accel = vms[0].accel
            boot = {vm.name: round(vm.boot_seconds or 0.0, 2) for vm in vms}
            self.log(f"[{mode} #{rep + 1}] booted in {max(boot.values()):.1f} s")
            budgets = [Budget.from_mb(v.name, v.entitlement_mb, v.memory_mb) for v in cfg.vm_list()]
            surplus = None
            if any(b.entitlement < b.max for b in budgets):
                surplus = SurplusManager(budgets, {vm.name: vm.qmp for vm in vms},
                                         enabled=cfg.surplus and m.shares,
                                         policy=Policy(**cfg.surplus_policy.model_dump()))
                surplus.start()
                self._wait_balloons(vms, surplus)
            ksm_ctl = None
            if m.scans:
                ksm_ctl = stack.enter_context(ksm.KSMControl(mode))
                ksm_after.append(ksm_ctl)
            ksm0 = ksm_ctl.sample() if ksm_ctl else None
            engines: dict[str, SharingEngine] = {}
            if m.engine:
                by_name = {vm.name: vm for vm in vms}
                for dom, names in cfg.domains().items():
                    members = [Member.from_vm(by_name[n]) for n in names if ring_of(by_name[n])]
                    if len(members) < len(names):
                        self.log(f"domain {dom}: VMs without hints take no part in sharing: "
                                 + ", ".join(n for n in names if not ring_of(by_name[n])))
                    if members:
                        engines[dom] = stack.enter_context(SharingEngine(
                            members, domain=f"{dom}-{run_id}", log=self.log))
            t_mode = time.monotonic()
            loop = _Loop(vms, engines, cfg.groups(), cfg.sample_interval_s, surplus, t_mode, ksm_ctl, self.log,
                         budget_pages=sum(b.entitlement for b in budgets), priority=cfg.engine_priority)
            ctx = RunContext(log=self.log, t0=t_mode, settle=loop.settle)
            results = []
            status, error = "ok", None
            loop.start()  # stopped and joined in the finally below
            loop.guard.start()
            try:
                loop.first_sample.wait(120)  # the workloads start from a measured baseline
                for i, w in enumerate(cfg.workloads):
                    wl = make(w.name, w.params.model_dump() if hasattr(w.params, "model_dump") else dict(w.params or {}),
                              seed=cfg.seed + rep)
                    alive = [vm for vm in vms if vm.alive()]
                    if not alive:
                        break
                    self.log(f"[{mode} #{rep + 1}] workload {i + 1}/{len(cfg.workloads)}: {w.name}")
                    try:
                        r = wl.run(alive, ctx)
                    except Exception as e:
                        time.sleep(0.5)  # the loop's threads record a QEMU that died under the workload
                        if loop.error is None and any(not vm.alive() for vm in alive):
                            loop.check_vms()
                            status = "failed"
                            error = f"workload {w.name}: {e}"
                            self.log(f"[{mode} #{rep + 1}] {w.name} failed after a VM died: {e}")
                            continue
                        raise
                    if loop.error:
                        raise loop.error
                    if loop.guard.error:
                        raise HarnessError(f"host memory guard failed: {loop.guard.error}")
                    results.append(dataclasses.asdict(r))
                    self.log(f"[{mode} #{rep + 1}] {w.name}: {r.time_s:.2f} s")
                end = time.monotonic() + SETTLE_TAIL_S
                while time.monotonic() < end and loop.error is None:
                    time.sleep(0.1)
            except KeyboardInterrupt:
                status, error = "interrupted", "interrupted"
                raise
            except BaseException as e:
                status, error = "failed", f"{type(e).__name__}: {e}"
                raise
            finally:
                loop.stop_evt.set()
                loop.guard.stop_evt.set()
                loop.join(30)
                loop.guard.join(30)
                if loop.is_alive():  # stuck in a QMP or agent call: say so, the VMs go down below
                    self.log(f"[{mode} #{rep + 1}] the sampling/sharing loop did not stop within 30 s")
                loop.check_vms()
                if loop.deaths and status == "ok":
                    status = "failed"
                if loop.deaths and error is None:
                    error = "; ".join(describe_death(f) for f in loop.deaths)
                if loop.error is not None and error is None:
                    status, error = "failed", f"sampling/sharing loop: {loop.error}"
                if loop.guard.error is not None and error is None:  # failed after the last workload
                    status, error = "failed", f"host memory guard: {loop.guard.error}"
                if surplus is not None:
                    with contextlib.suppress(Exception):
                        surplus.release()
                eng_stats = {d: e.stats() for d, e in engines.items()} or None
                ksm_delta = None
                if ksm_ctl and ksm0:
                    with contextlib.suppress(HarnessError):
                        ksm_delta = ksm_ctl.sample().since(ksm0)
                vm_stats = [v for s in (eng_stats or {}).values() for v in s["vms"].values()]
                # the agents' thread CPU (every request: merges and the engine's LISTs); unknown
                # (None, with the reason) if any agent could not say: never a substitute
                agent_errors = [f"VM {n}: {v.get('agent_error') or 'agent CPU unknown'}"
                                for s in (eng_stats or {}).values() for n, v in s["vms"].items()
                                if v.get("agent_cpu_ns") is None]
                agent_s = None if agent_errors else sum(v["agent_cpu_ns"] for v in vm_stats) / 1e9
                agent_merge_s = sum(v["agent_ns"] for v in vm_stats) / 1e9
                cpu = {
                    "harness_s": round(time.process_time() - cpu0, 3),
                    "engine_s": round(loop.engine_cpu, 3),
                    "sampling_s": round(loop.sample_cpu, 3),
                    "guard_s": round(loop.guard.cpu_s, 3),
                    "oracle_s": round(loop.oracle_cpu, 3),
                    "agent_s": round(agent_s, 3) if agent_s is not None else None,
                    "agent_merge_s": round(agent_merge_s, 3),
                    "ksmd_s": round(ksm_delta["ksmd_cpu_s"], 3) if ksm_delta else 0.0,
                    "wall_s": round(time.monotonic() - t_start, 3),
                    # the engine loop's longest step and longest overrun of a sleep (seconds)
                    "engine_loop_max": dict(loop.loop_max),
                    # steps over 0.1 s and the longest one: wall = CPU + run queue + blocked
                    "engine_slow_steps": {k: round(v, 3) for k, v in loop.slow_steps.items()},
                    "engine_longest_step": {k: round(v, 3) for k, v in loop.longest_step.items()},
                    "engine_steps": dict(loop.steps),
                    "engine_priority": cfg.engine_priority,
                    "realtime": loop.realtime,
                }
                if agent_errors:
                    cpu["error"] = "; ".join(agent_errors)
                starts = [t for t, label in ctx.events if "start" in label or "read" in label or "warm" in label]
                run = ModeRun(
                    mode=mode, rep=rep, samples=loop.samples, workloads=results, events=ctx.events,
                    t0=starts[0] if starts else None, engine=eng_stats, ksm=ksm_delta, cpu=cpu,
                    boot_s=boot, surplus=surplus.series() if surplus else [],
                    quiet_since=ctx.quiet_since, status=status, error=error, failures=list(loop.deaths),
                    entitlements_mb={v.name: float(v.entitlement_mb) for v in cfg.vm_list()}, vms=setup,
                )
                self.runs.append(run)
                self.write()
            if loop.error:
                raise HarnessError(f"mode {mode}: sampling/sharing loop failed: {loop.error}") from loop.error
        for f in run.failures:
            self.log(f"[{mode} #{rep + 1}] recorded: {describe_death(f)}")
        return run

    def _images(self) -> dict[str, Image]:
        """Each VM's image (its ``image:`` recipe, built or found in the cache), by VM name."""
        cdir = self.config_path.parent if self.config_path else None
        default = DEFAULT_RECIPE.resolve()
        built: dict[Path, Image] = {default: self.image} if self.image else {}
        out = {}
        for v in self.cfg.vm_list():
            rp = (recipe_path(v.image, cdir) or DEFAULT_RECIPE).resolve()
            if rp not in built:
                built[rp] = ensure_image(rp, log=self.log)
            out[v.name] = built[rp]
        return out

    def _wait_balloons(self, vms: list[VM], surplus: SurplusManager, timeout: float = 60.0) -> None:
        """Wait until each guest's balloon reached its entitlement (the guest frees memory)."""
        end = time.monotonic() + timeout
        for vm in vms:
            target = surplus.targets[vm.name] * 4096
            while time.monotonic() < end:
                if abs(int(vm.qmp("query-balloon")["actual"]) - target) < (8 << 20):
                    break
                time.sleep(0.5)
            else:
                self.log(f"VM {vm.name}: balloon did not reach {target >> 20} MB in {timeout:.0f} s")

    # ------------------------------------------------------------ all
    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.git_at_start = report.git_state()  # the code this run measures, whatever HEAD is later
        for m in self.cfg.modes:
            why = modes.get(m).unavailable()
            if why:
                self.skipped[m] = why
                self.log(f"mode {m} skipped: {why}")
        runnable = [m for m in self.cfg.modes if m not in self.skipped]
        self.image = ensure_image(log=self.log)
        self.images = self._images() if runnable else {}
        total = len(runnable) * self.cfg.repetitions
        k = 0
        try:
            for rep in range(self.cfg.repetitions):
                order = runnable[rep % len(runnable):] + runnable[:rep % len(runnable)] if runnable else []
                for mode in order:
                    k += 1
                    self.log(f"=== {k}/{total}: mode {mode}, repetition {rep + 1}/{self.cfg.repetitions}")
                    self.run_mode(mode, rep)
        except KeyboardInterrupt:
            self.log("interrupted: everything started was stopped; writing what was measured")
            self.write()
            raise
        self.write()
        return self.out

    # ------------------------------------------------------------ results
    def results(self) -> dict[str, Any]:
        """``results.json`` (layout: :mod:`harness.report`): per mode the table entry, every
        metric of :mod:`harness.metrics` per run, the runs' records (samples, events, engine
        statistics, CPU, failures)."""
        records = {(r.mode, r.rep): run_record(r, self.cfg) for r in self.runs}
        modes_out: dict[str, Any] = {}
        for (mode, rep), rec in records.items():
            base = records.get(("none", rep))
            view = metrics.RunView.from_record(rec, mode)
            base_view = metrics.RunView.from_record(base, "none") if base is not None else None
            rec["figures"], rec["why"] = metrics.evaluate(view, base_view)
            entry = modes_out.setdefault(mode, {"mode": mode_entry(mode), "runs": []})
            entry["runs"].append(rec)
        for entry in modes_out.values():
            entry.update(aggregate_runs(entry["runs"]))
        for mode, why in self.skipped.items():
            modes_out[mode] = {"mode": mode_entry(mode), "skipped": why}
        meta = report.collect_meta(
            config_as_run(self.cfg), self.accel.accel if self.accel else None,
            self.image.abi if self.image else None, self.image.recipe_hash if self.image else None,
            self.git_at_start,
        )
        if self.accel:
            meta["accel_reason"] = self.accel.reason
        meta["config_file"] = str(self.config_path) if self.config_path else None
        meta["images"] = {n: {"image": i.name, "recipe_hash": i.recipe_hash, "kernel": i.abi,
                              "hint_driver": i.hints} for n, i in self.images.items()}
        meta["seed"] = self.cfg.seed
        expected = (len(self.cfg.modes) - len(self.skipped)) * self.cfg.repetitions
        complete = len(self.runs) == expected and all(r.status == "ok" for r in self.runs)
        return {
            "name": self.cfg.name, "meta": meta,
            "status": "complete" if complete else "partial", "partial": not complete,
            "runs_expected": expected,
            "failures": [{"mode": r.mode, "rep": r.rep, **f} for r in self.runs for f in r.failures],
            "modes": dict(sorted(modes_out.items(), key=lambda kv: modes.order_key(kv[0]))),
        }

    def write(self) -> None:
        report.write_results(self.out, self.results())


def mode_entry(name: str) -> dict[str, Any]:
    """The mode table's entry as recorded in results (what the mode was when it ran)."""
    m = modes.get(name)
    return {"name": m.name, "summary": m.summary, "ram_backend": m.ram_backend,
            "ksm": dict(m.ksm) if m.ksm else None, "hints": m.hints, "engine": m.engine, "pmem": m.pmem}


def run_record(r: ModeRun, cfg: ExperimentConfig) -> dict[str, Any]:
    """One run as ``results.json`` keeps it (what :class:`harness.metrics.RunView` reads)."""
    from harness.workloads import registry

    kinds = registry()
    defines = sorted({d for w in cfg.workloads for d in kinds[w.name].DEFINES})
    return {
        "rep": r.rep, "status": r.status, "error": r.error, "failures": r.failures,
        "entitlements_mb": r.entitlements_mb, "vms": r.vms,
        "t0": r.t0, "quiet_since": r.quiet_since, "defines": defines, "surplus_on": cfg.surplus,
        "boot_s": r.boot_s, "cpu": r.cpu, "ksm": r.ksm, "engine": r.engine,
        "workloads": r.workloads, "events": r.events, "surplus": r.surplus, "samples": r.samples,
    }


def aggregate_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A mode's figures over its runs: every metric's per-run values (``figures``, with the
    reasons where a run has none, ``why``), over the runs that completed; over all of them, said
    in ``figures_from``, when none did."""
    ok = [r for r in runs if r["status"] == "ok"]
    use, frm = (ok, "completed runs") if ok else (runs, "runs that did not complete")
    figures = {m.key: [r["figures"].get(m.key) for r in use] for m in metrics.METRICS}
    why = {k: [r["why"].get(k) for r in use] for k in figures if any(r["why"].get(k) for r in use)}
    return {"figures": figures, "why": why, "figures_from": frm, "reps": [r["rep"] for r in use]}
