"""The sharing engine of one sharing domain: verified hints in, copy-on-write merges out.

Only VMs given to one engine are ever merged together: the engine *is* the sharing domain.
Several engines (domains) may run in one process and one thread (``satori run`` steps them in
turn); each step of each engine is bounded (below), so no domain and no VM can starve another.

Where things are (a newcomer's map):

- ``link.py``      — :class:`Member` (what a VM offers) and :class:`VMLink` (ring, agent, fds,
                     counters of one VM).
- ``core.c``/``core.py`` — the native hot path: per hint record read the page once, verify its
                     XXH64, key it with a secret hash, look it up, plan merges, stage store pages.
- ``index.py``     — the content index's rules: the secret key, the per-VM quota, the bounds.
- ``scheduler.py`` — flushing planned merges to the agents (:func:`send_batch`), their answers,
                     the merge lag.
- ``breaks.py``    — the agents' LISTs: copy-on-write breaks, freeing store slots safely.
- ``store.py``     — the content store file.
- ``reference.py`` — the planner in plain Python, the specification the core is tested against.

Each :meth:`SharingEngine.step` serves the VMs round robin, starting one further each step,
taking at most ``records_per_poll`` records from each VM's ring (the rest wait in the guest's
ring, which drops records when full: a flooding guest loses its own hints). So an honest VM's
hints wait at most one round of the others' budgets, whatever a flooding guest sends.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from harness import sysstate
from harness.errors import HarnessError
from harness.memfd import ProcFile
from harness.sharing import hosthints, index
from harness.sharing.agent import AgentRequestError
from harness.sharing.breaks import BreakChecker
from harness.sharing.core import NativeCore, base_bytes
from harness.sharing.link import Member, VMLink, resume
from harness.sharing.scheduler import MergeScheduler
from harness.sharing.store import PAGE, ContentStore

__all__ = ["IdlePoll", "Member", "SharingEngine"]


class IdlePoll:
    """Sleep between polls of the hint rings: ``poll_s`` while hints flow, growing by half each
    idle step up to ``max_s`` (an idle engine costs little CPU; the first hint after a quiet
    spell waits at most ``max_s``). The sleep reaches 0.25 s after ~0.9 s without a hint: an
    idle engine wakes 4 times a second, not 10 (an idle step measured ~0.15 ms of the engine
    thread's CPU on a busy 2-core host, however little it does); a burst of
    reads after a quiet spell waits at most 0.25 s for its first poll, then 20 ms again. While
    pairs wait in a batch (``pending``), the sleep stays at ``poll_s``: a batch is flushed when
    its flush interval is up, not up to one backed-off sleep later (that sleep is merge lag)."""

    def __init__(self, poll_s: float = 0.02, max_s: float = 0.25) -> None:
        self.poll_s = poll_s
        self.max_s = max(poll_s, max_s)
        self.cur = poll_s

    def wait(self, taken: int, pending: bool = False) -> float:
        """Sleep as said above; returns the seconds asked for (0 when hints were taken)."""
        if taken:
            self.cur = self.poll_s
            return 0.0
        if pending:
            self.cur = self.poll_s
            time.sleep(self.poll_s)
            return self.poll_s
        asked = self.cur
        time.sleep(asked)
        self.cur = min(self.max_s, self.cur * 1.5)
        return asked


class SharingEngine:
    """Immediate merging of hinted pages across the VMs of one sharing domain.

    ``records_per_poll``: hint records taken from one VM per step at most; ``candidate_quota``:
    the fraction of a VM's RAM pages it may hold as first holders in the index (one figure, or
    per VM name, 1.0 for VMs not named); ``key``: the index's secret key (random per engine
    unless given, for tests).
    """

    def __init__(
        self,
        members: Iterable[Member],
        domain: str = "default",
        store_name: str | None = None,
        batch_pages: int = 4096,
        flush_interval_s: float = 0.2,
        break_check_interval_s: float = 1.0,
        log: Callable[[str], None] | None = None,
        records_per_poll: int = 4096,
        candidate_quota: float | dict[str, float] = 1.0,
        stage_pages: int = 256,
        key: bytes | None = None,
    ) -> None:
        self.members = list(members)
        if not self.members:
            raise HarnessError("a sharing domain needs at least one VM")
        if records_per_poll < 1 or batch_pages < 1 or stage_pages < 1:
            raise HarnessError("records_per_poll, batch_pages and stage_pages must be >= 1")
        self.domain = domain
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)[:64]
        self.store_name = store_name or f"satori-store-{label}-{os.getpid()}"
        self.batch_pages = batch_pages
        self.flush_interval_s = flush_interval_s
        self.break_check_interval_s = break_check_interval_s
        self.records_per_poll = records_per_poll
        self.candidate_quota = candidate_quota
        self.stage_pages = stage_pages
        self.log = log or (lambda s: None)
        self._key = key if key is not None else index.new_key()
        self.links: list[VMLink] = []
        self.store: ContentStore | None = None
        self.core: NativeCore | None = None
        self.scheduler: MergeScheduler | None = None
        self.breaks: BreakChecker | None = None
        self._saved_max_map: int | None = None
        self._rr = 0
        self.step_max = {"ingest_s": 0.0, "flush_s": 0.0, "breaks_s": 0.0}
        self.t_first_hint: float | None = None
        self.t_start = time.monotonic()
        self.cpu_start = time.process_time()

    @property
    def store_ref(self) -> ProcFile | None:
        """The content store (a memfd) as other readers reach it: ``/proc/<engine pid>/fd/<n>``."""
        return self.store.ref if self.store is not None else None

    def quota(self, m: Member) -> int:
        """First holders VM ``m`` may have in the index at once."""
        q = self.candidate_quota
        return index.candidate_quota(m.ram_size, q.get(m.name, 1.0) if isinstance(q, dict) else q)

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> SharingEngine:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        self.store = ContentStore(self.store_name)
        sizes = [m.ram_size for m in self.members]
        self.core = NativeCore(self._key, self.store.fd, self.stage_pages, index.max_slots(sizes))
        for i, m in enumerate(self.members):
            link = VMLink(i, m)
            self.links.append(link)
            vm = self.core.add_vm(link.ram_fd, link.mem_fd, link.hva, m.ram_size, self.quota(m), self.batch_pages)
            assert vm == link.idx
            if link.view is not None:
                self.core.set_view(vm, link.view.addr)
            elif link.view_error:
                self.log(f"VM {m.name}: hinted pages read with pread ({link.view_error})")
            assert link.agent is not None
            try:
                link.agent.open_store(self.store.ref.path)
            except AgentRequestError as e:
                if e.errno != errno.EBUSY:
                    raise
                self._take_over(link)
            info = link.agent.ping()
            link.wp = info.get("wp") == 1
            link.delta = {"7", "8"} <= set(str(info.get("ops", "")).split(","))
            if not link.wp:
                why = info.get("wp_error") or "an agent without write-protection"
                self.log(f"VM {m.name}: no pause-free merging ({why}): each merge batch holds "
                         "its vCPUs with QMP stop/cont")
        self.breaks = BreakChecker(self.core, self.links, self.break_check_interval_s, self.log)
        self.scheduler = MergeScheduler(self.core, self.breaks, self.batch_pages, self.flush_interval_s, self.log)
        self._raise_max_map_count(2 * sum(s // PAGE for s in sizes) + 65536)

    def _take_over(self, link: VMLink) -> None:
        """The VM still maps pages of the store of an engine that is gone (stopped or killed):
        give them back to its RAM (unmerge, vCPUs held), then open this engine's store."""
        assert self.store is not None and link.agent is not None
        self.log(f"VM {link.name}: pages merged by a previous engine: unmerging them first")
        link.resume_due = True
        link.m.qmp("stop")
        try:
            res = link.agent.unmerge(0, link.m.ram_size // PAGE)
        finally:
            resume(link, self.log)
        self.log(f"VM {link.name}: {res.restored} pages unmerged ({res.failed} failed)")
        link.agent.open_store(self.store.ref.path)

    def close(self) -> None:
        for link in self.links:
            if link.resume_due:  # leave no VM paused behind us
                resume(link, self.log)
            link.close()
        self.links = []
        if self.core is not None:
            self.core.close()
            self.core = None
        if self.store is not None:
            self.store.close()  # QEMUs keep their mappings: the pages stay valid
            self.store = None
        self._restore_max_map_count()

    def _raise_max_map_count(self, want: int) -> None:
        """Each isolated merged page may cost 2 VMAs: lift the limit for the run (recorded
        machine-wide before the change, restored at close or by ``satori cleanup``)."""
        try:
            if sysstate.raise_max_map_count(want):
                self._saved_max_map = want
                self.log(f"vm.max_map_count raised to {want} for this run")
        except (OSError, HarnessError) as e:
            self.log(f"cannot raise vm.max_map_count ({e}): scattered merges may fail with ENOMEM")

    def _restore_max_map_count(self) -> None:
        if self._saved_max_map is not None:
            with contextlib.suppress(OSError, HarnessError):
                sysstate.release_max_map_count()
            self._saved_max_map = None

    # ---------------------------------------------------------------- the loop
    def _parts(self) -> tuple[NativeCore, MergeScheduler, BreakChecker]:
        if self.core is None or self.scheduler is None or self.breaks is None:
            raise HarnessError("the sharing engine is not open")
        return self.core, self.scheduler, self.breaks

    def step(self) -> int:
        """Serve every VM once (round robin, at most ``records_per_poll`` records each), flush
        due batches, look for breaks when due. Returns the records taken."""
        core, sched, breaks = self._parts()
        t0 = time.monotonic()
        taken = 0
        n = len(self.links)
        for k in range(n):
            link = self.links[(self._rr + k) % n]
            assert link.ring is not None
            batch = link.ring.poll(max_records=self.records_per_poll)
            if len(batch):
                if self.t_first_hint is None:
                    self.t_first_hint = time.monotonic()
                taken += len(batch)
                self._ingest(link, batch)
        self._rr = (self._rr + 1) % n
        t1 = now = time.monotonic()
        for link in self.links:
            if link.resume_due and now >= link.resume_at:  # a stop/cont failed: resume it
                resume(link, self.log)
        now_ns = time.monotonic_ns()
        for link in self.links:
            if sched.due(link, now_ns):
                sched.flush(link)
        t2 = time.monotonic()
        if breaks.due(t2, taken):
            breaks.check()
            breaks.checked()
        t3 = time.monotonic()
        m = self.step_max  # the longest of each part of a step so far (s): where lag comes from
        m["ingest_s"], m["flush_s"], m["breaks_s"] = (max(m["ingest_s"], t1 - t0), max(m["flush_s"], t2 - t1),
                                                       max(m["breaks_s"], t3 - t2))
        return taken

    def pending(self) -> bool:
        """Whether any VM has merge pairs waiting for their batch to be flushed (False once
        the engine is closed: nothing can wait in it any more)."""
        core = self.core
        return core is not None and any(core.pending(link.idx)[0] for link in self.links)

    def _ingest(self, link: VMLink, batch: np.ndarray) -> None:
        core, sched, _ = self._parts()
        t = time.monotonic_ns()
        done = 0
        while done < len(batch):
            done += core.ingest(link.idx, batch[done:], t)
            if done < len(batch):  # some VM's batch is full: send it, then go on
                for other in self.links:
                    if sched.full(other):
                        sched.flush(other)

    def run(self, stop: Callable[[], bool], poll_s: float = 0.02) -> None:
        """Step until ``stop()`` is true (Ctrl-C propagates; merged pages stay correct)."""
        idle = IdlePoll(poll_s)
        while not stop():
            idle.wait(self.step(), self.pending())
        self.flush_all()

    def run_for(self, seconds: float, poll_s: float = 0.02) -> None:
        end = time.monotonic() + seconds
        self.run(lambda: time.monotonic() >= end, poll_s)

    def drain(self, quiet_s: float = 0.5, timeout_s: float = 30.0) -> None:
        """Step until no hint arrived for ``quiet_s`` and every plan is flushed."""
        end = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < end:
            if self.step():
                last = time.monotonic()
            elif time.monotonic() - last >= quiet_s:
                break
            else:
                time.sleep(0.02)
        self.flush_all()

    def flush_all(self) -> None:
        _, sched, _ = self._parts()
        for link in self.links:
            sched.flush(link)

    def check_breaks(self) -> int:
        """Look for copy-on-write breaks and free unused store slots now."""
        _, _, breaks = self._parts()
        return breaks.check()

    # ---------------------------------------------------------------- figures
    def merged_ranges(self, exclude_private: bool = False) -> dict[str, np.ndarray]:
        """Per VM: the (guest_off, store_off, npages) ranges mapped from the store now; with
        ``exclude_private`` without the pages the guest has written since (copy-on-write
        broken: they hold a private copy and no longer need the store page)."""
        out = {}
        for link in self.links:
            assert link.agent is not None
            out[link.name] = link.agent.merged_ranges(exclude_private)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters of the domain and per VM; ``merge_lag_s``; per VM ``agent_cpu_ns`` (None
        with ``agent_error`` saying why when the agent could not tell) and ``hosthints_cpu_ns``
        (the host's hashing for host hints, 0 for a guest producer; None with ``hosthints_error``)."""
        core, sched, _ = self._parts()
        vms: dict[str, dict[str, Any]] = {}
        for link in self.links:
            cc = core.vm_counters(link.idx)
            assert link.ring is not None and link.agent is not None
            ring = link.ring.snapshot()
            v: dict[str, Any] = {
                "hinted": cc["hinted"], "changed": cc["changed"],
                "rejected": int(ring.rejected), "dropped": int(ring.dropped),
                "merged": cc["merged"], "broken": cc["broken"], "skipped": cc["skipped"],
                "candidates": cc["candidates"], "evicted": cc["evicted"], "adopted": cc["adopted"],
                "unconfirmed": cc["unconfirmed"],
            }
            v.update(vars(link.c))
            try:
                v["agent_cpu_ns"] = int(link.agent.stats()["thread_cpu_ns"])
                v["agent_error"] = None
            except (HarnessError, KeyError, ValueError) as e:
                v["agent_cpu_ns"] = None
                v["agent_error"] = f"agent STATS: {e}"
            try:  # a host producer counts its CPU in the ring header (a guest one leaves 0)
                v["hosthints_cpu_ns"] = hosthints.read_counters(link.m.ring).cpu_ns
                v["hosthints_error"] = None
            except HarnessError as e:
                v["hosthints_cpu_ns"], v["hosthints_error"] = None, str(e)
            v["last_error"] = link.last_error
            vms[link.name] = v
        c = core.counters()
        sizes = [m.ram_size for m in self.members]
        quotas = [self.quota(m) for m in self.members]

        return {
            "domain": self.domain,
            "store_pages": c["slots_live"],
            "store_slots_total": c["slots_hw"],
            "store": self.store.ref.as_dict() if self.store is not None else None,
            "engine_cpu_s": round(time.process_time() - self.cpu_start, 3),
            "merged_total": sum(v["merged_total"] for v in vms.values()),
            "merge_lag_s": sched.lag.summary(),
            "step_max_s": {k: round(v, 3) for k, v in self.step_max.items()},
            # the 5 batches with the longest lag: [lag s, VM, pages, wait before the send s, agent s]
            "slowest_batches": [list(b) for b in sched.slow],
            "index": {
                "entries": c["entries"], "slots_live": c["slots_live"], "slots_freed": c["slots_freed"],
                "slots_reused": c["slots_reused"], "unreferenced": c["unreferenced"],
                "slot_limit": c["slot_limit"], "lost": c["lost"],
                "mem_bytes": c["mem_bytes"],
                "mem_bound_bytes": index.memory_bound(sizes, quotas, self.batch_pages, self.stage_pages,
                                                      core.max_slots, base_bytes()),
            },
            "vms": vms,
        }
