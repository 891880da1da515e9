"""The ``satori`` command line: image build, VMs by hand, the demo/main job.

Every :class:`HarnessError` is printed with its context (console tail, command line, QMP
reply) and no traceback, exit status 1. Ctrl-C and SIGTERM unwind through the context
managers, so QEMU processes and their files are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

from harness.errors import HarnessError

# ---------------------------------------------------------------- helpers


def _err(msg: str) -> None:
    print(f"satori: error: {msg}", file=sys.stderr)


def _sigterm_to_interrupt() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def find_in_ram(ram, page: bytes) -> list[int]:
    """Page-aligned offsets in guest RAM (a :class:`harness.memfd.ProcFile`, or a path) that
    hold all of ``page``. Found by its first 64 bytes, then compared whole: a transient copy the
    guest freed (an SFTP or socket buffer being zeroed) may share the start and not the rest."""
    from harness.memfd import open_file

    hits = []
    with open(open_file(ram), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        pos = m.find(page[:64])
        while pos != -1:
            if pos % 4096 == 0 and m[pos:pos + len(page)] == page:
                hits.append(pos)
            pos = m.find(page[:64], pos + 1)
    return hits


# ---------------------------------------------------------------- image


def cmd_image_build(args: argparse.Namespace) -> int:
    from harness.image import DEFAULT_RECIPE, build_image

    img = build_image(Path(args.recipe) if args.recipe else DEFAULT_RECIPE, force=args.force)
    m = img.manifest
    print(f"image: {img.root}")
    print(f"  kernel {m['abi']} ({m['kernel_version']}), hints {'on' if img.hints else 'off'}, "
          f"built in {m['build_seconds']} s")
    return 0


# ---------------------------------------------------------------- vm


def cmd_vm_up(args: argparse.Namespace) -> int:
    from harness.config import recipe_path
    from harness.image import DEFAULT_RECIPE, ensure_image
    from harness.sharing.attach import agent_socket_of, hint_source, ring_of, sharing_attachments
    from harness.vm import VM, VMSpec, load_states

    # the name and the memory are checked before anything is built
    spec = VMSpec(name=args.name, memory_mb=args.memory, vcpus=args.vcpus)
    _cleanup_quietly()
    if any(s["name"] == args.name and s["alive"] for s in load_states()):
        raise HarnessError(f"a VM named {args.name!r} is already running (satori vm down {args.name})")
    img = ensure_image(recipe_path(args.image) or DEFAULT_RECIPE)
    source = hint_source(args.hints, img)  # default: the guest driver if the image has it, else host
    vm = VM(spec, img, detach=True,
            attachments=sharing_attachments(hints=source or "off", agent=args.sharing and source is not None))
    try:
        vm.start()
    except BaseException:
        vm.shutdown()
        raise
    print(vm.accel.line())
    print(f"VM {vm.name} is up in {vm.boot_seconds:.1f} s (pid {vm.pid})")
    print(f"  ssh:        satori vm ssh {vm.name}    (127.0.0.1:{vm.ssh_port}, key {img.key})")
    print(f"  qmp:        {vm.paths.qmp_manual}")
    print(f"  console:    {vm.paths.console}")
    print(f"  guest RAM:  {vm.ram.path} (a memfd: no file anyone else can open)")
    if ring_of(vm):
        print(f"  hint ring:  {ring_of(vm).path} ({source} hints)")
    if agent_socket_of(vm):
        print(f"  agent:      {agent_socket_of(vm)}")
    # release our connections; QEMU keeps running in its own session
    if vm._ssh:
        vm._ssh.close()
    if vm._qmp:
        vm._qmp.close()
    return 0


def _cleanup_quietly() -> None:
    """What killed runs left (dead VMs' folders, paused VMs, changed settings): undone before a
    new start, and said in one line each."""
    from harness.cleanup import cleanup

    for line in cleanup():
        if not line.startswith("left alone:"):
            print(f"cleanup: {line}")


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what killed harness processes left, restore the settings they changed."""
    from harness.cleanup import cleanup

    did = cleanup()
    for line in did:
        print(line)
    if not did:
        print("nothing to clean up: no orphaned VM, status file or changed setting")
    return 0


def cmd_vm_ls(args: argparse.Namespace) -> int:
    from harness.vm import load_states, run_state, state_paths

    problems: list[str] = []
    states = load_states(problems)
    for s in states:  # running / paused from QMP, not only "the pid is alive"
        s["status"] = run_state(s) if s["alive"] else "dead"
    if args.json:
        print(json.dumps(states, indent=2))
        return 0
    if not states:
        print("no VMs")
    else:
        print(f"{'NAME':12} {'STATE':10} {'PID':>8} {'SSH':>6} {'MEM':>6} {'ACCEL':5} QMP")
    for s in states:
        print(f"{s['name']:12} {s['status']:10} {s['pid'] or '-':>8} "
              f"{s['ssh_port'] or '-':>6} {s['spec']['memory_mb']:>5}M {s['accel'] or '-':5} "
              f"{state_paths(s).qmp_manual}")
    for p in problems:
        print(f"ignored: {p}")
    return 0


def cmd_vm_ssh(args: argparse.Namespace) -> int:
    from harness.vm import find_state

    s = find_state(args.name)
    if not s["alive"]:
        raise HarnessError(f"VM {args.name} is not running")
    cmd = [a for a in args.command if a != "--"]
    ssh = shutil.which("ssh")
    if ssh:
        argv = [
            "ssh", "-q", "-i", s["key"], "-p", str(s["ssh_port"]),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "root@127.0.0.1",
        ]
        if cmd:
            argv += ["--", *cmd]
        os.execvp(ssh, argv)
    if not cmd:
        raise HarnessError("an interactive shell needs the ssh client (apt-get install openssh-client)")
    from harness.ssh import SSH

    r = SSH(s["ssh_port"], Path(s["key"])).run(" ".join(cmd))
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.rc


def cmd_vm_qmp(args: argparse.Namespace) -> int:
    from harness.vm import find_state, qmp_connect, state_paths

    s = find_state(args.name)
    if not s["alive"]:
        raise HarnessError(f"VM {args.name} is not running")
    try:
        qargs = json.loads(args.arguments) if args.arguments else None
    except ValueError as e:
        raise HarnessError(f"QMP arguments are not valid JSON: {e}") from None
    if qargs is not None and not isinstance(qargs, dict):
        raise HarnessError("QMP arguments must be a JSON object, e.g. '{\"value\": 268435456}'")
    q = qmp_connect(state_paths(s).qmp_manual)
    try:
        reply = q.cmd_raw(args.qmp_command, qargs)
    finally:
        q.close()
    print(json.dumps(reply.get("return", reply), indent=2))
    return 1 if "error" in reply else 0


def cmd_vm_down(args: argparse.Namespace) -> int:
    from harness.vm import load_states, stop_background

    states = load_states()
    targets = states if args.all else [s for s in states if s["name"] in args.names]
    missing = set(args.names) - {s["name"] for s in states}
    for s in targets:
        stop_background(s)
        print(f"VM {s['name']} is down" if s["alive"] else
              f"VM {s['name']}: its QEMU was already gone (pid {s['pid']} is not it); files removed")
    if missing:
        raise HarnessError(f"no VM named {', '.join(sorted(missing))}")
    return 0


# ---------------------------------------------------------------- hints, share, status


def hint_counts(snap: dict[str, int]) -> dict[str, int]:
    """A hint ring's counters as a person reads them: ``records`` the guest produced
    (published), ``consumed`` by the host's reader, ``pending`` in the ring now; of the
    consumed, ``valid`` and ``rejected``; the guest's own ``dropped`` (ring full) and ``partial``."""
    produced, consumed = int(snap["producer"]), int(snap["consumer"])
    pending = produced - consumed
    return {
        "records": produced, "consumed": consumed,
        "pending": pending if 0 <= pending <= int(snap["capacity"]) else 0,
        "valid": int(snap["records"]), "rejected": int(snap["rejected"]), "dropped": int(snap["dropped"]),
        "partial": int(snap["partial"]), "resyncs": int(snap["resyncs"]), "capacity": int(snap["capacity"]),
        "guest_state": int(snap["guest_state"]),
    }


def cmd_hints(args: argparse.Namespace) -> int:
    """Live view (or one JSON snapshot) of a running VM's hint ring."""
    from harness.hints import HintRing
    from harness.sharing.attach import ring_of_state
    from harness.vm import find_state

    if not args.interval > 0:
        raise HarnessError(f"--interval must be a positive number of seconds, not {args.interval}")
    s = find_state(args.name)
    ref = ring_of_state(s)
    if ref is None:
        raise HarnessError(f"VM {args.name} has no hint ring (image without hints, or started with --no-hints)")
    ring = HintRing(ref, int(s["ram_size"]), readonly=True)
    try:
        snap = hint_counts(ring.stats())
        if args.json:
            print(json.dumps(snap))
            return 0
        print(f"hint ring of VM {args.name}: {ref.path} (Ctrl-C to stop)")
        last, t_last = snap, time.monotonic()
        while True:
            time.sleep(args.interval)
            snap, now = hint_counts(ring.stats()), time.monotonic()
            rate = (snap["records"] - last["records"]) / (now - t_last)
            print(f"{time.strftime('%H:%M:%S')}  {rate:9.0f} records/s  produced {snap['records']:>9}  "
                  f"consumed {snap['consumed']:>9}  pending {snap['pending']:>7}  dropped {snap['dropped']:>7}  "
                  f"rejected {snap['rejected']:>7}  partial {snap['partial']:>7}", flush=True)
            last, t_last = snap, now
    except KeyboardInterrupt:
        return 0
    finally:
        ring.close()


def read_share_status(f: Path) -> dict:
    """A ``share-*.json`` a ``satori share`` engine writes (validated: the keys this CLI uses)."""
    from harness.paths import read_private

    st = json.loads(read_private(f))
    if not (isinstance(st, dict) and isinstance(st.get("domain"), str) and isinstance(st.get("vms"), dict)
            and isinstance(st.get("pid"), int) and isinstance(st.get("start"), int)):
        raise HarnessError(f"{f}: not a sharing status file")
    for n, v in st["vms"].items():
        if not isinstance(v, dict) or not all(isinstance(v.get(k), int) for k in
                                              ("hinted", "merged", "broken", "rejected", "changed")):
            raise HarnessError(f"{f}: bad figures for VM {n!r}")
    return st


def _share_status_path(domain: str) -> Path:
    from harness.paths import runtime_dir

    return runtime_dir() / f"share-{domain}.json"


def cmd_share(args: argparse.Namespace) -> int:
    """Run the sharing engine in the foreground over background VMs."""
    from harness.config import DOMAIN_HELP, check_domain_name
    from harness.memfd import start_time
    from harness.paths import write_private
    from harness.sharing.engine import Member, SharingEngine
    from harness.vm import find_state

    if args.domain is None:
        raise HarnessError(f"satori share needs --domain NAME: sharing is opt-in, and {DOMAIN_HELP}. "
                           f"Give the VMs that trust each other a domain name, e.g. "
                           f"satori share {' '.join(args.names)} --domain trusted")
    check_domain_name(args.domain)  # before it names the store and the status file
    _cleanup_quietly()
    members = [Member.from_state(find_state(n)) for n in args.names]
    status = _share_status_path(args.domain)
    me = {"pid": os.getpid(), "start": start_time(os.getpid())}  # who wrote it: cleanup checks
    # the status file names this engine before it opens: opening may pause a VM already (taking
    # over pages a dead engine merged), and a kill at any moment after must leave a file that
    # `satori cleanup` finds and removes
    zero = dict.fromkeys(("hinted", "merged", "broken", "rejected", "changed"), 0)
    write_private(status, json.dumps({"domain": args.domain, "vms": {n: dict(zero) for n in args.names},
                                      "store_pages": 0} | me))
    try:
        with SharingEngine(members, domain=args.domain, batch_pages=args.batch,
                           flush_interval_s=args.interval, log=print) as eng:
            print(f"sharing domain {args.domain!r}: {', '.join(args.names)}; store {eng.store_ref.path} "
                  "(Ctrl-C stops)")
            t_print = 0.0
            try:
                while True:
                    if eng.step() == 0:
                        time.sleep(0.02)
                    if time.monotonic() - t_print >= 1.0:
                        t_print = time.monotonic()
                        st = eng.stats()
                        write_private(status, json.dumps(st | me))
                        per = "  ".join(f"{n}: hinted {v['hinted']} merged {v['merged']} broken {v['broken']} "
                                        f"rejected {v['rejected'] + v['changed']}" for n, v in st["vms"].items())
                        print(f"{time.strftime('%H:%M:%S')}  store {st['store_pages']} pages  {per}", flush=True)
            except KeyboardInterrupt:
                eng.flush_all()
                print("stopped; merged pages stay merged (copy-on-write) until the VMs write or exit")
    finally:
        status.unlink(missing_ok=True)
    return 0


# ---------------------------------------------------------------- experiments


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def cmd_run(args: argparse.Namespace) -> int:
    """Run an experiment config; print the summary tables and where results and plots are.
    Exit status 1 when a run did not complete (a VM died, an error): results.json says which."""
    from harness import report
    from harness.config import load_config
    from harness.experiment import Runner

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    cfg = load_config(path)
    _cleanup_quietly()
    for note in cfg.domain_notes():
        print(note, flush=True)
    report.require_plotting()  # before booting anything, not after the last mode
    runner = Runner(cfg, path, Path(args.out) if args.out else None,
                    log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True))
    try:
        runner.run()
    finally:
        if runner.runs or runner.skipped:
            table, files = report.report(runner.out)
            print()
            print(table)
            print(f"\nresults: {runner.out}/results.json; plots and summary: "
                  + ", ".join(str(f) for f in files))
    bad = [r for r in runner.runs if r.status != "ok"]
    if bad:
        raise HarnessError(f"{len(bad)} of {len(runner.runs)} runs did not complete: "
                           + "; ".join(f"{r.mode} #{r.rep + 1}: {r.error or r.status}" for r in bad))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Per VM and per sharing domain: what `satori share` did and what the memory holds now."""
    from harness import accounting
    from harness.memfd import ProcFile
    from harness.paths import runtime_dir
    from harness.vm import load_states

    states = [s for s in load_states() if s["alive"]]
    shares = {}
    for f in runtime_dir().glob("share-*.json"):
        with contextlib.suppress(OSError, ValueError, HarnessError):
            st = read_share_status(f)
            shares[st["domain"]] = st
    while True:
        out: dict = {"vms": {}, "domains": {}}
        for dom, st in shares.items():
            names = [n for n in st["vms"] if any(s["name"] == n for s in states)]
            targets = [accounting.target_from_state(s) for s in states if s["name"] in names]
            # what the kernel says (pagemap, QEMU's mappings of the store, the store's pages):
            # no agent is asked, so none can be missed or believed
            store = ProcFile.from_dict(st["store"]) if st.get("store") else None
            sample = accounting.measure(targets, store=store) if targets else None
            d = sample.as_dict() if sample else {}
            out["domains"][dom] = {k: d.get(k) for k in ("G", "F", "C", "E", "E_disk")} | {
                "store_pages": st.get("store_pages")}
            for n, v in st["vms"].items():
                out["vms"][n] = {"domain": dom, "hinted": v["hinted"], "merged": v["merged"],
                                 "broken": v["broken"], "rejected": v["rejected"] + v["changed"]}
        for s in states:
            out["vms"].setdefault(s["name"], {"domain": None, "hinted": None, "merged": 0, "broken": 0,
                                              "rejected": None})
        if args.json:
            print(json.dumps(out, indent=2))
            return 0
        print(f"{'VM':10} {'DOMAIN':16} {'HINTED':>9} {'MERGED':>9} {'BROKEN':>8} {'REJECTED':>9}")
        for n, v in out["vms"].items():
            print(f"{n:10} {str(v['domain']):16} {v['hinted'] or 0:>9} {v['merged']:>9} {v['broken']:>8} "
                  f"{v['rejected'] or 0:>9}")
        for dom, d in out["domains"].items():
            e = "n/a" if d["E"] is None else f"{d['E']:.3f}"
            ed = "n/a" if d["E_disk"] is None else f"{d['E_disk']:.3f}"
            print(f"domain {dom}: G {d['G']} F {d['F']} C {d['C']} E {e} E_disk {ed} store {d['store_pages']} pages")
        if not shares:
            print("no sharing engine running (satori share NAME...)")
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


# ---------------------------------------------------------------- demo (main job for now)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the image, boot two VMs, show QMP status and a guest page read through the RAM file."""
    from harness.image import ensure_image
    from harness.vm import VM, VMSpec, new_run_id, start_all

    img = ensure_image()
    run = new_run_id()
    with contextlib.ExitStack() as stack:
        vms = [stack.enter_context(_managed(VM(VMSpec(n, memory_mb=args.memory), img, run_id=run)))
               for n in ("a", "b")]
        start_all(vms)
        print(vms[0].accel.line())
        for vm in vms:
            st = vm.qmp("query-status")
            kernel = vm.ssh.check("uname -r").strip()
            print(f"VM {vm.name}: booted to SSH in {vm.boot_seconds:.1f} s, QMP status {st['status']}, "
                  f"kernel {kernel}")
        for vm in vms:
            marker = secrets.token_bytes(4096)
            vm.ssh.put(marker, "/tmp/satori-marker")  # tmpfs: stays in guest RAM
            good = find_in_ram(vm.ram, marker)
            if not good:
                raise HarnessError(f"VM {vm.name}: marker page not found in guest RAM ({vm.ram.path})")
            print(f"VM {vm.name}: a 4 KiB page the guest wrote is at guest-physical 0x{good[0]:x}, "
                  f"read by the host from the RAM memfd {vm.ram.path} (xxh64 {_xxh(marker)})")
    print("both VMs shut down; their files are removed")
    return 0


@contextlib.contextmanager
def _managed(vm):
    """Shut a VM down when the block ends, however it ends."""
    try:
        yield vm
    finally:
        vm.shutdown()


def _xxh(data: bytes) -> str:
    import xxhash

    return xxhash.xxh64(data).hexdigest()


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit status 1 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def _number(kind: type, low: float, inclusive: bool = True):
    """An argparse type: an int or float >= ``low`` (> ``low`` when not ``inclusive``)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if v != v or v < low or (v == low and not inclusive):  # NaN too
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low:g}")
        return v

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, 1)
POSITIVE_FLOAT = _number(float, 0, inclusive=False)
NONNEGATIVE_FLOAT = _number(float, 0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="satori", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    img = sub.add_parser("image", help="guest image").add_subparsers(dest="sub", required=True)
    b = img.add_parser("build", help="build (or reuse) the guest image")
    b.add_argument("--recipe", help="recipe YAML (default: images/bookworm.yaml)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=cmd_image_build)

    vm = sub.add_parser("vm", help="VMs by hand").add_subparsers(dest="sub", required=True)
    up = vm.add_parser("up", help="boot a VM in the background")
    up.add_argument("name")
    up.add_argument("--memory", type=POSITIVE_INT, default=512, help="MiB (default 512)")
    up.add_argument("--vcpus", type=POSITIVE_INT, default=1)
    up.add_argument("--image", help="image recipe (a name in images/, e.g. trixie, or a YAML path; "
                    "default: images/bookworm.yaml)")
    up.add_argument("--hints", choices=("guest", "host", "off"), default=None,
                    help="who reports the guest's disk reads: the patched guest driver, QEMU on the "
                         "host (any guest kernel), or nobody (default: guest when the image has the "
                         "driver, host otherwise)")
    up.add_argument("--no-hints", dest="hints", action="store_const", const="off", help="--hints off")
    up.add_argument("--sharing", action="store_true", help="hint ring and merge agent")
    up.set_defaults(func=cmd_vm_up)
    ls = vm.add_parser("ls", help="list VMs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_vm_ls)
    ssh = vm.add_parser("ssh", help="shell or command in a VM")
    ssh.add_argument("name")
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=cmd_vm_ssh)
    qmp = vm.add_parser("qmp", help="one QMP command, reply as JSON")
    qmp.add_argument("name")
    qmp.add_argument("qmp_command")
    qmp.add_argument("arguments", nargs="?")
    qmp.set_defaults(func=cmd_vm_qmp)
    down = vm.add_parser("down", help="stop VMs and remove their files")
    down.add_argument("names", nargs="*")
    down.add_argument("--all", action="store_true")
    down.set_defaults(func=cmd_vm_down)

    h = sub.add_parser("hints", help="live view of a VM's hint ring")
    h.add_argument("name")
    h.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    h.add_argument("--interval", type=POSITIVE_FLOAT, default=1.0)
    h.set_defaults(func=cmd_hints)

    sh = sub.add_parser("share", help="run the sharing engine over running VMs (foreground)")
    sh.add_argument("names", nargs="+")
    sh.add_argument("--domain", metavar="NAME",
                    help="required: the sharing domain these VMs form (letters, digits, '-', '_'); "
                         "sharing is opt-in, only VMs that trust each other may share (README, Security)")
    sh.add_argument("--batch", type=POSITIVE_INT, default=4096, help="pages per merge batch")
    sh.add_argument("--interval", type=POSITIVE_FLOAT, default=0.2, help="max seconds a planned merge waits")
    sh.set_defaults(func=cmd_share)

    st = sub.add_parser("status", help="per VM and per domain sharing figures now")
    st.add_argument("--json", action="store_true", help="one snapshot as JSON")
    st.add_argument("--watch", type=NONNEGATIVE_FLOAT, default=0, help="refresh every N seconds")
    st.set_defaults(func=cmd_status)

    run = sub.add_parser("run", help="run an experiment config (default: configs/quickstart.yaml)")
    run.add_argument("config", nargs="?")
    run.add_argument("--out", help="result folder (default: the config's output or results/<name>-<time>)")
    run.set_defaults(func=cmd_run)

    from harness.config import cmd_config_check, cmd_config_schema
    from harness.report import cmd_report

    cf = sub.add_parser("config", help="experiment configs").add_subparsers(dest="sub", required=True)
    ck = cf.add_parser("check", help="validate config files")
    ck.add_argument("file", nargs="+")
    ck.set_defaults(func=cmd_config_check)
    sc = cf.add_parser("schema", help="print the JSON schema of a config")
    sc.set_defaults(func=cmd_config_schema)
    rp = sub.add_parser("report", help="summary table, CSV and plots of result folders; compare several")
    rp.add_argument("dirs", nargs="+")
    rp.set_defaults(func=cmd_report)

    cl = sub.add_parser("cleanup", help="remove what killed runs left, restore the settings they changed")
    cl.set_defaults(func=cmd_cleanup)

    demo = sub.add_parser("demo", help="build the image, boot two VMs, read a guest page from the host")
    demo.add_argument("--memory", type=POSITIVE_INT, default=512)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # nothing the harness creates is readable by another user
    args = build_parser().parse_args(argv)
    _sigterm_to_interrupt()
    t0 = time.monotonic()
    try:
        return int(args.func(args) or 0)
    except HarnessError as e:
        _err(e.message)
        if e.context:
            print(e.context, file=sys.stderr)
        if args.verbose:
            raise
        return 1
    except OSError as e:  # a file or folder named on the command line, a full disk ...
        _err(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        if args.verbose:
            raise
        return 1
    except KeyboardInterrupt:
        _err(f"interrupted after {time.monotonic() - t0:.0f} s; everything started was stopped and removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
