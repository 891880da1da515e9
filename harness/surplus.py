"""Surplus: the host memory that sharing frees, given back to the VMs that share, as balloon targets.

Every VM boots with its *max* memory and a balloon that holds it at its *entitlement* (its own
allocation). When sharing saves host frames (the realized saving R of METRICS.md, in pages), the
saving is lent to the VMs that share, by raising their balloon targets (QMP ``balloon``, whose
``value`` is the guest's target size in bytes); when the saving shrinks, it is taken back.

The rule (:func:`allocate`, a pure function of pages; all targets are whole pages):

1. **Bounds.** A VM's target is never below its entitlement and never above its max. Its
   *surplus* is target - entitlement. The surplus of all VMs together never exceeds the current
   saving R (a negative R, store overhead larger than the saving, counts as 0).
2. **Contribution.** A page held by n guest pages (over the VMs of a domain) saves n-1 frames; each
   holder is credited (n-1)/n, so the credits add up to the saving (:func:`contribution_credits`,
   :func:`credits_from_frames`). A VM's *fair share* is ``R * credit / sum(credits)``, capped at
   its max - entitlement: credits are used as proportions, so a saving reduced by store overhead
   is shared out in the same proportions.
3. **Growth.** When the outstanding surplus is below R, the difference is handed out in two
   passes: first to VMs whose surplus is below their fair share, in proportion to the shortfall
   (so allocations converge to contribution); then whatever is left to VMs that hold shared
   pages and still have room below their max, in proportion to their credit. A VM that shares
   nothing gets nothing. Integer pages are split by largest remainder, ties by VM name. A grant
   smaller than ``min_grant`` pages is not made (a balloon move is not free for the guest).
4. **Reclaim.** When the saving falls below the outstanding surplus, exactly the excess is taken
   back, from the earliest grants first: every grant is kept in a ledger in the order it was
   made, and reclaim walks the ledger from its oldest entry, shrinking or removing grants until
   the outstanding surplus equals R. The VMs that got surplus first give it back first.
   Surplus already granted is not moved between VMs while R does not shrink (no churn).
5. **Reconciliation.** The ledger is checked against the current targets on every call: a VM
   whose target is lower than its ledger says (a failed QMP call, a restart) loses its newest
   grants; surplus the ledger does not know of counts as the oldest grant (reclaimed first).

:class:`SurplusManager` keeps the ledger and targets, calls ``qmp(command, **args)`` per VM for
every target that changed, and keeps a :class:`Decision` per update (timestamp, saving, credits,
targets, moves with reasons, QMP errors) for the results and the surplus plot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.errors import HarnessError

PAGE = 4096
PAGES_PER_MB = (1 << 20) // PAGE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Budget:
    """One VM's bounds, in pages: its own allocation and its max (what it booted with)."""

    name: str
    entitlement: int
    max: int

    def __post_init__(self) -> None:
        if not 0 < self.entitlement <= self.max:
            raise HarnessError(f"VM {self.name}: entitlement {self.entitlement} pages must be "
                               f"> 0 and <= max {self.max} pages")

    @classmethod
    def from_mb(cls, name: str, entitlement_mb: int, memory_mb: int) -> Budget:
        return cls(name, entitlement_mb * PAGES_PER_MB, memory_mb * PAGES_PER_MB)


@dataclasses.dataclass(frozen=True)
class Grant:
    """``pages`` of surplus lent to ``vm`` by the decision numbered ``seq`` (ledger entry)."""

    vm: str
    pages: int
    seq: int


@dataclasses.dataclass(frozen=True)
class Move:
    """One VM's target changed from ``before`` to ``after`` pages, and why."""

    vm: str
    before: int
    after: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` decided."""

    targets: dict[str, int]  # pages, entitlement <= target <= max
    ledger: tuple[Grant, ...]  # outstanding grants, oldest first
    moves: tuple[Move, ...]
    saving: int  # R used (pages, >= 0)
    reason: str  # one line for the decision as a whole

    @property
    def surplus(self) -> int:
        return sum(g.pages for g in self.ledger)


# ---------------------------------------------------------------- credits


def contribution_credits(holders: Iterable[Sequence[str]]) -> dict[str, float]:
    """Credits from shared frames: each item lists the VM of every guest page mapping one frame
    (a VM holding the frame twice appears twice). A frame held by n pages saves n-1 frames and
    credits each holder (n-1)/n, so the credits add up to the saving."""
    out: dict[str, float] = {}
    for group in holders:
        n = len(group)
        if n < 2:
            continue
        for vm in group:
            out[vm] = out.get(vm, 0.0) + (n - 1) / n
    return out


def credits_from_frames(frames: np.ndarray, owners: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """The same credits from arrays over guest pages: ``frames[i]`` is the host frame (or store
    slot) behind guest page i, ``owners[i]`` the index in ``names`` of the VM it belongs to."""
    frames = np.asarray(frames)
    owners = np.asarray(owners, dtype=np.int64)
    out = {n: 0.0 for n in names}
    if frames.size == 0:
        return out
    _, inverse, counts = np.unique(frames, return_inverse=True, return_counts=True)
    n = counts[inverse].astype(np.float64)
    per_page = (n - 1.0) / n
    sums = np.bincount(owners, weights=per_page, minlength=len(names))
    for i, name in enumerate(names):
        out[name] = float(sums[i])
    return out


# ---------------------------------------------------------------- the rule


def _split(total: int, weights: Mapping[str, float], caps: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` pages in proportion to ``weights``, never above ``caps``; water-filling,
    integer pages by largest remainder, ties by name. Gives out less only if every cap is hit."""
    alloc = {k: 0 for k in weights}
    active = sorted(k for k, w in weights.items() if w > 0 and caps.get(k, 0) > 0)
    remaining = total
    while remaining > 0 and active:
        wsum = sum(weights[k] for k in active)
        shares = {k: remaining * weights[k] / wsum for k in active}
        capped = [k for k in active if alloc[k] + shares[k] >= caps[k]]
        if capped:
            for k in capped:
                remaining -= caps[k] - alloc[k]
                alloc[k] = caps[k]
            active = [k for k in active if k not in capped]
            continue
        whole = {k: int(shares[k]) for k in active}
        rest = remaining - sum(whole.values())
        for k in sorted(active, key=lambda k: (-(shares[k] - whole[k]), k))[:rest]:
            whole[k] += 1
        for k in active:
            alloc[k] += whole[k]
        remaining = 0
    return alloc


def _take_from(grants: list[Grant], vm: str, pages: int) -> list[Grant]:
    """The ledger with ``pages`` of ``vm``'s grants removed, its newest grants first."""
    out = list(grants)
    for i in range(len(out) - 1, -1, -1):
        if pages <= 0:
            break
        g = out[i]
        if g.vm != vm:
            continue
        t = min(g.pages, pages)
        pages -= t
        out[i] = dataclasses.replace(g, pages=g.pages - t)
    return [g for g in out if g.pages > 0]


def _reconcile(budgets: Mapping[str, Budget], current: Mapping[str, int],
               ledger: Iterable[Grant]) -> tuple[dict[str, int], list[Grant]]:
    """Clamp current targets into bounds and make the ledger agree with them."""
    surplus = {n: min(max(current.get(n, b.entitlement), b.entitlement), b.max) - b.entitlement
               for n, b in budgets.items()}
    kept: list[Grant] = [g for g in ledger if g.vm in budgets and g.pages > 0]
    for vm, s in surplus.items():
        have = sum(g.pages for g in kept if g.vm == vm)
        if have > s:  # trim this VM's newest grants
            excess = have - s
            for i in range(len(kept) - 1, -1, -1):
                g = kept[i]
                if g.vm != vm or excess == 0:
                    continue
                take = min(g.pages, excess)
                excess -= take
                kept[i] = dataclasses.replace(g, pages=g.pages - take)
            kept = [g for g in kept if g.pages > 0]
        elif have < s:  # surplus the ledger does not know of: the oldest grant
            kept.insert(0, Grant(vm, s - have, -1))
    kept.sort(key=lambda g: g.seq)  # stable: keeps the order within one decision
    return surplus, kept


def allocate(
    vms: Sequence[Budget],
    saving: int,
    credits: Mapping[str, float],
    current: Mapping[str, int],
    ledger: Iterable[Grant] = (),
    *,
    seq: int = 0,
    min_grant: int = 0,
    reserve: float = 0.0,
    take: Mapping[str, int] | None = None,
    breaks: Mapping[str, float] | None = None,
    no_grant: Collection[str] = (),
    headroom: int | None = None,
) -> Allocation:
    """New balloon targets (pages) from the saving R and the contribution credits.

    ``current``: the targets now (pages; a VM missing is at its entitlement); ``ledger``: the
    outstanding grants, oldest first (from the previous :class:`Allocation`); ``seq``: the number
    of this decision, stamped on its new grants. ``reserve``: the fraction of R never lent.
    ``take``: pages to take back from these VMs now whatever R says (reclaim ahead of breaks,
    capped at their surplus). ``breaks``: per VM, its recent breaks (pages): when R falls, these
    VMs give first, in proportion (default: ``take``). ``no_grant``: VMs that get nothing new.
    ``headroom``: host pages still free below the budget now; new grants never exceed it (a
    saving the host does not see in its own frames is not lent). See the module docstring.
    """
    budgets = {b.name: b for b in vms}
    R = max(0, int(saving))
    lendable = R - math.ceil(max(0.0, min(1.0, reserve)) * R)
    surplus, grants = _reconcile(budgets, current, ledger)
    before = {n: budgets[n].entitlement + s for n, s in surplus.items()}
    reasons: dict[str, str] = {}
    take = {n: int(v) for n, v in (take or {}).items() if n in budgets and v > 0}
    order = {n: float(v) for n, v in (take if breaks is None else breaks).items() if n in budgets and v > 0}

    ahead = {n: min(surplus[n], v) for n, v in take.items()}
    for n, v in ahead.items():
        if v:
            grants = _take_from(grants, n, v)
            surplus[n] -= v
            reasons[n] = f"reclaim ahead: {take[n]} pages of its own breaks, its surplus first"
    outstanding = sum(surplus.values())
    if outstanding > lendable:
        excess = outstanding - lendable
        reason = (f"saving fell to {R} pages (lendable {lendable}): {excess} pages reclaimed, "
                  + ("breaking VMs first, then " if order else "") + "earliest grants first")
        # the VMs that break give first, in proportion to their breaks
        if order:
            first = _split(min(excess, sum(surplus[n] for n in order)), order, {n: surplus[n] for n in order})
            for n, v in first.items():
                if v:
                    grants = _take_from(grants, n, v)
                    surplus[n] -= v
                    excess -= v
                    reasons[n] = f"reclaim: saving fell to {R} pages; breaking VM first"
        new: list[Grant] = []
        for g in grants:
            t = min(g.pages, excess)
            if t:
                excess -= t
                surplus[g.vm] -= t
                reasons.setdefault(g.vm, f"reclaim: saving fell to {R} pages; "
                                         f"earliest grant first (decision {g.seq})")
            if g.pages - t:
                new.append(dataclasses.replace(g, pages=g.pages - t))
        grants = new
    elif ahead and any(ahead.values()):
        reason = f"reclaim ahead of breaks: {sum(ahead.values())} pages"
    elif outstanding < lendable:
        free = lendable - outstanding
        if headroom is not None:
            free = max(0, min(free, int(headroom)))
        csum = sum(max(0.0, credits.get(n, 0.0)) for n in budgets)
        if csum <= 0:
            reason = f"saving {R} pages, but no VM holds shared pages: nothing given"
        else:
            room = {n: 0 if n in no_grant else b.max - b.entitlement for n, b in budgets.items()}
            fair = {n: min(room[n], int(lendable * max(0.0, credits.get(n, 0.0)) / csum)) for n in budgets}
            short = {n: max(0, fair[n] - surplus[n]) for n in budgets}
            first = _split(min(free, sum(short.values())), short, short)
            left = free - sum(first.values())
            head = {n: max(0, room[n] - surplus[n] - first[n]) for n in budgets}
            second = _split(left, {n: max(0.0, credits.get(n, 0.0)) for n in budgets}, head)
            given = 0
            for n in sorted(budgets):
                amount = first[n] + second[n]
                if amount <= 0 or amount < min_grant:
                    continue
                surplus[n] += amount
                given += amount
                grants.append(Grant(n, amount, seq))
                why = "up to its share of the saving by contribution" if first[n] else ""
                if second[n]:
                    why = (why + ", and " if why else "") + "what others could not take, by credit"
                reasons[n] = f"grant: saving grew to {R} pages; {why}"
            reason = (f"saving grew to {R} pages (lendable {lendable}"
                      + (f", host headroom {headroom}" if headroom is not None else "")
                      + f"): {given} pages granted")
    else:
        reason = f"saving {R} pages (lendable {lendable}), all of it lent out or none to lend: no change"

    targets = {n: budgets[n].entitlement + surplus[n] for n in budgets}
    moves = tuple(Move(n, before[n], targets[n], reasons.get(n, reason))
                  for n in budgets if targets[n] != before[n])
    return Allocation(targets, tuple(grants), moves, R, reason)


# ---------------------------------------------------------------- the guard


@dataclasses.dataclass(frozen=True)
class Policy:
    """How surplus is lent and taken back when sharing collapses (docs/isolation.md).

    ``reserve``: the fraction of the saving R never lent (headroom against breaks). ``guard``:
    reclaim ahead of breaks, from the host budget (:func:`guard_takes`), between samples.
    ``horizon_s``: how far ahead the guard looks (host use + growth rate x horizon: about the
    time a balloon needs to give memory back). ``margin``: the fraction of the budget the guard
    keeps free. ``cooldown_s``: after the guard acts, no VM gets a new grant for this long.
    ``budget_cap``: a new grant never exceeds the host's headroom below the budget as last read
    (a saving the host does not see in its own frames is not lent).
    """

    reserve: float = 0.0
    guard: bool = False
    horizon_s: float = 2.0
    margin: float = 0.0
    cooldown_s: float = 10.0
    budget_cap: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.reserve <= 1.0 or not 0.0 <= self.margin < 1.0:
            raise HarnessError(f"surplus policy: reserve {self.reserve} must be in 0..1, margin "
                               f"{self.margin} in 0..1")
        if self.horizon_s < 0 or self.cooldown_s < 0:
            raise HarnessError("surplus policy: horizon_s and cooldown_s must be >= 0")


def guard_takes(policy: Policy, used: int, budget: int, breaks: Mapping[str, int], dt: float,
                surplus: Mapping[str, int]) -> tuple[dict[str, int], int]:
    """Reclaim ahead of breaks (pure): what to take back now, and the host use predicted.

    ``used``: host pages the guests use now; ``budget``: the sum of entitlements (pages);
    ``breaks``: per VM, shared pages (store or KSM) that broke into a private copy since the
    last look ``dt`` seconds ago; ``surplus``: per VM, pages lent. If ``used + sum(breaks) / dt
    * horizon_s`` would pass ``budget * (1 - margin)``, that excess is taken back, from the VMs
    holding surplus in proportion to their breaks (the VM that breaks pays first), or, if none
    of them breaks, in proportion to their surplus. Pages a guest fills anew are not counted:
    while the surplus stays within the saving they cannot take the host over its budget.
    """
    rate = sum(max(0, v) for v in breaks.values()) / dt if dt > 0 else 0.0
    predicted = int(used + rate * policy.horizon_s)
    need = predicted - int(budget * (1.0 - policy.margin))
    holders = {n: v for n, v in surplus.items() if v > 0}
    if need <= 0 or not holders:
        return {}, predicted
    weights: dict[str, float] = {n: float(breaks.get(n, 0)) for n in holders if breaks.get(n, 0) > 0}
    if not weights:
        weights = {n: float(v) for n, v in holders.items()}
    first = _split(min(need, sum(holders[n] for n in weights)), weights, {n: holders[n] for n in weights})
    left = need - sum(first.values())
    if left > 0:  # the growers gave all they had: the other holders, by surplus
        rest = {n: holders[n] - first.get(n, 0) for n in holders}
        more = _split(min(left, sum(rest.values())), {n: float(v) for n, v in rest.items()}, rest)
        first = {n: first.get(n, 0) + more.get(n, 0) for n in holders}
    return {n: v for n, v in first.items() if v > 0}, predicted


# ---------------------------------------------------------------- applying it


@dataclasses.dataclass
class Decision:
    """One update of the manager, as recorded for results and plots."""

    t: float  # seconds since the manager started
    seq: int
    saving: int  # pages
    credits: dict[str, float]
    targets: dict[str, int]  # pages, after the decision (what QMP accepted)
    surplus: dict[str, int]  # pages above entitlement, per VM
    moves: list[Move]
    reason: str
    errors: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets_mb"] = {k: v / PAGES_PER_MB for k, v in self.targets.items()}
        d["surplus_mb"] = {k: v / PAGES_PER_MB for k, v in self.surplus.items()}
        d["saving_mb"] = self.saving / PAGES_PER_MB
        return d


QMP = Callable[..., Any]


class SurplusManager:
    """Holds each VM's balloon at its entitlement and lends it the saving, by :func:`allocate`.

    ``qmp`` maps a VM name to a callable ``qmp(command, **args)`` (e.g. ``VM.qmp``); the manager
    only sends ``balloon`` with ``value`` in bytes. ``enabled=False`` keeps every VM at its
    entitlement (the same host budget, no surplus): :meth:`update` then records and moves nothing.
    """

    def __init__(
        self,
        vms: Sequence[Budget],
        qmp: Mapping[str, QMP],
        *,
        min_grant: int = PAGES_PER_MB,
        enabled: bool = True,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        missing = [b.name for b in vms if b.name not in qmp]
        if missing:
            raise HarnessError(f"surplus manager: no QMP for VM(s) {', '.join(missing)}")
        self.vms = list(vms)
        self._qmp = dict(qmp)
        self.min_grant = min_grant
        self.enabled = enabled
        self.policy = policy or Policy()
        self.budget = sum(b.entitlement for b in vms)
        self._clock = clock
        self._t0 = clock()
        self.targets: dict[str, int] = {b.name: b.max for b in vms}  # as booted: no balloon yet
        self.ledger: tuple[Grant, ...] = ()
        self.decisions: list[Decision] = []
        self._seq = 0
        self._saving = 0  # R of the last update, pages
        self._credits: dict[str, float] = {}
        self._breaks: dict[str, int] = {}  # broken pages per VM since the last update
        self._frozen_until = -1.0  # no new grants before this (clock), after the guard acted
        self._used: int | None = None  # host pages the guests use, as last observed
        self.guard_actions = 0
        # the sampling loop (update) and the guard (observe) run in different threads
        self._lock = threading.RLock()

    def _apply(self, moves: Iterable[Move]) -> dict[str, str]:
        errors: dict[str, str] = {}
        for m in moves:
            try:
                self._qmp[m.vm]("balloon", value=m.after * PAGE)
            except HarnessError as e:
                errors[m.vm] = e.message
                log.warning("surplus: VM %s: balloon to %d MB failed: %s", m.vm, m.after // PAGES_PER_MB, e.message)
                continue
            self.targets[m.vm] = m.after
            log.info("surplus: VM %s %d -> %d MB (%s)", m.vm, m.before // PAGES_PER_MB,
                     m.after // PAGES_PER_MB, m.reason)
        return errors

    def _record(self, saving: int, credits: Mapping[str, float], moves: Sequence[Move],
                reason: str, errors: dict[str, str]) -> Decision:
        d = Decision(
            t=round(self._clock() - self._t0, 3), seq=self._seq, saving=saving, credits=dict(credits),
            targets=dict(self.targets),
            surplus={b.name: self.targets[b.name] - b.entitlement for b in self.vms},
            moves=list(moves), reason=reason, errors=errors,
        )
        self.decisions.append(d)
        self._seq += 1
        return d

    def start(self) -> Decision:
        """Inflate every balloon to hold its VM at its entitlement."""
        with self._lock:
            return self._start()

    def _start(self) -> Decision:
        moves = [Move(b.name, self.targets[b.name], b.entitlement, "start: hold at entitlement")
                 for b in self.vms]
        errors = self._apply(moves)
        self.ledger = ()
        return self._record(0, {}, moves, "start: every VM held at its entitlement", errors)

    def update(self, saving: int, credits: Mapping[str, float]) -> Decision:
        """One step: new targets from the current saving (pages) and credits; QMP for changes."""
        with self._lock:
            return self._update(saving, credits)

    def _update(self, saving: int, credits: Mapping[str, float]) -> Decision:
        if not self.enabled:
            return self._record(max(0, int(saving)), credits, [], "surplus off: at entitlement", {})
        self._saving, self._credits = int(saving), dict(credits)
        frozen = self._frozen_until >= 0 and self._clock() < self._frozen_until
        headroom = None
        if self.policy.budget_cap and self._used is not None:
            headroom = int(self.budget * (1.0 - self.policy.margin)) - self._used
        a = allocate(self.vms, saving, credits, self.targets, self.ledger,
                     seq=self._seq, min_grant=self.min_grant, reserve=self.policy.reserve,
                     breaks=self._breaks, no_grant=[b.name for b in self.vms] if frozen else (),
                     headroom=headroom)
        self._breaks = {}
        errors = self._apply(a.moves)
        self.ledger = a.ledger  # reconciled against self.targets on the next call if QMP failed
        return self._record(a.saving, credits, a.moves, a.reason + (" (grants held: guard cooldown)" if frozen else ""),
                            errors)

    def observe(self, used: int, breaks: Mapping[str, int], dt: float) -> Decision | None:
        """A look between samples: the host uses ``used`` pages; ``breaks`` per VM are shared
        pages that broke in the last ``dt`` seconds. Remembers them (the next update reclaims from
        those VMs first) and, with ``policy.guard``, takes surplus back at once when the budget is
        at risk (:func:`guard_takes`). Returns the decision if it acted."""
        with self._lock:
            return self._observe(used, breaks, dt)

    def _observe(self, used: int, breaks: Mapping[str, int], dt: float) -> Decision | None:
        self._used = int(used)
        for n, v in breaks.items():
            if v > 0:
                self._breaks[n] = self._breaks.get(n, 0) + int(v)
        if not self.enabled or not self.policy.guard:
            return None
        surplus = {b.name: self.targets[b.name] - b.entitlement for b in self.vms}
        takes, predicted = guard_takes(self.policy, used, self.budget, breaks, dt, surplus)
        if not takes:
            return None
        self._frozen_until = self._clock() + self.policy.cooldown_s
        self.guard_actions += 1
        a = allocate(self.vms, self._saving, self._credits, self.targets, self.ledger, seq=self._seq,
                     min_grant=self.min_grant, reserve=self.policy.reserve, take=takes,
                     no_grant=[b.name for b in self.vms])
        errors = self._apply(a.moves)
        self.ledger = a.ledger
        return self._record(a.saving, self._credits, a.moves,
                            f"guard: host use {used} pages, {predicted} predicted in "
                            f"{self.policy.horizon_s:g} s, budget {self.budget}: {sum(takes.values())} "
                            "pages taken back ahead of breaks", errors)

    def release(self) -> Decision:
        """Take every grant back (end of a run): all VMs at their entitlement."""
        with self._lock:
            return self._release()

    def _release(self) -> Decision:
        moves = [Move(b.name, self.targets[b.name], b.entitlement, "end: surplus taken back")
                 for b in self.vms if self.targets[b.name] != b.entitlement]
        errors = self._apply(moves)
        self.ledger = ()
        return self._record(0, {}, moves, "end: every VM back at its entitlement", errors)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Balloon targets and surplus per VM now, in MB: the per-VM part of a sample."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, float]]:
        return {
            "balloon_mb": {b.name: self.targets[b.name] / PAGES_PER_MB for b in self.vms},
            "surplus_mb": {b.name: (self.targets[b.name] - b.entitlement) / PAGES_PER_MB for b in self.vms},
        }

    def series(self) -> list[dict[str, Any]]:
        """The decisions as plain dicts (JSON) for results.json and the surplus plot."""
        with self._lock:
            return [d.as_dict() for d in self.decisions]
