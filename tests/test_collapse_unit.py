"""The collapse workload's pure parts: fio latency logs, the bystander's windows."""

from __future__ import annotations

import pytest

from harness.errors import ConfigError
from harness.workloads import make
from harness.workloads.collapse import parse_lat_log, window_stats


def test_parse_lat_log_reads_msec_and_nsec_columns() -> None:
    text = "5, 4800000, 0, 4096, 0\n10, 5200000, 0, 4096, 0\nbad line\n\n12, x, 0\n"
    assert parse_lat_log(text) == [(0.005, 4.8), (0.010, 5.2)]


def test_window_stats_jobs_and_p99() -> None:
    # 1000 reads, one every 5 ms, latency 5 ms; 10 slow ones (50 ms) in the second half
    ios = [(0.005 * (i + 1), 50.0 if i >= 900 and i % 10 == 0 else 5.0) for i in range(1000)]
    first = window_stats(ios, 0.0, 2.5, 100)
    assert first["ios"] == 499 and first["jobs"] == 4  # 99 reads left over: no whole job
    assert first["job_s"] == pytest.approx(0.5) and first["p99_ms"] == 5.0
    assert first["iops"] == pytest.approx(199.6)
    late = window_stats(ios, 4.0, 5.1, 100)
    assert late["p99_ms"] == 50.0
    empty = window_stats(ios, 10.0, 11.0, 100)
    assert empty["ios"] == 0 and empty["job_s"] is None and empty["p99_ms"] is None


def test_collapse_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown parameter"):
        make("collapse", {"writers": 2})
    w = make("collapse", {"how": "sideways"})
    with pytest.raises(ConfigError, match="how must be"):
        w.run([], None)  # checked before any VM is touched
