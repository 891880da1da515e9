"""Accounting and KSM on real guests.

- KSM (``ksm-fast``) merges two readers of the same files: E_disk and pages_sharing rise, and
  the host's KSM settings are exactly as before afterwards.
- Two readers without sharing: E_disk is 0 although M is large; G is the populated guest
  memory; measuring allocates nothing in the RAM files.
"""

from __future__ import annotations

import os
import time

import pytest

from harness import accounting, ksm, modes
from harness.vm import VM, VMSpec, start_all

pytestmark = pytest.mark.integration

READ = "cat /data/set1/f000[0-9].bin > /dev/null"  # 40 MB, kept in the page cache
KSM_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")


def _ksm_values() -> dict[str, str]:
    return {k: (ksm.KSM_SYSFS / k).read_text() for k in KSM_KNOBS}


def _read_everywhere(vms: list[VM]) -> None:
    chans = [vm.ssh.client.exec_command(READ, timeout=300) for vm in vms]
    for vm, (_, out, err) in zip(vms, chans, strict=True):
        rc = out.channel.recv_exit_status()
        assert rc == 0, f"{vm.name}: {err.read().decode()}"


@pytest.mark.skipif(not ksm.KSM_SYSFS.exists(), reason="host kernel without KSM")
def test_ksm_fast_merges_readers_and_restores_sysfs(image):
    before = _ksm_values()
    figures = {}
    with pytest.raises(RuntimeError, match="end of the test body"):
        with ksm.KSMControl("ksm-fast") as k:
            assert int((ksm.KSM_SYSFS / "pages_to_scan").read_text()) == 1000
            vms = [VM(VMSpec(f"ksm{i}", memory_mb=384, ram_backend=modes.get("ksm-fast").ram_backend),
                      image) for i in range(2)]
            try:
                start_all(vms)
                s0 = k.sample()
                _read_everywhere(vms)
                t_read = time.monotonic()
                first = accounting.measure(vms)
                samples = [first]
                while time.monotonic() - t_read < 90:
                    s = accounting.measure(vms)
                    samples.append(s)
                    if s.E_disk is not None and s.E_disk >= 0.5:
                        break
                    time.sleep(2)
                s1 = k.sample()
                last = samples[-1]
                figures.update(
                    seconds=time.monotonic() - t_read, E_disk=last.E_disk, E=last.E,
                    M_disk=last.M_disk, G=last.G, pages_sharing=s1.pages_sharing,
                    full_scans=s1.full_scans - s0.full_scans, ksmd_cpu=s1.ksmd_cpu_s - s0.ksmd_cpu_s,
                    first_E_disk=first.E_disk, measure_ms=[round(x.seconds * 1000) for x in samples],
                )
                print("\nksm-fast:", figures)
                print("last sample:", accounting.format_sample(last))
                assert last.M_disk >= 10_000, "the two guests should hold >= 40 MB of equal disk blocks"
                assert last.E_disk is not None and last.E_disk >= 0.5, figures
                assert s1.pages_sharing > 5_000, figures
                assert s1.ksmd_cpu_s >= s0.ksmd_cpu_s
            finally:
                for vm in vms:
                    vm.shutdown()
            raise RuntimeError("end of the test body")  # the settings must come back on errors too
    assert _ksm_values() == before


def test_no_sharing_file_backend_measures_without_allocating(image):
    vms = [VM(VMSpec(f"acct{i}", memory_mb=384), image) for i in range(2)]
    try:
        start_all(vms)
        _read_everywhere(vms)
        for vm in vms:
            vm.qmp("stop")
        try:
            blocks = [os.stat(vm.ram.path).st_blocks for vm in vms]
            s = accounting.measure(vms)
            s2 = accounting.measure(vms, pause=True)  # paused already: stay paused
            assert not any(vm.qmp("query-status")["running"] for vm in vms)
            after = [os.stat(vm.ram.path).st_blocks for vm in vms]
        finally:
            for vm in vms:
                vm.qmp("cont")
        print("\nno sharing:", accounting.format_sample(s))
        assert after == blocks, "measuring allocated memory in a RAM file"
        populated = [b * 512 // 4096 for b in blocks]
        for v, p in zip(s.vms, populated, strict=True):
            assert abs(v.G - p) <= 0.01 * p + 16, (v, p)
        assert abs(s.G - sum(populated)) <= 0.01 * sum(populated) + 32
        assert s.F == s.G and s.R == 0  # every page its own frame
        assert s.E == 0.0 and s.E_disk == 0.0
        assert s.M_disk >= 10_000 and s.M > s.M_disk  # yet much could be shared
        assert s.G_disk >= 2 * 10_240  # the 40 MB read by each guest
        assert (s2.G, s2.F, s2.C) == (s.G, s.F, s.C)  # paused guests: a sample is reproducible
        s3 = accounting.measure(vms, pause=True)  # running guests: held, then running again
        assert all(vm.qmp("query-status")["running"] for vm in vms)
        assert abs(s3.G - s.G) <= 0.05 * s.G
    finally:
        for vm in vms:
            vm.shutdown()


def _disk_pages(vm: VM, disk_set) -> dict[tuple[int, int], int]:
    """Content -> guest byte offset of the present pages of ``vm`` that hold a disk block."""
    import numpy as np

    from harness import oracle

    t = accounting.target(vm)
    present, _ = accounting.decode_pagemap(accounting.read_pagemap(t.pid, t.hva, t.ram_size // 4096))
    idx = np.flatnonzero(present)
    h = oracle.hash_process_pages(t.pid, t.hva, idx)
    d = oracle.in_set(h, disk_set)
    return {(int(a), int(b)): int(i) * 4096 for (a, b), i in zip(h[d], idx[d], strict=True)}


def _backed_by_list(vm: VM, ranges) -> int:
    """Store-backed pages as the merge agent's LIST says: listed pages not present."""
    t = accounting.target(vm)
    present, _ = accounting.decode_pagemap(accounting.read_pagemap(t.pid, t.hva, t.ram_size // 4096))
    g, _ = accounting.expand_ranges(ranges, t.ram_size // 4096)
    return int((~present[g]).sum())


def test_store_backed_pages_count_after_real_merges_and_lying_agents(image, monkeypatch):
    """Merged pages the guest has not touched since are not present, yet count in G through
    the store: found in QEMU's mappings of the store (/proc/<pid>/maps), as many as the agents'
    honest LIST says; and when the agents lie (LIST says nonsense, or nothing), not one figure
    changes. Measuring maps neither guest nor store holes."""
    import numpy as np

    from harness.sharing.agent import AgentClient
    from harness.sharing.attach import MergeAgentAttachment, agent_socket_of
    from harness.sharing.store import ContentStore

    vms = [VM(VMSpec(f"accm{i}", memory_mb=384), image, attachments=[MergeAgentAttachment()]) for i in range(2)]
    cs = ContentStore(f"satori-test-acct-{os.getpid()}-store")
    store = cs.ref
    try:
        start_all(vms)
        _read_everywhere(vms)
        for vm in vms:
            vm.qmp("stop")
        try:
            before = accounting.measure(vms)
            dset = accounting.domain_disk_set([accounting.target(vm) for vm in vms])
            a, b = (_disk_pages(vm, dset) for vm in vms)
            common = sorted(set(a) & set(b), key=lambda k: a[k])  # store in A's order: runs
            assert len(common) >= 10_000
            for k in common:  # each common content once
                cs.append(_read_guest(vms[0], a[k]))
            cs.sync()
            honest = {}
            for vm, where in ((vms[0], a), (vms[1], b)):
                with AgentClient(agent_socket_of(vm)) as c:
                    c.open_store(store.path)
                    pairs = np.array([(where[k], i * 4096) for i, k in enumerate(common)], dtype=np.uint64)
                    pairs = pairs[np.argsort(pairs[:, 0])]
                    res = c.merge(pairs)
                    assert res.merged >= 0.95 * len(common), res
                    honest[vm.name] = c.merged_ranges()
            files = (vms[0].ram.path, vms[1].ram.path, store.path)
            blocks = [os.stat(p).st_blocks for p in files]
            s = accounting.measure(vms, store=store)
            assert [os.stat(p).st_blocks for p in files] == blocks
            by_list = {vm.name: _backed_by_list(vm, honest[vm.name]) for vm in vms}  # still held
            no_store = accounting.measure(vms)
            # the agents lie: LIST returns ranges that map nothing, then nothing at all
            rng = np.random.default_rng(1)
            bogus = np.column_stack([rng.integers(0, 90_000, 50) * 4096, rng.integers(0, 10, 50) * 4096,
                                     rng.integers(1, 200, 50)]).astype(np.uint64)
            lies = []
            for told in (bogus, np.zeros((0, 3), np.uint64)):
                monkeypatch.setattr(AgentClient, "merged_ranges", lambda self, *a, told=told, **k: told)
                with AgentClient(agent_socket_of(vms[0])) as c:
                    assert c.merged_ranges().tobytes() == told.tobytes()  # the lie is in place
                lies.append(accounting.measure(vms, store=store))
            monkeypatch.undo()
        finally:
            for vm in vms:
                vm.qmp("cont")
        print("\nbefore merging:", accounting.format_sample(before))
        print("after merging: ", accounting.format_sample(s), [(v.name, v.store_backed) for v in s.vms])
        for v in s.vms:  # the kernel's count is the honest agent's count
            assert v.store_backed == by_list[v.name]
        for lie in lies:
            assert lie.as_dict() | {"t": 0, "seconds": 0, "cpu_seconds": 0} == \
                s.as_dict() | {"t": 0, "seconds": 0, "cpu_seconds": 0}
        sb = sum(v.store_backed for v in s.vms)
        assert sb >= 0.9 * 2 * len(common)  # paused guests touched nothing since the merge
        assert s.G == before.G  # the merged pages still count, through the store
        assert no_store.G == before.G - sb  # without the store, only present pages count
        assert s.store_pages == len(common) and s.store_only_pages == 0
        assert before.E_disk == 0.0
        assert s.E_disk >= 0.9 and s.R_disk >= 0.9 * len(common)
        assert s.C == before.C  # contents did not change
        # surplus credits: (n-1)/n per page on a frame held n times; they add up to the frames
        # G saves, and two VMs sharing pairs of pages earn alike
        assert sum(before.credits.values()) == pytest.approx(before.G - (before.F - before.store_only_pages))
        assert sum(s.credits.values()) == pytest.approx(s.G - (s.F - s.store_only_pages))
        assert min(s.credits.values()) >= 0.45 * 0.9 * len(common)
        assert sum(s.credits.values()) >= sum(before.credits.values()) + 0.9 * len(common)
        # guests touch their merged pages again (reads): present now, on the store's frames
        _read_everywhere(vms)
        s2 = accounting.measure(vms, store=store)
        print("after re-reading:", accounting.format_sample(s2), [(v.name, v.store_backed) for v in s2.vms])
        assert s2.E_disk >= 0.9
        assert sum(v.store_backed for v in s2.vms) < sb
    finally:
        for vm in vms:
            vm.shutdown()
        cs.close()


def _read_guest(vm: VM, off: int) -> bytes:
    t = accounting.target(vm)
    fd = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, 4096, t.hva + off)
    finally:
        os.close(fd)
