"""The native sharing core (``core.c``), loaded with ctypes: the per-hint hot path.

One :class:`NativeCore` per sharing domain holds the content index, the per-VM books (which
guest page is merged with which store slot, which is a first holder), the pending merge pairs
and the store's staging pages. Python hands it whole ring batches (:meth:`NativeCore.ingest`),
takes the merge pairs it planned (:meth:`NativeCore.take`), and feeds back what the agents say
(:meth:`NativeCore.confirm`, :meth:`NativeCore.reconcile`, :meth:`NativeCore.free_unused`).
``core.c``'s header says what happens per record and why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as errno_mod
import functools
import os
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.sharing.agent import build_library, library_path
from harness.sharing.index import KEY_BYTES

PAGE = 4096
LIB_NAME = "satori_core.so"

_u64p = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
_i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_u8p = ctypes.c_char_p
_u8a = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")

CORE_FIELDS = ("slots_hw", "slots_live", "slots_freed", "slots_reused", "appended", "entries",
               "table_cap", "mem_bytes", "lost", "kept_listed", "store_writes", "unreferenced",
               "slot_limit", "ns_read", "ns_verify", "ns_key", "ns_index", "ns_store", "n_read", "n_key")
VM_FIELDS = ("hinted", "skipped", "changed", "broken", "planned", "candidates", "evicted", "merged",
             "pending", "adopted", "unconfirmed", "bad_list", "version", "pending_t0")


class _CoreCounters(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in CORE_FIELDS]


class _VMCounters(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in VM_FIELDS]


class CoreError(HarnessError):
    """The native core failed (store write, memory)."""


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    key: int
    xxh64: int
    refs: int
    free: bool


def core_source() -> Path:
    return Path(__file__).with_name("core.c")


@functools.cache
def _lib() -> ctypes.CDLL:
    src = core_source()
    lib = ctypes.CDLL(str(build_library(src, library_path(src, "core", LIB_NAME), "the sharing core")))
    vp, u32, u64, i64, sz, i = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64,
                                ctypes.c_size_t, ctypes.c_int)
    sig = {
        "satori_xxh64": ([_u8p, sz, u64], u64),
        "satori_core_new": ([_u8p, sz, i, u32, u64], vp),
        "satori_core_free": ([vp], None),
        "satori_core_add_vm": ([vp, i, i, u64, u64, u64, u32], i),
        "satori_core_set_view": ([vp, u32, u64, vp, vp], i),
        "satori_core_ingest": ([vp, u32, vp, sz, sz, u64], i64),
        "satori_core_take": ([vp, u32, _u64p, _u64p, sz], i64),
        "satori_core_confirm": ([vp, u32, _u64p, sz], None),
        "satori_core_lookup": ([vp, u32, _u64p, sz, _i64p], None),
        "satori_core_reconcile": ([vp, u32, _u64p, sz], i64),
        "satori_core_free_unused": ([vp, ctypes.POINTER(vp), ctypes.POINTER(sz), sz], i64),
        "satori_core_settle": ([vp, u32, _u64p, _u8a, sz], i64),
        "satori_core_apply_breaks": ([vp, u32, _u64p, sz], i64),
        "satori_core_unreferenced": ([vp, _u64p, sz], i64),
        "satori_core_free_slots": ([vp, _u64p, sz], i64),
        "satori_core_sync": ([vp], i),
        "satori_core_profile": ([vp, i], None),
        "satori_core_base_bytes": ([], sz),
        "satori_core_counters": ([vp, ctypes.POINTER(_CoreCounters)], i),
        "satori_core_vm_counters": ([vp, u32, ctypes.POINTER(_VMCounters)], i),
        "satori_core_keyed": ([vp, _u8p], u64),
        "satori_core_verify_key": ([vp, _u8p, u64, _u64p], i),
        "satori_core_nh": ([vp, _u8p, i, _u64p], None),
        "satori_core_has_avx2": ([], i),
        "satori_core_slot": ([vp, u64, _u64p], i),
        "satori_core_find": ([vp, u64, _u64p], i),
        "satori_core_probe_limit": ([i, sz, _u64p], i),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` as the core computes it (tests compare it with ``xxhash``)."""
    return int(_lib().satori_xxh64(data, len(data), seed))


def has_avx2() -> bool:
    return bool(_lib().satori_core_has_avx2())


def probe_limit(fd: int, pages: int = 16384) -> tuple[float, float, float]:
    """The floor of a merge, in µs per page (``core.c``): a 4 KiB memcmp, a page-table change
    with runs of 64 pages per mmap, and with one mmap per page. ``fd``: a file of 64 pages."""
    out = np.zeros(3, dtype=np.uint64)
    _check(_lib().satori_core_probe_limit(fd, pages, out), "probing the merge floor")
    return float(out[0]) / 1e3, float(out[1]) / 1e3, float(out[2]) / 1e3


def base_bytes() -> int:
    """Bytes of the core's fixed part."""
    return int(_lib().satori_core_base_bytes())


def _check(r: int, what: str) -> int:
    if r < 0:
        name = errno_mod.errorcode.get(-r, str(-r))
        raise CoreError(f"sharing core: {what}: {os.strerror(-r)} ({name})")
    return r


class NativeCore:
    """One domain's native core over the store file ``store_fd`` (see the module docstring).

    ``key``: :data:`harness.sharing.index.KEY_BYTES` secret bytes; ``stage_pages``: appended pages
    held before one write to the store; ``max_slots``: store slots in use at most.
    """

    def __init__(self, key: bytes, store_fd: int, stage_pages: int = 256, max_slots: int = 1 << 20) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the core's key is {KEY_BYTES} bytes")
        self._lib = _lib()
        self._h = self._lib.satori_core_new(key, len(key), store_fd, stage_pages, max_slots)
        self._vmc = _VMCounters()
        self._vmc_ref = ctypes.byref(self._vmc)
        if not self._h:
            raise CoreError("sharing core: cannot allocate its state")
        self.stage_pages = stage_pages
        self.max_slots = max_slots
        self._batch: list[int] = []  # per VM: its batch size (the take buffer's room)

    def close(self) -> None:
        if self._h:
            self._lib.satori_core_free(self._h)
            self._h = None

    def __enter__(self) -> NativeCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ VMs
    def add_vm(self, fd_ram: int, fd_mem: int, hva: int, ram_size: int, quota: int, batch_pages: int) -> int:
        """Register a VM: its RAM file (or -1), ``/proc/<pid>/mem``, the host address of guest
        offset 0 in QEMU, its RAM size, candidate quota and batch size. Returns its index."""
        r = self._lib.satori_core_add_vm(self._h, fd_ram, fd_mem, hva, ram_size, quota, batch_pages)
        _check(r, "adding a VM")
        self._batch.append(batch_pages)
        return r

    def set_view(self, vm: int, addr: int) -> None:
        """Read VM ``vm``'s RAM-file pages through ``addr``, the engine's own guarded view of the
        file (:class:`harness.oracle.RamMirror`), instead of ``pread``; 0: back to ``pread``.
        The view must outlive every later :meth:`ingest` of that VM (or be set back to 0)."""
        from harness.oracle import _reader  # pageread.c: the SIGBUS guard the copy runs under

        guard = _reader()
        ready = ctypes.cast(guard.satori_bus_ready, ctypes.c_void_p).value
        copy = ctypes.cast(guard.satori_copy_guarded, ctypes.c_void_p).value
        _check(self._lib.satori_core_set_view(self._h, vm, addr, ready, copy), "setting a RAM view")

    # ------------------------------------------------------------------ hot path
    def ingest(self, vm: int, records: np.ndarray, t_ns: int) -> int:
        """Verify, index and plan hint records (a structured array of ``RECORD_DTYPE``, u64 gpa
        and u64 hash first) read at ``t_ns``. Returns how many were taken: fewer than given
        when a VM's batch filled up (take it, then give the rest)."""
        if not len(records):
            return 0
        if not records.flags.c_contiguous:
            records = np.ascontiguousarray(records)
        r = self._lib.satori_core_ingest(self._h, vm, records.ctypes.data, records.dtype.itemsize,
                                         len(records), t_ns)
        return _check(r, "ingesting hints")

    def take(self, vm: int) -> tuple[np.ndarray, np.ndarray]:
        """VM ``vm``'s pending merge pairs (n x 2 u64: guest_off, store_off) and the hint time
        of each (ns); the batch is cleared, its pages unconfirmed until :meth:`confirm` or
        :meth:`reconcile`."""
        room = self._batch[vm] + 2
        pairs = np.empty((room, 2), dtype=np.uint64)
        times = np.empty(room, dtype=np.uint64)
        n = _check(self._lib.satori_core_take(self._h, vm, pairs.reshape(-1), times, room), "taking a batch")
        return pairs[:n], times[:n]

    def sync(self) -> None:
        """Write the staged store pages (before any agent is asked to map them)."""
        _check(self._lib.satori_core_sync(self._h), "writing the content store")

    def confirm(self, vm: int, pairs: np.ndarray) -> None:
        """The agent merged every pair of this batch."""
        p = np.ascontiguousarray(pairs, dtype=np.uint64).reshape(-1)
        self._lib.satori_core_confirm(self._h, vm, p, len(p) // 2)

    def lookup(self, vm: int, gpas: np.ndarray) -> np.ndarray:
        """Per guest offset: the store slot the books hold for it, or -1."""
        g = np.ascontiguousarray(gpas, dtype=np.uint64)
        out = np.empty(len(g), dtype=np.int64)
        self._lib.satori_core_lookup(self._h, vm, g, len(g), out)
        return out

    # ------------------------------------------------------------------ agents' word
    def reconcile(self, vm: int, ranges: np.ndarray) -> int:
        """Reset VM ``vm``'s books to its agent's LIST (m x 3 u64 ranges). Returns the pages
        found broken (copy-on-write) since."""
        r = np.ascontiguousarray(ranges, dtype=np.uint64).reshape(-1)
        return _check(self._lib.satori_core_reconcile(self._h, vm, r, len(r) // 3), "reconciling")

    def free_unused(self, lists: list[np.ndarray]) -> int:
        """Free the slots nothing references and no LIST names. ``lists``: the current LIST of
        EVERY VM of the core, in any order. Returns the slots freed."""
        arrs = [np.ascontiguousarray(x, dtype=np.uint64).reshape(-1) for x in lists]
        ptrs = (ctypes.c_void_p * max(len(arrs), 1))(*[a.ctypes.data for a in arrs])
        counts = (ctypes.c_size_t * max(len(arrs), 1))(*[len(a) // 3 for a in arrs])
        return _check(self._lib.satori_core_free_unused(self._h, ptrs, counts, len(arrs)), "freeing store slots")

    def settle(self, vm: int, pairs: np.ndarray, status: np.ndarray) -> int:
        """The agent's per-pair answer to a batch (0 merged, 1 mismatched, 2 failed, in the
        batch's order): merged pages confirmed (taken back if the books had let go), the others
        dropped unless planned again. Returns the pages dropped."""
        p = np.ascontiguousarray(pairs, dtype=np.uint64).reshape(-1)
        st = np.ascontiguousarray(status, dtype=np.uint8)
        if len(st) != len(p) // 2:
            raise ValueError("one status per pair")
        return _check(self._lib.satori_core_settle(self._h, vm, p, st, len(st)), "settling a batch")

    def apply_breaks(self, vm: int, ranges: np.ndarray) -> int:
        """Pages the agent saw break copy-on-write ((guest_off, store_off, npages) ranges):
        dropped from the books if held with that slot and not planned again. Returns them."""
        r = np.ascontiguousarray(ranges, dtype=np.uint64).reshape(-1)
        return _check(self._lib.satori_core_apply_breaks(self._h, vm, r, len(r) // 3), "applying breaks")

    def unreferenced(self) -> np.ndarray:
        """Slots no page references now: the candidates for freeing."""
        n = self.counters()["unreferenced"]
        out = np.empty(max(n, 1), dtype=np.uint64)
        k = _check(self._lib.satori_core_unreferenced(self._h, out, n), "listing slots")
        return out[:k]

    def free_slots(self, slots: np.ndarray) -> int:
        """Free these unreferenced slots. Only with the word of EVERY agent that it maps none
        of them (their MAPPED answers); else :meth:`free_unused` with every LIST."""
        s = np.ascontiguousarray(slots, dtype=np.uint64)
        return _check(self._lib.satori_core_free_slots(self._h, s, len(s)), "freeing store slots")

    # ------------------------------------------------------------------ figures, tests
    def counters(self) -> dict[str, int]:
        c = _CoreCounters()
        self._lib.satori_core_counters(self._h, ctypes.byref(c))
        return {f: int(getattr(c, f)) for f in CORE_FIELDS}

    def pending(self, vm: int) -> tuple[int, int]:
        """(pairs planned and not yet taken, hint time in ns of the oldest of them): what the
        scheduler asks every step, without building :meth:`vm_counters`' dict (an idle engine
        asks it for every VM ten times a second)."""
        c = self._vmc
        _check(self._lib.satori_core_vm_counters(self._h, vm, self._vmc_ref), "reading counters")
        return int(c.pending), int(c.pending_t0)

    def vm_counters(self, vm: int) -> dict[str, int]:
        c = _VMCounters()
        _check(self._lib.satori_core_vm_counters(self._h, vm, ctypes.byref(c)), "reading counters")
        return {f: int(getattr(c, f)) for f in VM_FIELDS}

    def profile(self, on: bool) -> None:
        """Time each stage per record (read, verify, key, index, store) into the counters."""
        self._lib.satori_core_profile(self._h, int(on))

    def keyed(self, page: bytes) -> int:
        """The index key of a 4 KiB page (as ingest computes it)."""
        if len(page) != PAGE:
            raise ValueError("a page is 4096 bytes")
        return int(self._lib.satori_core_keyed(self._h, page))

    def verify_key(self, page: bytes, want: int) -> int | None:
        """As ingest checks a page (XXH64 and the keyed hash in one pass): its key if its XXH64
        is ``want``, else None."""
        out = np.zeros(1, dtype=np.uint64)
        ok = self._lib.satori_core_verify_key(self._h, page, want, out)
        return int(out[0]) if ok else None

    def nh(self, page: bytes, avx2: bool) -> tuple[int, int]:
        out = np.zeros(2, dtype=np.uint64)
        self._lib.satori_core_nh(self._h, page, int(avx2), out)
        return int(out[0]), int(out[1])

    def slot(self, slot: int) -> SlotInfo | None:
        out = np.zeros(4, dtype=np.uint64)
        if self._lib.satori_core_slot(self._h, slot, out) < 0:
            return None
        return SlotInfo(int(out[0]), int(out[1]), int(out[2]), bool(out[3]))

    def find(self, key: int) -> tuple[str, int, int] | None:
        """What the index holds under ``key``: ("slot", slot, 0), ("candidate", vm, page) or None."""
        out = np.zeros(2, dtype=np.uint64)
        kind = self._lib.satori_core_find(self._h, key, out)
        if kind == 0:
            return None
        return ("slot", int(out[0]), 0) if kind == 1 else ("candidate", int(out[0]), int(out[1]))
