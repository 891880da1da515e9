"""The merge scheduler: when a VM's planned merges go to its agent, and what comes back.

The native core plans merge pairs per VM; the scheduler flushes a VM's batch when it is full or
its oldest pair waited ``flush_interval_s``, through :func:`send_batch` (the one function that
talks to an agent about merging), and feeds the agent's answer back to the core:

- every pair merged: the pages are confirmed;
- some pairs not merged (a page changed before the agent's memcmp, or a mapping failed): the
  agent's per-pair status settles the books (``NativeCore.settle``);
- no answer at all (the reply was lost: the agent may have merged any part of the batch), or
  an agent without per-pair status: the agent's LIST is asked at once and the VM's books reset
  to it (:meth:`BreakChecker.relist`); until that LIST is had, the batch's pages keep their
  store slots referenced, so no slot is ever punched while this VM may map it.

It also keeps the **merge lag**: per merged page, seconds from the engine reading the hint that
made the merge possible to the agent's answer (p50/p99/max over a log histogram, 2% bins).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.errors import HarnessError
from harness.sharing.agent import STATUS_MERGED, MergeResult
from harness.sharing.core import CoreError
from harness.sharing.link import resume

if TYPE_CHECKING:
    from harness.sharing.breaks import BreakChecker
    from harness.sharing.core import NativeCore
    from harness.sharing.link import VMLink

PAGE = 4096


def send_batch(link: VMLink, pairs: np.ndarray) -> MergeResult:
    """Send one batch of (guest_off, store_off) merge pairs to one VM's agent and return its
    answer, one status per pair; any failure raises (a ``HarnessError``). (The only function
    that asks an agent to merge; see COORDINATION.md.)

    Pause-free when the agent protects the pages itself (``link.wp``, PING ``wp=1``: each
    chunk is write-protected while it is compared and remapped, docs/merging.md); otherwise the
    VM's vCPUs are held by QMP ``stop``/``cont`` around the batch, since a guest write between
    the agent's memcmp and its mmap would be lost (``paused_s``, ``paused_max_s``)."""
    assert link.agent is not None
    if link.wp:
        return link.agent.merge(pairs, status=True)
    t0 = time.monotonic()
    link.resume_due = True  # until a verified 'cont': an interrupt anywhere, close() resumes it
    link.m.qmp("stop")
    try:
        return link.agent.merge(pairs, status=True)
    finally:
        resume(link)  # 'cont' retried and checked; a failure is recorded, retried by step()
        held = time.monotonic() - t0
        link.c.paused_s += held
        link.c.paused_max_s = max(link.c.paused_max_s, held)


class LagHistogram:
    """Seconds, in log bins 2% wide from 1 µs to ~50 min; exact count and maximum."""

    LO = 1e-6
    RATIO = 1.02
    BINS = 1100

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS + 1, dtype=np.int64)
        self.n = 0
        self.max = 0.0

    def add(self, lags_s: np.ndarray) -> None:
        lags = np.asarray(lags_s, dtype=np.float64)
        if not len(lags):
            return
        lags = np.maximum(lags, 0.0)
        idx = np.ceil(np.log(np.maximum(lags, self.LO) / self.LO) / math.log(self.RATIO))
        idx = np.clip(idx, 0, self.BINS).astype(np.int64)
        self.counts += np.bincount(idx, minlength=self.BINS + 1)
        self.n += len(lags)
        self.max = max(self.max, float(lags.max()))

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.n))
        return min(self.LO * self.RATIO ** i, self.max)

    def summary(self) -> dict[str, Any]:
        """``{p50, p99, max, n}`` in seconds (None while nothing was merged)."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {"p50": r(self.quantile(0.5)), "p99": r(self.quantile(0.99)),
                "max": r(self.max if self.n else None), "n": self.n}


class MergeScheduler:
    """Flushes the core's per-VM batches to the agents."""

    def __init__(self, core: NativeCore, breaks: BreakChecker, batch_pages: int,
                 flush_interval_s: float, log) -> None:
        self.core = core
        self.breaks = breaks
        self.batch_pages = batch_pages
        self.flush_ns = int(flush_interval_s * 1e9)
        self.log = log
        self.lag = LagHistogram()
        # the batches with the longest lag (a page p99 over a run is set by its worst batch or
        # two): (lag s, VM, pages, s from the oldest pair's hint to the send, s at the agent)
        self.slow: list[tuple[float, str, int, float, float]] = []

    def due(self, link: VMLink, now_ns: int) -> bool:
        pending, t0 = self.core.pending(link.idx)
        return bool(pending) and (pending >= self.batch_pages or now_ns - t0 >= self.flush_ns)

    def full(self, link: VMLink) -> bool:
        return self.core.pending(link.idx)[0] >= self.batch_pages

    def flush(self, link: VMLink) -> None:
        pairs, times = self.core.take(link.idx)
        if not len(pairs):
            return
        try:
            self.core.sync()  # the agent compares with (and maps) the store's bytes
        except CoreError as e:
            # no memory for the store pages (ENOSPC/ENOMEM): this batch is not merged (its
            # pages stay staged and are written by a later sync); the books go back to the
            # agent's word, nothing was sent
            link.c.not_stored += 1
            link.last_error = str(e)
            self.log(f"VM {link.name}: {e}: {len(pairs)} pages not merged")
            self.breaks.relist(link)
            return
        res: MergeResult | None
        t_send = time.monotonic_ns()
        try:
            res = send_batch(link, pairs)
        except HarnessError as e:
            # the agent may have merged any part of the batch: its LIST will say
            res = None
            link.c.agent_errors += 1
            link.last_error = str(e)
            link.needs_list = True
            self.log(f"VM {link.name}: merge batch of {len(pairs)} pages: no answer ({e}); asking its LIST")
        link.c.batches += 1
        now = time.monotonic_ns()
        if res is not None:
            link.c.merged_total += res.merged
            link.c.mismatched += res.mismatched
            link.c.failed += res.failed
            link.c.agent_ns += res.elapsed_ns
        if res is not None and res.merged == len(pairs) and not res.mismatched and not res.failed:
            self.core.confirm(link.idx, pairs)
            merged = np.ones(len(pairs), dtype=bool)
        elif res is not None and res.status is not None:
            self.core.settle(link.idx, pairs, res.status)  # the agent's word per pair: no LIST
            merged = res.status == STATUS_MERGED
        elif self.breaks.relist(link):
            merged = self.core.lookup(link.idx, pairs[:, 0]) == (pairs[:, 1] // PAGE).astype(np.int64)
            if res is None:
                link.c.merged_total += int(np.count_nonzero(merged))
        else:
            return  # no LIST either: the pages stay referenced until one comes
        lags = (now - times[merged].astype(np.int64)) / 1e9
        self.lag.add(lags)
        if len(lags):
            oldest = int(times[merged].min())
            self.slow.append((round(float(lags.max()), 3), link.name, int(len(pairs)),
                              round((t_send - oldest) / 1e9, 3), round((now - t_send) / 1e9, 3)))
            self.slow = sorted(self.slow, reverse=True)[:5]
