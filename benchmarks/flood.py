"""A flooding guest against the engine's bounds: engine memory and an honest pair's sharing,
with and without the flood (issue 8, "Benchmark": "the flood").

Three VMs in one sharing domain, the engine in this process (as ``satori run`` holds it): the
honest pair ``honest1``/``honest2`` read the same 5 dataset files cold (5,120 pages each), while
the third guest, ``mallory``, does one of:

- ``none``: nothing (the baseline);
- ``valid``: ever new *valid* hints: it writes 32 MiB of random bytes to its disk and reads them
  cold, again and again (every record is true, every page unique: the index's worst case);
- ``forged``: the adversary workload's forger (its ``flood`` attack): records as fast as its ring
  takes them, written straight into the ring (random hashes for random pages of its RAM: each
  costs the engine a page read and a hash).

Per condition over the repetitions (``none`` and ``valid`` interleaved, ``forged`` last: once
forged records have moved the ring's producer, mallory's own driver's records are refused for
the rest of the run; each read is of other files, so every read is a first sighting): the honest pair's **time to 90%** (from the start of the reads until
90% of the pages each read are merged, and after the last read), the engine's index memory
against its bound (``index.mem_bytes`` / ``mem_bound_bytes``), this process's peak RSS growth,
the attacker's records hinted / refused / evicted, and the engine CPU per honest merged page.

    python3 benchmarks/flood.py                 # 3 repetitions, ~12 min on a quiet 2-core TCG host
    python3 benchmarks/flood.py --reps 1        # a look

Figures from a busy machine are not claims: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.image import ensure_image  # noqa: E402
from harness.metrics import Stat  # noqa: E402
from harness.sharing.attach import sharing_attachments  # noqa: E402
from harness.sharing.engine import Member, SharingEngine  # noqa: E402
from harness.vm import VM, VMSpec, harness_leftovers, new_run_id, start_all  # noqa: E402
from harness.workloads.adversary import ARGS_PATH, FORGE, FORGE_PATH  # noqa: E402

CONDITIONS = ("none", "valid", "forged")
FILES_PER_READ = 5
PAGES_PER_FILE = 1024

VALID = ("end=$(( $(date +%s) + {secs} )); while [ $(date +%s) -lt $end ]; do "
         "head -c 33554432 /dev/urandom > /root/flood.bin; sync; echo 3 > /proc/sys/vm/drop_caches; "
         "cat /root/flood.bin > /dev/null; done; rm -f /root/flood.bin")


def log(m: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one(vms: list[VM], eng: SharingEngine, cond: str, files: list[str]) -> dict:
    a, b, c = vms
    for vm in (a, b):  # nothing of these files cached: every page is read from disk now
        vm.ssh.check("sync; echo 3 > /proc/sys/vm/drop_caches")
    eng.drain(quiet_s=0.5)
    s0 = eng.stats()
    cpu0, rss0 = time.process_time(), rss_kb()
    failed: list[str] = []

    def attack(cmd: str) -> None:
        try:
            c.ssh.check(cmd, timeout=300)
        except Exception as e:  # noqa: BLE001 - reported in the row, fails the run
            failed.append(str(e).splitlines()[0])

    attacker = None
    if cond == "forged":  # the adversary workload's forger, its flood attack only
        c.ssh.put(FORGE.encode(), FORGE_PATH)
        c.ssh.put(json.dumps({"attacks": ["flood"], "rate": 0, "duration_s": 40, "seed": 1}).encode(),
                  ARGS_PATH)
        attacker = threading.Thread(target=attack, args=(f"python3 {FORGE_PATH} {ARGS_PATH}",))
    elif cond == "valid":
        attacker = threading.Thread(target=attack, args=(VALID.format(secs=40),))
    if attacker is not None:
        attacker.start()
        eng.run_for(5)  # the flood is on before the honest reads start
    want = 0.9 * len(files) * PAGES_PER_FILE
    t0 = time.monotonic()
    done: dict[str, float] = {}

    def read(vm: VM) -> None:
        vm.ssh.check("cat " + " ".join(files) + " > /dev/null", timeout=600)
        done[vm.name] = time.monotonic()

    readers = [threading.Thread(target=read, args=(vm,)) for vm in (a, b)]
    for r in readers:
        r.start()
    t90 = None
    mem_peak = 0
    bound = 0
    while t90 is None and time.monotonic() - t0 < 180:
        eng.run_for(0.1, poll_s=0.01)
        st = eng.stats()
        mem_peak, bound = max(mem_peak, st["index"]["mem_bytes"]), st["index"]["mem_bound_bytes"]
        if all(st["vms"][vm.name]["merged_total"] - s0["vms"][vm.name]["merged_total"] >= want
               for vm in (a, b)):
            t90 = time.monotonic()
    for r in readers:
        r.join()
    while attacker is not None and attacker.is_alive():
        eng.run_for(0.5)
        st = eng.stats()
        mem_peak = max(mem_peak, st["index"]["mem_bytes"])
    eng.drain(quiet_s=0.5)
    st = eng.stats()
    vc, vc0 = st["vms"][c.name], s0["vms"][c.name]
    honest = sum(st["vms"][vm.name]["merged_total"] - s0["vms"][vm.name]["merged_total"] for vm in (a, b))
    last_read = max(done.values()) if len(done) == 2 else None
    return {
        "cond": cond,
        "t90_s": None if t90 is None else round(t90 - t0, 2),
        "t90_after_reads_s": None if t90 is None or last_read is None else round(max(0.0, t90 - last_read), 2),
        "reads_s": None if last_read is None else round(last_read - t0, 2),
        "index_mem_peak_mb": round(mem_peak / 2**20, 2),
        "index_mem_bound_mb": round(bound / 2**20, 2),
        "rss_growth_mb": round((rss_kb() - rss0) / 1024, 1),
        "attacker_hinted": vc["hinted"] - vc0["hinted"],
        "attacker_refused": (vc["changed"] - vc0["changed"]) + (vc["rejected"] - vc0["rejected"]),
        "attacker_evicted": vc["evicted"] - vc0["evicted"],
        "honest_merged": honest,
        "engine_cpu_s": round(time.process_time() - cpu0, 2),
        "attacker_error": failed[0] if failed else None,
    }


def med(xs: list) -> str:
    st = Stat.of(xs)
    if st is None:
        return "n/a"
    f = "{:,.0f}" if all(float(x).is_integer() for x in xs if x is not None) else "{:g}"
    return f"{f.format(st.median)} [{f.format(st.lo)}-{f.format(st.hi)}]" if st.n > 1 else f.format(st.median)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.reps * len(CONDITIONS) * FILES_PER_READ > 50:
        ap.error(f"at most {50 // (len(CONDITIONS) * FILES_PER_READ)} repetitions (/data/set1 has 50 files)")
    image = ensure_image(log=log)
    if not image.hints:
        print("flood.py: the image has no hint ring (the guest patch did not build)", file=sys.stderr)
        return 2
    before = set(harness_leftovers())
    run = new_run_id()
    # mallory maps its ring's BAR from user space (/sys/bus/pci/.../resource2): iomem=relaxed
    vms = [VM(VMSpec(n, memory_mb=512, append="iomem=relaxed" if n == "mallory" else ""), image,
              run_id=run, attachments=sharing_attachments(hints=True, agent=True))
           for n in ("honest1", "honest2", "mallory")]
    rows: list[dict] = []
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        log("booting honest1, honest2, mallory (512 MiB each)")
        start_all(vms)
        with SharingEngine([Member.from_vm(v) for v in vms], domain=f"flood-{run}") as eng:
            # none and valid interleaved, forged last: forged records move the ring's producer
            # under the guest driver, whose own records are then refused for the rest of the run
            # (a flooding guest loses its own hints; the honest pair does not)
            order = [(rep, cond) for rep in range(args.reps) for cond in CONDITIONS[:2]]
            order += [(rep, "forged") for rep in range(args.reps)]
            k = 0
            for rep, cond in order:
                files = [f"/data/set1/f{k + i:04d}.bin" for i in range(FILES_PER_READ)]
                k += FILES_PER_READ
                row = one(vms, eng, cond, files)
                row["rep"] = rep
                rows.append(row)
                log(json.dumps(row))
    finally:
        for v in vms:
            v.shutdown()
    left = [x for x in harness_leftovers() if x not in before]
    print()
    print(f"flood: {args.reps} repetitions, median [min-max]; honest pair reads 5 files "
          f"({FILES_PER_READ * PAGES_PER_FILE} pages) each")
    print("| mallory | honest time to 90% (s) | after the reads (s) | index memory peak / bound (MB) "
          "| attacker hinted | refused | evicted | engine CPU (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for cond in CONDITIONS:
        rs = [r for r in rows if r["cond"] == cond]
        print(f"| {cond} | {med([r['t90_s'] for r in rs])} | {med([r['t90_after_reads_s'] for r in rs])} "
              f"| {med([r['index_mem_peak_mb'] for r in rs])} / {rs[0]['index_mem_bound_mb']} "
              f"| {med([r['attacker_hinted'] for r in rs])} "
              f"| {med([r['attacker_refused'] for r in rs])} | {med([r['attacker_evicted'] for r in rs])} "
              f"| {med([r['engine_cpu_s'] for r in rs])} |")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0
    print(f"this process's peak RSS grew by {growth / 1024:.1f} MB over the whole run "
          f"(engine, index, the three VMs' clients)")
    if left:
        print("left behind: " + ", ".join(left))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["t90_s"] is None or r["attacker_error"]]
    for r in bad:
        print(f"rep {r['rep']} {r['cond']}: " + (r["attacker_error"] or "the honest pair did not reach 90%"))
    return 1 if left or bad else 0


if __name__ == "__main__":
    sys.exit(main())
