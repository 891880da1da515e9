"""The break checker: the agents' word on which pages still map the store, and freeing slots.

A merged page stops needing its store page when the guest writes it (copy-on-write: it gets a
private copy) or QEMU discards it (balloon). Only the agent in QEMU can see that. Each look asks
every agent that may map something for its BREAKS: the pages that stopped mapping their store
page since its last answer, each reported once; an agent whose QEMU took no page fault since
answers without looking at any page (docs/merging.md, "Copy-on-write breaks without walking").
They go to the native core's books (``NativeCore.apply_breaks``). Store slots nothing references
are freed only with every agent's MAPPED word that it maps none of them
(``NativeCore.free_slots``).

An agent without BREAKS, or one whose reply was lost (a merge batch, a BREAKS, a MAPPED: it is
marked ``needs_list``), is asked for its LIST instead (the pages mapped from the store and not
faulted private), and the VM's books are reset to it (``NativeCore.reconcile``: pages gone are
breaks, pages the books had let go of are taken back). While any VM is in that state, a slot is
punched only with every agent's current LIST in hand (``NativeCore.free_unused``), and until a
LIST from it arrives nothing is freed.

How often to look (``due``): every ``interval_s`` while hints come, less often (doubling up to
8x) while nothing changed.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from harness.errors import HarnessError

PAGE = 4096

if TYPE_CHECKING:
    from harness.sharing.core import NativeCore
    from harness.sharing.link import VMLink


class BreakChecker:
    def __init__(self, core: NativeCore, links: list[VMLink], interval_s: float, log) -> None:
        self.core = core
        self.links = links
        self.interval_s = interval_s
        self._interval = interval_s
        self._last = 0.0
        self.quiet = True  # set by check(): every agent's view was as at the last one
        self.log = log

    # ------------------------------------------------------------------ cadence
    def due(self, now: float, taken: int) -> bool:
        """Whether to look for breaks now (``taken``: hint records taken in this step)."""
        if taken:
            self._interval = self.interval_s
        if now - self._last < self._interval:
            return False
        self._last = now
        return True

    def checked(self) -> None:
        """After a look: nothing moved since the last one -> look less often (up to 8x), while
        no hint comes."""
        self._interval = min(8 * self.interval_s, 2 * self._interval) if self.quiet else self.interval_s

    # ------------------------------------------------------------------ LISTs
    def _list(self, link: VMLink) -> np.ndarray | None:
        try:
            assert link.agent is not None
            return link.agent.merged_ranges(exclude_private=True)
        except HarnessError as e:
            link.c.agent_errors += 1
            link.last_error = str(e)
            link.needs_list = True
            self.log(f"VM {link.name}: LIST failed ({e}); no store page is freed until it answers")
            return None

    def _reconcile(self, link: VMLink, ranges: np.ndarray, force: bool = False) -> int:
        digest = hashlib.blake2b(ranges.tobytes(), digest_size=16).digest()
        version = self.core.vm_counters(link.idx)["version"]
        if not force and not link.needs_list and link.listed == (version, digest):
            return 0  # the agent maps what it mapped at the last look, and the books agree
        self.quiet = False
        broken = self.core.reconcile(link.idx, ranges)
        link.listed = (self.core.vm_counters(link.idx)["version"], digest)
        link.needs_list = False
        return broken

    def relist(self, link: VMLink) -> bool:
        """Ask one agent's LIST now and reset its books to it (after a batch with misses or
        without an answer). False if the LIST failed too (asked again at the next check)."""
        ranges = self._list(link)
        if ranges is None:
            return False
        link.c.relists += 1
        self._reconcile(link, ranges, force=True)
        return True

    # ------------------------------------------------------------------ BREAKS, MAPPED
    def _delta(self, link: VMLink) -> bool:
        return link.delta and not link.needs_list

    def _lost(self, link: VMLink, what: str, e: HarnessError) -> None:
        link.c.agent_errors += 1
        link.last_error = str(e)
        link.needs_list = True
        self.quiet = False
        self.log(f"VM {link.name}: {what} failed ({e}); taking its LIST at the next look")

    def _breaks(self, link: VMLink) -> int:
        """The agent's BREAKS into the books. Returns the pages the books had and lost."""
        try:
            assert link.agent is not None
            rep = link.agent.breaks()
        except HarnessError as e:
            self._lost(link, "BREAKS", e)
            return 0
        if not len(rep.ranges):
            return 0
        self.quiet = False
        return self.core.apply_breaks(link.idx, rep.ranges)

    def _free_by_mapped(self) -> int:
        """Free the unreferenced slots no agent says it maps (MAPPED). Returns slots freed."""
        cand = self.core.unreferenced()
        if not len(cand):
            return 0
        mapped = np.zeros(len(cand), dtype=bool)
        for link in self.links:
            try:
                assert link.agent is not None
                mapped |= link.agent.mapped(cand * np.uint64(PAGE))
            except HarnessError as e:
                self._lost(link, "MAPPED", e)
                return 0
        return self.core.free_slots(cand[~mapped])

    def check(self) -> int:
        """Look at every agent that may map something, free unreferenced slots. Returns the
        pages found broken (or discarded)."""
        self.quiet = True
        lists: dict[int, np.ndarray] = {}
        broken = 0
        for link in self.links:
            if not (self.core.vm_counters(link.idx)["merged"] or link.needs_list):
                continue
            if self._delta(link):
                broken += self._breaks(link)
                continue
            ranges = self._list(link)
            if ranges is not None:
                lists[link.idx] = ranges
                broken += self._reconcile(link, ranges)
        if self.core.counters()["unreferenced"] and all(self._delta(link) for link in self.links):
            self._free_by_mapped()
        elif self.core.counters()["unreferenced"]:
            # freeing needs every agent's current LIST, also of VMs the books say map nothing
            for link in self.links:
                if link.idx not in lists:
                    ranges = self._list(link)
                    if ranges is not None:
                        lists[link.idx] = ranges
                        broken += self._reconcile(link, ranges)
            if len(lists) == len(self.links):
                self.core.free_unused([lists[link.idx] for link in self.links])
        return broken
