"""A balloon that inflates over merged pages gives their frames back to the host (issue 12).

Two real guests share 120 MB of page cache (merged by the engine). Each drops its cache and
inflates its balloon far below that: QEMU discards the ballooned pages, and the agent must give
those that were merged their RAM back and stop listing them, so that the engine frees the store
pages nobody maps any more and the accounting no longer counts them as shared. Without that, a
guest "held" more pages than its balloon lets it have, and the store kept every frame.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from harness import accounting
from harness.sharing.attach import sharing_attachments
from harness.sharing.engine import Member, SharingEngine
from harness.vm import VM, VMSpec, harness_leftovers, new_run_id, start_all

pytestmark = pytest.mark.integration

FILES = "/data/set1/f00[0-2]?.bin"  # 30 files x 4 MiB = 120 MiB
FILE_PAGES = 30 * 1024
BALLOON_MB = 128
MB = 256  # pages


def balloon_to(vm: VM, mb: int, timeout: float = 300.0) -> int:
    """Set the balloon target; wait until the guest got there (or stopped moving). Actual MB."""
    vm.qmp("balloon", value=mb << 20)
    end = time.monotonic() + timeout
    last, still = -1, 0
    while time.monotonic() < end:
        actual = int(vm.qmp("query-balloon")["actual"]) >> 20
        if actual <= mb + 1:
            return actual
        still = still + 1 if actual == last else 0
        if still >= 20:  # 10 s without progress: the guest gives no more
            return actual
        last = actual
        time.sleep(0.5)
    return int(vm.qmp("query-balloon")["actual"]) >> 20


def shared_truth(eng: SharingEngine) -> int:
    """Frames saved by store pages, from what the agents map: sum over slots of holders - 1."""
    slots = []
    for ranges in eng.merged_ranges(exclude_private=True).values():
        for _g, s, n in ranges.tolist():
            slots.append(np.arange(s // 4096, s // 4096 + n))
    if not slots:
        return 0
    _, counts = np.unique(np.concatenate(slots), return_counts=True)
    return int((counts - 1).sum())


def test_balloon_over_merged_pages_frees_their_store_pages(image):
    if not image.hints:
        pytest.fail("the image has no hint ring (guest patch did not build)")
    before = set(harness_leftovers())
    run = new_run_id()
    vms = [VM(VMSpec(n, memory_mb=512), image, run_id=run,
              attachments=sharing_attachments(hints=True, agent=True)) for n in ("ba", "bb")]
    try:
        start_all(vms)
        a, b = vms
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"bal-{run}") as eng:
            for vm in vms:
                vm.ssh.check(f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {FILES} > /dev/null")
            eng.drain(quiet_s=0.5, timeout_s=60)
            st0 = eng.stats()
            assert all(v["merged"] >= 0.9 * FILE_PAGES for v in st0["vms"].values()), st0["vms"]
            store0 = st0["store_pages"]

            for vm in vms:
                # the merged page cache goes to the guest's free lists, then to its balloon
                vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
                actual = balloon_to(vm, BALLOON_MB)
                eng.check_breaks()
                s = accounting.measure(vms, store=eng.store_ref)  # the kernel says what maps the store
                g = s.per_vm()[vm.name]
                # a guest cannot hold more pages than its balloon leaves it
                assert g <= actual * MB + 2 * MB, (vm.name, g / MB, actual)
                # the accounting's saving is what the agents really map, no more
                assert s.R <= shared_truth(eng) + 2 * MB, (s.R / MB, shared_truth(eng) / MB)

            agents = {vm.name: int(eng.links[i].agent.stats()["discarded"]) for i, vm in enumerate(vms)}
            assert all(n > 0.5 * FILE_PAGES for n in agents.values()), agents
            for _ in range(3):  # the engine frees slots a look after the last holder let go
                eng.check_breaks()
            store1 = eng.stats()["store_pages"]
            assert store1 <= store0 - 0.5 * FILE_PAGES, (store0, store1)
            # the guests still work, and read their files right (from disk again)
            sums = {vm.name: vm.ssh.check(f"cat {FILES} | md5sum").split()[0] for vm in (a, b)}
            assert sums[a.name] == sums[b.name]
    finally:
        for v in vms:
            v.shutdown()
    left = [x for x in harness_leftovers() if x not in before]
    assert not left, f"left behind: {left}"
