"""Merging is a timing side channel: inside one sharing domain a guest can tell whether another
guest holds a page; across two domains it cannot.

A write to a page the host has merged takes a copy-on-write fault in the host, so it is slower
than a write to a private page (CAIN, VUsion; CVE-2015-2877). Satori makes this fast and on
demand: a page read from disk is hinted and merged within a second. The attack:

1. the victim guest reads some of the candidate regions (dataset blocks of its own disk);
2. the attacker guest reads every candidate region from its own disk (cold: each read is hinted
   and, if another VM of its domain holds the same content, merged), then waits;
3. the attacker times one store to each page of each candidate (``side_channel_probe.c``, a small
   static program built on the host and copied into the guests: see its header) and decides
   "the victim holds it" when most of a candidate's pages are slower than a threshold it learnt
   from its own pages (a file it holds twice, which merges with itself, against a file it
   holds once).

It runs twice on fresh VMs: attacker and victim in one sharing domain (one engine), then in two
domains (one engine each). Printed: the write latency distributions of pages that were merged
and not merged at the time of the write (the truth, from the engine's agents), and the attacker's
classifier accuracy in both arrangements (50% is chance).

    python3 benchmarks/side_channel.py [--candidates 12] [--pages 32] [--wait 3] [--json FILE]

Timings depend on the machine (TCG or KVM, load): take figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.errors import HarnessError  # noqa: E402

HERE = Path(__file__).resolve().parent
PROBE_SOURCE = HERE / "side_channel_probe.c"
GUEST_PROBE = "/root/side_channel_probe"
PAGE = 4096
DATASET = "/data/set1"  # images/bookworm.yaml: f0000.bin .. f0049.bin, 4 MiB each
DATASET_FILES = 50
CAL_PAGES = 64  # attacker's own calibration files, pages each


# ---------------------------------------------------------------- the guest program


def build_probe(out_dir: Path) -> Path:
    """Compile ``side_channel_probe.c`` into a static binary in ``out_dir`` (runs in any x86-64 guest)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise HarnessError("building the side-channel probe needs a C compiler (apt-get install gcc)")
    out = out_dir / "side_channel_probe"
    r = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-static", "-o", str(out), str(PROBE_SOURCE)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise HarnessError(f"cannot build {PROBE_SOURCE.name} (static glibc: apt-get install libc6-dev)",
                           context=r.stderr[-2000:])
    out.chmod(0o700)
    return out


@dataclass(frozen=True)
class Region:
    path: str
    off: int
    npages: int

    def args(self) -> list[str]:
        return [self.path, str(self.off), str(self.npages)]


@dataclass
class Probe:
    """Per page of a ``write`` run: region index, page index, guest PFN, nanoseconds of the store."""

    region: np.ndarray
    index: np.ndarray
    pfn: np.ndarray
    ns: np.ndarray


def probe_argv(mode: str, seed: int, regions: list[Region]) -> list[str]:
    """The probe's arguments (numbers and harness-made paths only: no config string)."""
    if mode not in ("read", "write"):
        raise ValueError(mode)
    return [mode, str(int(seed))] + [a for r in regions for a in r.args()]


def parse_probe(text: str, regions: list[Region]) -> Probe:
    """The probe's ``write`` output, checked: a guest's output is input like any other."""
    want = sum(r.npages for r in regions)
    rows: list[tuple[int, int, int, int]] = []
    ns_per_tick = None
    for line in text.splitlines():
        f = line.split()
        if len(f) == 5 and f[0] == "page":
            reg, idx, pfn, ticks = (int(x) for x in f[1:])
            if not (0 <= reg < len(regions) and 0 <= idx < regions[reg].npages and pfn >= 0 and ticks >= 0):
                raise HarnessError(f"side-channel probe: bad line {line!r}")
            rows.append((reg, idx, pfn, ticks))
        elif len(f) == 2 and f[0] == "calib":
            ns_per_tick = float(f[1])
        elif f:
            raise HarnessError(f"side-channel probe: unexpected line {line[:80]!r}")
    if len(rows) != want or not ns_per_tick or not 0 < ns_per_tick < 100:
        raise HarnessError(f"side-channel probe: {len(rows)} pages (want {want}), calib {ns_per_tick}")
    a = np.array(rows, dtype=np.int64)
    return Probe(a[:, 0], a[:, 1], a[:, 2], a[:, 3] * ns_per_tick)


# ---------------------------------------------------------------- the host side


class EngineLoop(threading.Thread):
    """Steps the sharing engines in a thread; :meth:`merged_gpas` looks between two steps."""

    def __init__(self, engines: list) -> None:
        super().__init__(daemon=True, name="side-channel-engines")
        self.engines = engines
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    taken = sum(e.step() for e in self.engines)
                time.sleep(0.005 if taken else 0.02)
            with self.lock:
                for e in self.engines:
                    e.flush_all()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise HarnessError(f"sharing engine failed: {self.error}") from self.error

    def merged_gpas(self, vm_name: str) -> set[int]:
        """Guest-physical addresses of ``vm_name``'s pages mapped from a store now (not written since)."""
        self.check()
        with self.lock:
            for e in self.engines:
                ranges = e.merged_ranges(exclude_private=True)
                if vm_name in ranges:
                    out: set[int] = set()
                    for goff, _soff, n in np.asarray(ranges[vm_name]).reshape(-1, 3).tolist():
                        out.update(range(int(goff), int(goff) + int(n) * PAGE, PAGE))
                    return out
        return set()

    def merged_total(self) -> int:
        with self.lock:
            return sum(e.stats()["merged_total"] for e in self.engines)


@dataclass
class Phase:
    """One arrangement (``same``: one domain; ``cross``: two) and what the attacker measured."""

    name: str
    merged_ns: list[float] = field(default_factory=list)  # truth: merged when written
    unmerged_ns: list[float] = field(default_factory=list)
    held_score: list[float] = field(default_factory=list)  # per candidate: fraction of slow pages
    free_score: list[float] = field(default_factory=list)
    cal_unmerged_ns: list[float] = field(default_factory=list)  # the attacker's own pages
    cal_merged_ns: list[float] = field(default_factory=list)
    threshold_ns: float | None = None
    threshold_from: str = ""
    cal_merged_pages: int = 0
    correct: int = 0
    trials: int = 0
    merges: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.trials if self.trials else None


def _ssh(vm, cmd: str, timeout: float = 600) -> str:
    return vm.ssh.check(cmd, timeout=timeout)


def _probe(vm, mode: str, seed: int, regions: list[Region]) -> str:
    return _ssh(vm, " ".join([GUEST_PROBE, *probe_argv(mode, seed, regions)]))


def threshold_from(fast: np.ndarray, slow: np.ndarray | None) -> tuple[float, str]:
    """The attacker's per-page threshold from its own pages: halfway (geometric) between the 90th
    percentile of its unmerged writes (their slow tail: a TCG TLB refill, an interrupt) and the
    median of its merged ones when it could make merged pages; else 4x that 90th percentile."""
    tail = float(np.percentile(fast, 90))
    if slow is not None and len(slow) and float(np.median(slow)) > 2 * tail:
        return float(np.sqrt(tail * float(np.median(slow)))), "own merged vs unmerged pages"
    return 4.0 * tail, "4x own unmerged p90 (its own duplicate pages did not merge)"


def run_phase(name: str, img, args: argparse.Namespace, probe: Path, log: Callable[[str], None]) -> Phase:
    from harness.sharing.attach import sharing_attachments
    from harness.sharing.engine import Member, SharingEngine
    from harness.vm import VM, VMSpec, new_run_id, start_all

    ph = Phase(name)
    run = new_run_id()
    rnd = random.Random(args.seed + (0 if name == "same" else 1))
    with contextlib.ExitStack() as stack:
        att, vic = (VM(VMSpec(n, memory_mb=args.memory, boot_timeout_s=args.boot_timeout),
                       img, run_id=run, attachments=sharing_attachments(hints=True, agent=True))
                    for n in ("sc-attacker", "sc-victim"))
        for vm in (att, vic):
            stack.callback(vm.shutdown)
        log(f"[{name}] booting attacker and victim")
        start_all([att, vic])
        if name == "same":
            groups = [[att, vic]]
        else:
            groups = [[att], [vic]]
        engines = [stack.enter_context(SharingEngine([Member.from_vm(v) for v in g],
                                                     domain=f"sc-{name}{i}-{run}"))
                   for i, g in enumerate(groups)]
        loop = EngineLoop(engines)
        loop.start()
        stack.callback(loop.join, 30)
        stack.callback(loop.stop.set)
        data = probe.read_bytes()
        for vm in (att, vic):
            vm.ssh.put(data, GUEST_PROBE)
            _ssh(vm, f"chmod 700 {GUEST_PROBE}")

        # the attacker learns what its own merged and unmerged writes look like
        _ssh(att, f"head -c {CAL_PAGES * PAGE} /dev/urandom > /root/cal-once; "
                  f"head -c {CAL_PAGES * PAGE} /dev/urandom > /root/cal-twice-a; "
                  "cp /root/cal-twice-a /root/cal-twice-b; sync; echo 3 > /proc/sys/vm/drop_caches")
        cal = [Region("/root/cal-once", 0, CAL_PAGES), Region("/root/cal-twice-a", 0, CAL_PAGES),
               Region("/root/cal-twice-b", 0, CAL_PAGES)]
        _probe(att, "read", rnd.getrandbits(32), cal)
        time.sleep(args.wait)
        merged = loop.merged_gpas(att.name)
        p = parse_probe(_probe(att, "write", rnd.getrandbits(32), cal[:2]), cal[:2])
        ph.cal_merged_pages = int(sum((int(f) * PAGE) in merged for f in p.pfn[p.region == 1]))
        ph.cal_unmerged_ns, ph.cal_merged_ns = p.ns[p.region == 0].tolist(), p.ns[p.region == 1].tolist()
        ph.threshold_ns, ph.threshold_from = threshold_from(p.ns[p.region == 0], p.ns[p.region == 1])
        log(f"[{name}] attacker threshold {ph.threshold_ns / 1000:.2f} us ({ph.threshold_from}; "
            f"{ph.cal_merged_pages}/{CAL_PAGES} of its duplicate pages merged)")

        # the trials: each candidate a dataset file the victim read (held) or not
        files = list(range(DATASET_FILES))
        rnd.shuffle(files)
        cands = [Region(f"{DATASET}/f{i:04d}.bin", 0, args.pages) for i in files[:args.candidates]]
        held = set(rnd.sample(range(len(cands)), len(cands) // 2))
        for vm in (att, vic):
            _ssh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
        m0 = loop.merged_total()
        _probe(vic, "read", rnd.getrandbits(32), [cands[i] for i in sorted(held)])
        time.sleep(args.wait)  # the victim's hints are in its domain's index
        _probe(att, "read", rnd.getrandbits(32), cands)
        time.sleep(args.wait)  # the attacker waits; its hinted pages merge if someone holds them
        merged = loop.merged_gpas(att.name)
        p = parse_probe(_probe(att, "write", rnd.getrandbits(32), cands), cands)
        ph.merges = loop.merged_total() - m0
        is_merged = np.array([(int(f) * PAGE) in merged for f in p.pfn])
        ph.merged_ns += p.ns[is_merged].tolist()
        ph.unmerged_ns += p.ns[~is_merged].tolist()
        for c in range(len(cands)):
            score = float(np.mean(p.ns[p.region == c] > ph.threshold_ns))
            (ph.held_score if c in held else ph.free_score).append(score)
            ph.trials += 1
            ph.correct += int((score >= 0.5) == (c in held))
        loop.check()
    return ph


# ---------------------------------------------------------------- report


def _dist(ns: list[float]) -> str:
    if not ns:
        return "n=0"
    a = np.asarray(ns) / 1000
    q = np.percentile(a, [10, 50, 90, 99])
    return f"n={len(a):5d}  p10 {q[0]:7.2f}  p50 {q[1]:7.2f}  p90 {q[2]:7.2f}  p99 {q[3]:7.2f} us"


def _histogram(rows: dict[str, list[float]], width: int = 40) -> list[str]:
    every = np.concatenate([np.asarray(v) for v in rows.values() if v]) if any(rows.values()) else None
    if every is None:
        return []
    lo, hi = max(float(every.min()), 1.0), max(float(every.max()), 2.0)
    edges = np.geomspace(lo, hi * 1.0001, 13)
    out = [f"    {'us':>17}  " + "  ".join(f"{k:<{width // 2}}" for k in rows)]
    counts = {k: np.histogram(np.clip(v, lo, None), edges)[0] if v else np.zeros(12, int) for k, v in rows.items()}
    for b in range(12):
        cells = []
        for k, v in rows.items():
            n = len(v) or 1
            frac = counts[k][b] / n
            cells.append(f"{'#' * int(round(frac * width / 2)):<{width // 2}}")
        out.append(f"    {edges[b] / 1000:8.2f}-{edges[b + 1] / 1000:8.2f}  " + "  ".join(cells))
    return out


def report(phases: list[Phase]) -> str:
    lines = []
    title = {"same": "attacker and victim in ONE sharing domain",
             "cross": "attacker and victim in TWO sharing domains"}
    for ph in phases:
        lines.append(f"{title[ph.name]} ({ph.merges} pages merged in both VMs during the trials)")
        lines.append(f"  attacker's own file read once:  {_dist(ph.cal_unmerged_ns)}")
        lines.append(f"  attacker's own file read twice: {_dist(ph.cal_merged_ns)} "
                     f"({ph.cal_merged_pages}/{CAL_PAGES} merged)")
        lines.append(f"  write latency, pages merged when written:     {_dist(ph.merged_ns)}")
        lines.append(f"  write latency, pages not merged when written: {_dist(ph.unmerged_ns)}")
        lines += _histogram({"merged": ph.merged_ns, "not merged": ph.unmerged_ns})
        acc = ph.accuracy
        lines.append(f"  attacker's classifier (a candidate is held if >= half its pages are slower than "
                     f"{(ph.threshold_ns or 0) / 1000:.2f} us; {ph.threshold_from}): "
                     f"{ph.correct}/{ph.trials} right = {acc:.0%}" if acc is not None else "  no trials")
        lines.append(f"    fraction of slow pages: held candidates {np.round(ph.held_score, 2).tolist()}, "
                     f"not held {np.round(ph.free_score, 2).tolist()}")
        lines.append("")
    acc = {ph.name: ph.accuracy for ph in phases}
    if "same" in acc and "cross" in acc:
        lines.append(f"accuracy: same domain {acc['same']:.0%}, two domains {acc['cross']:.0%} (50% is chance)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=12, help="candidate regions (half held by the victim)")
    ap.add_argument("--pages", type=int, default=32, help="pages per candidate region")
    ap.add_argument("--wait", type=float, default=3.0, help="seconds the attacker waits after its reads")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--phases", nargs="+", choices=("same", "cross"), default=["same", "cross"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--boot-timeout", type=float, default=600.0, help="seconds a guest may take to boot")
    ap.add_argument("--json", type=Path, help="also write the figures and raw latencies here")
    args = ap.parse_args()
    if not 2 <= args.candidates <= DATASET_FILES or not 1 <= args.pages <= 1024:
        ap.error(f"--candidates 2..{DATASET_FILES}, --pages 1..1024")

    from harness.image import ensure_image

    def log(m: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)

    img = ensure_image(log=log)
    tmp = Path(tempfile.mkdtemp(prefix="satori-side-channel-"))  # 0700
    try:
        probe = build_probe(tmp)
        phases = [run_phase(name, img, args, probe, log) for name in args.phases]
    except KeyboardInterrupt:
        print("interrupted: VMs and engines stopped", file=sys.stderr)
        return 130
    except HarnessError as e:
        print(f"side_channel: {e.message}", file=sys.stderr)
        if e.context:
            print(e.context, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(report(phases))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "phases": [{"name": p.name, "accuracy": p.accuracy, "threshold_ns": p.threshold_ns,
                        "threshold_from": p.threshold_from, "cal_merged_pages": p.cal_merged_pages,
                        "cal_unmerged_ns": p.cal_unmerged_ns, "cal_merged_ns": p.cal_merged_ns,
                        "merges": p.merges, "merged_ns": p.merged_ns, "unmerged_ns": p.unmerged_ns,
                        "held_score": p.held_score, "free_score": p.free_score} for p in phases],
        }, indent=1))
        os.chmod(args.json, 0o600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
