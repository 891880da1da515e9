"""Pause-free merging leaves the oracle's write tracking intact (COORDINATION.md, LEAD decision on
userfaultfd).

Guest RAM belongs to the oracle's asynchronous write tracker (``harness/wptrack.c``, fd
``SATORI_TRACK_FD`` in every QEMU). The merge agent takes each chunk it merges from the tracker
only for the chunk (unregister there, register on its own, protect, compare, remap, unregister
what is left) and registers nothing of guest RAM between chunks; the oracle re-registers what it
finds unregistered at its next sample. Two small VMs read the same files while one engine merges
them pause-free and an incremental :class:`accounting.Meter` samples from another thread, as the
runner does: no sample may find guest RAM held by another userfaultfd for longer than a chunk,
after merging none at all, no page may have changed behind the tracker's back, and the
incremental figures equal a full scan of the same memory.
"""

from __future__ import annotations

import threading
import time

import pytest

from harness import accounting
from harness.sharing.attach import sharing_attachments
from harness.sharing.engine import Member, SharingEngine
from harness.vm import VM, VMSpec, new_run_id, start_all

pytestmark = pytest.mark.integration

READ = "sync; echo 3 > /proc/sys/vm/drop_caches; cat /data/set1/f00[0-1]?.bin > /dev/null"  # 80 MB
CHUNK = 64  # pages the agent protects at once (agent.c WP_CHUNK_PAGES)
KEYS = ("G", "F", "C", "G_nonzero", "F_nonzero", "C_nonzero", "G_disk", "F_disk", "C_disk",
        "zero_pages", "store_pages", "store_only_pages")


def test_pause_free_merging_keeps_the_oracle_incremental(image):
    if not image.hints:
        pytest.fail("the image has no hint ring (guest patch did not build)")
    run = new_run_id()
    vms = [VM(VMSpec(f"mo{i}", memory_mb=384, boot_timeout_s=900), image, run_id=run,
              attachments=sharing_attachments(hints=True, agent=True))
           for i in range(2)]  # fmt: skip
    try:
        start_all(vms)
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"test-mo-{run}") as eng, \
                accounting.Meter(vms, store=eng.store_ref) as meter:
            assert all(link.wp for link in eng.links), "the agents cannot merge pause-free here"
            assert meter.untracked == {}, meter.untracked
            samples: list[accounting.Sample] = []
            errors: list[BaseException] = []
            stop_sampling, stop_engine = threading.Event(), threading.Event()

            def sampler() -> None:
                try:
                    while not stop_sampling.wait(0.3):
                        samples.append(meter.sample())
                except BaseException as e:  # noqa: BLE001 - raised by the test
                    errors.append(e)

            threads = [threading.Thread(target=sampler, daemon=True),
                       threading.Thread(target=eng.run, args=(stop_engine.is_set,), daemon=True)]  # fmt: skip
            for t in threads:
                t.start()
            chans = [vm.ssh.client.exec_command(READ, timeout=300) for vm in vms]
            for vm, (_, out, err) in zip(vms, chans, strict=True):
                assert out.channel.recv_exit_status() == 0, f"{vm.name}: {err.read().decode()}"
            time.sleep(1.0)
            stop_engine.set()
            threads[1].join(30)
            eng.drain(quiet_s=0.3, timeout_s=30)  # same thread as run(): stopped above
            time.sleep(1.0)  # a few samples after the last merge
            stop_sampling.set()
            threads[0].join(30)
            assert not errors, errors[0]
            st = eng.stats()
            agents = {link.name: link.agent.stats() for link in eng.links if link.agent is not None}

            # what the sampler saw while the engine merged and after
            during = [s.untracked_pages for s in samples]
            print("\nuntracked pages per sample:", during)
            print("index:", st["index"])
            print("agents:", {n: {k: a[k] for k in ("wp_chunks", "wp_busy", "wp_faults", "wp_errors")}
                              for n, a in agents.items()})  # fmt: skip
            assert len(samples) >= 5 and all(s.method == "incremental" for s in samples)
            assert max(during) <= 2 * CHUNK, "the oracle lost guest RAM to the agent for longer than a chunk"
            assert during[-1] == 0
            assert samples[-1].stale == 0, "pages changed behind the write tracker's back"

            # the same memory, held: incremental == full scan, and incremental reads little
            for vm in vms:
                vm.qmp("stop")
            try:
                inc = meter.sample()
                full = accounting.measure(vms, store=eng.store_ref)
                meter.sample()
                again = meter.sample()
            finally:
                for vm in vms:
                    vm.qmp("cont")
            print("incremental:", accounting.format_sample(inc), "\nfull:       ", accounting.format_sample(full))
            assert {k: getattr(inc, k) for k in KEYS} == {k: getattr(full, k) for k in KEYS}
            assert [(v.G, v.present, v.store_backed) for v in inc.vms] == \
                [(v.G, v.present, v.store_backed) for v in full.vms]  # fmt: skip
            assert inc.untracked_pages == 0 and inc.stale == 0 and inc.method == "incremental"
            assert again.frames_read == again.scrubbed, "the tracker did not get guest RAM back"
        for name, v in st["vms"].items():
            assert v["merged"] >= 0.9 * 20 * 1024, (name, v)
            assert v["paused_s"] == 0, (name, v)
        for name, a in agents.items():
            assert a["wp_chunks"] > 0 and a["wp_errors"] == 0, (name, a)
        assert full.R_disk >= 10_000 and all(v.store_backed for v in full.vms)
    finally:
        for vm in vms:
            vm.shutdown()
