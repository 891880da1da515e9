"""Adversary (scenario 6): one guest forges hint records; no other guest's memory may change.

The attacker (``attacker``, default the last VM) maps its own hint ring BAR from user space
(the VM boots with ``iomem=relaxed`` so root may) and publishes forged records for
``duration_s`` at up to ``rate`` records/s: ``wrong-hash`` (its own pages, random hashes),
``bad-address`` (addresses outside its RAM, unaligned), ``changed-page`` (the real hash of a
dataset block, claimed for a page that holds something else), ``flood`` (as fast as the ring
takes). Honest VMs checksum their cached dataset before and after: it must not change.

No config string reaches a shell: ``attacks`` must be a list of :data:`ATTACKS` (the config
schema and this module both check it), and the parameters go to the guest as a JSON file (written
through the SSH channel's stdin to a fixed path); the guest command line is a constant.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from harness.errors import ConfigError, HarnessError
from harness.workloads import RunContext, Workload, WorkloadResult, on_all

ATTACKS: tuple[str, ...] = ("wrong-hash", "bad-address", "flood", "changed-page")
Attack = Literal["wrong-hash", "bad-address", "flood", "changed-page"]
ARGS_PATH = "/tmp/forge-args.json"
FORGE_PATH = "/tmp/forge.py"

FORGE = r"""
import glob, mmap, os, random, struct, sys, time, json
a = json.load(open(sys.argv[1]))
attacks, rate, secs, seed = list(a["attacks"]), int(a["rate"]), float(a["duration_s"]), int(a["seed"])
dev = [d for d in glob.glob('/sys/bus/pci/devices/*') if open(d + '/vendor').read().strip() == '0x1af4'
       and open(d + '/device').read().strip() == '0x1110'][0]
fd = os.open(dev + '/resource2', os.O_RDWR | os.O_SYNC)
m = mmap.mmap(fd, os.fstat(fd).st_size)
cap = struct.unpack_from('<I', m, 20)[0]
ram = int(open('/proc/meminfo').readline().split()[1]) * 1024
real = []  # real hashes of dataset blocks (xxh64 via the xxhsum tool of the image)
try:
    import subprocess
    blocks = open('/data/set1/f0000.bin', 'rb').read(4096 * 64)
    for i in range(64):
        h = subprocess.run(['xxhsum', '-H64', '-'], input=blocks[i*4096:(i+1)*4096], capture_output=True).stdout.split()[0]
        real.append(int(h, 16))
except Exception:
    real = [0]
rnd = random.Random(seed); sent = 0; end = time.time() + secs
while time.time() < end:
    prod = struct.unpack_from('<Q', m, 64)[0]
    cons = struct.unpack_from('<Q', m, 128)[0]
    room = cap - (prod - cons) if 0 <= prod - cons <= cap else cap // 2
    burst = room if 'flood' in attacks else min(room, max(1, rate // 20))
    for i in range(burst):
        a = attacks[(sent + i) % len(attacks)]
        if a == 'bad-address':
            gpa = rnd.choice([rnd.randrange(ram, 1 << 46), rnd.randrange(0, ram) | 123])
            h = rnd.getrandbits(64)
        elif a == 'changed-page':
            gpa = rnd.randrange(0, ram) & ~4095; h = rnd.choice(real)
        else:
            gpa = rnd.randrange(0, ram) & ~4095; h = rnd.getrandbits(64)
        struct.pack_into('<QQQHHI', m, 4096 + ((prod + i) % cap) * 32, gpa, h, 0, 0, 1, (prod + i) & 0xffffffff)
    struct.pack_into('<Q', m, 64, prod + burst)
    sent += burst
    time.sleep(0.05)
print(json.dumps({"sent": sent}))
"""


def check_attacks(attacks: Any) -> list[str]:
    """The attack list if every entry is one of :data:`ATTACKS` (at least one); else ConfigError."""
    if not isinstance(attacks, list | tuple) or not attacks:
        raise ConfigError(f"adversary: attacks must be a non-empty list of {', '.join(ATTACKS)}")
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise ConfigError(f"adversary: unknown attack(s) {', '.join(map(repr, bad))} "
                          f"(attacks: {', '.join(ATTACKS)})")
    return list(attacks)


class Adversary(Workload):
    kind = "adversary"
    PARAMS = {"attacker": "", "attacks": list(ATTACKS), "rate": 10000, "duration_s": 60.0}
    PARAM_TYPES = {"attacks": Annotated[list[Attack], Field(min_length=1)]}

    def __init__(self, params: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(params, seed)
        self.p["attacks"] = check_attacks(self.p["attacks"])

    def forge_args(self) -> bytes:
        """The forger's parameters as the JSON file the guest script reads (no shell involved)."""
        return json.dumps({"attacks": check_attacks(self.p["attacks"]), "rate": int(self.p["rate"]),
                           "duration_s": float(self.p["duration_s"]), "seed": int(self.seed)}).encode()

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        names = [vm.name for vm in vms]
        attacker = self.p["attacker"] or names[-1]
        if attacker not in names:
            raise HarnessError(f"adversary: no VM named {attacker!r}")
        mal = next(vm for vm in vms if vm.name == attacker)
        honest = [vm for vm in vms if vm is not mal]
        check = "cat /data/set1/*.bin | md5sum"
        before = on_all(honest, lambda vm: vm.ssh.check(check).split()[0])
        mal.ssh.put(FORGE.encode(), FORGE_PATH)
        mal.ssh.put(self.forge_args(), ARGS_PATH)
        ctx.mark("attack start")
        secs = float(self.p["duration_s"])
        out = mal.ssh.check(f"python3 {FORGE_PATH} {ARGS_PATH}", timeout=secs + 300)
        ctx.mark("attack end")
        ctx.settle()
        after = on_all(honest, lambda vm: vm.ssh.check(check).split()[0])
        changed = [n for n in before if before[n] != after[n]]
        if changed:
            raise HarnessError(f"adversary: honest VM data changed: {changed}")
        sent = json.loads(out.strip().splitlines()[-1])["sent"]
        per = {n: {"md5_ok": True} for n in before}
        per[attacker] = {"forged": sent}
        return WorkloadResult(self.kind, secs, per, extra={"forged": sent, "honest_changed": changed})
