"""Build the merge agent (``agent.c``, preloaded into QEMU) and talk to it over its UNIX socket.

Typical use::

    env = {**os.environ, **agent_env(sock, "/proc/self/fd/5")}  # QEMU inherits the RAM memfd as fd 5
    with AgentClient(sock) as agent:
        agent.open_store(store.ref.path)                  # /proc/<engine pid>/fd/<n>
        if not agent.pause_free():                        # wp=0: hold the vCPUs (QMP stop)
            ...
        res = agent.merge([(guest_off, store_off), ...], status=True)
        res.merged, res.mismatched, res.failed, res.status
        agent.breaks().ranges                             # pages broken since the last call

The wire protocol is described in the header comment of ``agent.c``.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from harness.errors import AgentError, HarnessError, ToolMissing
from harness.paths import cache_dir

MAGIC = 0x52544153  # "SATR" little-endian
VERSION = 1
PAGE = 4096
MAX_PAYLOAD = 64 << 20
MAX_PAIRS_PER_REQUEST = MAX_PAYLOAD // 16
CFLAGS = ("-O2", "-Wall", "-Werror", "-fPIC", "-shared", "-pthread")
LIB_NAME = "satori_agent.so"

_REQ = struct.Struct("<IHHII")  # magic, op, version, flags, len
_REP = struct.Struct("<IHHiI")  # magic, op, version, status, len


class Op(IntEnum):
    PING = 1
    OPEN_STORE = 2
    MERGE = 3
    UNMERGE = 4
    STATS = 5
    LIST = 6
    BREAKS = 7
    MAPPED = 8


LIST_EXCLUDE_PRIVATE = 1
MERGE_STATUS = 2  # MERGE flags: one status byte per pair in the reply
BREAKS_FORCE = 1  # BREAKS flags: look even if QEMU took no page fault since the last look
STATUS_MERGED, STATUS_MISMATCHED, STATUS_FAILED = 0, 1, 2


class AgentRequestError(AgentError):
    """The agent answered a request with an error; ``errno`` is its errno value."""

    def __init__(self, message: str, errno: int, context: str | None = None) -> None:
        super().__init__(message, context)
        self.errno = errno


# ------------------------------------------------------------------------------------ build


def agent_source() -> Path:
    return Path(__file__).with_name("agent.c")


def _find_compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc")):
        path = shutil.which(name)
        if path:
            return path
    return None


def agent_library_path() -> Path:
    """Where the agent built from the current source lives (it may not exist yet)."""
    return library_path(agent_source(), "agent", LIB_NAME)


def library_path(source: Path, folder: str, lib_name: str) -> Path:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return cache_dir() / folder / digest / lib_name


def ensure_agent() -> Path:
    """Compile ``agent.c`` once per source hash into the cache; return the library path."""
    return build_library(agent_source(), agent_library_path(), "the merge agent")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def built_here(lib: Path) -> bool:
    """Whether ``lib`` is a library this harness built and nobody changed since: a regular file
    (no symlink) of this user, not writable by group or others, whose SHA-256 is the one
    recorded next to it at build time. Anything else is rebuilt, never loaded."""
    import stat as stat_mod

    from harness.paths import read_private

    try:
        st = os.lstat(lib)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return False
        return read_private(lib.with_name(lib.name + ".sha256")).strip() == _sha256(lib)
    except (OSError, HarnessError):
        return False


def build_library(source: Path, out: Path, what: str) -> Path:
    """Compile one C file into a shared library at ``out`` (the cache, keyed by its source hash)
    unless a library the harness built is there already (:func:`built_here`); a missing
    compiler or a compile error is a clear error."""
    from harness.paths import private_dir, write_private

    if built_here(out):
        return out
    cc = _find_compiler()
    if cc is None:
        raise ToolMissing(
            f"no C compiler (cc or gcc) found to build {what}: install the package gcc"
        )
    private_dir(out.parent.parent, "cache folder")
    private_dir(out.parent, "cache folder")
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    cmd = [cc, *CFLAGS, "-o", str(tmp), str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp.unlink(missing_ok=True)
        raise AgentError(f"compiling {what} failed", f"{' '.join(cmd)}\n{e}") from e
    if proc.returncode != 0 or not tmp.is_file() or tmp.is_symlink():
        tmp.unlink(missing_ok=True)
        raise AgentError(
            f"compiling {what} failed",
            f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}".rstrip(),
        )
    os.chmod(tmp, 0o700)
    write_private(out.with_name(out.name + ".sha256"), _sha256(tmp) + "\n")
    os.replace(tmp, out)  # atomic: a concurrent build of the same source is harmless
    return out


def agent_env(
    socket_path: str | os.PathLike,
    mem_path: str | os.PathLike | None = None,
    *,
    ram_size: int | None = None,
) -> dict[str, str]:
    """Environment entries for a QEMU process that should run the agent.

    Give ``mem_path`` (the ``mem-path=`` of a ``memory-backend-file,share=on``) or, for an
    anonymous ``memory-backend-ram`` (satori+ksm mode), ``ram_size`` in bytes. Merge the result
    into the full environment (``{**os.environ, **agent_env(...)}``); an ``LD_PRELOAD`` already
    in ``os.environ`` is kept after the agent.
    """
    if (mem_path is None) == (ram_size is None):
        raise AgentError("agent_env needs exactly one of mem_path and ram_size")
    lib = str(ensure_agent())
    prev = os.environ.get("LD_PRELOAD", "")
    env = {
        "LD_PRELOAD": lib if not prev else f"{lib}:{prev}",
        "SATORI_AGENT_SOCKET": str(socket_path),
    }
    if mem_path is not None:
        env["SATORI_AGENT_MEMPATH"] = str(mem_path)
    else:
        env["SATORI_AGENT_RAMSIZE"] = str(int(ram_size))
    return env


# ----------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class MergeResult:
    merged: int
    mismatched: int
    failed: int
    elapsed_ns: int
    mmap_calls: int = 0
    last_errno: int = 0  # errno of the last failed page (ENOMEM: vm.max_map_count), 0 if none
    # per pair, in order (``merge(..., status=True)``): STATUS_MERGED, _MISMATCHED or _FAILED
    status: np.ndarray | None = None

    @property
    def pages(self) -> int:
        return self.merged + self.mismatched + self.failed

    def __add__(self, other: MergeResult) -> MergeResult:
        status = None
        if self.status is not None and other.status is not None:
            status = np.concatenate([self.status, other.status])
        return MergeResult(
            self.merged + other.merged,
            self.mismatched + other.mismatched,
            self.failed + other.failed,
            self.elapsed_ns + other.elapsed_ns,
            self.mmap_calls + other.mmap_calls,
            other.last_errno or self.last_errno,
            status,
        )


@dataclass(frozen=True)
class BreakReport:
    """What BREAKS answered: ``checked`` merged pages looked at (0: QEMU took no page fault
    since the last look, so none can have broken, and nothing was walked), QEMU's page
    ``faults`` so far, and the pages newly broken as (guest_off, store_off, npages) ranges."""

    checked: int
    faults: int
    ranges: np.ndarray

    @property
    def pages(self) -> int:
        return int(self.ranges[:, 2].sum()) if len(self.ranges) else 0


@dataclass(frozen=True)
class UnmergeResult:
    restored: int
    failed: int


def _as_pairs(pairs: np.ndarray | Iterable[Sequence[int]]) -> np.ndarray:
    if isinstance(pairs, np.ndarray):
        arr = pairs
    else:
        arr = np.array(list(pairs), dtype=np.uint64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype="<u8")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise AgentError(f"merge pairs must have shape (n, 2), got {arr.shape}")
    if arr.dtype.kind == "i" and (arr < 0).any():
        raise AgentError("merge pairs must not be negative")
    return np.ascontiguousarray(arr, dtype="<u8")


def _parse_kv(payload: bytes) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for line in payload.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


class AgentClient:
    """One connection to the merge agent of one QEMU process.

    Connects lazily (waiting up to ``connect_timeout`` for the socket to appear: QEMU may just
    be starting) and reconnects after a broken connection. Every failure raises ``AgentError``;
    an error answered by the agent raises ``AgentRequestError`` (with ``.errno``). Not
    thread-safe: one client per thread (the agent serves up to 16 connections).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None

    # -- connection
    def connect(self) -> None:
        if self._sock is not None:
            return
        deadline = time.monotonic() + self.connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise AgentError(
                        f"cannot connect to the merge agent at {self.socket_path}: {e}"
                    ) from e
                time.sleep(0.02)
                continue
            except OSError as e:
                s.close()
                raise AgentError(
                    f"cannot connect to the merge agent at {self.socket_path}: {e}"
                ) from e
            self._sock = s
            return

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> AgentClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            buf += chunk
        return bytes(buf)

    def call(
        self,
        op: int,
        payload: bytes | memoryview = b"",
        flags: int = 0,
        timeout: float | None = None,
        version: int = VERSION,
        magic: int = MAGIC,
    ) -> bytes:
        """Send one raw request and return the reply payload (for tests: any op/version)."""
        self.connect()
        assert self._sock is not None
        name = Op(op).name if op in Op._value2member_map_ else f"op {op}"
        try:
            self._sock.settimeout(timeout if timeout is not None else self.timeout)
            self._sock.sendall(_REQ.pack(magic, op, version, flags, len(payload)))
            if len(payload):
                self._sock.sendall(payload)
            rmagic, _rop, _rver, status, rlen = _REP.unpack(self._recv_exact(_REP.size))
            if rmagic != MAGIC:
                raise ConnectionError(f"bad reply magic {rmagic:#x}")
            body = self._recv_exact(rlen) if rlen else b""
        except (OSError, ConnectionError) as e:
            self.close()  # the stream is out of step now: start afresh next time
            what = "timed out" if isinstance(e, TimeoutError) else str(e)
            raise AgentError(f"merge agent {name} at {self.socket_path}: {what}") from e
        except BaseException:
            # interrupted between request and reply (Ctrl-C, SIGTERM): the reply would be read
            # as the answer to the next request (a MERGE reply taken for a LIST, say, whose
            # ranges then decide which store pages are freed): never reuse this connection
            self.close()
            raise
        if status != 0:
            msg = body.decode("utf-8", "replace")
            code = errno_mod.errorcode.get(status, str(status))
            raise AgentRequestError(f"merge agent {name}: {msg} ({code})", status)
        return body

    # -- typed requests
    def ping(self) -> dict[str, int | str]:
        return _parse_kv(self.call(Op.PING))

    def open_store(self, path: str | os.PathLike) -> int:
        """Open (or re-open) the content store; returns its size in bytes."""
        body = self.call(Op.OPEN_STORE, os.fsencode(os.fspath(path)))
        return struct.unpack("<Q", body)[0]

    def pause_free(self) -> bool:
        """Whether this agent protects the pages it merges itself (userfaultfd write-protect,
        PING ``wp=1``); if not, hold the VM's vCPUs (QMP stop/cont) around merges."""
        return self.ping().get("wp") == 1

    def merge(
        self,
        pairs: np.ndarray | Iterable[Sequence[int]],
        timeout: float | None = None,
        status: bool = False,
    ) -> MergeResult:
        """Merge (guest_off, store_off) pairs, byte offsets, 4096-aligned.

        Unless the agent is pause-free (:meth:`pause_free`), hold the VM's vCPUs around this
        call. With ``status`` the result has one status per pair. Batches above the agent's
        request limit are split; the results are summed.
        """
        arr = _as_pairs(pairs)
        total = MergeResult(0, 0, 0, 0, status=np.zeros(0, np.uint8) if status else None)
        for start in range(0, max(len(arr), 1), MAX_PAIRS_PER_REQUEST):
            chunk = arr[start : start + MAX_PAIRS_PER_REQUEST]
            t = timeout if timeout is not None else self.timeout + len(chunk) * 200e-6
            payload = memoryview(chunk).cast("B") if len(chunk) else b""
            body = self.call(Op.MERGE, payload, flags=MERGE_STATUS if status else 0, timeout=t)
            st = None
            if status:
                st = np.frombuffer(body, dtype=np.uint8, offset=48).copy()
                if len(st) != len(chunk):
                    raise AgentError(f"merge agent MERGE: {len(st)} status bytes for {len(chunk)} pairs")
            total = total + MergeResult(*struct.unpack_from("<6Q", body), status=st)
        return total

    def unmerge(self, guest_off: int, npages: int) -> UnmergeResult:
        """Give back the RAM file pages of a range this agent merged (bytes unchanged)."""
        body = self.call(
            Op.UNMERGE,
            struct.pack("<QQ", guest_off, npages),
            timeout=self.timeout + npages * 200e-6,
        )
        return UnmergeResult(*struct.unpack("<2Q", body))

    def stats(self) -> dict[str, int | str]:
        """Counters: merged_total, mismatched_total, failed_total, mmap_calls, merge_ns,
        merged_pages and merged_ranges (now), ram_size, store_size, ... (see agent.c)."""
        return _parse_kv(self.call(Op.STATS))

    def breaks(self, force: bool = False) -> BreakReport:
        """The pages that broke copy-on-write since the last call (each reported once). Cheap
        when QEMU took no page fault since the last call; ``force`` looks anyway."""
        body = self.call(Op.BREAKS, struct.pack("<I", BREAKS_FORCE if force else 0))
        checked, faults = struct.unpack_from("<2Q", body)
        ranges = np.frombuffer(body, dtype="<u8", offset=16).reshape(-1, 3).astype(np.uint64)
        return BreakReport(checked, faults, ranges)

    def mapped(self, store_offs: np.ndarray | Sequence[int]) -> np.ndarray:
        """Per store offset (bytes, 4096-aligned): whether a page of this VM may still map it."""
        arr = np.ascontiguousarray(np.asarray(store_offs, dtype=np.uint64), dtype="<u8")
        out = np.zeros(0, dtype=bool)
        step = MAX_PAYLOAD // 8
        for start in range(0, len(arr), step):
            chunk = arr[start : start + step]
            body = self.call(Op.MAPPED, memoryview(chunk).cast("B"))
            out = np.concatenate([out, np.frombuffer(body, dtype=np.uint8).astype(bool)])
        return out

    def merged_ranges(self, exclude_private: bool = False) -> np.ndarray:
        """Ranges still mapped from the store: array (m, 3) of guest_off, store_off, npages.

        With ``exclude_private`` pages the guest has since written (copy-on-write broken, seen
        by the agent in its own pagemap) are left out.
        """
        payload = struct.pack("<I", LIST_EXCLUDE_PRIVATE if exclude_private else 0)
        body = self.call(Op.LIST, payload)
        return np.frombuffer(body, dtype="<u8").reshape(-1, 3).astype(np.uint64)
