"""Web server: lighttpd in each guest serves the dataset files; wrk (in the guest) loads it.

The paper used Apache; lighttpd is the small equivalent here. Figure: seconds to serve a fixed
number of requests would need a fixed-count load generator, so wrk runs for ``duration_s`` and
the figure is the time per request (1 / requests-per-second), lower is better. wrk's latency
distribution (``--latency``) gives each VM's p99 request latency: ``web_p99_us`` (worst VM) in the
result's ``extra``, the figure the engine's "invisible to the guest" goal is judged on against
mode none.
"""

from __future__ import annotations

import re

from harness.errors import SSHError
from harness.workloads import RunContext, Workload, WorkloadResult, dataset_files, on_all

LIGHTTPD_CONF = """server.document-root = "/data/set1"
server.port = 8080
server.bind = "127.0.0.1"
server.errorlog = "/tmp/lighttpd.err"
"""


_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def parse_latency(out: str) -> dict[str, float]:
    """wrk ``--latency`` output -> {"p50_us": .., "p75_us": .., "p90_us": .., "p99_us": ..}."""
    got = {}
    for pct, val, unit in re.findall(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        got[f"p{pct}_us"] = float(val) * _UNIT_US[unit]
    return got


class Web(Workload):
    kind = "web"
    PARAMS = {"files": 50, "duration_s": 20, "connections": 4, "threads": 1}
    DEFINES = frozenset({"slowdown"})  # time per request

    def _one(self, vm, ctx: RunContext) -> dict:
        vm.ssh.put(LIGHTTPD_CONF.encode(), "/tmp/lighttpd.conf")
        vm.ssh.check("lighttpd -f /tmp/lighttpd.conf")
        n = int(self.p["files"])
        paths = [p.rsplit("/", 1)[1] for p in dataset_files(0, n)]
        lua = "counter = 0\nrequest = function()\n  counter = counter + 1\n" \
              f"  local names = {{{', '.join(repr(x) for x in paths)}}}\n" \
              "  return wrk.format(nil, '/' .. names[(counter % #names) + 1])\nend\n"
        vm.ssh.put(lua.replace("'", '"').encode(), "/tmp/wrk.lua")
        out = vm.ssh.check(
            f"wrk --latency -t{int(self.p['threads'])} -c{int(self.p['connections'])} -d{int(self.p['duration_s'])}s "
            "-s /tmp/wrk.lua http://127.0.0.1:8080/", timeout=int(self.p["duration_s"]) + 120)
        vm.ssh.run("pkill lighttpd")
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        t = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
        if not m:
            raise SSHError(f"VM {vm.name}: cannot parse wrk output", context=out[-800:])
        lat = parse_latency(out)
        if "p99_us" not in lat:
            raise SSHError(f"VM {vm.name}: wrk printed no latency distribution", context=out[-800:])
        return {"rps": float(m.group(1)), "transfer": f"{t.group(1)}{t.group(2)}" if t else None, **lat}

    def run(self, vms: list, ctx: RunContext) -> WorkloadResult:
        ctx.mark("web start")
        res = on_all(vms, lambda vm: self._one(vm, ctx))
        ctx.mark("web end")
        rps = sum(r["rps"] for r in res.values())
        return WorkloadResult(self.kind, 1.0 / rps if rps else float("inf"), res,
                              extra={"rps_total": rps, "web_p99_us": max(r["p99_us"] for r in res.values())})
