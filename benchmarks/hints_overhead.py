"""What the hints cost: a guest's cold read of 200 MB with the hint ring on vs off (issue 3).

One run boots two VMs from the cached image (``ensure_image()``, or ``$SATORI_IMAGE``) at the
same time and keeps them for the whole run:

- ``on``:  ``HintRingAttachment``: patched virtio_blk + ``ivshmem-plain`` ring of the default
  size (``harness.sharing.attach.DEFAULT_RING_BYTES``), drained by a host reader thread that calls ``HintRing.poll()``
  back to back while it returns records and sleeps ``--idle-sleep-ms`` when the ring is empty
  (``--idle-sleep-ms 0``: spin).  Its CPU time is taken with ``time.thread_time()`` in the thread.
- ``off``: no attachment: stock virtio_blk, no ring.

Each repetition reads the dataset (``/data/set1/f0000.bin .. f0049.bin``, 200 MB) cold in both
VMs, one after the other, the order alternating (on/off, off/on, ...) so machine drift hits both
sides.  In the guest::

    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(date +%s.%N); cat /data/set1/*.bin > /dev/null; t1=$(date +%s.%N)

The VM that is not measuring is paused (QMP ``stop``) meanwhile unless ``--no-pause``.  One
untimed warm-up read per VM comes first (``--warmup 0`` to skip): it fills the *host* page cache
with the base image, so the first timed read is not the only one that comes from the host disk.

Printed: median read time on/off, the slowdown (ratio of medians, and the min-max of the per-pair
ratios), records received per read (vs 4 KiB blocks read by the guest's vda, /sys/block/vda/stat),
records dropped (guest header counter), host reader CPU seconds per 1,000 records, and the goals
(slowdown <= 2 %, no drops).  ``--json`` prints everything as one JSON object instead.

Timings under TCG on a small shared machine are noisy (other sessions' VMs, builds): the load
average at start and end is printed; compare the spread of the ratios before reading anything
into a few percent.  Run as root (the harness's VMs need it)::

    python3 benchmarks/hints_overhead.py --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.hints import HintRing, max_capacity  # noqa: E402
from harness.image import ensure_image  # noqa: E402
from harness.sharing.attach import DEFAULT_RING_BYTES, HintRingAttachment, ring_of  # noqa: E402
from harness.vm import VM, VMSpec, new_run_id, start_all  # noqa: E402

DATASET = "/data/set1"
DATASET_FILES = 50
DATASET_BYTES = 200 << 20
PAGE = 4096
GOAL_SLOWDOWN = 1.02

READ_SCRIPT = f"""set -e
s0=$(awk '{{print $3}}' /sys/block/vda/stat)
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(date +%s.%N)
cat {DATASET}/*.bin > /dev/null
t1=$(date +%s.%N)
s1=$(awk '{{print $3}}' /sys/block/vda/stat)
echo "READ $t0 $t1 $s0 $s1"
"""

GUEST_COUNTERS = (
    "P=/sys/module/satori_ring/parameters; "
    "if [ -d $P ]; then echo COUNTERS $(cat $P/records $P/dropped $P/partial $P/attached); "
    "else echo COUNTERS none; fi; "
    "echo DRIVER $(cat /sys/module/virtio_blk/srcversion 2>/dev/null || echo ?) "
    "$(grep -c satori_ring /proc/modules || true)"
)


class Reader(threading.Thread):
    """Drains one ring: ``poll()`` back to back while it returns records, a short sleep when
    empty.  Cumulative counters are published as one tuple so the main thread can take
    consistent before/after snapshots around each read."""

    def __init__(self, ring: HintRing, idle_sleep_s: float) -> None:
        super().__init__(name="hint-reader", daemon=True)
        self.ring = ring
        self.idle_sleep_s = idle_sleep_s
        self.stop_evt = threading.Event()
        # (records, cpu_total_s, cpu_in_nonempty_polls_s, polls, nonempty_polls, max_batch)
        self.totals = (0, 0.0, 0.0, 0, 0, 0)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            cpu0 = time.thread_time()
            records = polls = busy_polls = max_batch = 0
            busy_cpu = 0.0
            while not self.stop_evt.is_set():
                c0 = time.thread_time()
                got = len(self.ring.poll())
                c1 = time.thread_time()
                polls += 1
                if got:
                    records += got
                    busy_polls += 1
                    busy_cpu += c1 - c0
                    max_batch = max(max_batch, got)
                self.totals = (records, c1 - cpu0, busy_cpu, polls, busy_polls, max_batch)
                if not got and self.idle_sleep_s > 0:
                    time.sleep(self.idle_sleep_s)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def stop(self) -> None:
        self.stop_evt.set()
        self.join(10)


def qemu_cpu_s(pid: int | None) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def other_qemus(ours: list[int | None]) -> int:
    out = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True).stdout
    pids = {int(p) for p in out.split()}
    out = subprocess.run(["pgrep", "-f", "^qemu-system-x86_64 "], capture_output=True, text=True).stdout
    pids |= {int(p) for p in out.split()}
    return len(pids - set(ours))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def guest_counters(vm: VM) -> dict:
    out = vm.ssh.check(GUEST_COUNTERS)
    res: dict = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "COUNTERS" and parts[1:] != ["none"]:
            r, d, p, a = map(int, parts[1:5])
            res.update(records=r, dropped=d, partial=p, attached=a)
        elif parts and parts[0] == "DRIVER":
            res["satori_ring_loaded"] = parts[-1] != "0"
    return res


def timed_read(vm: VM, other: VM | None, reader: Reader | None) -> dict:
    """One cold read of the dataset in ``vm`` (``other`` paused meanwhile, if given)."""
    if other is not None:
        other.qmp("stop")
    try:
        ring_before = vm_ring_stats(reader)
        tot_before = reader.totals if reader else None
        cpu_before = qemu_cpu_s(vm.pid)
        t_host0 = time.monotonic()
        out = vm.ssh.check(READ_SCRIPT, timeout=1800)
        t_host = time.monotonic() - t_host0
        cpu_q = qemu_cpu_s(vm.pid) - cpu_before
        if reader is not None:
            # the guest published its last record before `cat` returned; let the reader take it
            deadline = time.monotonic() + 5
            while reader.ring.pending() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)
        ring_after = vm_ring_stats(reader)
        tot_after = reader.totals if reader else None
    finally:
        if other is not None:
            other.qmp("cont")
    line = next(ln for ln in out.splitlines() if ln.startswith("READ "))
    t0, t1, s0, s1 = line.split()[1:]
    res = {
        "seconds": float(t1) - float(t0),
        "host_ssh_seconds": round(t_host, 3),
        "qemu_cpu_seconds": round(cpu_q, 2),
        "blocks_read": (int(s1) - int(s0)) * 512 // PAGE,
    }
    if reader is not None:
        d = [a - b for a, b in zip(tot_after, tot_before, strict=True)]
        res.update(
            records=d[0],
            reader_cpu_seconds=d[1],
            reader_cpu_in_polls_seconds=d[2],
            polls=d[3],
            nonempty_polls=d[4],
            max_batch=tot_after[5],
            dropped=ring_after["dropped"] - ring_before["dropped"],
            rejected=ring_after["rejected"] - ring_before["rejected"],
            partial=ring_after["partial"] - ring_before["partial"],
        )
    return res


def vm_ring_stats(reader: Reader | None) -> dict:
    return reader.ring.stats() if reader is not None else {}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="timed cold reads per VM (default 3)")
    ap.add_argument("--memory", type=int, default=512, help="guest RAM in MB (default 512)")
    ap.add_argument("--vcpus", type=int, default=1, help="guest vCPUs (default 1, VMSpec's default)")
    ap.add_argument("--ring-bytes", type=int, default=None,
                    help="hint ring size (default: DEFAULT_RING_BYTES)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed reads per VM first (default 1)")
    ap.add_argument("--idle-sleep-ms", type=float, default=1.0,
                    help="reader sleep when the ring is empty (default 1 ms; 0 = spin)")
    ap.add_argument("--no-pause", action="store_true", help="do not pause the idle VM during a read")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    # SIGTERM takes the same path as Ctrl-C: unwind, shut the VMs down, remove their files.
    def _term(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)

    load_start = loadavg()
    t_start = time.time()
    image = ensure_image(log=log)
    if not image.hints:
        log(f"image {image.root} has no patched driver (manifest hints=false): nothing to compare")
        return 2
    ring_bytes = args.ring_bytes or DEFAULT_RING_BYTES
    run_id = new_run_id()
    spec_on = VMSpec(name="bench-on", memory_mb=args.memory, vcpus=args.vcpus)
    spec_off = VMSpec(name="bench-off", memory_mb=args.memory, vcpus=args.vcpus)
    vm_on = VM(spec_on, image, run_id=run_id, log=log, attachments=[HintRingAttachment(ring_bytes)])
    vm_off = VM(spec_off, image, run_id=run_id, log=log)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    warm: dict[str, list[dict]] = {"on": [], "off": []}
    info: dict = {}
    with contextlib.ExitStack() as stack:
        stack.push(vm_off)  # __exit__ = shutdown + remove files (normal exit, error, Ctrl-C)
        stack.push(vm_on)
        log(f"booting 2 VMs ({args.memory} MB, {args.vcpus} vCPU, image {image.root.name}, run {run_id}) ...")
        t0 = time.monotonic()
        start_all([vm_on, vm_off])
        info["boot_seconds"] = round(time.monotonic() - t0, 1)
        info["accel"] = vm_on.accel.accel if vm_on.accel else None
        assert ring_of(vm_on) is not None
        ring = stack.enter_context(HintRing(ring_of(vm_on), vm_on.ram_size))
        reader = Reader(ring, args.idle_sleep_ms / 1000)
        reader.start()
        stack.callback(reader.stop)  # runs before the ring is closed (LIFO)
        gc_on, gc_off = guest_counters(vm_on), guest_counters(vm_off)
        if gc_on.get("attached") != 1:
            raise SystemExit(f"hints-on VM: satori_ring not attached ({gc_on})")
        if gc_off.get("satori_ring_loaded"):
            raise SystemExit("hints-off VM: satori_ring is loaded (expected the stock driver)")
        boot = ring.stats()
        info["ring"] = {"bytes": ring_bytes, "capacity": ring.capacity,
                        "capacity_of_file": max_capacity(ring_bytes),
                        "records_during_boot": boot["records"], "dropped_during_boot": boot["dropped"]}
        log(f"booted in {info['boot_seconds']} s ({info['accel']}); ring {ring_bytes >> 10} KiB = "
            f"{ring.capacity:,} records; boot produced {boot['records']:,} records, {boot['dropped']} dropped")

        vms = {"on": vm_on, "off": vm_off}
        for i in range(args.warmup):
            for kind in ("on", "off"):
                other = None if args.no_pause else vms["off" if kind == "on" else "on"]
                r = timed_read(vms[kind], other, reader if kind == "on" else None)
                warm[kind].append(r)
                log(f"warm-up {i + 1} {kind:>3}: {r['seconds']:.2f} s")
        for i in range(args.reps):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for kind in order:
                other = None if args.no_pause else vms["off" if kind == "on" else "on"]
                r = timed_read(vms[kind], other, reader if kind == "on" else None)
                runs[kind].append(r)
                extra = (f", {r['records']:,} records, {r['dropped']} dropped, reader "
                         f"{r['reader_cpu_seconds'] * 1000:.0f} ms CPU") if kind == "on" else ""
                log(f"rep {i + 1}/{args.reps} {kind:>3}: {r['seconds']:.2f} s "
                    f"({r['blocks_read']:,} blocks read{extra})")
            if reader.error is not None:
                raise reader.error
        info["guest_counters_end"] = {"on": guest_counters(vm_on), "off": guest_counters(vm_off)}
        info["ring_end"] = ring.stats()
        info["other_qemu_processes"] = other_qemus([vm_on.pid, vm_off.pid])
    # all VMs are down and their files are gone here
    leftovers = [p for p in (vm_on.paths.work, vm_off.paths.work) if p.exists()]
    load_end = loadavg()

    on_s = [r["seconds"] for r in runs["on"]]
    off_s = [r["seconds"] for r in runs["off"]]
    ratios = [a / b for a, b in zip(on_s, off_s, strict=True)]
    recs = [r["records"] for r in runs["on"]]
    blocks_on = [r["blocks_read"] for r in runs["on"]]
    dropped = sum(r["dropped"] for r in runs["on"])
    rejected = sum(r["rejected"] for r in runs["on"])
    cpu_total = sum(r["reader_cpu_seconds"] for r in runs["on"])
    cpu_polls = sum(r["reader_cpu_in_polls_seconds"] for r in runs["on"])
    nrec = sum(recs)
    slowdown = median(on_s) / median(off_s)
    # A verdict only when the noise allows one: every pair within the goal, or every pair over it.
    if max(ratios) <= GOAL_SLOWDOWN:
        verdict, verdict_bool = "met", True
    elif min(ratios) > GOAL_SLOWDOWN:
        verdict, verdict_bool = "NOT met", False
    else:
        verdict, verdict_bool = "inconclusive: the per-pair spread is wider than the goal", None
    summary = {
        "reps": args.reps,
        "memory_mb": args.memory,
        "vcpus": args.vcpus,
        "dataset_bytes": DATASET_BYTES,
        "expected_records_per_read": DATASET_BYTES // PAGE,
        "median_seconds_on": round(median(on_s), 3),
        "median_seconds_off": round(median(off_s), 3),
        "slowdown": round(slowdown, 4),
        "slowdown_pairs_min": round(min(ratios), 4),
        "slowdown_pairs_max": round(max(ratios), 4),
        "records_per_read": recs,
        "blocks_read_per_read_on": blocks_on,
        "blocks_read_per_read_off": [r["blocks_read"] for r in runs["off"]],
        "dropped": dropped,
        "rejected": rejected,
        "ring_bytes": ring_bytes,
        "ring_capacity": info["ring"]["capacity"],
        "reader_cpu_s_per_1000_records": round(cpu_total / nrec * 1000, 6) if nrec else None,
        "reader_cpu_s_per_1000_records_in_polls": round(cpu_polls / nrec * 1000, 6) if nrec else None,
        "reader_idle_sleep_ms": args.idle_sleep_ms,
        "paused_idle_vm": not args.no_pause,
        "goals": {"slowdown_max": GOAL_SLOWDOWN, "dropped": 0,
                  "slowdown_met": verdict_bool, "no_drops_met": dropped == 0},
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "wall_seconds": round(time.time() - t_start, 1),
        "leftover_files": [str(p) for p in leftovers],
        "runs": runs,
        "warmup": warm,
        **info,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0

    def pct(x: float) -> str:
        return f"{(x - 1) * 100:+.1f} %"

    print()
    print(f"== hints overhead: cold read of {DATASET_BYTES >> 20} MB ({DATASET_FILES} files), "
          f"{args.reps} reps interleaved, {args.memory} MB / {args.vcpus} vCPU guests, "
          f"{info['accel']} ==")
    print(f"NOTE: TCG on a shared {os.cpu_count()}-core machine: timings are noisy. "
          f"load average (1/5/15 min) start {load_start}, end {load_end}; "
          f"other QEMU processes at the end: {info['other_qemu_processes']}")
    print(f"read time, median     on {median(on_s):7.2f} s   off {median(off_s):7.2f} s   "
          f"(on: {', '.join(f'{x:.2f}' for x in on_s)}; off: {', '.join(f'{x:.2f}' for x in off_s)})")
    print(f"slowdown on/off       {slowdown:.3f} ({pct(slowdown)}), per pair {min(ratios):.3f} .. "
          f"{max(ratios):.3f}    goal <= {GOAL_SLOWDOWN:.2f}: {verdict}")
    print(f"records per read      {', '.join(f'{x:,}' for x in recs)}   expected ~{DATASET_BYTES // PAGE:,} "
          f"(4 KiB blocks the guest's vda read during the script: {', '.join(f'{x:,}' for x in blocks_on)})")
    print(f"dropped               {dropped} in {args.reps} reads (ring {ring_bytes >> 10} KiB = "
          f"{info['ring']['capacity']:,} records{', the default' if ring_bytes == DEFAULT_RING_BYTES else ''})    goal 0: "
          f"{'met' if dropped == 0 else 'NOT met'}    rejected {rejected}")
    if nrec:
        print(f"host reader CPU       {cpu_total / nrec * 1000 * 1000:.3f} ms per 1,000 records "
              f"(whole thread during the reads, incl. empty polls every {args.idle_sleep_ms:g} ms); "
              f"{cpu_polls / nrec * 1000 * 1000:.3f} ms per 1,000 in the polls that returned records")
    polls = sum(r["nonempty_polls"] for r in runs["on"])
    print(f"reader batches        {nrec / max(polls, 1):,.0f} records per non-empty poll on average, "
          f"largest {max(r['max_batch'] for r in runs['on']):,}")
    q_on = median([r["qemu_cpu_seconds"] for r in runs["on"]])
    q_off = median([r["qemu_cpu_seconds"] for r in runs["off"]])
    print(f"QEMU CPU per read     on {q_on:.2f} s   off {q_off:.2f} s (median, host utime+stime of the VM)")
    print(f"boot {info['boot_seconds']} s; whole run {summary['wall_seconds']} s; "
          f"idle VM {'paused' if not args.no_pause else 'running'} during each read; "
          f"leftover files: {len(leftovers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
