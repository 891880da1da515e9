"""The sample rows the runner's loop writes (pure logic: samples and engine stats made by hand,
no QEMU): the CPU counters, and no silent substitute when an agent cannot say its CPU."""

from __future__ import annotations

import dataclasses
import time

import pytest

from harness.accounting import Sample, VMPages
from harness.experiment import _Loop


def _sample(cpu: float = 0.004, stale: int = 0) -> Sample:
    return Sample(t=0.0, seconds=0.01, G=10, F=7, C=6, R=3, M=4, E=0.75, G_nonzero=9, F_nonzero=6,
                  C_nonzero=5, R_nonzero=3, M_nonzero=4, E_nonzero=0.75, G_disk=4, F_disk=2, C_disk=2,
                  R_disk=2, M_disk=2, E_disk=1.0, zero_pages=1, store_pages=2, store_only_pages=0,
                  vms=(VMPages("a", 5, 4, 1), VMPages("b", 5, 5, 0)), frames_read=12, cpu_seconds=cpu,
                  method="incremental", stale=stale)


class _Eng:
    store_ref = None


def _loop(engines) -> _Loop:
    return _Loop([], engines, {"d": ["a", "b"]}, 1.0, None, 0.0, None, lambda m: None)


def _stats(cpu_a, err_a=None) -> dict:
    return {"d": {"merged_total": 8, "vms": {
        "a": {"agent_cpu_ns": cpu_a, "agent_error": err_a}, "b": {"agent_cpu_ns": 2_000_000, "agent_error": None}}}}


def test_row_carries_cpu_counters_and_oracle_cost():
    loop = _loop({"d": _Eng()})
    loop._stats = _stats(1_000_000)
    loop.engine_cpu, loop.oracle_cpu = 1.5, 0.25
    loop.sample({"d": _sample()})
    row = loop.samples[-1]
    assert row["cpu"] == {"engine_s": 1.5, "agent_s": 0.003, "ksmd_s": 0.0, "hosthints_s": 0.0, "oracle_s": 0.25}
    assert row["oracle"] == {"cpu_ms": 4.0, "hashed": 12, "untracked_pages": 0, "stale": 0,
                             "method": "incremental"}
    assert row["G"] == 10 and row["E_disk"] == 1.0 and row["merged_total"] == 8


def test_an_agent_that_cannot_say_makes_agent_cpu_unknown_not_zero():
    loop = _loop({"d": _Eng()})
    loop._stats = _stats(None, "agent STATS: connection reset")
    loop.sample({"d": _sample()})
    cpu = loop.samples[-1]["cpu"]
    assert cpu["agent_s"] is None and "connection reset" in cpu["error"] and "VM a" in cpu["error"]
    loop._stats = {}  # the engine thread has not read stats yet
    loop.sample({"d": _sample()})
    assert loop.samples[-1]["cpu"]["agent_s"] is None and "no engine stats" in loop.samples[-1]["cpu"]["error"]


def test_modes_without_agents_or_ksmd_charge_zero():
    loop = _loop({})
    loop.sample({"d": _sample()})
    cpu = loop.samples[-1]["cpu"]
    assert cpu["agent_s"] == 0.0 and cpu["ksmd_s"] == 0.0 and "error" not in cpu


def test_host_hint_cpu_is_summed_and_unknown_when_a_vm_cannot_say():
    loop = _loop({"d": _Eng()})
    st = _stats(1_000_000)
    st["d"]["vms"]["a"]["hosthints_cpu_ns"] = 500_000_000
    st["d"]["vms"]["b"]["hosthints_cpu_ns"] = 250_000_000
    loop._stats = st
    loop.sample({"d": _sample()})
    assert loop.samples[-1]["cpu"]["hosthints_s"] == 0.75
    st["d"]["vms"]["b"].update(hosthints_cpu_ns=None, hosthints_error="ring header unreadable")
    loop.sample({"d": _sample()})
    cpu = loop.samples[-1]["cpu"]
    assert cpu["hosthints_s"] is None and "ring header unreadable" in cpu["error"]


def test_rows_of_several_domains_carry_totals_with_ratios_from_the_sums():
    loop = _Loop([], {}, {"x": ["a"], "y": ["b"]}, 1.0, None, 0.0, None, lambda m: None)
    loop.sample({"x": _sample(), "y": _sample()})
    row = loop.samples[-1]
    assert row["x.R"] == 3 and row["y.R"] == 3 and row["R"] == 6 and row["M"] == 8
    assert row["E"] == 0.75 and row["E_disk"] == 1.0 and row["R_disk"] == 4


def test_the_registry_reads_the_rows_the_loop_writes():
    """Rows as the sampler writes them go through the registry: the yardstick charges engine +
    agents (+ ksmd, host hints), never the oracle, over peak R; the oracle's own figures too."""
    from harness import metrics

    loop = _loop({"d": _Eng()})
    for i, (eng, agent_ns, orc, stale, r) in enumerate([(0.1, 1_000_000, 0.5, 0, 1), (0.6, 101_000_000, 1.5, 0, 3),
                                                        (0.9, 201_000_000, 2.0, 2, 2)]):
        loop._stats = _stats(agent_ns)
        loop.engine_cpu, loop.oracle_cpu = eng, orc
        s = dataclasses.replace(_sample(stale=stale), R=r)
        loop.sample({"d": s})
        loop.samples[-1]["t"] = float(i * 10)
    run = metrics.RunView(mode="satori", rep=0, samples=loop.samples)
    vals, why = metrics.evaluate(run)
    charged = (0.9 - 0.1) + (0.203 - 0.003)  # engine + agents (b's 2 ms is in both ends)
    assert vals["cpu_s"] == pytest.approx(charged)
    assert vals["pages_saved"] == 3
    assert vals["cpu_per_page_saved_s"] == pytest.approx(charged / 3)
    assert vals["oracle_cpu_pct_core"] == pytest.approx(100 * 1.5 / 20)
    assert vals["oracle_stale_pages"] == 2 and vals["oracle_untracked_pages"] == 0
    # an agent that could not say its CPU at the end: no CPU figure, and why
    loop._stats = _stats(None, "agent STATS: connection reset")
    loop.sample({"d": _sample()})
    loop.samples[-1]["t"] = 30.0
    vals, why = metrics.evaluate(metrics.RunView(mode="satori", rep=0, samples=loop.samples))
    assert vals["cpu_per_page_saved_s"] is None and "connection reset" in why["cpu_per_page_saved_s"]


def test_slow_engine_steps_are_split_into_cpu_run_queue_and_blocked():
    loop = _loop({})
    loop._account_step(0.02, 0.01, 0.005)  # a fast step: only the maximum sees it
    loop._account_step(0.5, 0.1, 0.3)
    loop._account_step(0.2, 0.05, 0.2)  # counters read a little apart: blocked never negative
    assert loop.slow_steps["n"] == 2
    assert loop.slow_steps["wall_s"] == pytest.approx(0.7)
    assert loop.slow_steps["runq_s"] == pytest.approx(0.5)
    assert loop.slow_steps["blocked_s"] == pytest.approx(0.1)
    assert loop.longest_step == pytest.approx({"wall_s": 0.5, "cpu_s": 0.1, "runq_s": 0.3, "blocked_s": 0.1})
    assert loop.loop_max["step_s"] == 0.5


def test_run_queue_wait_is_read_for_the_calling_thread():
    from harness.experiment import _SchedStat

    s = _SchedStat()
    try:
        assert s.fd is not None, "this kernel has /proc/thread-self/schedstat"
        a = s.runq_s()
        end = time.monotonic() + 0.05
        while time.monotonic() < end:  # stay runnable: the wait can only grow
            pass
        assert s.runq_s() >= a >= 0.0
    finally:
        s.close()
    assert s.runq_s() == 0.0


def test_the_guard_reads_once_a_sample_when_nothing_is_lent():
    from harness.experiment import _Guard

    g = _Guard([], None, [])  # no surplus manager: nothing to take back between samples
    assert not g.watching
    g.start()
    g.join(5)
    assert not g.is_alive()  # no 4 Hz thread
    g.reading()
    t1 = g.meter._t
    time.sleep(0.01)
    g.reading()
    assert g.meter._t > t1  # each sample's reading is taken then
    assert g.cpu_s > 0 and g.inline_cpu_s == g.cpu_s  # all of it in the caller's thread


def test_the_guard_watches_between_samples_when_surplus_is_lent():
    from harness.experiment import GUARD_INTERVAL_S, _Guard

    class Surplus:
        def __init__(self):
            self.seen = 0

        def observe(self, used, broken, dt):
            self.seen += 1

    s = Surplus()
    g = _Guard([], s, [])
    assert g.watching
    g.start()
    try:
        end = time.monotonic() + 20 * GUARD_INTERVAL_S
        while s.seen < 2 and time.monotonic() < end:
            time.sleep(GUARD_INTERVAL_S)
        assert g.is_alive() and s.seen >= 2  # the thread read and let the manager act
        g.reading()  # the thread's latest reading: none taken in this (the caller's) thread
        assert g.inline_cpu_s == 0.0
    finally:
        g.stop_evt.set()
        g.join(5)
    assert g.error is None
