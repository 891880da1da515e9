"""Files, folders and processes, without booting a guest: runtime and cache folders that are not
the user's are refused, planted symlinks are never followed, hostile state files are refused,
and a pid in a state file is never signalled unless it is still that VM's QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import paths, sysstate
from harness.errors import HarnessError
from harness.image import Image
from harness.memfd import start_time
from harness.vm import VM, VMSpec, load_states

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, runtime: Path, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "SATORI_RUNTIME": str(runtime), **env}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=120)


def fake_image() -> Image:
    root = Path("/img")
    return Image(root, root / "vmlinuz", root / "initrd.img", root / "rootfs.raw", root / "key",
                 "6.1.0-1-amd64", "abc", True)


@pytest.mark.parametrize("how", ["0777", "nobody", "symlink"])
def test_premade_runtime_folder_is_refused(tmp_path, how):
    rt = tmp_path / "rt"
    if how == "symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        rt.symlink_to(real)
    else:
        rt.mkdir()
        os.chmod(rt, 0o777)  # what another user makes first in /tmp
        if how == "nobody":
            os.chmod(rt, 0o700)
            os.chown(rt, 65534, 65534)
    planted = rt / "vms"
    r = cli("vm", "ls", runtime=rt)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "runtime folder" in r.stderr and "refusing" in r.stderr and "Traceback" not in r.stderr
    assert not planted.exists()  # nothing created in it
    # the cache folder: the same rule
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    old = os.environ.get("SATORI_CACHE")
    os.environ["SATORI_CACHE"] = str(cache)
    try:
        with pytest.raises(HarnessError, match="cache folder .* writable by group or others"):
            paths.cache_dir()
    finally:
        if old is None:
            del os.environ["SATORI_CACHE"]
        else:
            os.environ["SATORI_CACHE"] = old


def test_default_runtime_folder_of_root_is_run_satori(monkeypatch):
    monkeypatch.delenv("SATORI_RUNTIME", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    if os.geteuid() == 0:
        assert paths.default_runtime_dir() == Path("/run/satori")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.default_runtime_dir() == Path("/run/user/1000/satori")


def test_write_private_replaces_a_planted_symlink_and_never_follows_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "share-x.json"
    link.symlink_to(victim)
    paths.write_private(link, "{}")
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == "{}"
    assert link.stat().st_mode & 0o777 == 0o600
    link.unlink()
    link.symlink_to(victim)
    with pytest.raises(OSError):  # reading never follows one either
        paths.read_private(link)


def test_planted_symlinks_at_system_state_files_are_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("65530\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sysctl = tmp_path / "max_map_count"
    sysctl.write_text("100\n")
    (state / "max_map_count.lock").symlink_to(victim)
    with pytest.raises(OSError):  # O_NOFOLLOW: the lock is not taken through a link
        sysstate.raise_max_map_count(1000, sysctl, state)
    (state / "max_map_count.lock").unlink()
    (state / "max_map_count.json").symlink_to(victim)
    with pytest.raises(HarnessError, match="unreadable"):
        sysstate.raise_max_map_count(1000, sysctl, state)
    assert victim.read_text() == "65530\n" and sysctl.read_text() == "100\n"


def test_planted_symlink_as_vms_folder_or_vm_folder_is_refused(tmp_path, monkeypatch):
    rt = tmp_path / "rt"
    monkeypatch.setenv("SATORI_RUNTIME", str(rt))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    paths.runtime_dir()
    (rt / "vms").symlink_to(elsewhere)
    with pytest.raises(HarnessError, match="not a folder"):
        load_states()
    (rt / "vms").unlink()
    # a VM folder planted where a VM would be made: launch refuses it before touching anything
    vm = VM(VMSpec("planted"), fake_image(), run_id="r1")
    vm.paths.work.symlink_to(elsewhere)
    with pytest.raises(HarnessError, match="exists"):
        vm._check_inputs = lambda: None  # no QEMU or image needed to get to the folder
        vm.accel = object()
        vm.launch()
    assert list(elsewhere.iterdir()) == []


def _plant_state(rt: Path, vm_name: str, vm_pid: int, override: dict | None = None) -> Path:
    """A state.json exactly as the harness writes it, naming ``pid`` (not a QEMU of ours)."""
    old = os.environ["SATORI_RUNTIME"]
    os.environ["SATORI_RUNTIME"] = str(rt)
    try:
        vm = VM(VMSpec(vm_name), fake_image(), run_id="r1")
        vm.paths.work.mkdir(parents=True)
        vm.pid, vm.start_time = vm_pid, start_time(vm_pid)
        vm._save_state()
    finally:
        os.environ["SATORI_RUNTIME"] = old
    if override:
        s = json.loads(vm.paths.state.read_text())
        s.update(override)
        vm.paths.state.write_text(json.dumps(s))
    return vm.paths.work


def test_pid_reuse_is_never_killed(tmp_path):
    """A state.json naming an unrelated live process (its real start time, even a QEMU-looking
    exe): `vm down` must not signal it."""
    victim = subprocess.Popen(["sleep", "600"])
    try:
        rt = tmp_path / "rt"
        w1 = _plant_state(rt, "reused", victim.pid)
        w2 = _plant_state(rt, "faked", victim.pid, {"exe": "/usr/bin/qemu-system-x86_64"})
        r = cli("vm", "ls", "--json", runtime=rt)
        assert r.returncode == 0, r.stderr
        assert [s["status"] for s in json.loads(r.stdout)] == ["dead", "dead"]
        r = cli("vm", "down", "--all", runtime=rt)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        assert victim.poll() is None, "vm down killed an unrelated process"
        assert not w1.exists() and not w2.exists()  # its files are removed, the process is not
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("bad", [
    {"rm": "/"},  # unknown key
    {"pid": "1"},  # wrong type
    {"name": "../../etc"},  # a name that is a path
    {"memfiles": {"ram": {"pid": 1, "fd": 3, "name": "/etc/shadow", "start": 1, "size": 1}}},
    {"attached": {"merge-agent": {"socket": ["x"]}}},
])
def test_hostile_state_json_is_refused(tmp_path, bad):
    victim = subprocess.Popen(["sleep", "600"])
    try:
        rt = tmp_path / "rt"
        work = _plant_state(rt, "hostile", victim.pid, bad)
        r = cli("vm", "ls", runtime=rt)
        assert r.returncode == 0 and "ignored:" in r.stdout, r.stdout + r.stderr
        r = cli("vm", "down", "--all", runtime=rt)
        assert r.returncode == 0
        assert victim.poll() is None and work.exists()  # nothing acted on it
        r = cli("vm", "down", "hostile", runtime=rt)
        assert r.returncode == 1 and "no VM named" in r.stderr
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_vm_name_checked_before_anything_is_built(tmp_path):
    r = cli("vm", "up", "../x y", runtime=tmp_path / "rt", SATORI_CACHE=str(tmp_path / "nocache"))
    assert r.returncode == 1 and "letters, digits" in r.stderr
    assert not (tmp_path / "nocache").exists()  # no image build started


def test_cleanup_removes_status_files_of_dead_engines(tmp_path, monkeypatch):
    rt = tmp_path / "rt"
    monkeypatch.setenv("SATORI_RUNTIME", str(rt))
    dead = subprocess.Popen(["true"])
    dead.wait()
    paths.write_private(paths.runtime_dir() / "share-gone.json",
                        json.dumps({"pid": dead.pid, "start": 1, "domain": "gone", "vms": {}}))
    paths.write_private(paths.runtime_dir() / "share-live.json",
                        json.dumps({"pid": os.getpid(), "start": start_time(os.getpid()),
                                    "domain": "live", "vms": {}}))
    r = cli("cleanup", runtime=rt)
    assert r.returncode == 0, r.stderr
    assert "share-gone.json" in r.stdout and "share-live.json" not in r.stdout
    assert not (rt / "share-gone.json").exists() and (rt / "share-live.json").exists()


def test_cleanup_removes_vm_folders_a_kill_left_without_state(tmp_path, monkeypatch):
    """A harness killed between making a VM folder and writing its state.json: the folder goes
    once it is a minute old and no process names its QMP socket; one still named (a QEMU being
    started, or orphaned) and a fresh one stay."""
    rt = tmp_path / "rt"
    monkeypatch.setenv("SATORI_RUNTIME", str(rt))
    from harness.vm import VMPaths, vms_dir

    made = {}
    for name in ("old", "used", "new"):
        work = vms_dir() / f"r1-{name}"
        os.mkdir(work, 0o700)
        (work / "qemu.log").write_text("")
        made[name] = work
    for name in ("old", "used"):
        os.utime(made[name], (time.time() - 120, time.time() - 120))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               str(VMPaths.in_folder(made["used"]).qmp)])
    try:
        r = cli("cleanup", runtime=rt)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert f"removed {made['old']}" in r.stdout, r.stdout
    assert not made["old"].exists() and made["used"].exists() and made["new"].exists()
    assert f"left alone: {made['used']}: no state.json" in r.stdout, r.stdout


def test_store_out_of_memory_loses_only_unwritten_pages(monkeypatch):
    """ENOSPC/ENOMEM writing the store: a clear StoreFull naming the slots not written; the
    pages written before are intact and the store keeps working."""
    import errno

    from harness.sharing import store as store_mod
    from harness.sharing.store import PAGE, ContentStore, StoreFull

    s = ContentStore("satori-test-full")
    try:
        pages = [bytes([i]) * PAGE for i in range(1, 9)]
        for p in pages[:3]:
            s.append(p)
        s.sync()
        for p in pages[3:]:
            s.append(p)
        real = os.pwritev
        monkeypatch.setattr(store_mod.os, "pwritev",
                            lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
        with pytest.raises(StoreFull, match="out of memory") as ei:
            s.sync()
        assert (ei.value.first, ei.value.end) == (3, 8) and s.live == 3
        monkeypatch.setattr(store_mod.os, "pwritev", real)
        assert [s.read(i) for i in range(3)] == pages[:3]
        slot = s.append(b"\x09" * PAGE)
        assert slot == 8 and s.read(8) == b"\x09" * PAGE
    finally:
        s.close()


def test_store_write_failure_merges_nothing_and_loses_nothing(monkeypatch):
    """The host has no memory for the store pages of a batch (the core's write fails with
    ENOSPC/ENOMEM): nothing is sent to the agent, the books go back to the agent's word, the
    failure is counted and shown; once memory is back the same pages merge."""
    import random

    import xxhash
    from test_core import World, native, records
    from test_engine_unit import links_for

    from harness.sharing.breaks import BreakChecker
    from harness.sharing.core import CoreError
    from harness.sharing.scheduler import MergeScheduler

    PAGE = 4096
    w = World(native, nvms=2, npages=64)
    try:
        links = links_for(w)
        log: list[str] = []
        breaks = BreakChecker(w.core, links, 1.0, log.append)
        sched = MergeScheduler(w.core, breaks, 4096, 0.2, log.append)
        pages = [random.Random(5).randbytes(PAGE) for _ in range(10)]
        recs = records([(k * PAGE, xxhash.xxh64_intdigest(pg)) for k, pg in enumerate(pages)])

        def hint_all() -> None:
            for vm in (0, 1):
                w.core.ingest(vm, recs, 1)

        for vm in (0, 1):
            for k, pg in enumerate(pages):
                w.write(vm, k, pg)
        hint_all()
        real = w.core.sync

        def full() -> None:
            raise CoreError("sharing core: writing the content store: No space left on device (ENOSPC)")

        monkeypatch.setattr(w.core, "sync", full)
        for link in links:
            sched.flush(link)
        assert w.mapped == [{}, {}]  # no agent was asked to map a page the store does not hold
        assert sum(link.c.not_stored for link in links) >= 1
        assert any("ENOSPC" in (link.last_error or "") for link in links)
        assert any("not merged" in m for m in log)
        assert all(w.read(vm, k) == pages[k] for vm in (0, 1) for k in range(10))
        monkeypatch.setattr(w.core, "sync", real)
        hint_all()  # memory is back: the guests' next reads merge
        for link in links:
            sched.flush(link)
        assert w.mapped[0] and w.mapped[1]
        assert all(w.read(vm, k) == pages[k] for vm in (0, 1) for k in range(10))
    finally:
        w.close()


def test_not_enough_host_memory_is_a_clear_error_before_boot(tmp_path, monkeypatch):
    from harness import vm as vm_mod

    monkeypatch.setenv("SATORI_RUNTIME", str(tmp_path / "rt"))
    from harness.sharing.attach import sharing_attachments

    vms = [VM(VMSpec(f"m{i}", memory_mb=2048), fake_image(), run_id="r",
              attachments=sharing_attachments(hints=True, agent=True)) for i in range(3)]
    assert vms[0].host_memory() == (2048 << 20) + (4 << 20) + (64 << 20)
    monkeypatch.setattr(vm_mod, "_mem_available", lambda: 4 << 30)
    with pytest.raises(HarnessError, match=r"not enough host memory: the VMs need 6348 MB"):
        vm_mod.check_host_room(vms)
    monkeypatch.setattr(vm_mod, "_mem_available", lambda: 64 << 30)
    vm_mod.check_host_room(vms)  # enough
    monkeypatch.setattr(vm_mod, "DISK_PER_VM", 1 << 60)
    with pytest.raises(HarnessError, match="not enough room in"):
        vm_mod.check_host_room(vms)
    assert not any(v.paths.work.exists() for v in vms)  # checked before anything is made


def test_cached_library_the_harness_did_not_build_is_rebuilt(tmp_path, monkeypatch):
    """A satori_agent.so in the cache that is not the one the harness built (changed bytes,
    writable by others, no recorded hash, a symlink) is rebuilt, never handed to QEMU."""
    from harness.sharing import agent as agent_mod

    monkeypatch.setenv("SATORI_CACHE", str(tmp_path / "cache"))
    lib = agent_mod.ensure_agent()
    good = lib.read_bytes()
    assert agent_mod.built_here(lib) and lib.stat().st_mode & 0o777 == 0o700

    def tampered(how: str) -> None:
        if how == "bytes":
            lib.write_bytes(good[:-16] + b"\0" * 16)
        elif how == "mode":
            os.chmod(lib, 0o777)
        elif how == "hash":
            lib.with_name(lib.name + ".sha256").unlink()
        elif how == "symlink":
            other = tmp_path / "evil.so"
            other.write_bytes(good)
            lib.unlink()
            lib.symlink_to(other)

    for how in ("bytes", "mode", "hash", "symlink"):
        tampered(how)
        assert not agent_mod.built_here(lib), how
        again = agent_mod.ensure_agent()
        assert again == lib and agent_mod.built_here(lib) and not lib.is_symlink(), how
        assert lib.read_bytes() == good, how


def test_agent_connection_interrupted_mid_request_is_never_reused(tmp_path):
    """Ctrl-C between a request and its reply: the next request must not read the old reply
    (a MERGE reply read as a LIST decides which store pages get freed)."""
    import socket as sock_mod
    import threading

    from harness.sharing.agent import AgentClient

    path = tmp_path / "a.sock"
    srv = sock_mod.socket(sock_mod.AF_UNIX, sock_mod.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    conns = []
    threading.Thread(target=lambda: conns.append(srv.accept()[0]), daemon=True).start()
    c = AgentClient(path, timeout=30)

    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            c.ping()  # the fake agent never answers
        assert c._sock is None, "an interrupted connection was kept"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        c.close()
        for s in conns:
            s.close()
        srv.close()
