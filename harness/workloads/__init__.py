"""Workloads: what runs in the guests over SSH, what they need in the image, how output is parsed.

One module per kind (``identical_readers``, ``short_lived``, ``macro``, ``web``, ``boot_storm``),
each a :class:`Workload` subclass registered in :data:`KINDS` with its parameters and defaults
(``PARAMS``), which the config schema validates against. Datasets come with the image
(``images/bookworm.yaml``: ``/data/set1/f0000.bin`` .. ``f0049.bin``, 4 MiB each, identical in
every VM of one image).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from harness.errors import ConfigError

DATASET = "/data/set1"
DATASET_FILES = 50  # images/bookworm.yaml
FILE_MB = 4


def dataset_files(first: int, count: int) -> list[str]:
    if first < 0 or count < 1 or first + count > DATASET_FILES:
        raise ConfigError(f"dataset files {first}..{first + count - 1} outside 0..{DATASET_FILES - 1}")
    return [f"{DATASET}/f{i:04d}.bin" for i in range(first, first + count)]


@dataclasses.dataclass
class WorkloadResult:
    """What a workload measured. ``time_s``: its own time figure (lower is better); whether it may
    be compared across modes is what the workload class says (:attr:`Workload.DEFINES`)."""

    kind: str
    time_s: float
    per_vm: dict[str, dict[str, Any]]
    events: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunContext:
    """What a workload gets from the runner besides its VMs."""

    log: Callable[[str], None] = print
    t0: float = dataclasses.field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    settle: Callable[[], None] = lambda: None  # the runner: let sharing catch up (mode dependent)
    quiet_since: float | None = None  # the guests have done nothing since (s from t0), or None

    def mark(self, label: str, activity: bool = True) -> None:
        """Record an event; ``activity`` (the default) ends a quiet phase."""
        t = round(time.monotonic() - self.t0, 3)
        self.events.append((t, label))
        if activity:
            self.quiet_since = None

    def quiet(self) -> None:
        """From now on the guests do nothing (until the next activity): the idle tail where a
        scanner keeps paying and hinted sharing should not (idle CPU, docs/metrics.md)."""
        self.mark("quiet", activity=False)
        self.quiet_since = self.events[-1][0]


class Workload:
    kind: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Any]] = {}
    PARAM_TYPES: ClassVar[dict[str, Any]] = {}  # a type narrower than the default implies
    # the ratio figures against mode none its time figure supports (harness.metrics):
    # "slowdown" (guest slowdown) and "macro_gain"; none by default (a fixed duration, sleeps)
    DEFINES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: dict[str, Any] | None = None, seed: int = 0) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise ConfigError(f"workload {self.kind}: unknown parameter(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(self.PARAMS))}")
        self.p = {**self.PARAMS, **params}
        self.seed = seed

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:  # pragma: no cover - abstract
        raise NotImplementedError


def on_all(vms: list, fn: Callable[[Any], Any]) -> dict[str, Any]:
    """Run ``fn(vm)`` on every VM at once (threads; SSH waits on the network); re-raise the first error."""
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def one(vm):
        try:
            out[vm.name] = fn(vm)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(vm,), daemon=True) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def timed(vm, command: str, timeout: float = 1800) -> float:
    """Seconds the guest spends on ``command`` (measured in the guest, SSH latency excluded)."""
    out = vm.ssh.check(f"s=$(date +%s.%N); {command}; e=$(date +%s.%N); echo \"$s $e\"", timeout=timeout)
    s, e = out.strip().splitlines()[-1].split()
    return float(e) - float(s)


def registry() -> dict[str, type[Workload]]:
    from harness.workloads import (
        adversary,
        boot_storm,
        collapse,
        identical_readers,
        integrity,
        macro,
        short_lived,
        web,
    )

    return {w.kind: w for w in (identical_readers.IdenticalReaders, short_lived.ShortLived,
                                 macro.Macro, web.Web, boot_storm.BootStorm, integrity.Integrity,
                                 adversary.Adversary, collapse.Collapse)}


def make(kind: str, params: dict[str, Any] | None = None, seed: int = 0) -> Workload:
    reg = registry()
    if kind not in reg:
        raise ConfigError(f"unknown workload {kind!r}; known: {', '.join(sorted(reg))}")
    return reg[kind](params, seed)
