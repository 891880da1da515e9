"""The engine's Python parts (scheduler, break checker) over the native core, with fake agents.

Pure logic: the agents are stand-ins that merge a pair when the page equals the store page and
LIST what they merged (see tests/test_core.py's World); a real agent is exercised in
tests/test_engine_attacks.py. Checked here: a lost MERGE reply followed by lost LISTs never
lets a slot be freed, the books come back once an agent answers, errors are counted and
shown, and the merge lag figure.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import xxhash
from test_core import World, native, records

from harness.errors import AgentError
from harness.sharing import scheduler as sched_mod
from harness.sharing.agent import MergeResult
from harness.sharing.breaks import BreakChecker
from harness.sharing.link import VMCounters
from harness.sharing.scheduler import LagHistogram, MergeScheduler

PAGE = 4096


class FakeAgent:
    def __init__(self, world: World, vm: int) -> None:
        self.world, self.vm = world, vm
        self.fail_lists = 0

    def merge(self, pairs: np.ndarray, status: bool = False) -> MergeResult:
        # no per-pair status (an agent without it): misses are re-listed
        merged, mismatched = self.world.merge(self.vm, pairs)
        return MergeResult(merged, mismatched, 0, 1000)

    def merged_ranges(self, exclude_private: bool = False) -> np.ndarray:
        if self.fail_lists:
            self.fail_lists -= 1
            raise AgentError("injected: LIST lost")
        return self.world.list(self.vm)


def fake_qmp(command: str, *a, **k):
    return {"running": True} if command == "query-status" else None


def links_for(world: World) -> list:
    return [SimpleNamespace(idx=i, name=f"vm{i}", m=SimpleNamespace(qmp=fake_qmp),
                            agent=FakeAgent(world, i), c=VMCounters(), needs_list=False, listed=None,
                            last_error=None, wp=False, delta=False) for i in range(len(world.ram))]


def hint_same_pages(w: World, seed: int, n: int, now: int = 0) -> list[bytes]:
    """n random pages written at pages 0..n-1 of both VMs and hinted by each (records at ``now``)."""
    rng = random.Random(seed)
    pages = [rng.randbytes(PAGE) for _ in range(n)]
    for vm in (0, 1):
        for k, pg in enumerate(pages):
            w.write(vm, k, pg)
        w.core.ingest(vm, records([(k * PAGE, xxhash.xxh64_intdigest(pg)) for k, pg in enumerate(pages)]), now)
    return pages


@pytest.fixture()
def engine_parts():
    w = World(native, nvms=2, npages=64)
    links = links_for(w)
    log: list[str] = []
    breaks = BreakChecker(w.core, links, 1.0, log.append)
    sched = MergeScheduler(w.core, breaks, 4096, 0.2, log.append)
    yield w, links, breaks, sched, log
    w.close()


def test_lost_reply_then_lost_lists_never_free_a_mapped_slot(engine_parts, monkeypatch):
    w, links, breaks, sched, log = engine_parts
    pages = hint_same_pages(w, 1, 10, now=1)
    sched.flush(links[0])
    real = sched_mod.send_batch

    def lossy(link, pairs):
        real(link, pairs)  # merged ...
        link.agent.fail_lists = 2  # ... the LIST right after and the next one fail too ...
        raise AgentError("injected: MERGE reply lost")  # ... and the reply is lost

    monkeypatch.setattr(sched_mod, "send_batch", lossy)
    sched.flush(links[1])
    assert w.mapped[1] == {k: k for k in range(10)}
    assert links[1].needs_list and links[1].c.agent_errors == 2
    for k in range(10):  # VM 0 writes every page: its side breaks
        w.write(0, k, bytes(PAGE))
    breaks.check()  # VM 1 cannot LIST: nothing freed
    assert w.core.counters()["slots_freed"] == 0 and links[1].needs_list
    breaks.check()  # VM 1 answers: its pages are confirmed, nothing freed
    assert not links[1].needs_list
    c = w.core.counters()
    assert c["slots_freed"] == 0 and c["lost"] == 0 and c["slots_live"] == 10
    assert w.core.vm_counters(1)["merged"] == 10 and w.core.vm_counters(0)["broken"] == 10
    for k in range(10):
        assert w.read(1, k) == pages[k]
    for k in range(10):
        w.write(1, k, bytes(PAGE))
    breaks.check()
    assert w.core.counters()["slots_freed"] == 10
    assert any("no answer" in m for m in log) and "injected" in links[1].last_error


def test_misses_are_relisted_and_lag_counts_merged_pages_only(engine_parts):
    w, links, breaks, sched, _ = engine_parts
    hint_same_pages(w, 2, 8)
    w.write(1, 3, bytes(PAGE))  # changed before the merge: the agent's memcmp says no
    sched.flush(links[0])
    sched.flush(links[1])
    assert links[1].c.mismatched == 1 and links[1].c.relists == 1
    assert w.core.vm_counters(1)["merged"] == 7 and w.core.vm_counters(1)["unconfirmed"] == 1
    lag = sched.lag.summary()
    assert lag["n"] == 15 and lag["max"] > 0 and lag["p50"] <= lag["p99"] <= lag["max"]
    # the slowest batches, worst first: (lag, VM, pages sent, wait before the send, agent)
    assert [(b[1], b[2]) for b in sorted(sched.slow, key=lambda b: b[1])] == [("vm0", 8), ("vm1", 8)]
    assert abs(sched.slow[0][0] - lag["max"]) < 1e-3 and sched.slow[0][0] >= sched.slow[1][0]
    assert all(b[0] >= b[3] >= 0 and b[4] >= 0 for b in sched.slow)


def test_lag_histogram_quantiles():
    h = LagHistogram()
    assert h.summary() == {"p50": None, "p99": None, "max": None, "n": 0}
    vals = np.random.default_rng(3).exponential(0.05, 100_000)
    h.add(vals[:50_000])
    h.add(vals[50_000:])
    s = h.summary()
    assert s["n"] == 100_000 and s["max"] == pytest.approx(vals.max(), rel=1e-6)
    for q, k in ((0.5, "p50"), (0.99, "p99")):
        assert s[k] == pytest.approx(np.quantile(vals, q), rel=0.025)


class FakeDeltaAgent(FakeAgent):
    """An agent with per-pair MERGE status, BREAKS and MAPPED (a real one: tests/test_agent.py);
    its LIST must never be needed."""

    def merge(self, pairs: np.ndarray, status: bool = False) -> MergeResult:
        st = self.world.merge_status(self.vm, pairs)
        return MergeResult(int(np.count_nonzero(st == 0)), int(np.count_nonzero(st)), 0, 1000,
                           status=st if status else None)

    def breaks(self, force: bool = False) -> SimpleNamespace:
        return SimpleNamespace(ranges=self.world.breaks(self.vm))

    def mapped(self, store_offs: np.ndarray) -> np.ndarray:
        return self.world.mapped_by_anyone(np.asarray(store_offs) // PAGE)

    def merged_ranges(self, exclude_private: bool = False) -> np.ndarray:
        raise AssertionError("LIST asked of an agent that answers BREAKS and MAPPED")


def test_delta_agents_settle_break_and_free_without_any_list():
    """Agents with per-pair status, BREAKS and MAPPED: a batch with a miss is settled from the
    status (no LIST), pause-free (no QMP); guest writes come back as breaks; slots are freed
    once no agent maps them, and not before."""
    w = World(native, nvms=2, npages=64)
    links = links_for(w)
    for link in links:
        link.agent = FakeDeltaAgent(w, link.idx)
        link.wp = link.delta = True
        link.m = SimpleNamespace(qmp=lambda *a, **k: pytest.fail("QMP used by a pause-free link"))
    log: list[str] = []
    breaks = BreakChecker(w.core, links, 1.0, log.append)
    sched = MergeScheduler(w.core, breaks, 4096, 0.2, log.append)
    try:
        hint_same_pages(w, 4, 8)
        w.write(1, 3, bytes(PAGE))  # changed before the merge: the agent's memcmp says no
        sched.flush(links[0])
        sched.flush(links[1])
        assert links[1].c.mismatched == 1 and links[1].c.relists == 0
        assert w.core.vm_counters(1)["merged"] == 7  # the same books as after a LIST (the miss test above)
        assert links[0].c.paused_s == 0 and links[1].c.paused_s == 0
        for k in range(8):  # VM 0 writes every page: its side breaks
            w.write(0, k, bytes(PAGE))
        assert breaks.check() == 8
        assert w.core.counters()["slots_freed"] == 1  # page 3's slot: VM 1 never held it
        for k in range(8):
            w.write(1, k, bytes(PAGE))
        assert breaks.check() == 7
        c = w.core.counters()
        assert c["slots_freed"] == 8 and c["slots_live"] == 0 and c["lost"] == 0
        assert not any(link.needs_list for link in links) and not log
    finally:
        w.close()


def test_idle_poll_backs_off_only_when_nothing_waits(monkeypatch):
    """An idle engine sleeps longer and longer (up to max_s); pairs waiting for their batch's
    flush keep it at poll_s, so the flush is not delayed by a backed-off sleep (merge lag)."""
    from harness.sharing.engine import IdlePoll

    slept: list[float] = []
    monkeypatch.setattr("harness.sharing.engine.time.sleep", slept.append)
    p = IdlePoll(0.02, 0.25)
    for _ in range(10):
        p.wait(0)
    assert slept[0] == 0.02 and max(slept) == 0.25 and slept == sorted(slept)
    slept.clear()
    p.wait(0, pending=True)
    p.wait(0, pending=True)
    assert slept == [0.02, 0.02]
    p.wait(0)
    assert slept[-1] == 0.02  # backing off starts from poll_s again
    slept.clear()
    p.wait(5)  # records taken: no sleep at all
    assert slept == []
