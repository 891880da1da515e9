"""What write-protection buys and costs: racing writers against merges, protected or not.

Runs ``tests/helpers/wp_writers.c`` (writer threads in the process that holds "guest RAM", the
merge agent preloaded: they stand in for vCPUs) and merges the pages they write, 64 at a time,
each first copied as it is into a store, without stopping anything:

- ``wp``: the agent write-protects each chunk while it compares and remaps it (pause-free);
- ``unprotected``: ``SATORI_AGENT_WP=0`` and no stop either: the race the protection closes.

Prints per mode: writes, writes lost (must be 0 with wp), merges, writes that waited on a page
being merged, the time a chunk stays protected (mean and max), the agent's µs per merged page.

    python benchmarks/merge_race.py [--seconds 10] [--threads 2] [--pages 4096]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.sharing.agent import PAGE, AgentClient, agent_env  # noqa: E402

SRC = ROOT / "tests" / "helpers" / "wp_writers.c"


def run(mode: str, exe: Path, seconds: float, threads: int, npages: int, tmp: Path) -> dict:
    run_id = secrets.token_hex(4)
    ram = Path("/dev/shm") / f"satori-bench-{run_id}-ram"
    store = Path("/dev/shm") / f"satori-bench-{run_id}-store"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, npages * PAGE)
    os.close(fd)
    sock = tmp / f"{run_id}.sock"
    env = {**os.environ, **agent_env(sock, ram), "SATORI_AGENT_WP": "1" if mode == "wp" else "0"}
    proc = subprocess.Popen([str(exe), str(ram), str(npages), str(threads), str(seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    sfd = -1
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        c = AgentClient(sock)
        st = c.stats()
        if mode == "wp" and st["wp"] != 1:
            raise SystemExit(f"no pause-free merging here: {st['wp_error']}")
        base = int(st["ram_base"])
        mem = os.open(f"/proc/{proc.pid}/mem", os.O_RDONLY)
        rng = np.random.default_rng(1)
        merged = rounds = soff = 0
        end = time.monotonic() + seconds - 1.5
        while time.monotonic() < end:
            if sfd < 0 or soff >= 32 << 20:  # a fresh store every 32 MB
                if sfd >= 0:
                    c.unmerge(0, npages)
                    os.close(sfd)
                    store.unlink()
                sfd = os.open(store, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                soff = 0
                c.open_store(store)
            start = int(rng.integers(0, npages - 64))
            os.pwrite(sfd, os.pread(mem, 64 * PAGE, base + start * PAGE), soff)
            merged += c.merge([((start + i) * PAGE, soff + i * PAGE) for i in range(64)]).merged
            soff += 64 * PAGE
            rounds += 1
        st = c.stats()
        c.close()
        os.close(mem)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sfd >= 0:
            os.close(sfd)
        for p in (ram, store):
            p.unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
    w = dict(kv.split("=") for kv in out.split())
    chunks = max(int(st["wp_chunks"]), 1)
    return {"mode": mode, "writes": int(w["writes"]), "lost": int(w["bad"]), "merged": merged,
            "waited": int(st["wp_faults"]), "hold_mean_us": int(st["wp_ns"]) / chunks / 1e3,
            "hold_max_us": int(st["wp_max_ns"]) / 1e3,
            "agent_us_per_page": int(st["merge_ns"]) / max(int(st["merged_total"]), 1) / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pages", type=int, default=4096)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = tmp / "wp_writers"
        subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(exe), str(SRC)],
                       check=True)  # fmt: skip
        rows = [run(m, exe, a.seconds, a.threads, a.pages, tmp) for m in ("wp", "unprotected")]
    print(f"{'mode':<12} {'writes':>10} {'lost':>6} {'merged':>8} {'waited':>7} "
          f"{'hold µs mean':>13} {'hold µs max':>12} {'agent µs/pg':>12}")
    for r in rows:
        print(f"{r['mode']:<12} {r['writes']:>10} {r['lost']:>6} {r['merged']:>8} {r['waited']:>7} "
              f"{r['hold_mean_us']:>13.1f} {r['hold_max_us']:>12.1f} {r['agent_us_per_page']:>12.2f}")


if __name__ == "__main__":
    main()
