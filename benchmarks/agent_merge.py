"""Micro-benchmark of the merge agent: µs per merged page, coalesced runs vs scattered pages.

Starts a paused QEMU (``-S``, TCG, no QMP) with the agent preloaded, fills guest RAM through the
RAM memfd, builds a content store memfd, and merges:

- coalesced: guest pages contiguous, store in the same order -> one mmap per batch
- shuffled: guest pages contiguous, store order shuffled -> one mmap (and 1 VMA) per page
- scattered: every other guest page, store order shuffled -> one mmap (and 2 VMAs) per page

Each scenario gets a fresh QEMU. Prints the agent's own time (memcmp + mmap + punch + madvise)
and the wall time per page seen by the client (socket round trip included). The scattered case
needs ~2 VMAs per page: as root the script raises vm.max_map_count for the run and restores it.

    python3 benchmarks/agent_merge.py [--pages 50000] [--ram-mb 512] [--batch 4096]
"""

from __future__ import annotations

import argparse
import mmap
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import memfd  # noqa: E402
from harness.sharing.agent import PAGE, AgentClient, MergeResult, agent_env  # noqa: E402

MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


def start_qemu(tag: str, ram_mb: int, rundir: Path) -> tuple[subprocess.Popen, int, Path]:
    mem = memfd.create(f"satori-bench-{tag}", ram_mb << 20)  # guest RAM as the harness makes it
    sock = rundir / f"{tag}.sock"
    cmd = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(ram_mb),
        "-object", f"memory-backend-file,id=ram0,share=on,mem-path=/proc/self/fd/{mem},size={ram_mb}M",
        "-machine", "memory-backend=ram0",
        "-nographic", "-S", "-nodefaults", "-display", "none",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **agent_env(sock, f"/proc/self/fd/{mem}")},
        pass_fds=(mem,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, mem, sock


def wait_ready(client: AgentClient, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while client.stats()["ram_found"] != 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("QEMU did not start")
        time.sleep(0.05)


def run_scenario(name: str, npages: int, ram_mb: int, batch: int, rundir: Path) -> dict:
    rng = np.random.default_rng(1)
    if name == "coalesced":
        gpages = np.arange(npages, dtype=np.uint64)
        spages = np.arange(npages, dtype=np.uint64)
    elif name == "shuffled":
        gpages = np.arange(npages, dtype=np.uint64)
        spages = rng.permutation(npages).astype(np.uint64)
    else:
        gpages = np.arange(npages, dtype=np.uint64) * 2
        spages = rng.permutation(npages).astype(np.uint64)
    if int(gpages[-1]) * PAGE >= ram_mb << 20:
        raise SystemExit(f"{npages} pages do not fit {ram_mb} MB in the {name} layout")
    content = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    tag = f"{name}-{secrets.token_hex(3)}"
    proc, mem, sock = start_qemu(tag, ram_mb, rundir)
    store = memfd.create(f"satori-bench-{tag}-store", 0)
    client = AgentClient(sock, timeout=120)
    try:
        wait_ready(client, proc)
        with mmap.mmap(mem, ram_mb << 20) as ram:
            view = np.frombuffer(ram, dtype=np.uint8).reshape(-1, PAGE)
            view[gpages.astype(np.int64)] = content
            del view
        sbuf = np.empty_like(content)
        sbuf[spages.astype(np.int64)] = content
        os.pwrite(store, sbuf.tobytes(), 0)
        del sbuf
        client.open_store(f"/proc/{os.getpid()}/fd/{store}")
        pairs = np.stack([gpages * PAGE, spages * PAGE], axis=1)
        total = MergeResult(0, 0, 0, 0)
        t0 = time.perf_counter_ns()
        for i in range(0, npages, batch):
            total = total + client.merge(pairs[i : i + batch])
        wall = time.perf_counter_ns() - t0
        st = client.stats()
        t1 = time.perf_counter_ns()
        un = client.unmerge(0, (ram_mb << 20) // PAGE)
        unmerge_ns = time.perf_counter_ns() - t1
        return {
            "scenario": name,
            "pages": npages,
            "merged": total.merged,
            "failed": total.failed,
            "mmap_calls": total.mmap_calls,
            "agent_us": total.elapsed_ns / 1e3 / max(total.merged, 1),
            "wall_us": wall / 1e3 / max(total.merged, 1),
            "ranges": st["merged_ranges"],
            "mmap_us": int(st["mmap_ns"]) / 1e3 / max(total.merged, 1),
            "madvise_us": int(st["madvise_ns"]) / 1e3 / max(total.merged, 1),
            "punch_us": int(st["punch_ns"]) / 1e3 / max(total.merged, 1),
            "unmerge_us": unmerge_ns / 1e3 / max(un.restored, 1),
        }
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(mem)
        os.close(store)
        sock.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=50_000)
    ap.add_argument("--ram-mb", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096, help="pairs per merge request")
    args = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("qemu-system-x86_64 not found")

    original = MAX_MAP_COUNT.read_text()
    need = 2 * args.pages + 4096
    raised = False
    if int(original) < need:
        if os.geteuid() != 0:
            raise SystemExit(f"scattered needs vm.max_map_count >= {need} (run as root)")
        MAX_MAP_COUNT.write_text(str(need))
        raised = True
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="satori-bench-") as d:
            for name in ("coalesced", "shuffled", "scattered"):
                rows.append(run_scenario(name, args.pages, args.ram_mb, args.batch, Path(d)))
    finally:
        if raised:
            MAX_MAP_COUNT.write_text(original)

    print(f"merge agent, paused TCG QEMU, {args.ram_mb} MB RAM, batches of {args.batch} pairs")
    hdr = ("scenario", "pages", "merged", "failed", "mmaps", "ranges", "agent µs/pg",
           "wall µs/pg", "unmerge µs/pg")  # fmt: skip
    print("{:<10} {:>7} {:>7} {:>6} {:>7} {:>7} {:>12} {:>11} {:>14}".format(*hdr))
    for r in rows:
        print(
            f"{r['scenario']:<10} {r['pages']:>7} {r['merged']:>7} {r['failed']:>6} "
            f"{r['mmap_calls']:>7} {r['ranges']:>7} {r['agent_us']:>12.2f} "
            f"{r['wall_us']:>11.2f} {r['unmerge_us']:>14.2f}"
        )
    print("agent time per merged page, by part (the rest: memcmp and bookkeeping):")
    for r in rows:
        rest = r["agent_us"] - r["mmap_us"] - r["madvise_us"] - r["punch_us"]
        print(
            f"  {r['scenario']:<10} mmap {r['mmap_us']:.2f}  madvise {r['madvise_us']:.2f}  "
            f"punch {r['punch_us']:.2f}  rest {rest:.2f} µs"
        )


if __name__ == "__main__":
    main()
