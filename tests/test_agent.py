"""Merge agent (harness/sharing/agent.c) and its client, against real paused QEMU processes.

The QEMUs run with ``-S`` (no guest code runs), so nothing races with the pages the test writes
into the RAM file. Reading PFNs from pagemap, /proc/<pid>/mem writes and vm.max_map_count need
root; the integration tests skip without it.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from harness import memfd
from harness.errors import AgentError, ToolMissing
from harness.sharing import agent as agent_mod
from harness.sharing.agent import (
    MAGIC,
    PAGE,
    AgentClient,
    AgentRequestError,
    MergeResult,
    Op,
    agent_env,
    ensure_agent,
)
from harness.vm import own_memfds

QEMU = shutil.which("qemu-system-x86_64")
RAM_MB = 256
IS_ROOT = os.geteuid() == 0

needs_qemu = pytest.mark.skipif(
    QEMU is None or not IS_ROOT, reason="needs qemu-system-x86_64 and root"
)


# ------------------------------------------------------------------------------ helpers


def page_of(tag: int, salt: int = 0) -> bytes:
    """A 4 KiB page whose content depends on tag (and a salt), never all zeros."""
    head = struct.pack("<QQ", tag + 1, salt ^ 0x5A7051)
    return (head * (PAGE // len(head)))[:PAGE]


def read_mem(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        return os.pread(f.fileno(), n, addr)


def write_mem(pid: int, addr: int, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        assert os.pwrite(f.fileno(), data, addr) == len(data)


def pagemap(pid: int | str, addr: int) -> int:
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        return struct.unpack("<Q", os.pread(f.fileno(), 8, (addr // PAGE) * 8))[0]


def pfn(entry: int) -> int:
    assert entry >> 63, "page not present"
    return entry & ((1 << 55) - 1)


def is_hole(fd: int, off: int) -> bool:
    """True if the file page at off is a hole (punched / never written)."""
    try:
        return os.lseek(fd, off, os.SEEK_DATA) != off
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after off at all
            return True
        raise


def maps_lines(pid: int, needle: str) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [ln for ln in f if needle in ln]


def sigterm_caught(pid: int) -> bool:
    """QEMU has installed its SIGTERM handler, i.e. finished starting: a SIGTERM before that
    kills it outright (no clean exit, so the agent's destructor does not remove its socket)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def map_count(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


class Store:
    """A content store memfd (as the engine makes it), written page by page. ``path`` is how
    the agent opens it (``/proc/<test pid>/fd/<n>``), ``label`` how it shows in a maps list."""

    def __init__(self, name: str) -> None:
        self.fd = memfd.create(name, 0)
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.label = f"/memfd:{name} (deleted)"
        self.npages = 0

    def append(self, pages: list[bytes]) -> int:
        off = self.npages * PAGE
        os.pwrite(self.fd, b"".join(pages), off)
        self.npages += len(pages)
        return off

    def read(self, off: int, n: int = PAGE) -> bytes:
        return os.pread(self.fd, n, off)

    def close(self) -> None:
        os.close(self.fd)


class VM:
    """One paused QEMU with the agent preloaded; the host's view of its RAM file."""

    def __init__(
        self, name: str, rundir: Path, anon: bool = False, ram_fd_at: int | None = None
    ) -> None:
        self.anon = anon
        self.sock = rundir / f"{name}.sock"
        fds: tuple[int, ...] = ()
        preexec, placeholder = None, None
        if anon:  # satori+ksm mode: anonymous RAM, no file
            env = {**os.environ, **agent_env(self.sock, ram_size=RAM_MB << 20)}
            backend = f"memory-backend-ram,id=ram0,size={RAM_MB}M,merge=on"
        else:  # as the harness does it: a memfd QEMU inherits, named by its fd number
            self.ram_fd = memfd.create(f"satori-test-{name}-ram", RAM_MB << 20)
            fds = (self.ram_fd,)
            self.mem_path = f"/proc/self/fd/{self.ram_fd}"
            if ram_fd_at is not None:  # QEMU gets the memfd at this descriptor number
                fds, src = (ram_fd_at,), self.ram_fd
                self.mem_path = f"/proc/self/fd/{ram_fd_at}"
                try:  # pass_fds wants it open here too: a placeholder while spawning if free
                    os.fstat(ram_fd_at)
                except OSError:
                    placeholder = os.dup2(src, ram_fd_at, inheritable=False)

                def preexec() -> None:  # runs in the child before the descriptors are closed
                    os.dup2(src, ram_fd_at, inheritable=True)

            self.label = f"/memfd:satori-test-{name}-ram (deleted)"
            env = {**os.environ, **agent_env(self.sock, self.mem_path)}
            backend = (
                f"memory-backend-file,id=ram0,share=on,mem-path={self.mem_path},size={RAM_MB}M"
            )
        cmd = [
            QEMU, "-machine", "pc,accel=tcg", "-m", str(RAM_MB),
            "-object", backend,
            "-machine", "memory-backend=ram0",
            "-nographic", "-S", "-nodefaults", "-display", "none",
        ]  # fmt: skip
        self.log = open(rundir / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=fds, preexec_fn=preexec,
        )  # fmt: skip
        if placeholder is not None:
            os.close(placeholder)
        self.pid = self.proc.pid
        self.client = AgentClient(self.sock, timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the agent answers at once; QEMU maps RAM a little later
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(rundir / f'{name}.log').read_text()}")
            st = self.client.stats()
            if st["ram_found"] == 1 and sigterm_caught(self.pid):
                break
            assert time.monotonic() < deadline, "QEMU never mapped its RAM"
            time.sleep(0.05)
        self.base = int(st["ram_base"])
        assert st["ram_size"] == RAM_MB << 20
        assert st["ram_kind"] == ("anon" if anon else "file")
        if not anon:
            self.ram = mmap.mmap(self.ram_fd, RAM_MB << 20)

    def hva(self, goff: int) -> int:
        return self.base + goff

    def write_pages(self, goff: int, pages: list[bytes]) -> None:
        data = b"".join(pages)
        if self.anon:
            write_mem(self.pid, self.hva(goff), data)
        else:
            self.ram[goff : goff + len(data)] = data

    def guest_read(self, goff: int, n: int = PAGE) -> bytes:
        """What the guest sees (QEMU's own mapping), read through /proc/<pid>/mem."""
        return read_mem(self.pid, self.hva(goff), n)

    def stop(self) -> None:
        self.client.close()
        if not self.anon:
            self.ram.close()
            os.close(self.ram_fd)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def world(tmp_path):
    """Factory for VMs and stores; afterwards no QEMU, socket or memfd remains."""
    run = secrets.token_hex(4)
    vms: list[VM] = []
    stores: list[Store] = []

    class World:
        def vm(self, anon: bool = False, ram_fd_at: int | None = None) -> VM:
            v = VM(f"{run}-{len(vms)}", tmp_path, anon, ram_fd_at)
            vms.append(v)
            return v

        def store(self) -> Store:
            s = Store(f"satori-test-{run}-store{len(stores)}")
            stores.append(s)
            return s

    yield World()

    for v in vms:
        v.stop()
    for s in stores:
        s.close()
    codes = {v.pid: v.proc.returncode for v in vms}
    sockets = [v.sock for v in vms if v.sock.exists()]
    for p in sockets:
        p.unlink()
    alive = [v.pid for v in vms if v.proc.poll() is None]
    assert not alive, f"QEMU still running: {alive}"
    # memfds die with their last holder; the agent removes its socket when QEMU exits normally
    # (SIGTERM), so none may be left.
    held = [m for m in own_memfds() if f"satori-test-{run}" in m]
    assert not held, f"memfds still open: {held}"
    assert not sockets, f"agent sockets left after SIGTERM: {sockets}, exit codes {codes}"


# ---------------------------------------------------------------------------- unit tests


def test_compile_cache_second_call_is_noop(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_CACHE", str(tmp_path))
    lib = ensure_agent()
    assert lib.is_file()
    assert lib.parent.parent == tmp_path / "agent"
    assert len(lib.parent.name) == 16
    mtime = lib.stat().st_mtime_ns

    def no_compile(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(agent_mod.subprocess, "run", no_compile)
    assert ensure_agent() == lib
    assert lib.stat().st_mtime_ns == mtime


def test_missing_compiler_names_gcc(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(agent_mod.shutil, "which", lambda name: None)
    with pytest.raises(ToolMissing, match="gcc"):
        ensure_agent()


def test_compile_error_carries_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "agent.c"
    bad.write_text("int main(void) { return undefined_thing; }\n")
    monkeypatch.setattr(agent_mod, "agent_source", lambda: bad)
    with pytest.raises(AgentError) as ei:
        ensure_agent()
    assert "undefined_thing" in str(ei.value)
    assert not list((tmp_path / "cache").rglob("*.so*"))


def test_agent_env():
    env = agent_env("/tmp/x.sock", "/proc/self/fd/5")
    assert env["LD_PRELOAD"].split(":")[0] == str(ensure_agent())
    assert env["SATORI_AGENT_SOCKET"] == "/tmp/x.sock"
    assert env["SATORI_AGENT_MEMPATH"] == "/proc/self/fd/5"
    anon = agent_env("/tmp/x.sock", ram_size=1 << 30)
    assert anon["SATORI_AGENT_RAMSIZE"] == str(1 << 30) and "SATORI_AGENT_MEMPATH" not in anon
    with pytest.raises(AgentError):
        agent_env("/tmp/x.sock")


def test_agent_scrubs_its_env_for_child_processes(tmp_path):
    """Programs QEMU starts (helpers, scripts) must not load the agent or see its socket."""
    sock = tmp_path / "s.sock"
    env = {**os.environ, **agent_env(sock, "/proc/self/fd/5")}
    env["LD_PRELOAD"] = f"/nonexistent-other.so:{env['LD_PRELOAD']}"
    script = 'echo "$LD_PRELOAD|$SATORI_AGENT_SOCKET|$SATORI_AGENT_MEMPATH"; test -S "$1"'
    r = subprocess.run(["sh", "-c", script, "sh", str(sock)], env=env, capture_output=True)
    assert r.stdout.decode().strip() == "/nonexistent-other.so||"
    assert r.returncode == 0, "the socket existed while sh ran"
    sock.unlink(missing_ok=True)  # dash leaves by _exit(): no destructor ran


def test_inert_without_socket_and_no_ram_outside_qemu(tmp_path):
    """Preloaded without SATORI_AGENT_SOCKET the library does nothing; in a process without the
    RAM mapping, merge requests fail cleanly and the agent keeps serving."""
    lib = str(ensure_agent())
    r = subprocess.run(["true"], env={**os.environ, "LD_PRELOAD": lib}, capture_output=True)
    assert r.returncode == 0 and r.stderr == b""
    sock = tmp_path / "a.sock"
    env = {**os.environ, **agent_env(sock, str(tmp_path / "satori-test-does-not-exist"))}
    proc = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    try:
        with AgentClient(sock) as c:
            assert c.ping()["pid"] == proc.pid
            assert c.stats()["ram_found"] == 0
            with pytest.raises(AgentRequestError) as ei:
                c.merge([(0, 0)])
            assert ei.value.errno == errno.ENOENT
            assert c.stats()["bad_requests"] == 1
    finally:
        proc.kill()
        proc.wait()
        sock.unlink(missing_ok=True)  # SIGKILL: no destructor ran


# --------------------------------------------------------------------- integration tests


@pytest.mark.integration
@needs_qemu
def test_merge_punches_maps_store_and_skips_mismatches(world):
    vm = world.vm()
    store = world.store()
    goff0 = 16 << 20
    n = 64
    guest = [page_of(i) for i in range(n)]
    vm.write_pages(goff0, guest)
    # the store holds the same pages in the same order, except every 5th page differs
    differ = {i for i in range(n) if i % 5 == 0}
    soff0 = store.append([page_of(i, salt=1) if i in differ else guest[i] for i in range(n)])
    blocks_before = os.fstat(vm.ram_fd).st_blocks
    maps_before = map_count(vm.pid)

    assert vm.client.open_store(store.path) == n * PAGE
    pairs = np.array([(goff0 + i * PAGE, soff0 + i * PAGE) for i in range(n)], dtype=np.uint64)
    res = vm.client.merge(pairs)
    merged = [i for i in range(n) if i not in differ]
    assert (res.merged, res.mismatched, res.failed) == (len(merged), len(differ), 0)
    assert res.mmap_calls == len(differ)  # 13 runs of 4 (and 3) pages between the mismatches
    assert res.elapsed_ns > 0

    # the host's view of the RAM file: merged pages are holes now, mismatched pages are not
    assert os.fstat(vm.ram_fd).st_blocks == blocks_before - len(merged) * (PAGE // 512)
    for i in range(n):
        assert is_hole(vm.ram_fd, goff0 + i * PAGE) == (i not in differ), i
        if i in differ:
            assert vm.ram[goff0 + i * PAGE : goff0 + (i + 1) * PAGE] == guest[i]
    # the guest's view: store bytes where merged, its own bytes elsewhere
    for i in range(n):
        assert vm.guest_read(goff0 + i * PAGE) == guest[i]
        e = pagemap(vm.pid, vm.hva(goff0 + i * PAGE))
        assert bool((e >> 61) & 1), "file-backed (store page cache or RAM file)"
    store_maps = maps_lines(vm.pid, store.label)
    assert len(store_maps) == len(differ) + 1  # 13 remapped runs + the agent's read view
    with open(f"/proc/{vm.pid}/smaps") as f:
        smaps = f.read()
    remapped = [ln for ln in store_maps if " rw-p " in ln]
    assert len(remapped) == len(differ)
    assert map_count(vm.pid) > maps_before

    # MADV_DONTFORK re-applied on the remapped ranges
    chunks = smaps.split(store.label)
    flags = [c.split("VmFlags:")[1].split("\n")[0] for c in chunks[1:]]
    rw_flags = [f for f, ln in zip(flags, store_maps, strict=True) if " rw-p " in ln]
    assert all(" dc" in f for f in rw_flags), rw_flags

    ranges = vm.client.merged_ranges()
    assert int(ranges[:, 2].sum()) == len(merged)
    assert ranges.shape == (len(differ), 3)
    st = vm.client.stats()
    assert st["merged_pages"] == len(merged) and st["merged_ranges"] == len(differ)
    assert st["merged_total"] == len(merged) and st["mismatched_total"] == len(differ)
    assert st["punch_errors"] == 0 and st["madvise_errors"] == 0

    # the store grows (append-only): new pages merge without reopening
    extra = [page_of(1000 + i) for i in range(8)]
    vm.write_pages(goff0 + n * PAGE, extra)
    soff1 = store.append(extra)
    res2 = vm.client.merge([(goff0 + (n + i) * PAGE, soff1 + i * PAGE) for i in range(8)])
    assert (res2.merged, res2.mmap_calls) == (8, 1)

    # unmerge: bytes unchanged, the RAM file holds them again, QEMU's mapping is whole again
    un = vm.client.unmerge(goff0, n + 8)
    assert (un.restored, un.failed) == (len(merged) + 8, 0)
    for i in range(n):
        assert vm.guest_read(goff0 + i * PAGE) == guest[i]
        assert vm.ram[goff0 + i * PAGE : goff0 + (i + 1) * PAGE] == guest[i]
        assert not is_hole(vm.ram_fd, goff0 + i * PAGE)
    assert vm.guest_read(goff0 + n * PAGE, 8 * PAGE) == b"".join(extra)
    assert len([ln for ln in maps_lines(vm.pid, store.label) if " rw-p " in ln]) == 0
    assert len(maps_lines(vm.pid, vm.label)) == 1, "RAM VMAs did not merge back"
    assert len(vm.client.merged_ranges()) == 0
    assert vm.client.stats()["merged_pages"] == 0


@pytest.mark.integration
@needs_qemu
def test_two_vms_share_store_frames_and_copy_on_write(world):
    a, b = world.vm(), world.vm()
    store = world.store()
    n = 32
    pages = [page_of(i, salt=7) for i in range(n)]
    soff = store.append(pages)
    goff_a, goff_b = 8 << 20, 40 << 20  # different guest addresses, same content
    a.write_pages(goff_a, pages)
    b.write_pages(goff_b, pages)
    for vm, goff in ((a, goff_a), (b, goff_b)):
        vm.client.open_store(store.path)
        res = vm.client.merge(np.array([(goff + i * PAGE, soff + i * PAGE) for i in range(n)]))
        assert (res.merged, res.mismatched, res.failed, res.mmap_calls) == (n, 0, 0, 1)

    # the store file's own frames, as the host sees them
    sm = mmap.mmap(store.fd, n * PAGE, prot=mmap.PROT_READ)
    try:
        store_base = np.frombuffer(sm, dtype=np.uint8).ctypes.data
        assert sum(sm[i * PAGE] for i in range(n)) > 0  # fault them in
        store_pfns = [pfn(pagemap("self", store_base + i * PAGE)) for i in range(n)]
    finally:
        sm.close()
    # each QEMU faults the pages in by a read; both then map exactly the store's frames
    for vm, goff in ((a, goff_a), (b, goff_b)):
        assert vm.guest_read(goff, n * PAGE) == b"".join(pages)
        got = [pfn(pagemap(vm.pid, vm.hva(goff + i * PAGE))) for i in range(n)]
        assert got == store_pfns

    # copy-on-write: a write into A's merged page changes only A's view
    k = 5
    new = page_of(999, salt=3)
    write_mem(a.pid, a.hva(goff_a + k * PAGE), new)
    assert a.guest_read(goff_a + k * PAGE) == new
    assert b.guest_read(goff_b + k * PAGE) == pages[k]
    assert store.read(soff + k * PAGE) == pages[k]
    e = pagemap(a.pid, a.hva(goff_a + k * PAGE))
    assert not (e >> 61) & 1, "A's written page is anonymous now"
    assert pfn(e) != store_pfns[k]
    assert pfn(pagemap(b.pid, b.hva(goff_b + k * PAGE))) == store_pfns[k]
    # the agent still lists the range it mapped; with exclude_private the broken page drops out
    assert vm_ranges(a, False) == [(goff_a, soff, n)]
    assert vm_ranges(a, True) == [
        (goff_a, soff, k),
        (goff_a + (k + 1) * PAGE, soff + (k + 1) * PAGE, n - k - 1),
    ]
    assert vm_ranges(b, True) == [(goff_b, soff, n)]

    # merge the broken page again: back on the store frame
    res = a.client.merge([(goff_a + k * PAGE, soff + k * PAGE)])
    assert res.mismatched == 1  # its content differs now: not merged
    write_mem(a.pid, a.hva(goff_a + k * PAGE), pages[k])
    res = a.client.merge([(goff_a + k * PAGE, soff + k * PAGE)])
    assert res.merged == 1
    assert a.guest_read(goff_a + k * PAGE) == pages[k]
    assert pfn(pagemap(a.pid, a.hva(goff_a + k * PAGE))) == store_pfns[k]

    # unmerge keeps what each guest sees
    write_mem(b.pid, b.hva(goff_b), new)
    assert b.client.unmerge(goff_b, n).restored == n
    assert b.guest_read(goff_b, n * PAGE) == new + b"".join(pages[1:])
    assert bytes(b.ram[goff_b : goff_b + PAGE]) == new


def vm_ranges(vm: VM, exclude_private: bool) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in r) for r in vm.client.merged_ranges(exclude_private)]


@pytest.mark.integration
@needs_qemu
def test_malformed_requests_get_errors_and_agent_keeps_serving(world):
    vm = world.vm()
    c = vm.client
    good_page = page_of(42)
    vm.write_pages(0, [good_page] * 4)

    def expect(code: int, fn, *args, **kw):
        with pytest.raises(AgentRequestError) as ei:
            fn(*args, **kw)
        assert ei.value.errno == code, str(ei.value)
        assert c.ping()["pid"] == vm.pid  # still serving, same connection

    expect(errno.EBADF, c.merge, [(0, 0)])  # no store open yet
    expect(errno.ENOENT, c.open_store, "/proc/self/fd/999999")
    expect(errno.EINVAL, c.open_store, "")
    expect(errno.EINVAL, c.open_store, "/proc")  # not a regular file
    store = world.store()
    soff = store.append([good_page] * 2)  # the store holds 2 pages
    assert c.open_store(store.path) == 2 * PAGE

    expect(errno.EOPNOTSUPP, c.call, 77)
    expect(errno.EPROTONOSUPPORT, c.call, Op.STATS, version=9)
    expect(errno.EINVAL, c.call, Op.MERGE, b"\0" * 15)  # not n x 16 bytes
    expect(errno.EINVAL, c.call, Op.STATS, b"x")
    expect(errno.EINVAL, c.call, Op.UNMERGE, b"\0" * 8)
    expect(errno.EINVAL, c.call, Op.LIST, struct.pack("<I", 2))
    expect(errno.EINVAL, c.merge, [(100, 0)])  # unaligned guest offset
    expect(errno.EINVAL, c.merge, [(0, 8)])  # unaligned store offset
    expect(errno.ERANGE, c.merge, [(RAM_MB << 20, 0)])  # just past the end of RAM
    expect(errno.ERANGE, c.merge, [(0, 1 << 63)])
    # a store shorter than asked: page 2 does not exist; the whole batch is refused, the valid
    # pair before it included
    expect(errno.ERANGE, c.merge, [(0, soff), (PAGE, soff + 2 * PAGE)])
    assert c.stats()["merged_pages"] == 0 and not is_hole(vm.ram_fd, 0)
    expect(errno.ERANGE, c.unmerge, RAM_MB << 20, 1)
    expect(errno.ERANGE, c.unmerge, 0, (RAM_MB << 20) // PAGE + 1)
    expect(errno.EINVAL, c.unmerge, 1, 1)
    # switching stores while pages are merged is refused
    assert c.merge([(0, soff)]).merged == 1
    other = world.store()
    other.append([good_page])
    expect(errno.EBUSY, c.open_store, other.path)
    assert c.open_store(store.path) == 2 * PAGE  # the same store again is fine
    empty = c.merge([])
    assert (empty.merged, empty.mismatched, empty.failed, empty.mmap_calls) == (0, 0, 0, 0)

    # protocol breakers close their connection; the agent serves the next one
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(vm.sock))
    raw.sendall(struct.pack("<IHHII", 0xDEADBEEF, 1, 1, 0, 0))
    hdr = raw.recv(16)
    assert struct.unpack("<IHHiI", hdr)[3] == errno.EPROTO
    assert raw.recv(4096)  # the message...
    raw.settimeout(5)
    while raw.recv(4096):  # ...then EOF
        pass
    raw.close()
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(vm.sock))
    raw.sendall(struct.pack("<IHHII", MAGIC, Op.MERGE, 1, 0, 0xFFFFFFF0))
    assert struct.unpack("<IHHiI", raw.recv(16))[3] == errno.E2BIG
    raw.close()
    raw = socket.socket(socket.AF_UNIX)  # half a request, then hang up
    raw.connect(str(vm.sock))
    raw.sendall(struct.pack("<IHHII", MAGIC, Op.MERGE, 1, 0, 32) + b"\0" * 7)
    raw.close()
    raw = socket.socket(socket.AF_UNIX)  # garbage shorter than a header
    raw.connect(str(vm.sock))
    raw.sendall(b"hello")
    raw.close()
    # the client's own connection was never disturbed, and new clients work
    assert c.merge([(PAGE, soff + PAGE)]).merged == 1
    with AgentClient(vm.sock) as c2:
        st = c2.stats()
    assert st["merged_pages"] == 2
    assert st["bad_requests"] >= 20
    assert vm.proc.poll() is None
    assert c.unmerge(0, 2).restored == 2


@pytest.mark.integration
@needs_qemu
def test_enomem_from_tiny_max_map_count_is_not_merged(world):
    vm = world.vm()
    store = world.store()
    n = 40
    pages = [page_of(i, salt=11) for i in range(n)]
    # scattered guest pages (every other page), store in reverse order: nothing coalesces,
    # every merged page splits QEMU's RAM mapping: +2 VMAs each
    goffs = [(64 << 20) + 2 * i * PAGE for i in range(n)]
    for g, p in zip(goffs, pages, strict=True):
        vm.write_pages(g, [p])
    soff = store.append(pages[::-1])
    pairs = np.array([(g, soff + (n - 1 - i) * PAGE) for i, g in enumerate(goffs)])
    vm.client.open_store(store.path)
    vm.client.ping()
    # fault in everything the agent may touch before the limit goes down (the memcmp reads)
    assert vm.guest_read(goffs[0], goffs[-1] - goffs[0] + PAGE)

    limit_path = Path("/proc/sys/vm/max_map_count")
    original = limit_path.read_text()
    payload = memoryview(np.ascontiguousarray(pairs, dtype="<u8")).cast("B")
    tiny = map_count(vm.pid) + 10  # room for about 5 isolated pages
    try:
        limit_path.write_text(str(tiny))
        body = vm.client.call(Op.MERGE, payload)
    finally:
        limit_path.write_text(original)
    assert limit_path.read_text() == original
    res = MergeResult(*struct.unpack("<6Q", body))
    assert res.failed > 0 and res.merged > 0, res
    assert res.merged + res.failed == n and res.mismatched == 0
    assert res.last_errno == errno.ENOMEM
    merged_g = {int(r[0]) for r in vm.client.merged_ranges()}
    assert len(merged_g) == res.merged
    for g, p in zip(goffs, pages, strict=True):
        assert vm.guest_read(g) == p  # merged or not, the guest sees its page
        assert is_hole(vm.ram_fd, g) == (g in merged_g)  # failed pages: not punched
    st = vm.client.stats()
    assert st["failed_total"] == res.failed and st["last_errno"] == errno.ENOMEM
    assert st["repaired"] == 0  # the kernel left the old mapping in place
    # with the limit back, the failed pages merge
    res2 = vm.client.merge(pairs)
    assert (res2.merged, res2.failed) == (n, 0)
    for g, p in zip(goffs, pages, strict=True):
        assert vm.guest_read(g) == p and is_hole(vm.ram_fd, g)
    assert vm.client.unmerge(64 << 20, 2 * n).restored == n
    assert len(maps_lines(vm.pid, vm.label)) == 1


@pytest.mark.integration
@needs_qemu
def test_anonymous_ram_backend_satori_ksm_mode(world):
    """memory-backend-ram,merge=on: the agent finds the anonymous RAM by size; merging frees
    the guest's anonymous pages (no file to punch); unmerge maps anonymous memory back."""
    vm = world.vm(anon=True)
    store = world.store()
    n = 32
    pages = [page_of(i, salt=5) for i in range(n)]
    goff = 8 << 20
    vm.write_pages(goff, pages)
    for i in range(n):
        e = pagemap(vm.pid, vm.hva(goff + i * PAGE))
        assert e >> 63 and not (e >> 61) & 1, "present, anonymous"
    soff = store.append(pages)
    vm.client.open_store(store.path)
    maps_before = map_count(vm.pid)
    res = vm.client.merge([(goff + i * PAGE, soff + i * PAGE) for i in range(n)])
    assert (res.merged, res.mismatched, res.failed, res.mmap_calls) == (n, 0, 0, 1)
    for i in range(n):  # the anonymous pages are gone: not present until read
        assert not pagemap(vm.pid, vm.hva(goff + i * PAGE)) >> 63
    assert vm.guest_read(goff, n * PAGE) == b"".join(pages)
    for i in range(n):
        assert (pagemap(vm.pid, vm.hva(goff + i * PAGE)) >> 61) & 1, "store page cache"
    new = page_of(77)
    write_mem(vm.pid, vm.hva(goff), new)  # copy-on-write
    assert vm.guest_read(goff) == new and store.read(soff) == pages[0]
    assert vm_ranges(vm, True) == [(goff + PAGE, soff + PAGE, n - 1)]
    assert vm.client.unmerge(goff, n).restored == n
    assert vm.guest_read(goff, n * PAGE) == new + b"".join(pages[1:])
    assert not [ln for ln in maps_lines(vm.pid, store.label) if " rw-p " in ln]
    st = vm.client.stats()
    # pause-free (wp=1), the bytes are moved in with mremap, in one step: the moved pages keep
    # their own anon_vma, so that range stays a VMA of its own (2 more than before); held vCPUs
    # (wp=0) allow mapping fresh memory and copying, and the RAM VMA heals
    extra = 2 if st["wp"] else 0
    assert map_count(vm.pid) == maps_before + extra, "the anonymous RAM VMA did not heal"

    assert st["merged_pages"] == 0 and st["punch_errors"] == 0 and st["madvise_errors"] == 0


@pytest.mark.integration
@needs_qemu
def test_random_merge_unmerge_write_matches_model(world):
    """Random merges (runs and scattered pairs, matching or not), copy-on-write writes and
    unmerges against a model: after every step the guest sees exactly the model's bytes, the
    RAM file has holes exactly where pages are store-backed, and the agent's range list (with
    and without private pages) equals the model's."""
    rng = np.random.default_rng(20090614)
    vm = world.vm()
    store = world.store()
    npg, nslots, kinds = 256, 160, 48
    base = 32 << 20
    contents = [page_of(k, salt=99) for k in range(kinds)]
    guest = [int(k) for k in rng.integers(0, kinds, npg)]  # content id per guest page
    slots = guest[:64] + [int(k) for k in rng.integers(0, kinds, nslots - 64)]
    vm.write_pages(base, [contents[k] for k in guest])
    soff0 = store.append([contents[k] for k in slots])
    vm.client.open_store(store.path)
    tracked: dict[int, int] = {}  # guest page -> store slot, as the agent maps it
    private: set[int] = set()  # tracked pages written since (copy-on-write broken)
    fresh = kinds

    def model_ranges(exclude_private: bool) -> list[tuple[int, int, int]]:
        out: list[list[int]] = []
        for i in sorted(tracked):
            if exclude_private and i in private:
                continue
            g, s = base + i * PAGE, soff0 + tracked[i] * PAGE
            if out and out[-1][0] + out[-1][2] * PAGE == g and out[-1][1] + out[-1][2] * PAGE == s:
                out[-1][2] += 1
            else:
                out.append([g, s, 1])
        return [tuple(r) for r in out]

    def check() -> None:
        seen = vm.guest_read(base, npg * PAGE)
        for i in range(npg):
            want = contents[guest[i]] if guest[i] < kinds else page_of(guest[i], salt=1)
            assert seen[i * PAGE : (i + 1) * PAGE] == want, f"guest page {i}"
            assert is_hole(vm.ram_fd, base + i * PAGE) == (i in tracked), f"hole {i}"
        assert vm_ranges(vm, False) == model_ranges(False)
        assert vm_ranges(vm, True) == model_ranges(True)

    by_content: dict[int, list[int]] = {}
    for j, k in enumerate(slots):
        by_content.setdefault(k, []).append(j)
    merges = 0
    for _step in range(120):
        op = rng.random()
        if op < 0.55:  # merge a batch: a few runs and scattered pairs
            pairs: list[tuple[int, int]] = []
            for _ in range(int(rng.integers(1, 5))):
                if rng.random() < 0.5:
                    i, j, n = int(rng.integers(0, 64)), None, int(rng.integers(1, 12))
                    j = i if rng.random() < 0.8 else int(rng.integers(0, nslots - 12))
                    pairs += [(i + t, j + t) for t in range(n) if i + t < npg]
                else:
                    i = int(rng.integers(0, npg))
                    cands = by_content.get(guest[i], [])
                    j = (
                        int(rng.choice(cands))
                        if cands and rng.random() < 0.7
                        else int(rng.integers(0, nslots))
                    )
                    pairs.append((i, j))
            want = [0, 0]
            for i, j in pairs:  # the agent's semantics: in order, memcmp then map
                if guest[i] == slots[j]:
                    tracked[i] = j
                    private.discard(i)
                    want[0] += 1
                else:
                    want[1] += 1
            res = vm.client.merge([(base + i * PAGE, soff0 + j * PAGE) for i, j in pairs])
            assert (res.merged, res.mismatched, res.failed) == (want[0], want[1], 0)
            merges += res.merged
        elif op < 0.8:  # the guest writes a page (merged or not)
            i = int(rng.integers(0, npg))
            guest[i] = fresh
            fresh += 1
            write_mem(vm.pid, vm.hva(base + i * PAGE), page_of(guest[i], salt=1))
            if i in tracked:
                private.add(i)
        else:  # unmerge a range
            i, n = int(rng.integers(0, npg)), int(rng.integers(1, 40))
            n = min(n, npg - i)
            gone = [p for p in range(i, i + n) if p in tracked]
            res = vm.client.unmerge(base + i * PAGE, n)
            assert (res.restored, res.failed) == (len(gone), 0)
            for p in gone:
                del tracked[p]
                private.discard(p)
        check()
    assert merges > 200
    assert vm.client.unmerge(base, npg).restored == len(tracked)
    tracked.clear()
    check()
    assert len(maps_lines(vm.pid, vm.label)) == 1


@pytest.mark.integration
@needs_qemu
@pytest.mark.parametrize("fd_at", [3, 200], ids=["below-qemus-own", "above-qemus-own"])
def test_unmerge_heals_ram_into_one_mapping_whatever_descriptor_qemu_got(world, fd_at):
    """QEMU opens mem-path=/proc/self/fd/<n> itself, a new open file of the memfd, and maps
    that. The agent must map unmerged ranges back from QEMU's own descriptor, not from <n>
    (same inode, another open file: the kernel never merges the VMAs then). Which one a scan of
    /proc/self/fd met first used to depend on descriptor numbers (3 is below anything QEMU
    opens itself, 200 above): after merging every other page and unmerging them all, guest RAM
    must be one mapping again in both cases."""
    vm = world.vm(ram_fd_at=fd_at)
    store = world.store()
    base, n = 32 << 20, 16
    pages = [page_of(k, salt=7) for k in range(n)]
    vm.write_pages(base, pages)
    soff = store.append(pages)
    vm.client.open_store(store.path)
    res = vm.client.merge([(base + i * PAGE, soff + i * PAGE) for i in range(0, n, 2)])
    assert (res.merged, res.mismatched, res.failed) == (n // 2, 0, 0)
    assert len(maps_lines(vm.pid, vm.label)) == 1 + n // 2  # RAM between the store pages
    assert vm.client.unmerge(base, n).restored == n // 2
    assert vm.guest_read(base, n * PAGE) == b"".join(pages)
    assert len(maps_lines(vm.pid, vm.label)) == 1, maps_lines(vm.pid, vm.label)


# ------------------------------------------------------------ pause-free merging (uffd-wp)

WRITERS_SRC = Path(__file__).parent / "helpers" / "wp_writers.c"


@pytest.mark.integration
@pytest.mark.parametrize("tracker", [False, True], ids=["alone", "with-tracker"])
def test_pause_free_merge_keeps_racing_writes(tmp_path, tracker):
    """Writer threads inside the process that holds "guest RAM" (standing in for vCPUs) keep
    writing the very pages that are being merged, broken, re-merged and unmerged, with nothing
    stopped: every write must land (each writer checks every page against what it last wrote
    there before writing it again). The writers must have raced the merges: some waited on a
    write-protected page. BREAKS reports pages written since their merge. With a write tracker
    like the oracle's (its own userfaultfd holding all of RAM, taking back every 20 ms what the
    agent's chunks took), merging works the same and the tracker keeps getting RAM back."""
    exe = tmp_path / "wp_writers"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(exe), str(WRITERS_SRC)],
                   check=True)  # fmt: skip
    run = secrets.token_hex(4)
    npages, secs = 4096, 12.0
    ram = Path("/dev/shm") / f"satori-test-{run}-wpram"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, npages * PAGE)
    os.close(fd)
    sock = tmp_path / "w.sock"
    env = {**os.environ, **agent_env(sock, ram)}
    env.pop("SATORI_AGENT_WP", None)
    args = [str(exe), str(ram), str(npages), "2", str(secs)] + (["track"] if tracker else [])
    proc = subprocess.Popen(args, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    stores: list[Path] = []
    sfd = soff = -1
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        c = AgentClient(sock)
        st = c.stats()
        assert st["wp"] == 1, f"no pause-free merging on this kernel: {st['wp_error']}"
        base = int(st["ram_base"])
        mem = os.open(f"/proc/{proc.pid}/mem", os.O_RDONLY)
        rng = np.random.default_rng(7)
        merged = mismatched = unmerged = broken = 0
        ever_merged: set[int] = set()
        end = time.monotonic() + secs - 2
        while time.monotonic() < end:
            if sfd < 0 or soff >= 24 << 20:  # a fresh store every 24 MB (unmerge everything)
                if sfd >= 0:
                    unmerged += c.unmerge(0, npages).restored
                    os.close(sfd)
                    stores[-1].unlink()
                stores.append(Path("/dev/shm") / f"satori-test-{run}-store{len(stores)}")
                sfd = os.open(stores[-1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                soff = 0
                c.open_store(stores[-1])
            # the pages as they are now, into the store, then merged while the writers run on
            start = int(rng.integers(0, npages - 64))
            os.pwrite(sfd, os.pread(mem, 64 * PAGE, base + start * PAGE), soff)
            res = c.merge([((start + i) * PAGE, soff + i * PAGE) for i in range(64)], status=True)
            soff += 64 * PAGE
            merged += res.merged
            mismatched += res.mismatched
            assert res.failed == 0 and len(res.status) == 64
            ever_merged.update(start + i for i in np.flatnonzero(res.status == 0).tolist())
            rep = c.breaks()
            for g, _s, n in rep.ranges.tolist():
                assert all(g // PAGE + k in ever_merged for k in range(n)), (
                    "break of an unmerged page"
                )
                broken += n
        st = c.stats()
        c.close()
        os.close(mem)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sfd >= 0:
            os.close(sfd)
        for p in [ram, *stores]:
            p.unlink(missing_ok=True)
    result = dict(kv.split("=") for kv in out.split())
    assert proc.returncode == 0 and result["bad"] == "0", (out, err)
    assert int(result["writes"]) > 10_000
    assert merged > 1000 and unmerged > 0, (merged, mismatched, unmerged)
    assert st["wp_faults"] > 0, "no write ever raced a merge: the test did not test anything"
    assert st["wp_errors"] == 0, st
    assert broken > 0 and st["breaks_found"] == broken
    if tracker:  # the agent holds nothing once it stopped merging: RAM is all the tracker's
        assert int(result["track_ok"]) > 0 and result["track_last"] == "0", result


@pytest.mark.integration
@needs_qemu
def test_breaks_reports_each_write_once_and_mapped_answers_for_slots(world):
    """BREAKS looks only when QEMU took a page fault since its last look (a write by another
    process, like this test's /proc/<pid>/mem, is charged to that process: only a forced look
    sees it) and reports each broken page once; MAPPED says which store pages are still
    mapped."""
    vm = world.vm()
    store = world.store()
    n = 16
    pages = [page_of(i, salt=21) for i in range(n)]
    goff = 16 << 20
    vm.write_pages(goff, pages)
    soff = store.append(pages)
    vm.client.open_store(store.path)
    assert vm.client.merge([(goff + i * PAGE, soff + i * PAGE) for i in range(n)]).merged == n
    assert vm.guest_read(goff, n * PAGE) == b"".join(pages)  # the store pages mapped in
    assert vm.client.breaks(force=True).pages == 0
    assert vm.client.breaks().checked == 0, "QEMU (paused) took a page fault: looked anyway"
    write_mem(vm.pid, vm.hva(goff + 3 * PAGE), page_of(99))
    assert vm.client.breaks().checked == 0  # not QEMU's fault
    rep = vm.client.breaks(force=True)
    assert rep.checked == n and rep.ranges.tolist() == [[goff + 3 * PAGE, soff + 3 * PAGE, 1]]
    assert vm.client.breaks(force=True).pages == 0, "reported twice"
    st = vm.client.stats()
    assert st["merged_pages"] == n - 1 and st["breaks_found"] == 1
    asked = [soff + 3 * PAGE, soff + 4 * PAGE, soff + 64 * PAGE]
    assert vm.client.mapped(asked).tolist() == [False, True, False]
    # LIST still has every mapped range (the broken page too, without exclude_private)
    assert vm_ranges(vm, False) == [(goff, soff, n)]
    # a page merged again after its break is tracked afresh
    store.append([page_of(99)])
    assert vm.client.merge([(goff + 3 * PAGE, soff + n * PAGE)]).merged == 1
    assert vm.client.mapped([soff + n * PAGE]).tolist() == [True]
    assert vm.client.stats()["merged_pages"] == n
