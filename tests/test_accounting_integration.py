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

from harness import accounting, ksm
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
            vms = [VM(VMSpec(f"ksm{i}", memory_mb=384, hints=False, ram_backend=ksm.ram_backend("ksm-fast")),
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
    vms = [VM(VMSpec(f"acct{i}", memory_mb=384, hints=False), image) for i in range(2)]
    try:
        start_all(vms)
        _read_everywhere(vms)
        for vm in vms:
            vm.qmp("stop")
        try:
            blocks = [os.stat(vm.ram_path).st_blocks for vm in vms]
            s = accounting.measure(vms)
            s2 = accounting.measure(vms)
            after = [os.stat(vm.ram_path).st_blocks for vm in vms]
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
    finally:
        for vm in vms:
            vm.shutdown()
