"""Host-observed hints: the preload (``hosthints.c``) that reports a stock guest's disk reads.

QEMU reads a guest's disk blocks into guest RAM itself (``preadv64``/``pread64`` from its
thread pool, with the harness's drive settings). ``hosthints.c``, preloaded into QEMU, hashes
every whole page such a read put in guest RAM and pushes the same record the patched guest
driver would into a hint ring of the same format (``docs/hint-ring.md``), which the harness
created and reads as it reads a guest's. No guest change: any kernel, any guest.

This module builds the library (once per source hash, into the cache, like the merge agent),
attaches it to a VM (:class:`HostHintsAttachment`: a ring memfd under the same key as the guest
driver's ring, so the engine does not care who fills it; the preload; the guest's stock
driver), and reads the counters the library keeps in the ring header (calls, pages hashed,
its CPU time: the host-side cost of host hints).

What it covers is what the harness configures: QEMU 7.2's ``aio=threads`` (the default; the VM
never sets ``aio=``) on a qcow2 overlay over a raw base, ``cache=writeback``. Reads with
``aio=native`` or ``aio=io_uring`` land in guest RAM in another call and are not reported.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.hints import init_ring
from harness.memfd import ProcFile, open_file
from harness.sharing.agent import build_library, library_path
from harness.vm import VM, Attachment

LIB_NAME = "satori_hosthints.so"

# header fields a host producer writes (docs/hint-ring.md "Host producer")
OFF_PRODUCER = 64
OFF_DROPPED = 72
OFF_PARTIAL = 80
OFF_GUEST_STATE = 88
OFF_HH_CALLS = 96
OFF_HH_CPU_NS = 104
OFF_HH_PAGES = 112
OFF_HH_OTHER = 120


def source() -> Path:
    return Path(__file__).with_name("hosthints.c")


def ensure_library() -> Path:
    """Compile ``hosthints.c`` once per source hash into the cache; return the library path."""
    src = source()
    return build_library(src, library_path(src, "hosthints", LIB_NAME), "the host-hints preload")


def preload_env(ring: str | os.PathLike, ram: str | os.PathLike,
                disks: Sequence[str | os.PathLike]) -> dict[str, str]:
    """Environment entries for a QEMU process that should report its guest's disk reads.

    ``ring``: the hint ring file (initialised with :func:`harness.hints.init_ring`; inside QEMU
    a ``/proc/self/fd/N`` of a memfd it inherits);
    ``ram``: the guest RAM backend file (``mem-path=``, or a ``/proc/.../fd/N`` link to it);
    ``disks``: the image files whose reads count (the overlay, then its backing file): a
    record's ``disk`` is the index in this list, its ``sector`` the byte offset in that file
    / 512. An ``LD_PRELOAD`` already in the environment is kept after this library.
    """
    if not disks:
        raise HarnessError("host hints need at least one disk image file")
    for d in disks:
        if ":" in os.fspath(d):
            raise HarnessError(f"host hints: disk path {d} contains ':'")
    lib = str(ensure_library())
    prev = os.environ.get("LD_PRELOAD", "")
    return {
        "LD_PRELOAD": lib if not prev else f"{lib}:{prev}",
        "SATORI_HOSTHINTS_RING": os.fspath(ring),
        "SATORI_HOSTHINTS_RAM": os.fspath(ram),
        "SATORI_HOSTHINTS_DISKS": ":".join(os.fspath(d) for d in disks),
    }


@dataclasses.dataclass(frozen=True)
class HostHintCounters:
    """What the preload in one QEMU did so far (from the ring header it writes)."""

    attached: bool  # the preload found and accepted the ring
    calls: int  # read calls whose destination lay in guest RAM
    pages: int  # whole pages hashed (records pushed + dropped)
    records: int  # records published (the ring's producer position)
    dropped: int  # ring full
    partial: int  # pieces of reads into RAM that were not whole aligned pages
    other: int  # reads into guest RAM from files that are not the VM's disk images
    cpu_ns: int  # CPU time the QEMU threads spent in the preload's work (hash + push)

    @property
    def cpu_s(self) -> float:
        return self.cpu_ns / 1e9


def read_counters(ring: ProcFile | str | os.PathLike) -> HostHintCounters:
    """The host producer's counters of one ring (all zero if no preload attached yet)."""
    fd = open_file(ring)
    try:
        hdr = os.pread(fd, 128, 0)
    except OSError as e:
        raise HarnessError(f"cannot read hint ring {ring}: {e.strerror}") from e
    finally:
        os.close(fd)
    return counters_from_header(hdr, str(ring))


def counters_from_header(hdr: bytes, what: str = "hint ring") -> HostHintCounters:
    """:class:`HostHintCounters` from the first 128 bytes of a ring (e.g. a reader's mapping)."""
    if len(hdr) < 128:
        raise HarnessError(f"{what} is too small")
    u64 = lambda off: struct.unpack_from("<Q", hdr, off)[0]  # noqa: E731
    return HostHintCounters(
        attached=struct.unpack_from("<I", hdr, OFF_GUEST_STATE)[0] == 1,
        calls=u64(OFF_HH_CALLS), pages=u64(OFF_HH_PAGES), records=u64(OFF_PRODUCER),
        dropped=u64(OFF_DROPPED), partial=u64(OFF_PARTIAL), other=u64(OFF_HH_OTHER),
        cpu_ns=u64(OFF_HH_CPU_NS),
    )


class HostHintsAttachment(Attachment):
    """Host-observed hints for a VM: a hint ring memfd (key ``ring``, like the guest driver's,
    but no ivshmem device: the guest never sees it), the preload that fills it from QEMU's own
    disk reads, and the guest's stock disk driver (``satori.hints=0``). Needs guest RAM the
    preload can find (``ram_backend="file"``)."""

    key = "host-hints"

    def __init__(self, ring_bytes: int = 4 << 20) -> None:
        if ring_bytes & (ring_bytes - 1) or ring_bytes < 8192:
            raise HarnessError("ring_bytes must be a power of two >= 8192")
        self.ring_bytes = ring_bytes

    def pre_launch(self, vm: VM) -> None:
        from harness.sharing.attach import RING_KEY

        ram_fd = vm.memfd_number("ram")
        if ram_fd is None:
            raise HarnessError(f"VM {vm.name}: host hints need guest RAM in a shared memfd "
                               "(ram_backend 'file'), not anonymous RAM")
        fd = vm.add_memfd(RING_KEY, self.ring_bytes)
        init_ring(fd, self.ring_bytes)
        env = preload_env(f"/proc/self/fd/{fd}", f"/proc/self/fd/{ram_fd}",
                          [vm.paths.overlay, vm.image.rootfs])
        vm.add_preload(env.pop("LD_PRELOAD").split(":")[0])
        for k, v in env.items():
            vm.set_env(k, v)
        vm.set_kernel_arg("satori.hints", "0")  # the stock driver, whatever the image has

    def state(self, vm: VM) -> dict[str, str | int | None]:
        return {"source": "host"}

    def host_memory(self, vm: VM) -> int:
        return self.ring_bytes
