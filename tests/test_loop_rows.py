"""The sample rows the runner's loop writes (pure logic: samples and engine stats made by hand,
no QEMU): the CPU counters, and no silent substitute when an agent cannot say its CPU."""

from __future__ import annotations

from harness.accounting import Sample, VMPages
from harness.experiment import _Loop


def _sample(cpu: float = 0.004, stale: int = 0) -> Sample:
    return Sample(t=0.0, seconds=0.01, G=10, F=7, C=6, R=3, M=4, E=0.75, G_nonzero=9, F_nonzero=6,
                  C_nonzero=5, R_nonzero=3, M_nonzero=4, E_nonzero=0.75, G_disk=4, F_disk=2, C_disk=2,
                  R_disk=2, M_disk=2, E_disk=1.0, zero_pages=1, store_pages=2, store_only_pages=0,
                  vms=(VMPages("a", 5, 4, 1), VMPages("b", 5, 5, 0)), frames_read=12, cpu_seconds=cpu,
                  method="incremental", stale=stale)


class _Eng:
    store_path = None


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
    assert row["cpu"] == {"engine_s": 1.5, "agent_s": 0.003, "ksmd_s": 0.0, "oracle_s": 0.25}
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
