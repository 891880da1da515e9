"""The break checker: the agents' word on which pages still map the store, and freeing slots.

A merged page stops needing its store page when the guest writes it (copy-on-write: it gets a
private copy). Only the agent in QEMU can see that (its pagemap); its LIST request answers with
the pages mapped from the store and not faulted private. The checker asks each agent for its
LIST, resets the native core's books of that VM to it (``NativeCore.reconcile``: pages gone
are breaks, pages the books had let go of are taken back), and then frees the store slots that
nothing references.

The rule that keeps guests' data safe: **a slot is punched only with every agent's current
LIST in hand** (``NativeCore.free_unused`` gets them all and frees no slot any of them names).
An agent whose reply is lost (a merge batch or a LIST) is marked ``needs_list``; until a LIST
from it arrives, nothing is freed and its unanswered pages keep their slots referenced.

How often to look (``due``): every ``interval_s`` while hints come, less often (doubling up to
8x) while every agent's LIST is as at the last look.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from harness.errors import HarnessError

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
        no hint comes; each look is a pagemap walk over every merged page in every agent."""
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

    def check(self) -> int:
        """Look at every agent that may map something (all of them when a slot may be freed),
        reconcile, free unreferenced slots. Returns the pages found broken."""
        self.quiet = True
        lists: dict[int, np.ndarray] = {}
        broken = 0
        for link in self.links:
            if not (self.core.vm_counters(link.idx)["merged"] or link.needs_list):
                continue
            ranges = self._list(link)
            if ranges is not None:
                lists[link.idx] = ranges
                broken += self._reconcile(link, ranges)
        if self.core.counters()["unreferenced"]:
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
