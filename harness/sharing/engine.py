"""The sharing engine: verified hints in, copy-on-write merges out, for one sharing domain.

For every VM of the domain the engine reads the hint ring (``harness.hints``), and for each
record re-reads the guest page from the host side and re-hashes it: a guest's word is never
trusted, a record whose page does not hash to what it says is counted (``changed``) and dropped.
Verified pages are indexed by hash. When a second page of the same content appears (in any VM
of the domain), its bytes are appended once to the content store and both holders are planned
for merging; later holders of a stored content are planned straight away. Plans are sent to
each VM's merge agent in batches, with that VM's vCPUs held by QMP ``stop``/``cont`` around the
batch (the agent memcmps every page against the store before mapping it, so a page that changed
in between is simply not merged).

Copy-on-write breaks are found by asking each agent which pages are still mapped from the store
and not faulted private; a store slot nobody maps any more is freed.

Only VMs given to one engine are ever merged together: the engine *is* the sharing domain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from harness.accounting import ram_hva
from harness.errors import AgentError, HarnessError
from harness.hints import HintRing
from harness.paths import shm_dir
from harness.sharing import verify
from harness.sharing.agent import AgentClient
from harness.sharing.store import PAGE, ContentStore

MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


@dataclasses.dataclass
class Member:
    """What the engine needs of one VM: files, sockets, a way to run QMP."""

    name: str
    pid: int
    ram_path: Path
    ram_size: int
    ring_path: Path
    agent_socket: Path
    qmp: Callable[..., Any]

    @classmethod
    def from_vm(cls, vm) -> Member:
        if vm.ring_path is None or vm.agent_socket is None:
            raise HarnessError(
                f"VM {vm.name} has no hint ring or no merge agent: start it with sharing on "
                "(VMSpec(sharing=True), 'satori vm up NAME --sharing'), on an image with hints"
            )
        return cls(vm.name, vm.pid, vm.ram_path, vm.ram_size, vm.ring_path, vm.agent_socket, vm.qmp)

    @classmethod
    def from_state(cls, state: dict) -> Member:
        """A VM started in the background (``satori vm up NAME --sharing``)."""
        from harness.vm import qmp_connect

        if not state.get("alive"):
            raise HarnessError(f"VM {state['name']} is not running")
        if not state.get("ring") or not state.get("agent"):
            raise HarnessError(
                f"VM {state['name']} was not started with sharing (satori vm up {state['name']} --sharing)"
            )
        conn = qmp_connect(Path(state["qmp"]))

        def qmp(command: str, **args: Any) -> Any:
            reply = conn.cmd_raw(command, args or None)
            if "error" in reply:
                raise HarnessError(f"VM {state['name']}: QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

        return cls(state["name"], int(state["pid"]), Path(state["ram"]), int(state["ram_size"]),
                   Path(state["ring"]), Path(state["agent"]), qmp)


class IdlePoll:
    """Sleep between polls of the hint rings: ``poll_s`` while hints flow, growing by half each
    idle step up to ``max_s`` (an idle engine costs little CPU; the first hint after a quiet
    spell waits at most ``max_s``)."""

    def __init__(self, poll_s: float = 0.02, max_s: float = 0.1) -> None:
        self.poll_s = poll_s
        self.max_s = max(poll_s, max_s)
        self.cur = poll_s

    def wait(self, taken: int) -> None:
        if taken:
            self.cur = self.poll_s
            return
        time.sleep(self.cur)
        self.cur = min(self.max_s, self.cur * 1.5)


@dataclasses.dataclass
class VMCounters:
    """Per-VM counters; ``merged`` is pages merged now, the rest are totals."""

    hinted: int = 0  # valid records taken from the ring
    changed: int = 0  # page did not hash to what the record said (stale or forged): dropped
    rejected: int = 0  # records the ring reader refused (bad address, garbage)
    dropped: int = 0  # records the guest dropped, ring full
    merged: int = 0
    merged_total: int = 0
    mismatched: int = 0  # agent memcmp said no (page changed before the merge)
    failed: int = 0  # agent could not map (e.g. ENOMEM)
    broken: int = 0  # copy-on-write breaks seen
    batches: int = 0
    paused_s: float = 0.0
    agent_ns: int = 0  # wall time of the agent's merges
    agent_cpu_ns: int = 0  # CPU of the agent's thread in QEMU: every request (merges, lists)


class _VMState:
    def __init__(self, idx: int, m: Member) -> None:
        self.idx = idx
        self.m = m
        self.ring = HintRing(m.ring_path, m.ram_size)
        self.agent = AgentClient(m.agent_socket)
        self.ram_fd = os.open(m.ram_path, os.O_RDONLY) if m.ram_path.exists() else -1
        self.mem_fd = os.open(f"/proc/{m.pid}/mem", os.O_RDONLY)
        self.hva = ram_hva(m)  # HMP gpa2hva, as the accounting reads it
        # where verify.verify reads a page: source 0 is the RAM file, 1 QEMU's memory
        self.fds = np.array([self.ram_fd, self.mem_fd], dtype=np.int32)
        self.buf: np.ndarray | None = None  # verify's page buffer, reused (no page faults per batch)
        self.merged: dict[int, int] = {}  # gpa -> store slot (merged or planned)
        # per guest page, whether it was ever mapped from the store: its bytes live in QEMU's
        # private mapping (store page or, after a copy-on-write break, an anonymous copy), no
        # longer in the RAM file
        self.remapped = np.zeros(m.ram_size // PAGE, dtype=bool)
        self.pending: list[tuple[int, int]] = []
        self.pending_since = 0.0
        self.c = VMCounters()
        self.version = 0  # bumped whenever ``merged`` changes
        self.checked: tuple[int, bytes] | None = None  # (version, LIST reply) of the last check

    def read_page(self, gpa: int) -> bytes:
        """The guest page's bytes now, without ever allocating host memory.

        A page never merged lives in the shared RAM file: pread it (a hole reads as zeros and
        stays a hole). A page merged once lives in QEMU's private mapping of the store (or in
        its private copy after a write): read it through /proc/<pid>/mem, which at worst maps
        the store page that is already there.
        """
        if self.ram_fd < 0 or self.remapped[gpa // PAGE]:
            # anonymous RAM (satori+ksm): a read fault there maps the zero page, allocates nothing
            return os.pread(self.mem_fd, PAGE, self.hva + gpa)
        return os.pread(self.ram_fd, PAGE, gpa)

    def sources(self, gpas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For ``verify``: per page, which of ``fds`` holds its bytes and at what offset (as
        ``read_page`` decides, for a whole batch)."""
        if self.ram_fd < 0:
            src = np.ones(len(gpas), dtype=np.uint8)
        else:
            src = self.remapped[gpas // PAGE].astype(np.uint8)
        offs = np.where(src == 1, gpas + np.uint64(self.hva), gpas)
        return src, offs

    def close(self) -> None:
        self.ring.close()
        self.agent.close()
        for fd in (self.ram_fd, self.mem_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class SharingEngine:
    """Immediate merging of hinted pages across the VMs of one sharing domain."""

    def __init__(
        self,
        members: Iterable[Member],
        domain: str = "default",
        store_path: Path | None = None,
        batch_pages: int = 4096,
        flush_interval_s: float = 0.2,
        break_check_interval_s: float = 1.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.members = list(members)
        if not self.members:
            raise HarnessError("a sharing domain needs at least one VM")
        self.domain = domain
        self.store_path = store_path or shm_dir() / f"satori-store-{domain}-{os.getpid()}-{time.time_ns() % 10**9}"
        self.batch_pages = batch_pages
        self.flush_interval_s = flush_interval_s
        self.break_check_interval_s = break_check_interval_s
        self.log = log or (lambda s: None)
        self.vms: list[_VMState] = []
        self.store: ContentStore | None = None
        # content index: xxh64 -> store slot (shared content) or the first holder (vm idx, gpa)
        self.slot_of: dict[int, int] = {}
        self.candidate: dict[int, tuple[int, int]] = {}
        self.slot_hash: list[int] = []
        self.slot_refs: list[int] = []  # the engine's count of pages merged per slot
        self.maybe_free: set[int] = set()  # slots whose count fell to 0: freed once the agents agree
        self._saved_max_map: int | None = None
        self._last_break_check = 0.0
        self._break_interval = break_check_interval_s
        self._quiet_check = True  # set by check_breaks: every agent's view was as at the last one
        self.t_first_hint: float | None = None
        self.t_start = time.monotonic()
        self.cpu_start = time.process_time()

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> SharingEngine:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        self.store = ContentStore(self.store_path)
        for i, m in enumerate(self.members):
            st = _VMState(i, m)
            self.vms.append(st)
            st.agent.open_store(self.store_path)
        total_pages = sum(m.ram_size // PAGE for m in self.members)
        self._raise_max_map_count(2 * total_pages + 65536)

    def close(self) -> None:
        for st in self.vms:
            st.close()
        self.vms = []
        if self.store is not None:
            self.store.close(unlink=True)  # QEMUs keep their mappings: the pages stay valid
            self.store = None
        self._restore_max_map_count()

    def _raise_max_map_count(self, want: int) -> None:
        """Each isolated merged page may cost 2 VMAs: lift the limit for the run (restored at close)."""
        try:
            cur = int(MAX_MAP_COUNT.read_text())
        except OSError:
            return
        if cur >= want:
            return
        try:
            MAX_MAP_COUNT.write_text(str(want))
            self._saved_max_map = cur
            self.log(f"vm.max_map_count {cur} -> {want} for this run")
        except OSError as e:
            self.log(f"cannot raise vm.max_map_count ({e}): scattered merges may fail with ENOMEM")

    def _restore_max_map_count(self) -> None:
        if self._saved_max_map is not None:
            with contextlib.suppress(OSError):
                MAX_MAP_COUNT.write_text(str(self._saved_max_map))
            self._saved_max_map = None

    # ---------------------------------------------------------------- the loop
    def step(self) -> int:
        """Take every VM's new hints, plan merges, flush due batches. Returns records taken."""
        taken = 0
        for st in self.vms:
            batch = st.ring.poll()  # (its rejected/dropped counters are read by stats())
            if len(batch):
                if self.t_first_hint is None:
                    self.t_first_hint = time.monotonic()
                taken += len(batch)
                self._ingest(st, batch)
        now = time.monotonic()
        for st in self.vms:
            if st.pending and (len(st.pending) >= self.batch_pages or now - st.pending_since >= self.flush_interval_s):
                self._flush(st)
        if taken:
            self._break_interval = self.break_check_interval_s
        if now - self._last_break_check >= self._break_interval:
            self._last_break_check = now
            self.check_breaks()
            # nothing moved since the last look: look less often (up to 8x), while no hint comes;
            # each look is a pagemap walk over every merged page in every agent
            self._break_interval = (min(8 * self.break_check_interval_s, 2 * self._break_interval)
                                    if self._quiet_check else self.break_check_interval_s)
        return taken

    def run(self, stop: Callable[[], bool], poll_s: float = 0.02) -> None:
        """Step until ``stop()`` is true (Ctrl-C propagates; merged pages stay correct)."""
        idle = IdlePoll(poll_s)
        while not stop():
            idle.wait(self.step())
        self.flush_all()

    def run_for(self, seconds: float, poll_s: float = 0.02) -> None:
        end = time.monotonic() + seconds
        self.run(lambda: time.monotonic() >= end, poll_s)

    def drain(self, quiet_s: float = 0.5, timeout_s: float = 30.0) -> None:
        """Step until no hint arrived for ``quiet_s`` and every plan is flushed."""
        end = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < end:
            if self.step():
                last = time.monotonic()
            elif time.monotonic() - last >= quiet_s:
                break
            else:
                time.sleep(0.02)
        self.flush_all()

    def flush_all(self) -> None:
        for st in self.vms:
            if st.pending:
                self._flush(st)

    # ---------------------------------------------------------------- hints -> plans
    def _ingest(self, st: _VMState, batch: np.ndarray) -> None:
        st.c.hinted += len(batch)
        gpas = np.ascontiguousarray(batch["gpa"], dtype=np.uint64)
        hashes = np.ascontiguousarray(batch["hash"], dtype=np.uint64)
        if st.merged:  # pages already merged (or planned) with this very content: nothing to do
            get, sh = st.merged.get, self.slot_hash
            fresh = np.fromiter(
                ((c := get(g)) is None or sh[c] != h for g, h in zip(gpas.tolist(), hashes.tolist(), strict=True)),
                dtype=bool, count=len(gpas),
            )
            gpas, hashes = gpas[fresh], hashes[fresh]
        if not len(gpas):
            return
        # the guest's word is checked against the page's bytes, for the whole batch in C
        src, offs = st.sources(gpas)
        pages, ok = verify.verify(st.fds, src, offs, hashes, out=st.buf)
        st.buf = pages
        st.c.changed += int(len(ok) - np.count_nonzero(ok))  # stale or forged: dropped
        idx = np.flatnonzero(ok)
        self._place(st, idx.tolist(), gpas[idx].tolist(), hashes[idx].tolist(), pages)

    def _place(self, st: _VMState, idx: list[int], gpas: list[int], hashes: list[int], pages: np.ndarray) -> None:
        """Verified records -> plans. Per record: already merged with this content (skip), a
        content in the store (plan), a first holder (remember it), or the second holder of a
        content whose first holder still holds the same bytes (store the page, plan both).

        The hot loop of the engine (dict and list lookups bound to locals)."""
        merged, slot_of, candidate, slot_hash = st.merged, self.slot_of, self.candidate, self.slot_hash
        me, store = st.idx, self.store
        assert store is not None
        for i, gpa, h in zip(idx, gpas, hashes, strict=True):
            cur = merged.get(gpa)
            if cur is not None:
                if slot_hash[cur] == h:
                    continue  # a second record of this page in the batch
                # a merged page now holds other bytes: the guest wrote it (copy-on-write broke)
                self._unref(st, gpa)
                st.c.broken += 1
            slot = slot_of.get(h)
            if slot is None:
                cand = candidate.get(h)
                if cand is None or (cand[0] == me and cand[1] == gpa):
                    candidate[h] = (me, gpa)
                    continue
                other = self.vms[cand[0]]
                data = pages[i].tobytes()  # a copy: the store keeps it until its next sync
                if cand[1] in other.merged or other.read_page(cand[1]) != data:
                    candidate[h] = (me, gpa)  # the first holder changed since: we are first now
                    continue
                del candidate[h]
                slot = store.append(data)
                slot_of[h] = slot
                slot_hash.append(h)
                self.slot_refs.append(0)
                self._plan(other, cand[1], slot)
            self._plan(st, gpa, slot)

    def _plan(self, st: _VMState, gpa: int, slot: int) -> None:
        if not st.pending:
            st.pending_since = time.monotonic()
        st.pending.append((gpa, slot * PAGE))
        st.merged[gpa] = slot
        st.version += 1
        st.remapped[gpa // PAGE] = True
        self.slot_refs[slot] += 1
        self.maybe_free.discard(slot)
        if len(st.pending) >= self.batch_pages:
            self._flush(st)

    def _unref(self, st: _VMState, gpa: int) -> None:
        slot = st.merged.pop(gpa)
        st.version += 1
        self.slot_refs[slot] -= 1
        if self.slot_refs[slot] <= 0:
            self.maybe_free.add(slot)

    def _free_unused_slots(self, live: set[int]) -> int:
        """Free the store slots no VM maps: ``live`` are the slots the agents report mapped
        (their own view, not the engine's bookkeeping) plus those of planned merges."""
        freed = 0
        for slot in sorted(self.maybe_free - live):
            h = self.slot_hash[slot]
            if self.slot_of.get(h) == slot:
                del self.slot_of[h]
            if self.store is not None:
                self.store.free(slot)
            freed += 1
        self.maybe_free &= live
        return freed

    # ---------------------------------------------------------------- plans -> agent
    def _flush(self, st: _VMState) -> None:
        pairs = np.array(st.pending, dtype="<u8").reshape(-1, 2)
        st.pending = []
        assert self.store is not None
        self.store.sync()  # the agent compares with (and maps) the store's bytes
        t0 = time.monotonic()
        st.m.qmp("stop")
        try:
            res = st.agent.merge(pairs)
        except AgentError as e:
            self.log(f"VM {st.m.name}: merge batch failed: {e}")
            res = None
        finally:
            st.m.qmp("cont")
        st.c.paused_s += time.monotonic() - t0
        st.c.batches += 1
        if res is None:
            for gpa, _ in pairs.tolist():
                self._unref(st, gpa)
            st.c.failed += len(pairs)
            return
        st.c.merged_total += res.merged
        st.c.mismatched += res.mismatched
        st.c.failed += res.failed
        st.c.agent_ns += res.elapsed_ns
        if res.mismatched or res.failed:
            self._reconcile(st, {int(g) for g, _ in pairs.tolist()})
        st.c.merged = len(st.merged)

    def _mapped_arrays(self, st: _VMState, ranges: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(gpas, slots) of every page the agent maps from the store, not faulted private;
        sorted by gpa. Expanded from the agent's ranges (asked for unless given) with numpy:
        no per-page Python."""
        if ranges is None:
            ranges = st.agent.merged_ranges(exclude_private=True)
        ranges = ranges.astype(np.int64).reshape(-1, 3)
        if not len(ranges):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        n = ranges[:, 2]
        starts = np.repeat(np.cumsum(n) - n, n)
        k = np.arange(int(n.sum()), dtype=np.int64) - starts
        gpas = np.repeat(ranges[:, 0], n) + k * PAGE
        slots = np.repeat(ranges[:, 1] // PAGE, n) + k
        order = np.argsort(gpas, kind="stable")
        return gpas[order], slots[order]

    def _reconcile(self, st: _VMState, gpas: set[int]) -> None:
        """After a batch with misses: drop the planned pages the agent did not map."""
        g, sl = self._mapped_arrays(st)
        for gpa in gpas:
            slot = st.merged.get(gpa)
            if slot is None:
                continue
            i = int(np.searchsorted(g, gpa))
            if not (i < len(g) and g[i] == gpa and sl[i] == slot):
                self._unref(st, gpa)

    def check_breaks(self) -> int:
        """Take each agent's word for which pages still map the store (not faulted private):
        pages the guests wrote since are copy-on-write breaks; slots nobody maps are freed.

        The engine's own bookkeeping is reset to the agents' view, so a stale or forged hint
        can never make the engine free a store page that some guest still maps. Vectorised:
        only the pages that differ are touched in Python.
        """
        broken = 0
        live: list[np.ndarray] = []
        self._quiet_check = True
        for st in self.vms:
            if not st.merged and not self.maybe_free:
                continue
            ranges = st.agent.merged_ranges(exclude_private=True)
            reply = ranges.tobytes()
            if (st.version, reply) == st.checked and not st.pending and not self.maybe_free:
                continue  # the agent maps what it mapped at the last check, the engine agrees
            self._quiet_check = False
            planned = {g: s // PAGE for g, s in st.pending}
            g, sl = self._mapped_arrays(st, ranges)
            live.append(sl)
            live.append(np.fromiter(planned.values(), np.int64, len(planned)))
            keys = np.fromiter(st.merged.keys(), np.int64, len(st.merged))
            vals = np.fromiter(st.merged.values(), np.int64, len(st.merged))
            # engine says merged, agent does not (with that slot): broken, unless still planned
            idx = np.minimum(np.searchsorted(g, keys), max(len(g) - 1, 0))
            ok = (g[idx] == keys) & (sl[idx] == vals) if len(g) else np.zeros(len(keys), bool)
            for gpa, slot in zip(keys[~ok].tolist(), vals[~ok].tolist(), strict=True):
                if planned.get(gpa) == slot:
                    continue
                self._unref(st, gpa)
                st.c.broken += 1
                broken += 1
            # agent maps it, engine had let go of it: take the agent's word
            if len(g):
                order = np.argsort(keys, kind="stable")
                ks, vs = keys[order], vals[order]
                j = np.minimum(np.searchsorted(ks, g), max(len(ks) - 1, 0))
                known = (ks[j] == g) & (vs[j] == sl) if len(ks) else np.zeros(len(g), bool)
                for gpa, slot in zip(g[~known].tolist(), sl[~known].tolist(), strict=True):
                    if gpa in st.merged:
                        self._unref(st, gpa)
                    st.merged[gpa] = slot
                    st.version += 1
                    st.remapped[gpa // PAGE] = True
                    self.slot_refs[slot] += 1
                    self.maybe_free.discard(slot)
            st.c.merged = len(st.merged)
            st.checked = (st.version, reply) if not st.pending else None
        if self.maybe_free:
            self._free_unused_slots(set(np.concatenate(live).tolist()) if live else set())
        return broken

    # ---------------------------------------------------------------- figures
    def merged_ranges(self, exclude_private: bool = False) -> dict[str, np.ndarray]:
        """Per VM: the (guest_off, store_off, npages) ranges mapped from the store now; with
        ``exclude_private`` without the pages the guest has written since (copy-on-write
        broken: they hold a private copy and no longer need the store page)."""
        return {st.m.name: st.agent.merged_ranges(exclude_private) for st in self.vms}

    def stats(self) -> dict[str, Any]:
        for st in self.vms:
            s = st.ring.snapshot()
            st.c.rejected, st.c.dropped = int(s.rejected), int(s.dropped)
            with contextlib.suppress(AgentError, OSError, ValueError, KeyError):
                st.c.agent_cpu_ns = int(st.agent.stats()["thread_cpu_ns"])
        vms = {st.m.name: dataclasses.asdict(st.c) for st in self.vms}
        merged_total = sum(v["merged_total"] for v in vms.values())
        cpu = time.process_time() - self.cpu_start
        return {
            "domain": self.domain,
            "store_pages": self.store.live if self.store else 0,
            "store_slots_total": self.store.slots if self.store else 0,
            "store_path": str(self.store_path),
            "engine_cpu_s": round(cpu, 3),
            "merged_total": merged_total,
            "vms": vms,
        }
