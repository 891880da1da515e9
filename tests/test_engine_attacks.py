"""The engine against a hostile guest and a lost agent reply, with real guests.

Three VMs share one engine: ``ea`` and ``eb`` are honest, ``ec`` attacks. The tests run in order:
a lost merge reply (fault injection: the agent really merges, then the reply raises) never
lets a store page be freed while a guest maps it; a planted XXH64 collision does not keep the
honest pair from merging (the index is keyed by a secret hash); a flooding guest (ever new
valid hints, then forged records as fast as its ring takes) stays within its index quota and
the engine's memory bound, and the honest pair still merges.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from test_core import xxh64_collision

from harness.errors import AgentError
from harness.sharing import scheduler
from harness.sharing.attach import sharing_attachments
from harness.sharing.engine import Member, SharingEngine
from harness.vm import VM, VMSpec, harness_leftovers, new_run_id, start_all
from harness.workloads.adversary import ARGS_PATH, FORGE, FORGE_PATH

pytestmark = pytest.mark.integration

PAGE = 4096
ATTACKER_QUOTA = 0.02  # of its RAM pages: 2621 first holders for 512 MiB


@pytest.fixture(scope="module")
def trio(image):
    if not image.hints:
        pytest.fail("the image has no hint ring (guest patch did not build)")
    before = set(harness_leftovers())
    run = new_run_id()
    vms = [VM(VMSpec(n, memory_mb=512, append="iomem=relaxed"), image, run_id=run,
              attachments=sharing_attachments(hints=True, agent=True))
           for n in ("ea", "eb", "ec")]
    try:
        start_all(vms)
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"test-{run}",
                           candidate_quota={"ec": ATTACKER_QUOTA}) as eng:
            yield vms, eng
    finally:
        for v in vms:
            v.shutdown()
    left = [x for x in harness_leftovers() if x not in before]
    assert not left, f"left behind: {left}"


def read_cold(vm: VM, files: str) -> None:
    vm.ssh.check(f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {files} > /dev/null")


def md5(vm: VM, path: str) -> str:
    return vm.ssh.check(f"md5sum {path}").split()[0]


def test_a_lost_merge_reply_never_frees_a_mapped_page(trio, monkeypatch):
    (a, b, _), eng = trio
    f = "/data/set1/f0020.bin"
    eng.drain(quiet_s=0.3)
    orig = md5(b, f)
    read_cold(a, f)
    eng.drain(quiet_s=0.5)  # a holds every page of f first
    link_b = next(link for link in eng.links if link.name == b.name)
    real_send, real_list = scheduler.send_batch, link_b.agent.merged_ranges
    lost = {"pairs": 0, "lists": 0}

    def failing_list(*args, **kwargs):
        lost["lists"] += 1
        raise AgentError("injected: the LIST reply was lost")

    def lossy_send(link, pairs):
        res = real_send(link, pairs)  # the agent really merges the batch ...
        if link is link_b and not lost["pairs"]:
            lost["pairs"] = res.merged
            link.agent.merged_ranges = failing_list  # ... and cannot LIST for a while
            raise AgentError("injected: the MERGE reply was lost")  # ... and the reply is lost
        return res

    monkeypatch.setattr(scheduler, "send_batch", lossy_send)
    read_cold(b, f)
    eng.drain(quiet_s=0.5)
    assert lost["pairs"] >= 900 and lost["lists"] >= 1, lost
    freed0 = eng.core.counters()["slots_freed"]
    # the other holder writes every page: its copies break; b still maps the store pages
    a.ssh.check(f"dd if=/dev/urandom of={f} bs=4096 count=1024 conv=notrunc status=none; sync")
    eng.check_breaks()  # b cannot answer: nothing may be freed
    assert eng.core.counters()["slots_freed"] == freed0
    link_b.agent.merged_ranges = real_list
    eng.check_breaks()  # b answers: its pages are confirmed, a's breaks counted
    assert md5(b, f) == orig, "b reads other bytes: a store page it maps was freed"
    assert md5(a, f) != orig
    st = eng.stats()
    assert st["index"]["lost"] == 0
    vb = st["vms"][b.name]
    assert vb["agent_errors"] >= 2 and "injected" in vb["last_error"], vb
    assert st["vms"][a.name]["broken"] >= 900


def test_a_planted_xxh64_collision_does_not_stop_the_honest_pair(trio):
    """The attacker builds, for 256 pages Y of a dataset file, pages X != Y with XXH64(X) =
    XXH64(Y), writes two files of them to its disk and reads both: honest hints of X, stored as
    shared content. An index keyed by XXH64 would then plan every honest Y against X (the
    agent's memcmp refuses: never merged); keyed by the secret hash, the honest pair merges."""
    (a, b, c), eng = trio
    f, n = "/data/set1/f0030.bin", 256
    ys = base64.b64decode(c.ssh.check(f"head -c {n * PAGE} {f} | base64 -w0"))
    ys = [ys[i * PAGE:(i + 1) * PAGE] for i in range(n)]
    xs = [xxh64_collision(y) for y in ys]
    c.ssh.put(b"".join(xs), "/root/x1.bin")
    c.ssh.check("cp /root/x1.bin /root/x2.bin; sync; echo 3 > /proc/sys/vm/drop_caches; "
                "cat /root/x1.bin /root/x2.bin > /dev/null")
    end = time.monotonic() + 60
    planted = 0
    while planted < 0.9 * n and time.monotonic() < end:
        eng.run_for(1)
        planted = sum(1 for x in xs if (h := eng.core.find(eng.core.keyed(x))) and h[0] == "slot")
    assert planted >= 0.9 * n, (f"the attacker's pages were not stored ({planted} of {n})",
                                eng.stats()["vms"][c.name])
    readers = [threading.Thread(target=read_cold, args=(vm, f)) for vm in (a, b)]
    for r in readers:
        r.start()
    while any(r.is_alive() for r in readers):
        eng.run_for(0.5)
    eng.drain(quiet_s=0.5)
    mapped = {name: {int(s) // PAGE + k for _g, s, cnt in r.tolist() for k in range(cnt)}
              for name, r in eng.merged_ranges(exclude_private=True).items()}
    both = 0
    for y in ys:
        found = eng.core.find(eng.core.keyed(y))
        if found and found[0] == "slot" and found[1] in mapped[a.name] and found[1] in mapped[b.name]:
            both += 1
    assert both >= 0.95 * n, f"only {both} of {n} attacked pages merged between the honest VMs"
    # the attacker's planted content is still stored (it did not lose it either)
    assert sum(1 for x in xs if (h := eng.core.find(eng.core.keyed(x))) and h[0] == "slot") >= 0.9 * n
    c.ssh.check("rm -f /root/x1.bin /root/x2.bin")


def test_a_flooding_guest_stays_within_its_bounds(trio):
    (a, b, c), eng = trio
    quota = eng.quota(eng.members[2])
    v0 = eng.stats()["vms"]
    # 1: ever new valid hints (a file of random bytes rewritten and read again, 6 x 8192 pages)
    flood = threading.Thread(target=c.ssh.check, args=(
        "for i in 1 2 3 4 5 6; do head -c 33554432 /dev/urandom > /root/flood.bin; sync; "
        "echo 3 > /proc/sys/vm/drop_caches; cat /root/flood.bin > /dev/null; done; rm -f /root/flood.bin",),
        kwargs={"timeout": 600})
    files1 = "/data/set1/f004[0-4].bin"
    flood.start()
    readers = [threading.Thread(target=read_cold, args=(vm, files1)) for vm in (a, b)]
    for r in readers:
        r.start()
    while flood.is_alive() or any(r.is_alive() for r in readers):
        eng.run_for(0.5)
        st = eng.stats()
        assert st["vms"][c.name]["candidates"] <= quota
        assert st["index"]["mem_bytes"] <= st["index"]["mem_bound_bytes"], st["index"]
    eng.drain(quiet_s=0.5)
    v1 = eng.stats()["vms"]
    vc = v1[c.name]
    assert vc["hinted"] - v0[c.name]["hinted"] >= 40_000 and vc["evicted"] >= 30_000, vc
    for vm in (a, b):
        # (pages merged by the agent; "merged now" also loses the earlier tests' pages, which
        # the guests' drop_caches gave back to be written)
        assert v1[vm.name]["merged_total"] - v0[vm.name]["merged_total"] >= 0.9 * 5 * 1024, (v0[vm.name], v1[vm.name])
    # 2: forged records as fast as the ring takes, while the honest pair reads other files
    files2 = "/data/set1/f004[5-9].bin"
    c.ssh.put(FORGE.encode(), FORGE_PATH)  # the adversary workload's forger, its flood attack
    c.ssh.put(json.dumps({"attacks": ["flood"], "rate": 0, "duration_s": 25, "seed": 1}).encode(), ARGS_PATH)
    forge = threading.Thread(target=c.ssh.check, args=(f"python3 {FORGE_PATH} {ARGS_PATH}",),
                             kwargs={"timeout": 300})
    forge.start()
    eng.run_for(3)
    readers = [threading.Thread(target=read_cold, args=(vm, files2)) for vm in (a, b)]
    for r in readers:
        r.start()
    while forge.is_alive() or any(r.is_alive() for r in readers):
        eng.run_for(0.5)
    eng.drain(quiet_s=0.5)
    st = eng.stats()
    v2 = st["vms"]
    refused = (v2[c.name]["changed"] - v1[c.name]["changed"]) + (v2[c.name]["rejected"] - vc["rejected"])
    assert refused >= 20_000, v2[c.name]
    for vm in (a, b):
        assert v2[vm.name]["merged_total"] - v1[vm.name]["merged_total"] >= 0.9 * 5 * 1024, (v1[vm.name], v2[vm.name])
    assert st["index"]["mem_bytes"] <= st["index"]["mem_bound_bytes"] and st["index"]["lost"] == 0
