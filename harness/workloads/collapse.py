"""Collapse (performance isolation): sharing VMs earn and use the surplus, then destroy their
sharing at once, while a bystander VM that shares nothing keeps working.

The sharers (default: every VM but the bystander) read the same working set (``files`` x 4 MiB
of the dataset: it merges, and the saving is lent back to them through their balloons), then
use it (``ios`` random 4 KiB reads with fio, served from the cache the surplus pays for). At
"collapse start" they all overwrite what they share as fast as they can:

- ``how: anon``: drop the page cache (the freed guest pages still map the shared frames) and
  fill ``collapse_mb`` of fresh anonymous memory with data unique to each page (each first
  write to a guest page that maps a shared frame is a copy-on-write break, or a new frame);
- ``how: files``: overwrite the cached working-set files in place through ``mmap`` (each page
  written is a break; the written cache is dirty and must be written back to the throttled disk
  before the guest can give it up).

Each sharer keeps what it wrote for ``after_s`` (the host must take the surplus back meanwhile),
then exits. The bystander (default: the last VM) first fills its memory with its own page cache
(``bystander_fill`` files: it uses its whole entitlement), then reads its own disk the whole time
with fio (random 4 KiB, ``O_DIRECT``: steady, no cache), first ``solo_s`` seconds while the
sharers are idle (its baseline), then on until the end. Figures (``extra["bystander"]``): its time per
``job_ios`` reads and its p99 read latency while the sharers are idle vs in the ``window_s``
seconds after the collapse starts. ``time_s``: the bystander's median job time in that window.
"""

from __future__ import annotations

import json
import statistics
import time

from harness.errors import ConfigError, HarnessError, SSHError
from harness.workloads import RunContext, Workload, WorkloadResult, dataset_files, on_all, timed

# Fill anonymous memory (how=anon) or overwrite files in place (how=files) with data unique to
# every page, as fast as Python can; print the seconds it took, keep the memory `hold` seconds.
WRITER = r"""
import json, mmap, os, sys, time
how, mb, tag, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
files = sys.argv[5:]
stamp = tag[:16].ljust(16, b".")
t0 = time.time(); pages = 0; maps = []
if how == "anon":
    n = mb << 20
    m = mmap.mmap(-1, n)
    for off in range(0, n, 4096):
        m[off:off + 24] = stamp + off.to_bytes(8, "little")
    pages = n // 4096; maps.append(m)
else:
    left = mb << 20
    for k, f in enumerate(files):
        if left <= 0:
            break
        fd = os.open(f, os.O_RDWR)
        size = min(os.fstat(fd).st_size, left)
        m = mmap.mmap(fd, size)
        os.close(fd)
        for off in range(0, size, 4096):
            m[off:off + 24] = stamp + (k << 32 | off).to_bytes(8, "little")
        left -= size; pages += size // 4096; maps.append(m)
t1 = time.time()
print(json.dumps({"write_s": round(t1 - t0, 3), "pages": pages}), flush=True)
end = time.time() + hold
while time.time() < end and not os.path.exists("/tmp/collapse.stop"):
    time.sleep(0.2)
"""


def _fio_cmd(files: list[str], name: str, runtime_s: float) -> str:
    return (f"fio --name={name} --rw=randread --bs=4k --ioengine=psync --direct=1 --iodepth=1 "
            f"--filename={':'.join(files)} --file_service_type=random --norandommap "
            f"--time_based --runtime={max(1, int(runtime_s))} --write_lat_log=/tmp/{name} "
            "--log_avg_msec=0 --per_job_logs=0 --output-format=json --output=/tmp/{0}.json".format(name))


def parse_lat_log(text: str) -> list[tuple[float, float]]:
    """fio latency log lines ``msec, nsec, ddir, bs[, ...]`` -> (completion s, latency ms)."""
    out = []
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 2:
            continue
        try:
            out.append((int(parts[0]) / 1000.0, int(parts[1]) / 1e6))
        except ValueError:
            continue
    return out


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def window_stats(ios: list[tuple[float, float]], t_from: float, t_to: float, job_ios: int) -> dict:
    """Reads completing in ``[t_from, t_to)`` (s on the log's clock): their p99 latency, and the
    time of each whole job of ``job_ios`` consecutive reads inside the window."""
    win = [(t, lat) for t, lat in ios if t_from <= t < t_to]
    jobs = []
    prev = t_from
    for k in range(job_ios - 1, len(win), job_ios):
        jobs.append(win[k][0] - prev)
        prev = win[k][0]
    return {
        "ios": len(win),
        "p99_ms": round(p, 3) if (p := _p99([lat for _, lat in win])) is not None else None,
        "jobs": len(jobs),
        "job_s": round(statistics.median(jobs), 4) if jobs else None,
        "job_s_min": round(min(jobs), 4) if jobs else None,
        "job_s_max": round(max(jobs), 4) if jobs else None,
        "iops": round(len(win) / (t_to - t_from), 1) if t_to > t_from else None,
    }


class Collapse(Workload):
    kind = "collapse"
    PARAMS = {"bystander": "", "first_file": 0, "files": 50, "ios": 10000, "earn_s": 10.0,
              "how": "files", "collapse_mb": 200, "after_s": 20.0, "solo_s": 20.0,
              "window_s": 15.0, "job_ios": 100, "bystander_files": 10, "bystander_fill": 50}

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        p = self.p
        if p["how"] not in ("anon", "files"):
            raise ConfigError("collapse: how must be anon or files")
        names = [vm.name for vm in vms]
        by_name = p["bystander"] or names[-1]
        if by_name not in names:
            raise ConfigError(f"collapse: no VM named {by_name!r} (VMs: {', '.join(names)})")
        by = next(vm for vm in vms if vm.name == by_name)
        sharers = [vm for vm in vms if vm is not by]
        if not sharers:
            raise ConfigError("collapse: needs at least one sharing VM besides the bystander")
        files = dataset_files(int(p["first_file"]), int(p["files"]))
        by_files = dataset_files(0, int(p["bystander_files"]))
        on_all(vms, lambda vm: vm.ssh.check("rm -f /tmp/collapse.stop /tmp/by*; sync; "
                                            "echo 3 > /proc/sys/vm/drop_caches"))
        on_all(sharers, lambda vm: vm.ssh.put(WRITER.encode(), "/tmp/collapse.py"))
        # the bystander fills its memory (its own page cache): it uses its whole entitlement
        fill = dataset_files(0, int(p["bystander_fill"])) if int(p["bystander_fill"]) else []
        if fill:
            by.ssh.check(f"cat {' '.join(fill)} > /dev/null", timeout=1800)

        # 1. the bystander alone (the sharers idle): its baseline
        ctx.mark("solo start")
        by.ssh.check(_fio_cmd(by_files, "solo", float(p["solo_s"])), timeout=float(p["solo_s"]) + 300)
        ctx.mark("solo end")
        solo = parse_lat_log(by.ssh.check("cat /tmp/solo_lat.log"))
        # 2. the bystander on, in the background, until the end
        t_guest0 = float(by.ssh.check(
            "date +%s.%N; nohup " + _fio_cmd(by_files, "by", 24 * 3600) + " > /dev/null 2>&1 &").split()[0])
        ctx.mark("bystander start")
        try:
            per_vm, t_collapse_guest = self._sharers(sharers, by, files, ctx)
        finally:
            by.ssh.run("pkill -INT -x fio; for i in $(seq 100); do pgrep -x fio >/dev/null || break; "
                       "sleep 0.2; done", timeout=60)
        ctx.mark("bystander end")
        by_ios = parse_lat_log(by.ssh.check("cat /tmp/by_lat.log"))
        if not solo or not by_ios:
            raise HarnessError(f"collapse: bystander {by_name} logged no reads (fio lat log empty)")
        job = int(p["job_ios"])
        base = window_stats(solo, solo[0][0] - solo[0][1] / 1000.0, solo[-1][0] + 1e-9, job)
        t_c = t_collapse_guest - t_guest0
        during = window_stats(by_ios, t_c, t_c + float(p["window_s"]), job)
        bystander = {
            "vm": by_name, "solo": base, "collapse": during,
            "job_ratio": round(during["job_s"] / base["job_s"], 3) if during["job_s"] and base["job_s"] else None,
            "p99_ratio": round(during["p99_ms"] / base["p99_ms"], 3)
            if during["p99_ms"] and base["p99_ms"] else None,
            # the median job during the collapse lies inside the spread of the jobs alone
            "within_noise": (base["job_s_min"] <= during["job_s"] <= base["job_s_max"])
            if during["job_s"] and base["job_s_min"] else None,
        }
        per_vm[by_name] = {"bystander": bystander}
        ctx.log(f"collapse: bystander {by_name}: {job} reads in {base['job_s']} s alone, "
                f"{during['job_s']} s during the collapse; p99 {base['p99_ms']} -> {during['p99_ms']} ms")
        return WorkloadResult(self.kind, during["job_s"] or float("nan"), per_vm,
                              extra={"bystander": bystander, "how": p["how"],
                                     "sharers": [vm.name for vm in sharers]})

    def _sharers(self, sharers: list, by, files: list[str], ctx: RunContext) -> tuple[dict, float]:
        p = self.p
        ctx.mark("warm-up")
        reads = on_all(sharers, lambda vm: timed(vm, f"cat {' '.join(files)} > /dev/null"))
        ctx.settle()
        end = time.monotonic() + float(p["earn_s"])  # the surplus is lent meanwhile
        while time.monotonic() < end and not ctx.stop.is_set():
            time.sleep(0.2)
        ctx.mark("use start")
        use = on_all(sharers, lambda vm: timed(vm, (
            "fio --name=use --rw=randread --bs=4k --ioengine=psync --invalidate=0 "
            f"--filename={':'.join(files)} --file_service_type=random --number_ios={int(p['ios'])} "
            f"--randrepeat=1 --randseed={self.seed + 1} --norandommap --output=/dev/null"), timeout=3600))
        ctx.mark("use end")
        drop = "sync; echo 1 > /proc/sys/vm/drop_caches; " if p["how"] == "anon" else ""
        args = f"{p['how']} {int(p['collapse_mb'])} {{name}} {float(p['after_s'])} " + " ".join(files)
        t_guest = float(by.ssh.check("date +%s.%N").split()[0])
        ctx.mark("collapse start")
        try:
            out = on_all(sharers, lambda vm: vm.ssh.check(
                f"{drop}python3 /tmp/collapse.py {args.format(name=vm.name)}", timeout=float(p["after_s"]) + 600))
        except SSHError as e:  # say what the guests' kernels said (an OOM kill shows there)
            tails = "\n".join(f"--- console of {vm.name}:\n{vm.console_tail(20)}" for vm in sharers)
            raise SSHError(f"collapse: a writer failed: {e.message}", context=tails) from None
        ctx.mark("collapse end")
        per_vm = {}
        for vm in sharers:
            try:
                w = json.loads(out[vm.name].strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise SSHError(f"VM {vm.name}: collapse writer printed no result", context=out[vm.name][-500:]) from None
            per_vm[vm.name] = {"read_s": round(reads[vm.name], 3), "use_s": round(use[vm.name], 3), **w}
        return per_vm, t_guest
