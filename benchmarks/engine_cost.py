"""Host CPU of the sharing engine per page, split by stage, against the floor of a merge.

The floor: what a merge needs at least per page, one 4 KiB compare plus one page-table change
(~1 µs), measured here on this host (``core.probe_limit``: memcmp, and an mmap of the store
over anonymous memory in runs of 64 pages and one page at a time, each followed by the touch
that installs the page-table entry).

Stages of the engine, per page (the native core times them when profiling is on):
  read    the guest page copied into the staging buffer: from the engine's own guarded view of
          the RAM file (no system call), or pread of /proc/<pid>/mem for pages merged before;
          --no-view: pread of the RAM file too, as before 2026-12-01
  hash    XXH64 of the page against the record (verification) + the secret-keyed index hash
  index   index lookup/insert, planning
  store   writes of new store pages
  python  the Python around them: ring polls, calls into the core, flush bookkeeping
  (stages are wall time from clock_gettime: on a busy host they include time the thread waited)
  agent   the merge agent in QEMU (memcmp + mmap + punch), and the QMP stop/cont around batches

Two ways to run it:

    python3 benchmarks/engine_cost.py --synthetic [--pages 100000]
        no VMs: two fake VMs (memfds) holding the same pages, every page hinted once per VM;
        the core's stages only (no agent). Quick; shows the core's own cost.
    python3 benchmarks/engine_cost.py [--files 30]
        two real guests read the same files cold while the engine runs in a thread (as
        ``satori run`` does); all stages, the agent's included.

Figures from a busy machine are not claims: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.hints import RECORD_DTYPE  # noqa: E402
from harness.sharing import core as core_mod  # noqa: E402
from harness.sharing import index  # noqa: E402

PAGE = 4096
STAGES = ("read", "verify", "key", "index", "store")


def floor_us() -> tuple[float, float, float]:
    fd = os.memfd_create("satori-floor")
    try:
        os.write(fd, os.urandom(64 * PAGE))
        return core_mod.probe_limit(fd)
    finally:
        os.close(fd)


def print_table(rows: list[tuple[str, float]], per: str, floor: tuple[float, float, float]) -> None:
    limit = floor[0] + floor[1]
    print(f"floor of a merge on this host: memcmp {floor[0]:.3f} us + page-table change {floor[1]:.3f} us "
          f"(runs of 64) = {limit:.3f} us/page; one mmap per page: {floor[2]:.3f} us")
    total = 0.0
    print(f"{'stage':<8} {'us/' + per:>10} {'x floor':>8}")
    for name, us in rows:
        total += us
        print(f"{name:<8} {us:>10.3f} {us / limit:>8.2f}")
    print(f"{'total':<8} {total:>10.3f} {total / limit:>8.2f}")


def print_agent_split(agents: list[dict]) -> None:
    """The agents' merge time split by what it spends on (their own clocks, wall time in the
    agent thread): the page-table change (mmap of the store), madvise, the punch of the guest's
    old copy, and the rest (memcmp, userfaultfd register/protect/release of each chunk)."""
    def tot(k: str) -> int:
        return sum(int(a.get(k, 0)) for a in agents)
    merged, calls = tot("merged_total"), tot("mmap_calls")
    if not merged:
        return
    parts = {k: tot(k) for k in ("mmap_ns", "madvise_ns", "punch_ns")}
    rest = tot("merge_ns") - sum(parts.values())
    print(f"agents: {merged} pages merged in {calls} mmaps ({merged / max(1, calls):.2f} pages per run), "
          f"{tot('wp_chunks')} write-protected chunks (held {tot('wp_ns') / max(1, tot('wp_chunks')) / 1e3:.1f} us "
          f"on average, max {max(int(a.get('wp_max_ns', 0)) for a in agents) / 1e3:.0f} us)")
    print("agent merge time per merged page: " + ", ".join(
        f"{k[:-3]} {v / merged / 1e3:.3f} us" for k, v in parts.items())
        + f", rest (memcmp + userfaultfd) {rest / merged / 1e3:.3f} us")


def stage_us(c: dict[str, int], n: int) -> list[tuple[str, float]]:
    return [("read", c["ns_read"] / n / 1e3), ("hash", (c["ns_verify"] + c["ns_key"]) / n / 1e3),
            ("index", c["ns_index"] / n / 1e3), ("store", c["ns_store"] / n / 1e3)]


def synthetic(pages: int, batch: int, poll: int, view: bool) -> int:
    """Two fake VMs with the same pages; every page hinted once in each, in ring-sized polls."""
    import xxhash

    from harness.oracle import RamMirror

    data = np.frombuffer(os.urandom(pages * PAGE), dtype=np.uint8).reshape(pages, PAGE)
    rams = []
    for i in range(2):
        fd = os.memfd_create(f"satori-ram{i}")
        os.write(fd, data.tobytes())
        rams.append(fd)
    store = os.memfd_create("satori-store")
    recs = np.zeros(pages, dtype=RECORD_DTYPE)
    recs["gpa"] = np.arange(pages, dtype=np.uint64) * PAGE
    recs["hash"] = [xxhash.xxh64_intdigest(p.tobytes()) for p in data]
    recs["flags"] = 1
    c = core_mod.NativeCore(index.new_key(), store, 256, index.max_slots([pages * PAGE] * 2))
    views: list[RamMirror] = []
    try:
        for i, fd in enumerate(rams):
            c.add_vm(fd, fd, 0, pages * PAGE, index.candidate_quota(pages * PAGE), batch)
            if view:  # as the engine reads them
                views.append(RamMirror(f"/proc/self/fd/{fd}", pages, f"fake VM {i}"))
                c.set_view(i, views[-1].addr)
        c.profile(True)
        t0 = time.thread_time()
        merged = 0
        for vm in (0, 1):
            for s in range(0, pages, poll):
                chunk = recs[s:s + poll]
                done = 0
                while done < len(chunk):
                    done += c.ingest(vm, chunk[done:], time.monotonic_ns())
                    for v in (0, 1):
                        if c.vm_counters(v)["pending"] >= batch or done == len(chunk):
                            c.sync()
                            merged += len(c.take(v)[0])
        cpu = time.thread_time() - t0
        counters = c.counters()
    finally:
        c.close()
        for v in views:
            v.close()
        for fd in [*rams, store]:
            os.close(fd)
    n = 2 * pages
    rows = stage_us(counters, n)
    rows.append(("python", max(0.0, cpu * 1e6 / n - sum(us for _, us in rows))))
    print(f"synthetic: 2 VMs x {pages} identical pages, each hinted once ({n} hints, {merged} merge pairs "
          f"planned, {counters['appended']} store pages); no agent; pages read "
          f"{'through views of the RAM files' if view else 'with pread'}. Per hinted page:")
    print_table(rows, "page", floor_us())
    print(f"(profiling adds ~{4 * 0.02:.2f} us/page of clock reads to the stages)")
    return 0


def with_vms(files: int, memory: int, keep: float, view: bool) -> int:
    from harness.image import ensure_image
    from harness.sharing.attach import sharing_attachments
    from harness.sharing.engine import Member, SharingEngine
    from harness.vm import VM, VMSpec, new_run_id, start_all
    from harness.workloads import dataset_files

    img = ensure_image()
    run = new_run_id()
    vms = [VM(VMSpec(n, memory_mb=memory), img, run_id=run,
              attachments=sharing_attachments(hints=True, agent=True)) for n in ("ea", "eb")]
    try:
        start_all(vms)
        paths = " ".join(dataset_files(0, files))
        for vm in vms:
            vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"bench-{run}") as eng:
            assert eng.core is not None
            eng.core.profile(True)
            if not view:  # pread of the RAM files, as before the engine had its views
                for link in eng.links:
                    eng.core.set_view(link.idx, 0)
            stop = threading.Event()
            cpu: dict[str, float] = {}

            def loop() -> None:
                c0 = time.thread_time()
                eng.run(stop.is_set)
                eng.drain(quiet_s=0.5)
                cpu["engine"] = time.thread_time() - c0

            th = threading.Thread(target=loop)
            th.start()
            t0 = time.monotonic()
            readers = [threading.Thread(target=vm.ssh.check, args=(f"cat {paths} > /dev/null",)) for vm in vms]
            for r in readers:
                r.start()
            for r in readers:
                r.join()
            read_s = time.monotonic() - t0
            time.sleep(keep)
            stop.set()
            th.join()
            st = eng.stats()
            counters = eng.core.counters()
            agents = [link.agent.stats() for link in eng.links if link.agent is not None]
        merged = st["merged_total"]
        v = st["vms"].values()
        hinted = sum(x["hinted"] for x in v)
        agent_cpu = [x["agent_cpu_ns"] for x in v]
        agent_merge_s = sum(x["agent_ns"] for x in v) / 1e9
        paused_s = sum(x["paused_s"] for x in v)
        print(f"accelerator: {vms[0].accel.line()}")
        print(f"pages read {'through views of the RAM files' if view else 'with pread'}; "
              f"read {files * 4} MB in each of 2 guests in {read_s:.1f} s, kept {keep:.1f} s; "
              f"{hinted} hints, {merged} pages merged; merge lag {st['merge_lag_s']}")
        if not merged:
            print("nothing merged")
            return 1
        rows = stage_us(counters, merged)
        rows.append(("python", max(0.0, cpu["engine"] * 1e6 / merged - sum(us for _, us in rows)
                                   - paused_s * 1e6 / merged)))
        rows.append(("agent", agent_merge_s * 1e6 / merged))
        rows.append(("qmp", max(0.0, paused_s - agent_merge_s) * 1e6 / merged))
        print("per merged page (engine thread CPU split by stage; agent = its merge time in QEMU, "
              "qmp = stop/cont wall time around batches):")
        print_table(rows, "page", floor_us())
        if None in agent_cpu:
            print(f"agent thread CPU: unknown ({[x['agent_error'] for x in v]})")
        else:
            s = sum(agent_cpu) / 1e9
            print(f"agent threads' CPU (merges and LISTs): {s:.3f} s = {s * 1e6 / merged:.3f} us per merged page")
        print(f"engine thread CPU {cpu['engine']:.3f} s = {cpu['engine'] * 1e6 / merged:.3f} us per merged page")
        print_agent_split(agents)
    finally:
        for vm in vms:
            vm.shutdown()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="no VMs: the core's stages on fake VMs")
    ap.add_argument("--pages", type=int, default=100_000, help="(synthetic) pages per fake VM")
    ap.add_argument("--batch", type=int, default=4096, help="(synthetic) merge batch size")
    ap.add_argument("--poll", type=int, default=4096, help="(synthetic) records per ring poll")
    ap.add_argument("--files", type=int, default=30, help="4 MiB dataset files each guest reads")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--keep", type=float, default=1.5,
                    help="seconds the engine keeps running after the reads (idle cost counts too)")
    ap.add_argument("--no-view", action="store_true",
                    help="read RAM-file pages with pread, not through the engine's views of the files")
    args = ap.parse_args()
    if args.synthetic:
        return synthetic(args.pages, args.batch, args.poll, not args.no_view)
    return with_vms(args.files, args.memory, args.keep, not args.no_view)


if __name__ == "__main__":
    sys.exit(main())
