"""The sharing modes, defined once: every other module reads this table.

A mode says how the VMs of a run are built and what shares their memory:

- ``ram_backend``: ``file`` (guest RAM the host can map and the merge agent can remap) or
  ``ram-merge`` (anonymous RAM marked mergeable: KSM only scans that);
- ``ksm``: the KSM sysfs values written for the run, in order (``run`` last), or ``None`` when
  the run leaves KSM alone (its VMs' RAM is not mergeable, so no scanner can help them);
- ``hints``: where page hints come from: ``guest`` (the patched guest virtio-blk and its ring),
  ``host`` (QEMU's own disk reads), or ``None`` (no hints: the stock guest driver);
- ``engine``: whether the sharing engine (verify hints, merge through the agents) runs;
- ``pmem``: the image's dataset is one read-only virtio-pmem image mounted with FS-DAX in
  every guest (``harness.dax``): its pages never enter a guest's page cache;
- ``requires``: checks of this host; each returns ``None`` or the reason the mode cannot run
  here (:meth:`Mode.unavailable`), which the runner records instead of running it.

Adding a mode is one entry in :data:`MODES`; the config schema, the runner, the KSM control,
the metric registry and the report take it from here. ``docs/metrics.md`` describes each mode
(a test checks that every mode is there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from harness.errors import HarnessError

KSM_SYSFS = Path("/sys/kernel/mm/ksm")

HintSource = Literal["guest", "host"] | None
Check = Callable[[], "str | None"]


def ksm_files(*names: str, root: Path | None = None) -> Check:
    """A requirement: the KSM sysfs files ``names`` exist (KSM built in, a recent enough kernel)."""

    def check() -> str | None:
        base = root or KSM_SYSFS
        if not (base / "run").exists():
            return f"KSM is not available: {base} is missing (host kernel built without CONFIG_KSM?)"
        missing = [n for n in names if not (base / n).exists()]
        if missing:
            return (f"this kernel's KSM has no {', '.join(missing)} in {base} (Linux >= 6.8 has "
                    "smart_scan and the scan-time advisor)")
        return None

    check.__doc__ = f"KSM sysfs files {', '.join(names) or 'run'} exist"
    return check


@dataclasses.dataclass(frozen=True)
class Mode:
    """One sharing mode (see the module docstring for the fields)."""

    name: str
    summary: str  # one line for tables and `satori config check`
    ram_backend: Literal["file", "ram-merge"]
    ksm: Mapping[str, int | str] | None
    hints: HintSource
    engine: bool
    requires: tuple[Check, ...] = ()
    pmem: bool = False

    @property
    def scans(self) -> bool:
        """Whether ksmd scans during the run."""
        return bool(self.ksm) and int(self.ksm.get("run", 0)) == 1

    @property
    def shares(self) -> bool:
        """Whether anything shares memory in this mode (``none`` is the baseline that does not)."""
        return self.scans or self.engine or self.pmem

    def unavailable(self) -> str | None:
        """Why this host cannot run the mode, or ``None`` when it can."""
        for check in self.requires:
            why = check()
            if why:
                return why
        return None


_KSM_DEFAULT_RATE = {"pages_to_scan": 100, "sleep_millisecs": 20}

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("none", "no sharing: stock guest driver, RAM not mergeable (the baseline)",
         ram_backend="file", ksm=None, hints=None, engine=False),
    Mode("ksm", "KSM at the kernel's default rate (100 pages / 20 ms)",
         ram_backend="ram-merge", ksm={**_KSM_DEFAULT_RATE, "run": 1}, hints=None, engine=False,
         requires=(ksm_files(),)),
    Mode("ksm-advisor", "KSM as tuned today (Linux >= 6.8): smart_scan, the scan-time advisor "
         "aiming at a full pass every 20 s",
         ram_backend="ram-merge",
         # the advisor sets pages_to_scan itself (between its min and max, within max_cpu %);
         # advisor_mode first: switching it resets pages_to_scan
         ksm={"advisor_mode": "scan-time", "smart_scan": 1, "advisor_target_scan_time": 20,
              "sleep_millisecs": 20, "run": 1},
         hints=None, engine=False,
         requires=(ksm_files("smart_scan", "advisor_mode", "advisor_target_scan_time"),)),
    Mode("ksm-fast", "KSM at 10x the default rate (1000 pages / 20 ms)",
         ram_backend="ram-merge", ksm={"pages_to_scan": 1000, "sleep_millisecs": 20, "run": 1},
         hints=None, engine=False, requires=(ksm_files(),)),
    Mode("satori", "hints from the guest's disk reads, verified and merged at once",
         ram_backend="file", ksm=None, hints="guest", engine=True),
    Mode("satori+ksm", "satori's hints, and KSM at the default rate for what no read reveals",
         ram_backend="ram-merge", ksm={**_KSM_DEFAULT_RATE, "run": 1}, hints="guest", engine=True,
         requires=(ksm_files(),)),
    Mode("satori-host", "hints from QEMU's own disk reads (any guest kernel, no guest patch), "
         "verified and merged at once",
         ram_backend="file", ksm={"run": 0}, hints="host", engine=True),
    Mode("dax", "the dataset on one read-only virtio-pmem image mounted with FS-DAX in every "
         "guest: no page-cache copy at all (only that data, never writes)",
         ram_backend="file", ksm={"run": 0}, hints=None, engine=False, pmem=True),
)}

NAMES: tuple[str, ...] = tuple(MODES)


def get(name: str) -> Mode:
    """The mode called ``name``; an unknown name is a :class:`HarnessError` listing the modes."""
    try:
        return MODES[name]
    except KeyError:
        raise HarnessError(f"unknown sharing mode {name!r}: one of {', '.join(MODES)}") from None


def ksm_keys() -> frozenset[str]:
    """Every KSM sysfs file some mode writes (what a saved-settings file may hold)."""
    return frozenset(k for m in MODES.values() if m.ksm for k in m.ksm)


def order_key(name: str) -> tuple[int, str]:
    """Sort key: modes in table order, unknown names last."""
    return (NAMES.index(name) if name in MODES else len(NAMES), name)
