"""Integrity (scenario 5): guests keep writing and checking data over pages being merged.

Each guest copies ``mb`` MB of the dataset into a file of its own (identical in every guest, so
its cached pages merge across VMs), then for ``duration_s`` rewrites random pages of it, drops
it from the page cache and re-reads it every other round (new hints, new merges, new
copy-on-write breaks), and checks every page against what it last wrote. Any wrong page is a
lost or corrupted guest write: the figure ``bad_pages`` must be 0.
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.workloads import RunContext, Workload, WorkloadResult, on_all

SCRIPT = r"""
import hashlib, os, random, sys, time
# Prints: rounds, pages checked, bad pages. Stops after secs, or early when /tmp/stop exists.
path, secs, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
n = os.fstat(fd).st_size // 4096
expect = [hashlib.md5(os.pread(fd, 4096, i * 4096)).digest() for i in range(n)]
rnd = random.Random(seed); bad = checked = rounds = 0; end = time.time() + secs
while time.time() < end and not os.path.exists("/tmp/stop"):
    for _ in range(64):
        i = rnd.randrange(n); page = rnd.randbytes(4096)
        os.pwrite(fd, page, i * 4096); expect[i] = hashlib.md5(page).digest()
    if rounds % 2 == 0:
        os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for i in range(n):
        checked += 1
        cur = os.pread(fd, 4096, i * 4096)
        if hashlib.md5(cur).digest() != expect[i]:
            bad += 1
            if bad <= 20:
                print("bad page", i, "round", rounds, "zero" if cur == bytes(4096) else "nonzero",
                      file=sys.stderr)
    rounds += 1
print(rounds, checked, bad)
"""


def prepare(vm, mb: int) -> None:
    """Put the checker and its data file (a copy of dataset files: identical in every VM) in place."""
    files = min(50, max(1, mb // 4))
    vm.ssh.put(SCRIPT.encode(), "/tmp/integrity.py")
    vm.ssh.check(f"cat $(ls /data/set1/*.bin | tail -n {files}) > /root/integ.bin; sync; "
                 "echo 3 > /proc/sys/vm/drop_caches; rm -f /tmp/stop")


def parse(out: str) -> dict:
    rounds, checked, bad = (int(x) for x in out.split()[-3:])
    return {"rounds": rounds, "checked": checked, "bad_pages": bad}


class Integrity(Workload):
    kind = "integrity"
    PARAMS = {"mb": 128, "duration_s": 600.0}

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        on_all(vms, lambda vm: prepare(vm, int(self.p["mb"])))
        ctx.mark("integrity start")
        secs = float(self.p["duration_s"])
        res = on_all(vms, lambda vm: parse(vm.ssh.check(
            f"python3 /tmp/integrity.py /root/integ.bin {secs} {self.seed}", timeout=secs + 600)))
        ctx.mark("integrity end")
        bad = sum(r["bad_pages"] for r in res.values())
        if bad:
            raise HarnessError(f"integrity: {bad} guest pages held wrong data: {res}")
        return WorkloadResult(self.kind, secs, res, extra={"bad_pages": bad,
                                                           "checked": sum(r["checked"] for r in res.values())})
