"""Host budget accounting: frames counted once, store and RAM-file pages no guest maps (memfd
sizes through /proc/<pid>/fd), private, new and broken pages per VM, and the figures over a run
(overshoot, reclaim, violations). Pure, but for one real memfd."""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness.budget import (
    PAGE,
    PAGES_PER_MB,
    PM_EXCLUSIVE,
    PM_FILE,
    _file_pages,
    count_host,
    overshoot,
    page_changes,
    reclaim_time,
    run_figures,
    violations,
)
from harness.errors import HarnessError

PRESENT = np.uint64(1 << 63)


def pm(pfns, *, file=False, excl=None):
    """Pagemap entries: a PFN per page (0 = not present)."""
    out = []
    for i, p in enumerate(pfns):
        if not p:
            out.append(0)
            continue
        e = int(PRESENT) | p
        if file:
            e |= int(PM_FILE)
        if excl is None or excl[i]:
            e |= int(PM_EXCLUSIVE)
        out.append(e)
    return np.array(out, dtype=np.uint64)


def test_a_frame_two_vms_map_counts_once() -> None:
    a = pm([10, 11, 12], excl=[True, False, True])
    b = pm([20, 11, 0], excl=[True, False, True])
    hu = count_host({"a": a, "b": b})
    assert hu.frames == 4 and hu.used == 4  # 10 11 12 20
    assert hu.private == {"a": 2, "b": 1} and hu.present == {"a": 3, "b": 2}


def test_store_pages_no_guest_maps_count_and_mapped_ones_do_not_twice() -> None:
    # a and b map store frames 100 and 101 at guest pages 1..2 (file pages); a broke page 2
    # (an anonymous private copy, frame 50): store page 101 is now mapped by b only
    merged = {"a": np.array([[4096, 0, 2]]), "b": np.array([[4096, 0, 2]])}
    a = np.array([int(PRESENT) | int(PM_EXCLUSIVE) | 5,
                  int(PRESENT) | int(PM_FILE) | 100,
                  int(PRESENT) | int(PM_EXCLUSIVE) | 50], dtype=np.uint64)
    b = np.array([int(PRESENT) | int(PM_EXCLUSIVE) | 6,
                  int(PRESENT) | int(PM_FILE) | 100,
                  int(PRESENT) | int(PM_FILE) | int(PM_EXCLUSIVE) | 101], dtype=np.uint64)
    # the store holds 3 pages: 100, 101 and one nobody maps (not freed yet)
    hu = count_host({"a": a, "b": b}, merged, store_pages=3)
    assert hu.frames == 5  # 5 6 50 100 101
    assert hu.store_only == 1 and hu.used == 6


def test_ram_file_pages_no_guest_maps_count() -> None:
    a = pm([7, 8, 0], file=True)
    hu = count_host({"a": a}, None, 0, {"a": 5})  # the RAM file holds 5 pages, 2 mapped
    assert hu.ram_only == 3 and hu.used == 5
    assert count_host({"a": a}, None, 0, {"a": 1}).ram_only == 0  # never negative


def test_page_changes_tell_new_pages_from_breaks() -> None:
    before = pm([10, 11, 0, 13], excl=[True, False, True, True])
    # page 0 same frame; page 1 shared -> private anonymous copy (a break); page 2 newly
    # present (new); page 3 merged onto a shared frame (neither)
    after = pm([10, 30, 31, 40], excl=[True, True, True, False])
    assert page_changes(before, after) == (1, 1)
    assert page_changes(None, after) == (3, 0)  # first reading: every private page is new
    assert page_changes(after, after) == (0, 0)
    # a merge onto a store page only this VM maps so far (file page, exclusive): neither
    merged = pm([50, 11, 0, 13], file=True, excl=[True, False, True, True])
    assert page_changes(before, merged) == (0, 0)


def test_private_counts_own_ram_file_pages_even_when_mapped_twice() -> None:
    # RAM-file pages (file, not in the store ranges) the harness maps for a moment are not
    # exclusive, but still this VM's own; a store page two VMs map is not
    e = pm([7, 8, 9], file=True, excl=[False, True, False])
    merged = {"a": np.array([[2 * 4096, 0, 1]])}
    assert count_host({"a": e}, merged, store_pages=1).private == {"a": 2}


def rows(over, t0=0.0, dt=1.0, **extra):
    return [{"t": t0 + i * dt, "host": {"over_mb": o, "budget_mb": 1000.0, "used_mb": 1000.0 + o}, **extra}
            for i, o in enumerate(over)]


def test_overshoot_peak_and_time_above_budget() -> None:
    s = rows([0, 0, 30, 50, 10, 0, 0])
    assert overshoot(s) == (50, 3.0)  # above at t=2, 3, 4: each until the next sample
    assert overshoot([]) == (None, None)
    assert overshoot(rows([0, 0]))[1] == 0.0
    assert overshoot(rows([0, 0.4, 0.6, 0])) == (0.6, 0.0)  # within a MB of the budget: at it


def test_reclaim_time_counts_until_the_guests_hold_no_more_than_the_saving() -> None:
    ent = {"a": 256.0, "b": 256.0}
    s = [
        {"t": 9.0, "R": 100 * PAGES_PER_MB, "balloon_actual_mb": {"a": 306, "b": 306}},
        {"t": 10.0, "R": 100 * PAGES_PER_MB, "balloon_actual_mb": {"a": 306, "b": 306}},
        {"t": 11.0, "R": 0, "balloon_actual_mb": {"a": 300, "b": 290}},
        {"t": 12.0, "R": 0, "balloon_actual_mb": {"a": 270, "b": 260}},
        {"t": 13.5, "R": 0, "balloon_actual_mb": {"a": 262, "b": 256}},  # 6 MB left: within 8
    ]
    assert reclaim_time(s, 10.0, ent) == 3.5
    assert reclaim_time(s, 10.0, ent, tol_mb=1.0) is None  # never back within 1 MB
    assert reclaim_time(s[:2], 9.0, ent) == 0.0  # nothing lent beyond the saving
    again = s + [{"t": 15.0, "R": 0, "balloon_actual_mb": {"a": 280, "b": 256}},  # lent again, unpaid
                 {"t": 16.0, "R": 0, "balloon_actual_mb": {"a": 256, "b": 256}}]
    assert reclaim_time(again, 10.0, ent) == 6.0  # back for good only at t=16


def test_violations_count_targets_and_actual_sizes_below_entitlement() -> None:
    ent = {"a": 256.0, "b": 256.0}
    ok = [{"balloon_mb": {"a": 256, "b": 300}, "balloon_actual_mb": {"a": 256, "b": 290}}]
    assert violations(ok, ent) == 0
    bad = ok + [{"balloon_mb": {"a": 255, "b": 300}, "balloon_actual_mb": {"a": 250, "b": 256}}]
    assert violations(bad, ent) == 2
    assert violations(ok, ent, [{"targets_mb": {"a": 200.0, "b": 256.0}}]) == 1


def test_run_figures_from_samples_and_events() -> None:
    s = rows([0, 0, 40, 20, 0], R=0, balloon_mb={"a": 256.0})
    for row, actual in zip(s, [300, 300, 290, 260, 256], strict=True):
        row["balloon_actual_mb"] = {"a": float(actual)}
    f = run_figures(s, [(1.5, "collapse start")], {"a": 256.0})
    assert f["peak_overshoot_mb"] == 40 and f["peak_overshoot_pct"] == 4.0
    assert f["overshoot_s"] == 2.0 and f["entitlement_violations"] == 0
    assert f["reclaim_s"] == 1.5  # 290 at t=2 is the last above 256 + 8: back at t=3 (4 MB left)
    none = run_figures([{"t": 0.0}], [], {"a": 256.0})
    assert none["peak_overshoot_mb"] is None and none["reclaim_s"] is None


def test_memfd_pages_counted_through_proc_fd_and_an_unreadable_file_is_an_error() -> None:
    fd = os.memfd_create("budget-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 64 * PAGE)  # a sparse memfd: size is not memory
        assert _file_pages(f"/proc/self/fd/{fd}") == 0
        for i in (0, 5, 9):
            os.pwrite(fd, b"x", i * PAGE)
        assert _file_pages(f"/proc/{os.getpid()}/fd/{fd}") == 3
    finally:
        os.close(fd)
    assert _file_pages(None) == 0
    with pytest.raises(HarnessError, match="cannot read the size"):
        _file_pages(f"/proc/self/fd/{fd}")  # closed: the pages it held cannot be hidden as 0
