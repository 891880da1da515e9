"""Issue 11: sharing for any guest, and the alternatives people pick, side by side.

    python3 benchmarks/any_guest.py                       # identical readers, 2 VMs (3 reps)
    python3 benchmarks/any_guest.py --reps 1 --files 10   # a short look
    python3 benchmarks/any_guest.py --cross               # bookworm + trixie (stock 6.12)
    python3 benchmarks/any_guest.py --boot                # boot storm: what host hints can reach

Identical readers (configs/any-guest-readers.yaml): ``satori`` (the patched guest driver hashes
its reads), ``satori-host`` (QEMU's reads hashed on the host, any guest), ``ksm-advisor`` (KSM as
tuned today) and ``dax`` (the dataset on one read-only virtio-pmem image, FS-DAX: no page-cache
copy). Per mode, median [min-max] over the repetitions: E_disk after the reads, time to 90%,
merge lag p99 (when the engine reports it), host CPU per page saved (engine + agents + ksmd +
host hints, over peak R), and the hashing: the host's CPU for host hints (measured in QEMU's
threads by the preload) against the guest's for guest hints (records x the guest's own xxh64
time per 4 KiB page, measured in a guest with ``xxhsum -b``: an estimate, the kernel module
keeps no clock).

``dax`` is measured on its own too: two VMs read the dataset through DAX; its saving is the pmem
pages both guests map from the host's one copy (their pagemaps), and their RAM holds no copy.

``--boot`` (configs/any-guest-boot.yaml): after the storm, which part of each booted guest's
populated non-zero memory is disk content (a hint source can only ever reach that part: the
kernel and initramfs come from ``-kernel``/``-initrd``, QEMU copies them into RAM without a disk
read), and how much of it each mode merged.

Numbers from a loaded 2-core TCG host are not claims; the lead runs this on a quiet machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.config import validate  # noqa: E402
from harness.experiment import Runner  # noqa: E402
from harness.report import load_results  # noqa: E402

PAGE = 4096


def log(m: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)


def fmt(vals: list, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    v = [x * scale for x in vals if x is not None]
    if not v:
        return "n/a"
    m = statistics.median(v)
    if len(v) == 1:
        return f"{m:.{digits}g}{unit}"
    return f"{m:.{digits}g}{unit} [{min(v):.{digits}g}-{max(v):.{digits}g}]"


def run(config: Path, args, modes: list[str] | None = None, workload_params: dict | None = None) -> dict:
    data = yaml.safe_load(config.read_text())
    data["repetitions"] = args.reps
    if modes:
        data["modes"] = modes
    for w in data["workloads"]:
        w.setdefault("params", {}).update(workload_params or {})
    cfg = validate(data, source=str(config), config_dir=config.parent)
    out = Runner(cfg, config, Path(args.out) / cfg.name if args.out else None, log=log).run()
    log(f"results: {out}")
    return load_results(out)


def reps_of(mode: dict) -> list[dict]:
    return mode.get("runs") or []


def samples_of(mode: dict, i: int) -> list[dict]:
    """Sample rows of repetition ``i`` (in its run record, or the mode's older per-rep lists)."""
    runs = reps_of(mode)
    if i < len(runs) and runs[i].get("samples"):
        return runs[i]["samples"]
    s = mode.get("samples") or []
    return s[i] if s and isinstance(s[0], list) else s


def figure(r: dict, key: str):
    """A run's figure from ``harness.metrics`` (``r["figures"]``), or the older flat key."""
    figs = r.get("figures")
    return figs.get(key) if isinstance(figs, dict) and key in figs else r.get(key)


def rep_figures(mode: dict) -> list[dict]:
    """Per repetition: the figures this benchmark prints (the registry's when the results carry
    them, else computed the same way from the run's samples, engine statistics and CPU)."""
    out = []
    for i, r in enumerate(reps_of(mode)):
        rows = samples_of(mode, i)
        peak_r = figure(r, "pages_saved")
        if peak_r is None:
            peak_r = max((row.get("R") or 0 for row in rows), default=0)
        vms = [v for st in (r.get("engine") or {}).values() for v in st["vms"].values()]
        hh_s = sum(v.get("hosthints_cpu_ns") or 0 for v in vms) / 1e9
        host_hinted = sum(v.get("hinted") or 0 for v in vms if v.get("hosthints_cpu_ns"))
        guest_hinted = sum(v.get("hinted") or 0 for v in vms if not v.get("hosthints_cpu_ns"))
        cpu_per_saved = figure(r, "cpu_per_page_saved_s")
        if cpu_per_saved is None and peak_r:
            cpu = r.get("cpu") or {}
            cpu_per_saved = (sum(cpu.get(k) or 0 for k in ("engine_s", "agent_s", "ksmd_s")) + hh_s) / peak_r
        lag_p99 = figure(r, "merge_lag_p99_s")
        if lag_p99 is None:
            lags = [st.get("merge_lag_s") for st in (r.get("engine") or {}).values() if st.get("merge_lag_s")]
            lag_p99 = max((lag.get("p99") or 0 for lag in lags), default=None) if lags else None
        out.append({
            "E_disk": figure(r, "E_disk_final"),
            "t90": figure(r, "time_to_90_s"),
            "lag_p99": lag_p99,
            "peak_R": peak_r or 0,
            "cpu_per_saved": cpu_per_saved,
            "hosthints_s": hh_s,
            "guest_hinted": guest_hinted,
            "hh_per_page": hh_s / host_hinted if host_hinted else None,
        })
    return out


def guest_hash_us(image_recipe: Path | None = None) -> float | None:
    """µs a guest spends on xxh64 of one 4 KiB page (xxhsum's benchmark in a booted guest)."""
    from harness.image import DEFAULT_RECIPE, ensure_image
    from harness.vm import VM, VMSpec

    img = ensure_image(image_recipe or DEFAULT_RECIPE, log=log)
    with VM(VMSpec("hashbench", memory_mb=384), img, log=log) as vm:
        out = vm.ssh.check("xxhsum -b3 -B4K -i3 2>&1 || true")
    m = re.search(r"XXH64\s.*?\(\s*([\d.]+)\s*MB/s", out)
    if not m:
        log(f"xxhsum benchmark gave no XXH64 speed: {out.strip()[-200:]}")
        return None
    mbs = float(m.group(1))
    return PAGE / (mbs * 1e6) * 1e6  # MB/s is 10^6 bytes per second in xxhsum


def dax_alone(files: int) -> dict:
    """Two dax VMs read ``files`` dataset files: the pmem pages they share, their RAM copies."""
    import numpy as np

    from harness import accounting, dax, modes, oracle
    from harness.image import ensure_image
    from harness.sharing.attach import mode_attachments
    from harness.vm import VM, VMSpec, new_run_id, start_all

    img = ensure_image(log=log)
    run = new_run_id()
    vms = [VM(VMSpec(n, memory_mb=512), img, run_id=run, log=log,
              attachments=mode_attachments(modes.MODES["dax"], img, log=log)[0]) for n in ("dxa", "dxb")]
    names = " ".join(f"/data/set1/f{i:04d}.bin" for i in range(files))
    try:
        start_all(vms)
        for vm in vms:
            if not dax.dax_mounted(vm, "/data/set1"):
                raise SystemExit(f"{vm.name}: /data/set1 is not mounted with DAX")
            vm.ssh.check(f"cat {names} > /dev/null")
        sh = dax.pmem_sharing(vms)
        import hashlib

        dset = oracle.unique_hashes(np.concatenate([
            oracle.hash_pages(hashlib.shake_256(f"satori-dataset:/data/set1:1:{i}".encode()).digest(4 << 20))
            for i in range(files)]))
        in_ram = 0
        for vm in vms:
            hva = accounting.ram_hva(vm)
            present, _ = accounting.decode_pagemap(accounting.read_pagemap(vm.pid, hva, vm.ram_size // PAGE))
            idx = np.flatnonzero(present)
            in_ram += int(oracle.in_set(oracle.hash_process_pages(vm.pid, hva, idx), dset).sum())
        return {"G": sh.G, "F": sh.F, "R": sh.R, "read_pages": 2 * files * 1024, "in_ram": in_ram}
    finally:
        for vm in vms:
            vm.shutdown()


def readers(args) -> None:
    params = {"files": args.files, "keep_s": args.keep}
    config = REPO / "configs" / ("any-guest-cross.yaml" if args.cross else "any-guest-readers.yaml")
    res = run(config, args, args.modes, params)
    hash_us = guest_hash_us() if "satori" in res["modes"] else None
    print()
    print(f"{res['name']}: {args.files} files x 4 MiB per VM, {args.reps} repetition(s), "
          f"commit {(res['meta'].get('git_commit') or '?')[:10]}, {res['meta'].get('accel')}")
    if res["meta"].get("images"):
        print("images: " + ", ".join(f"{n} {i['image']} ({i['kernel']})" for n, i in res["meta"]["images"].items()))
    head = ("mode", "E_disk", "time to 90%", "merge lag p99", "host CPU/page saved", "peak R",
            "hashing CPU")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, mode in res["modes"].items():
        if "skipped" in mode:
            print(f"| {name} | skipped: {mode['skipped']} |")
            continue
        f = rep_figures(mode)
        parts = []
        if any(x["hh_per_page"] for x in f):
            parts.append("host " + fmt([x["hh_per_page"] for x in f], " us/page", 1e6))
        if hash_us and any(x["guest_hinted"] for x in f):
            pages = statistics.median(x["guest_hinted"] for x in f)
            parts.append(f"guest ~{hash_us:.2f} us/page (est.), ~{pages * hash_us / 1e6:.2f} s")
        hashing = "; ".join(parts) or "-"
        print(f"| {name} | {fmt([x['E_disk'] for x in f])} | {fmt([x['t90'] for x in f], ' s')} | "
              f"{fmt([x['lag_p99'] for x in f], ' s')} | {fmt([x['cpu_per_saved'] for x in f], ' us', 1e6)} | "
              f"{fmt([x['peak_R'] * PAGE / 2**20 for x in f], ' MB')} | {hashing} |")
    if "dax" in res["modes"] and not args.no_dax_alone:
        d = dax_alone(args.files)
        print(f"\ndax alone (2 VMs, {args.files} files each): pmem pages mapped G={d['G']}, host frames "
              f"F={d['F']}, saved R={d['R']} ({d['R'] * PAGE / 2**20:.0f} MB); dataset pages in the "
              f"guests' RAM: {d['in_ram']} of {d['read_pages']} read (the page cache holds no copy)")
        print("\nE_disk of dax counts guest RAM only (the dataset is not in it); its saving is the line above.")


def boot(args) -> None:
    res = run(REPO / "configs" / "any-guest-boot.yaml", args, args.modes, {"keep_s": args.keep})
    print()
    print(f"{res['name']}: {args.reps} repetition(s), commit {(res['meta'].get('git_commit') or '?')[:10]}")
    head = ("mode", "disk content / populated non-zero", "E_disk", "E", "merged (MB)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, mode in res["modes"].items():
        if "skipped" in mode:
            continue
        frac, ed, e, merged = [], [], [], []
        for i in range(len(reps_of(mode))):
            rows = samples_of(mode, i)
            if not rows:
                continue
            last = rows[-1]
            nonzero = (last.get("G") or 0) - (last.get("zero_pages") or 0)
            frac.append((last.get("G_disk") or 0) / nonzero if nonzero else None)
            ed.append(last.get("E_disk"))
            e.append(last.get("E"))
            merged.append((last.get("R_disk") or 0) * PAGE / 2**20)
        print(f"| {name} | {fmt(frac)} | {fmt(ed)} | {fmt(e)} | {fmt(merged)} |")
    print("\nThe rest of a booted guest (kernel text and data from -kernel, initramfs, anonymous and "
          "zero pages) is not disk content: no read reveals it, to the guest driver or to QEMU.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--files", type=int, default=50, help="dataset files (4 MiB) each VM reads")
    ap.add_argument("--keep", type=float, default=30.0, help="seconds kept after the reads / boots")
    ap.add_argument("--modes", nargs="+")
    ap.add_argument("--cross", action="store_true", help="bookworm + trixie instead of two bookworm VMs")
    ap.add_argument("--boot", action="store_true", help="boot storm with host hints")
    ap.add_argument("--no-dax-alone", action="store_true")
    ap.add_argument("--out", help="results parent folder (default: results/)")
    args = ap.parse_args()
    if args.boot:
        boot(args)
    else:
        readers(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
