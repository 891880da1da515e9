"""Host memory budget: what the guests of a run really cost the host, against what it promised.

The host promised every VM its *entitlement* (its own allocation, where the balloon holds it);
the **budget** is the sum of the entitlements. Surplus lent out of a saving must fit inside it:
a page saved by sharing is a frame the host does not pay, so lending it back costs nothing
*while the sharing lasts*. When the guests write their shared pages, each write makes a private
copy the host pays at once, while the surplus comes back only as fast as the balloons inflate:
the run then uses more host memory than it promised. This module measures that.

**Used** (pages, :func:`measure_host`): the distinct physical frames behind every VM's guest
RAM that its QEMU maps now (``/proc/<pid>/pagemap``, present pages: RAM-file pages, content-store
pages mapped copy-on-write, their private copies after a write, KSM pages; a frame several
pages map counts once), plus the pages the host keeps for the guests without any guest mapping
them: content-store pages no guest maps present (``st_blocks`` of the store file minus the
store frames seen in the guests) and RAM-file pages no guest maps present. The content store
is inside *used*, so the budget needs no allowance for it: lending at most the saving R keeps
used <= budget as long as the guests do not write (used = sum of guest sizes - R).

Per VM: ``private`` pages (present, mapped by this process only: ``PM_MMAP_EXCLUSIVE``, or a
page of its own RAM file: a page that costs the host a frame of its own) and, between two
readings (:class:`HostMeter`), ``new`` pages (the guest filled memory it had not touched) and
``broken`` pages (a shared store or KSM page written: anonymous now, on a frame of its own).
Broken pages are the live signal of a collapse, from the kernel, in every mode: while the
surplus lent stays within the saving, filling memory cannot take the host over its budget, only
breaks can (they shrink the saving).

The figures over a run (:func:`run_figures`, pure, on the sample rows the runner records):

- **peak overshoot** (MB and % of the budget) and **overshoot time** (seconds above budget);
- **reclaim time**: from the collapse until the surplus still in the guests (balloon *actual*
  above entitlement) is back for good within the saving left (R) plus a tolerance;
- **entitlement violations**: samples x VMs where a balloon target or actual size is below the
  VM's entitlement (must be 0), plus the surplus manager's decisions that set one.

Reading only: pagemap reads and ``fstat``; nothing here maps or touches guest memory.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.accounting import decode_pagemap, expand_ranges, ram_hva, read_pagemap
from harness.errors import HarnessError

PAGE = 4096
PAGES_PER_MB = (1 << 20) // PAGE
PM_FILE = np.uint64(1 << 61)  # file page or shared anonymous page
PM_EXCLUSIVE = np.uint64(1 << 56)  # mapped by exactly one process
RECLAIM_TOL_MB = 8.0  # a balloon within this of its goal counts as there
OVER_TOL_MB = 1.0  # above the budget by less than this is at the budget (balloon granularity)


@dataclasses.dataclass(frozen=True)
class HostUse:
    """One reading of the host memory the guests use (pages)."""

    used: int  # distinct frames + store pages no guest maps + RAM-file pages no guest maps
    frames: int  # distinct frames the guests map
    store: int  # content-store pages resident (all stores)
    store_only: int  # of which no guest maps present
    ram_only: int  # RAM-file pages resident that no guest maps present
    private: dict[str, int]  # per VM: present pages mapped by it alone
    present: dict[str, int]  # per VM: present pages
    # per VM since the previous reading (HostMeter, page_changes): pages the guest filled anew,
    # and shared pages that broke into a private copy
    new: dict[str, int] = dataclasses.field(default_factory=dict)
    broken: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self, budget_pages: int) -> dict[str, Any]:
        mb = PAGES_PER_MB
        return {
            "used_mb": round(self.used / mb, 2),
            "budget_mb": round(budget_pages / mb, 2),
            "over_mb": round(max(0, self.used - budget_pages) / mb, 2),
            "store_mb": round(self.store / mb, 2),
            "store_only_mb": round(self.store_only / mb, 2),
            "ram_only_mb": round(self.ram_only / mb, 2),
            "private_mb": {k: round(v / mb, 2) for k, v in self.private.items()},
            "present_mb": {k: round(v / mb, 2) for k, v in self.present.items()},
            "new_mb": {k: round(v / mb, 2) for k, v in self.new.items()},
            "broken_mb": {k: round(v / mb, 2) for k, v in self.broken.items()},
        }


def _file_pages(path: str | os.PathLike | None) -> int:
    """Resident pages of a tmpfs/memfd file (its allocated blocks), 0 if there is no file. A
    file that cannot be read is an error, never 0: it would hide host memory from the budget."""
    if path is None:
        return 0
    try:
        return os.stat(path).st_blocks * 512 // PAGE
    except OSError as e:
        raise HarnessError(f"host budget: cannot read the size of {path}: {e.strerror}") from None


def count_host(
    entries: Mapping[str, np.ndarray],
    merged: Mapping[str, np.ndarray] | None = None,
    store_pages: int = 0,
    ram_file_pages: Mapping[str, int] | None = None,
) -> HostUse:
    """The arithmetic of :func:`measure_host` on raw pagemap entries (pure, unit tested).

    ``entries``: per VM, the raw pagemap entries of its guest RAM, one per guest page.
    ``merged``: per VM, the merge agent's ranges (guest byte offset, store byte offset, pages):
    where a guest page maps the content store. ``store_pages``: resident pages of the stores;
    ``ram_file_pages``: per VM with a RAM file, its resident pages.
    """
    frames_all: list[np.ndarray] = []
    store_frames: list[np.ndarray] = []
    ram_only = 0
    private: dict[str, int] = {}
    present_n: dict[str, int] = {}
    for name, e in entries.items():
        e = np.asarray(e, dtype=np.uint64)
        present, pfn = decode_pagemap(e)
        frames_all.append(pfn[present])
        present_n[name] = int(np.count_nonzero(present))
        in_store = np.zeros(len(e), dtype=bool)
        mg, _ = expand_ranges((merged or {}).get(name), len(e))
        in_store[mg] = True
        filep = present & ((e & PM_FILE) != 0)
        # a RAM-file page is this VM's own even while the harness's sampling maps it too
        private[name] = int(np.count_nonzero(present & (((e & PM_EXCLUSIVE) != 0) | (filep & ~in_store))))
        store_frames.append(pfn[filep & in_store])  # a private copy after a break is anonymous
        if ram_file_pages and name in ram_file_pages:
            ram_only += max(0, int(ram_file_pages[name]) - int(np.count_nonzero(filep & ~in_store)))
    frames = _distinct(np.concatenate(frames_all)) if frames_all else 0
    mapped_store = _distinct(np.concatenate(store_frames)) if store_frames else 0
    store_only = max(0, int(store_pages) - mapped_store)
    return HostUse(frames + store_only + ram_only, frames, int(store_pages), store_only, ram_only,
                   private, present_n)


def page_changes(prev: np.ndarray | None, cur: np.ndarray) -> tuple[int, int]:
    """(new, broken) between two pagemap readings of one VM (pure). Both are pages present and
    mapped by this process alone now. *New*: not present before (the guest filled a page).
    *Broken*: present before on another frame, anonymous now: a copy-on-write break of a store
    page or a KSM page (a merge moves a page onto a shared, file-backed or KSM frame: neither).
    The first reading counts every such page as new."""
    cur = np.asarray(cur, dtype=np.uint64)
    present, pfn = decode_pagemap(cur)
    mine = present & ((cur & PM_EXCLUSIVE) != 0)
    if prev is None:
        return int(np.count_nonzero(mine)), 0
    p_present, p_pfn = decode_pagemap(np.asarray(prev, dtype=np.uint64))
    anon = (cur & PM_FILE) == 0
    return (int(np.count_nonzero(mine & ~p_present)),
            int(np.count_nonzero(mine & p_present & anon & (p_pfn != pfn))))


def _distinct(values: np.ndarray) -> int:
    if len(values) == 0:
        return 0
    s = np.sort(values)
    return 1 + int(np.count_nonzero(s[1:] != s[:-1]))


def measure_host(
    vms: Iterable[Any],
    stores: Iterable[str | os.PathLike] = (),
    merged: Mapping[str, np.ndarray] | None = None,
) -> HostUse:
    """Read the host memory the running ``vms`` use now (see the module docstring).

    ``vms``: running :class:`harness.vm.VM` objects; ``stores``: the content store files of
    the run's sharing engines; ``merged``: per VM name, the merge agent's ranges.
    """
    entries, ram_files = _read_entries(vms)
    return count_host(entries, merged, sum(_file_pages(s) for s in stores), ram_files)


def _read_entries(vms: Iterable[Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per VM: raw pagemap entries of its guest RAM; resident pages of its RAM file."""
    if os.geteuid() != 0:
        raise HarnessError("host memory accounting reads frame numbers from pagemap: run as root")
    entries: dict[str, np.ndarray] = {}
    ram_files: dict[str, int] = {}
    for vm in vms:
        if not vm.pid:
            raise HarnessError(f"VM {vm.name} is not running")
        entries[vm.name] = read_pagemap(vm.pid, ram_hva(vm), vm.ram_size // PAGE)
        if getattr(vm.spec, "ram_backend", "file") == "file":
            ram_files[vm.name] = _file_pages(vm.ram.path if vm.ram is not None else None)
    return entries, ram_files


class HostMeter:
    """Successive readings of :func:`measure_host` over the same VMs, each with ``new`` and
    ``broken`` per VM (:func:`page_changes` since the previous reading) and the seconds since it
    (``dt``)."""

    def __init__(self, vms: Iterable[Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.vms = list(vms)
        self._clock = clock
        self._prev: dict[str, np.ndarray] = {}
        self._t: float | None = None
        self.dt = 0.0

    def read(self, stores: Iterable[str | os.PathLike] = (),
             merged: Mapping[str, np.ndarray] | None = None) -> HostUse:
        entries, ram_files = _read_entries(self.vms)
        now = self._clock()
        self.dt = (now - self._t) if self._t is not None else 0.0
        self._t = now
        changes = {n: page_changes(self._prev.get(n), e) for n, e in entries.items()}
        self._prev = entries
        hu = count_host(entries, merged, sum(_file_pages(s) for s in stores), ram_files)
        return dataclasses.replace(hu, new={n: c[0] for n, c in changes.items()},
                                   broken={n: c[1] for n, c in changes.items()})


# ---------------------------------------------------------------- figures over a run


def _get(row: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(row, Mapping) or k not in row:
            return None
        row = row[k]
    return row


def overshoot(samples: Sequence[Mapping[str, Any]], t_from: float | None = None,
              t_to: float | None = None) -> tuple[float | None, float | None]:
    """(peak MB above budget, seconds above budget) over the samples with a host reading; a
    sample more than :data:`OVER_TOL_MB` above budget counts for the interval up to the next."""
    rows = [s for s in samples if _get(s, "host", "over_mb") is not None
            and (t_from is None or s["t"] >= t_from) and (t_to is None or s["t"] <= t_to)]
    if not rows:
        return None, None
    peak = max(float(s["host"]["over_mb"]) for s in rows)
    secs = 0.0
    for a, b in zip(rows, rows[1:], strict=False):
        if a["host"]["over_mb"] > OVER_TOL_MB:
            secs += b["t"] - a["t"]
    return peak, round(secs, 3)


def lent_in_guests_mb(row: Mapping[str, Any], entitlements_mb: Mapping[str, float]) -> float | None:
    """Surplus still inside the guests: balloon actual above entitlement, summed (MB)."""
    actual = row.get("balloon_actual_mb")
    if not isinstance(actual, Mapping):
        return None
    return sum(max(0.0, float(actual[n]) - e) for n, e in entitlements_mb.items() if actual.get(n) is not None)


def reclaim_time(samples: Sequence[Mapping[str, Any]], t_collapse: float,
                 entitlements_mb: Mapping[str, float], tol_mb: float = RECLAIM_TOL_MB) -> float | None:
    """Seconds from ``t_collapse`` until the surplus in the guests is back for good: the first
    sample after the last one whose guests hold more than the saving R (MB) + ``tol_mb``.
    0 if no sample after the collapse held more; None if the last sample still does."""
    rows = [s for s in samples if s["t"] >= t_collapse and lent_in_guests_mb(s, entitlements_mb) is not None]
    if not rows:
        return None
    over = [lent_in_guests_mb(s, entitlements_mb) > max(0.0, float(s.get("R") or 0) / PAGES_PER_MB) + tol_mb
            for s in rows]
    if not any(over):
        return 0.0
    last = max(i for i, o in enumerate(over) if o)
    if last == len(rows) - 1:
        return None
    return round(rows[last + 1]["t"] - t_collapse, 3)


def violations(samples: Sequence[Mapping[str, Any]], entitlements_mb: Mapping[str, float],
               decisions: Sequence[Mapping[str, Any]] = ()) -> int:
    """Samples x VMs whose balloon target or actual size is below the VM's entitlement, plus
    decisions of the surplus manager whose target for a VM is below its entitlement."""
    n = 0
    for s in samples:
        for key in ("balloon_mb", "balloon_actual_mb"):
            d = s.get(key)
            if not isinstance(d, Mapping):
                continue
            n += sum(1 for vm, e in entitlements_mb.items() if d.get(vm) is not None and d[vm] < e - 1e-6)
    for d in decisions:
        t = d.get("targets_mb") or {}
        n += sum(1 for vm, e in entitlements_mb.items() if t.get(vm) is not None and t[vm] < e - 1e-6)
    return n


def event_time(events: Iterable[Sequence[Any]], label: str) -> float | None:
    """Time (s since the mode started) of the first event with this label."""
    return next((float(t) for t, lab in events if lab == label), None)


def run_figures(samples: Sequence[Mapping[str, Any]], events: Iterable[Sequence[Any]],
                entitlements_mb: Mapping[str, float],
                decisions: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The budget figures of one run (None where the run has no host readings or no collapse)."""
    events = list(events)
    peak, secs = overshoot(samples)
    budget = next((_get(s, "host", "budget_mb") for s in samples if _get(s, "host", "budget_mb")), None)
    t_c = event_time(events, "collapse start")
    return {
        "peak_overshoot_mb": peak,
        "peak_overshoot_pct": round(100 * peak / budget, 2) if peak is not None and budget else None,
        "overshoot_s": secs,
        "budget_mb": budget,
        "peak_used_mb": max((s["host"]["used_mb"] for s in samples if _get(s, "host", "used_mb") is not None),
                            default=None),
        "reclaim_s": reclaim_time(samples, t_c, entitlements_mb) if t_c is not None else None,
        "entitlement_violations": violations(samples, entitlements_mb, decisions),
    }
