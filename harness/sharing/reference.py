"""The Python reference planner: what the native core (``core.c``) does, written plainly.

It is the engine's planner from before the core (``SharingEngine._place``/``_plan``: dicts from a
content to its store slot or first holder, per-VM dicts of merged pages) with the core's rules,
and the same interface as :class:`harness.sharing.core.NativeCore`. Tests feed both the same
hint streams (honest, forged, stale) and the same agent replies and require the same merge
pairs, the same store contents, the same counters. It is slow (pure Python) and never used by
the engine.

What changed from the planner it grew from, on purpose (each is a rule of ``core.c``):
  - the index is keyed by :func:`harness.sharing.index.keyed_hash` of the bytes read, not by the
    guest's XXH64 (with ``keyed=False`` it uses the XXH64, as before: tests show the attack);
  - the first holder's page is not read again when the second holder comes (the agent's memcmp
    is the check); a page is the first holder of one content at most; a quota per VM;
  - slots nobody maps are reused; merges stop at ``max_slots`` slots in use.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

import numpy as np

from harness.sharing.core import CORE_FIELDS, VM_FIELDS, SlotInfo, xxh64
from harness.sharing.index import KEY_BYTES, keyed_hash

PAGE = 4096
F_REMAPPED, F_PENDING, F_UNCONFIRMED = 1, 2, 4


@dataclass
class _VM:
    fd_ram: int
    fd_mem: int
    hva: int
    npages: int
    quota: int
    batch: int
    slot: dict[int, int] = field(default_factory=dict)  # page -> slot (merged or planned)
    cand: dict[int, int] = field(default_factory=dict)  # page -> key of its candidate entry
    flag: dict[int, int] = field(default_factory=dict)
    pend: list[tuple[int, int, int]] = field(default_factory=list)  # (gpa, store_off, t)
    clock: int = 0
    c: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VM_FIELDS, 0))


class ReferenceCore:
    """Same methods and results as :class:`~harness.sharing.core.NativeCore`."""

    def __init__(self, key: bytes, store_fd: int, stage_pages: int = 256, max_slots: int = 1 << 20,
                 *, keyed: bool = True) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the key is {KEY_BYTES} bytes")
        self.key = key
        self.keyed = keyed
        self.store_fd = store_fd
        self.max_slots = max_slots
        self.index: dict[int, tuple] = {}  # key -> ("slot", s) | ("cand", vm, page)
        self.slot_key: list[int] = []
        self.slot_xxh: list[int] = []
        self.refs: list[int] = []
        self.free: list[int] = []  # sorted free slots
        self.free_cursor = 0
        self.zero: list[int] = []
        self.zmark: set[int] = set()
        self.vms: list[_VM] = []
        self.full = False
        self.c = dict.fromkeys(CORE_FIELDS, 0)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ VMs
    def add_vm(self, fd_ram: int, fd_mem: int, hva: int, ram_size: int, quota: int, batch_pages: int) -> int:
        self.vms.append(_VM(fd_ram, fd_mem, hva, ram_size // PAGE, quota, batch_pages))
        return len(self.vms) - 1

    # ------------------------------------------------------------------ books
    def _cand_remove(self, v: int, p: int) -> None:
        s = self.vms[v]
        k = s.cand.pop(p, None)
        if k is None:
            return
        if self.index.get(k) == ("cand", v, p):
            del self.index[k]
        s.c["candidates"] -= 1

    def _evict_one(self, v: int) -> None:
        s = self.vms[v]
        for _ in range(s.npages):
            p = s.clock % s.npages
            s.clock += 1
            if p in s.cand:
                self._cand_remove(v, p)
                s.c["evicted"] += 1
                return

    def _unref(self, v: int, p: int) -> None:
        s = self.vms[v]
        sl = s.slot.pop(p)
        s.c["merged"] -= 1
        s.c["version"] += 1
        self.refs[sl] -= 1
        if self.refs[sl] == 0 and sl not in self.zmark:
            self.zmark.add(sl)
            self.zero.append(sl)
            self.c["unreferenced"] = len(self.zero)

    def _plan(self, v: int, p: int, sl: int, t: int) -> None:
        s = self.vms[v]
        if p in s.cand:
            self._cand_remove(v, p)
        if p in s.slot:
            self._unref(v, p)
        if not s.pend:
            s.c["pending_t0"] = t
        s.pend.append((p * PAGE, sl * PAGE, t))
        s.c["pending"] = len(s.pend)
        s.c["planned"] += 1
        s.slot[p] = sl
        s.flag[p] = s.flag.get(p, 0) | F_REMAPPED | F_PENDING
        s.c["merged"] += 1
        s.c["version"] += 1
        self.refs[sl] += 1
        if len(s.pend) >= s.batch:
            self.full = True

    def _adopt(self, v: int, p: int, sl: int) -> None:
        s = self.vms[v]
        if self._slot_is_free(sl):
            self.c["lost"] += 1
            self.free.remove(sl)
            self.c["slots_live"] += 1
            self.slot_key[sl] = self.slot_xxh[sl] = 0
        if p in s.slot:
            self._unref(v, p)
        if p in s.cand:
            self._cand_remove(v, p)
        s.slot[p] = sl
        s.flag[p] = (s.flag.get(p, 0) | F_REMAPPED) & ~F_UNCONFIRMED
        s.c["merged"] += 1
        s.c["adopted"] += 1
        s.c["version"] += 1
        self.refs[sl] += 1

    def _slot_alloc(self) -> int | None:
        if self.free:
            i = bisect.bisect_left(self.free, self.free_cursor)
            sl = self.free.pop(i if i < len(self.free) else 0)
            self.free_cursor = sl + 1
            self.c["slots_reused"] += 1
            self.c["slots_live"] += 1
            return sl
        if self.c["slots_hw"] >= self.max_slots:
            self.c["slot_limit"] += 1
            return None
        self.slot_key.append(0)
        self.slot_xxh.append(0)
        self.refs.append(0)
        self.c["slots_live"] += 1
        self.c["slots_hw"] += 1
        return len(self.refs) - 1

    def _slot_is_free(self, sl: int) -> bool:
        i = bisect.bisect_left(self.free, sl)
        return i < len(self.free) and self.free[i] == sl

    # ------------------------------------------------------------------ hot path
    def ingest(self, v: int, records: np.ndarray, t_ns: int) -> int:
        s = self.vms[v]
        i = 0
        for i, (gpa, h) in enumerate(zip(records["gpa"].tolist(), records["hash"].tolist(), strict=True)):
            if self.full:
                return i
            p = gpa // PAGE
            if gpa % PAGE or p >= s.npages:
                s.c["changed"] += 1
                continue
            s.c["hinted"] += 1
            cur = s.slot.get(p)
            if cur is not None and self.slot_xxh[cur] == h:
                s.c["skipped"] += 1
                continue
            if s.fd_ram < 0 or s.flag.get(p, 0) & F_REMAPPED:
                page = _pread(s.fd_mem, s.hva + gpa)
            else:
                page = _pread(s.fd_ram, gpa)
            if page is None or xxh64(page) != h:
                s.c["changed"] += 1
                continue
            k = keyed_hash(page, self.key) if self.keyed else (h or 1)
            if cur is not None and self.slot_key[cur] == k:
                s.c["skipped"] += 1
                continue
            if cur is not None and not s.flag.get(p, 0) & F_PENDING:
                s.c["broken"] += 1
            e = self.index.get(k)
            if e is not None and e[0] == "slot":
                self._plan(v, p, e[1], t_ns)
            elif e is not None:
                _, v2, p2 = e
                if (v2, p2) != (v, p):
                    sl = self._slot_alloc()
                    if sl is None:
                        continue
                    os.pwrite(self.store_fd, page, sl * PAGE)
                    self.c["appended"] += 1
                    self.slot_key[sl], self.slot_xxh[sl], self.refs[sl] = k, h, 0
                    self.index[k] = ("slot", sl)
                    del self.vms[v2].cand[p2]
                    self.vms[v2].c["candidates"] -= 1
                    self._plan(v2, p2, sl, t_ns)
                    self._plan(v, p, sl, t_ns)
                elif cur is not None:
                    self._unref(v, p)
            else:
                if cur is not None:
                    self._unref(v, p)
                if p in s.cand:
                    self._cand_remove(v, p)
                if s.quota:
                    if s.c["candidates"] >= s.quota:
                        self._evict_one(v)
                    self.index[k] = ("cand", v, p)
                    s.cand[p] = k
                    s.c["candidates"] += 1
        else:
            return len(records)
        return i

    def take(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.vms[v]
        pairs = np.array([(g, so) for g, so, _ in s.pend], dtype=np.uint64).reshape(-1, 2)
        times = np.array([t for _, _, t in s.pend], dtype=np.uint64)
        for g, _, _ in s.pend:
            p = g // PAGE
            s.flag[p] = (s.flag.get(p, 0) & ~F_PENDING) | F_UNCONFIRMED
        s.pend = []
        s.c["pending"] = 0
        self.full = any(len(w.pend) >= w.batch for w in self.vms)
        return pairs, times

    def sync(self) -> None:
        pass  # pages are written at append

    def confirm(self, v: int, pairs: np.ndarray) -> None:
        s = self.vms[v]
        for g in np.asarray(pairs, dtype=np.uint64).reshape(-1, 2)[:, 0].tolist():
            p = g // PAGE
            if p in s.flag:
                s.flag[p] &= ~F_UNCONFIRMED

    def lookup(self, v: int, gpas: np.ndarray) -> np.ndarray:
        s = self.vms[v]
        return np.array([s.slot.get(g // PAGE, -1) for g in np.asarray(gpas).tolist()], dtype=np.int64)

    # ------------------------------------------------------------------ agents' word
    def reconcile(self, v: int, ranges: np.ndarray) -> int:
        s = self.vms[v]
        seen: set[int] = set()
        for g, so, n in np.asarray(ranges, dtype=np.uint64).reshape(-1, 3).tolist():
            if (g | so) % PAGE:
                s.c["bad_list"] += 1
                continue
            for k in range(n):
                p, sl = g // PAGE + k, so // PAGE + k
                if p >= s.npages or sl >= self.c["slots_hw"]:
                    s.c["bad_list"] += 1
                    continue
                seen.add(p)
                if s.slot.get(p) == sl:
                    s.flag[p] = s.flag.get(p, 0) & ~F_UNCONFIRMED
                    continue
                if s.flag.get(p, 0) & F_PENDING:
                    continue
                self._adopt(v, p, sl)
        broken = 0
        for p in sorted(s.slot):
            if p in seen or s.flag.get(p, 0) & F_PENDING:
                continue
            self._unref(v, p)
            if s.flag.get(p, 0) & F_UNCONFIRMED:
                s.flag[p] &= ~F_UNCONFIRMED
                s.c["unconfirmed"] += 1
            else:
                s.c["broken"] += 1
                broken += 1
        return broken

    def free_unused(self, lists: list[np.ndarray]) -> int:
        if len(lists) != len(self.vms):
            raise ValueError("free_unused needs every VM's LIST")
        listed: set[int] = set()
        for ranges in lists:
            for _g, so, n in np.asarray(ranges, dtype=np.uint64).reshape(-1, 3).tolist():
                listed.update(range(so // PAGE, so // PAGE + n))
        freed, keep = 0, []
        for sl in self.zero:
            self.zmark.discard(sl)
            if self.refs[sl] or self._slot_is_free(sl):
                continue
            if sl in listed:
                self.c["kept_listed"] += 1
                self.zmark.add(sl)
                keep.append(sl)
                continue
            self._free(sl)
            freed += 1
        self.zero = keep
        self.c["unreferenced"] = len(keep)
        return freed

    def settle(self, v: int, pairs: np.ndarray, status: np.ndarray) -> int:
        s = self.vms[v]
        dropped = 0
        for (g, so), st in zip(np.asarray(pairs, dtype=np.uint64).reshape(-1, 2).tolist(),
                               np.asarray(status).tolist(), strict=True):
            p, sl = g // PAGE, so // PAGE
            if p >= s.npages or sl >= self.c["slots_hw"]:
                continue
            if st == 0:
                if s.slot.get(p) == sl:
                    s.flag[p] = s.flag.get(p, 0) & ~F_UNCONFIRMED
                    continue
                if s.flag.get(p, 0) & F_PENDING:
                    continue
                self._adopt(v, p, sl)
            elif s.slot.get(p) == sl and not s.flag.get(p, 0) & F_PENDING:
                self._unref(v, p)
                s.flag[p] &= ~F_UNCONFIRMED
                s.c["unconfirmed"] += 1
                dropped += 1
        return dropped

    def apply_breaks(self, v: int, ranges: np.ndarray) -> int:
        s = self.vms[v]
        broken = 0
        for g, so, n in np.asarray(ranges, dtype=np.uint64).reshape(-1, 3).tolist():
            if (g | so) % PAGE:
                s.c["bad_list"] += 1
                continue
            for k in range(n):
                p, sl = g // PAGE + k, so // PAGE + k
                if p >= s.npages:
                    s.c["bad_list"] += 1
                    break
                if s.slot.get(p) != sl or s.flag.get(p, 0) & F_PENDING:
                    continue
                self._unref(v, p)
                s.flag[p] &= ~F_UNCONFIRMED
                s.c["broken"] += 1
                broken += 1
        return broken

    def unreferenced(self) -> np.ndarray:
        return np.array([sl for sl in self.zero if not self.refs[sl] and not self._slot_is_free(sl)],
                        dtype=np.uint64)

    def free_slots(self, slots: np.ndarray) -> int:
        freed = 0
        for sl in np.asarray(slots, dtype=np.uint64).tolist():
            if sl >= len(self.refs) or self.refs[sl] or self._slot_is_free(sl):
                continue
            self._free(sl)
            freed += 1
        keep = []
        for sl in self.zero:
            if self.refs[sl] or self._slot_is_free(sl):
                self.zmark.discard(sl)
                continue
            keep.append(sl)
        self.zero = keep
        self.c["unreferenced"] = len(keep)
        return freed

    def _free(self, sl: int) -> None:
        if self.index.get(self.slot_key[sl]) == ("slot", sl):
            del self.index[self.slot_key[sl]]
        _punch(self.store_fd, sl * PAGE)
        self.slot_key[sl] = self.slot_xxh[sl] = 0
        bisect.insort(self.free, sl)
        self.c["slots_live"] -= 1
        self.c["slots_freed"] += 1

    # ------------------------------------------------------------------ figures
    def counters(self) -> dict[str, int]:
        return dict(self.c, entries=len(self.index))

    def vm_counters(self, v: int) -> dict[str, int]:
        return dict(self.vms[v].c)

    def slot(self, sl: int) -> SlotInfo | None:
        if sl >= len(self.refs):
            return None
        return SlotInfo(self.slot_key[sl], self.slot_xxh[sl], self.refs[sl], self._slot_is_free(sl))


def _pread(fd: int, off: int) -> bytes | None:
    try:
        b = os.pread(fd, PAGE, off)
    except OSError:
        return None
    return b if len(b) == PAGE else None


def _punch(fd: int, off: int) -> None:
    from harness.sharing.store import punch_hole

    punch_hole(fd, off, PAGE)
