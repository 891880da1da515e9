"""What sharing attaches to a VM: the hint ring (an ``ivshmem-plain`` device over a memfd) and
the merge agent (``agent.c``, LD_PRELOADed into QEMU). The VM carries them as
:class:`harness.vm.Attachment` objects without knowing what they are.

Use::

    vm = VM(spec, image, attachments=sharing_attachments(hints=True, agent=True))
    ring_of(vm)            # ProcFile of the ring memfd, or None (image without the hint driver)
    agent_socket_of(vm)    # Path of the agent's socket, or None

and for a background VM, the same from its validated ``state.json``:
:func:`ring_of_state`, :func:`agent_socket_of_state`.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError
from harness.hints import init_ring
from harness.memfd import ProcFile
from harness.vm import VM, Attachment, state_memfile, state_paths

RING_KEY = "ring"
AGENT_KEY = "agent"
DEFAULT_RING_BYTES = 4 << 20  # power of two: ivshmem needs it
STORE_ESTIMATE = 64 << 20  # host memory a sharing VM's part of the content store may add


class HintRingAttachment(Attachment):
    """The hint ring: a memfd with an initialised header, exposed to the guest as the BAR of an
    ``ivshmem-plain`` device, and the kernel argument that loads the patched driver. On an
    image without the patched driver it adds nothing (the guest keeps the stock driver)."""

    key = "hint-ring"

    def __init__(self, ring_bytes: int = DEFAULT_RING_BYTES) -> None:
        if ring_bytes & (ring_bytes - 1) or ring_bytes < 8192:
            raise HarnessError("ring_bytes must be a power of two >= 8192")
        self.ring_bytes = ring_bytes

    def pre_launch(self, vm: VM) -> None:
        if not vm.image.hints:
            return
        fd = vm.add_memfd(RING_KEY, self.ring_bytes)
        init_ring(fd, self.ring_bytes)
        vm.add_args(
            "-object",
            f"memory-backend-file,id=hintring,size={self.ring_bytes},mem-path=/proc/self/fd/{fd},share=on",
            "-device", "ivshmem-plain,memdev=hintring,id=hintdev",
        )
        vm.set_kernel_arg("satori.hints", "1")

    def host_memory(self, vm: VM) -> int:
        return self.ring_bytes if vm.image.hints else 0


class MergeAgentAttachment(Attachment):
    """The merge agent preloaded into QEMU, serving ``<work>/agent.sock``; it finds guest RAM
    by the memfd QEMU inherited (or, for anonymous RAM, by its size)."""

    key = "merge-agent"

    def pre_launch(self, vm: VM) -> None:
        from harness.sharing.agent import agent_env

        sock = vm.paths.work / "agent.sock"
        ram_fd = vm.memfd_number("ram")
        if ram_fd is not None:
            env = agent_env(sock, f"/proc/self/fd/{ram_fd}")
        else:  # anonymous RAM (satori+ksm): the agent finds the RAM block by its size
            env = agent_env(sock, None, ram_size=vm.ram_size)
        for k, v in env.items():
            vm.set_env(k, v)

    def state(self, vm: VM) -> dict[str, str | int | None]:
        return {"socket": str(vm.paths.work / "agent.sock")}

    def host_memory(self, vm: VM) -> int:
        # the store holds one copy of each shared page, and the guests' copies are freed as
        # they merge; what it adds at most is a batch in flight and the index: an estimate
        return STORE_ESTIMATE


HINT_SOURCES = ("guest", "host", "off")


def hint_source(wanted: str | bool | None, image) -> str | None:
    """Who reports a VM's reads: ``"guest"`` (the patched driver in the image), ``"host"`` (the
    preload in QEMU, any guest) or ``None``. ``wanted``: ``"guest"`` | ``"host"`` | ``"off"``,
    or ``None``/``"auto"``/``True`` for the default: guest when the image has the driver, host
    otherwise. Asking for guest hints of an image without the driver is an error."""
    if wanted in (None, "auto", True):
        return "guest" if image.hints else "host"
    if wanted in ("off", False):
        return None
    if wanted == "host":
        return "host"
    if wanted == "guest":
        if not image.hints:
            raise HarnessError(f"image {image.name or image.root} has no hint driver (stock kernel): "
                               "use hints: host")
        return "guest"
    raise HarnessError(f"hints must be one of {', '.join(HINT_SOURCES)}, not {wanted!r}")


def sharing_attachments(hints: str | bool | None = True, agent: bool = False,
                        ring_bytes: int = DEFAULT_RING_BYTES) -> list[Attachment]:
    """The attachments of a VM that takes part in sharing (``agent``) or only reports hints.

    ``hints``: ``"guest"`` (or ``True``: the guest driver when the image has it), ``"host"``
    (host-observed hints: :class:`harness.sharing.hosthints.HostHintsAttachment`), or
    ``None``/``False``/``"off"``. Resolve a per-VM choice with :func:`hint_source` first."""
    source = {True: "guest", False: "off", None: "off"}.get(hints, hints)  # type: ignore[call-overload]
    if source not in HINT_SOURCES:
        raise HarnessError(f"hints must be one of {', '.join(HINT_SOURCES)}, not {hints!r}")
    out: list[Attachment] = []
    if source == "host":
        from harness.sharing.hosthints import HostHintsAttachment

        out.append(HostHintsAttachment(ring_bytes))
    elif source == "guest":
        out.append(HintRingAttachment(ring_bytes))
    if agent:
        out.append(MergeAgentAttachment())
    return out


def mode_attachments(mode, image, hints: str | None = None,
                     log=print) -> tuple[list[Attachment], str | None]:
    """What a VM of ``image`` carries in ``mode`` (a :class:`harness.modes.Mode`), and its hint
    source. ``hints``: the VM's own setting (``guest``/``host``/``off``, ``None`` = default).

    - a mode without hints: none; ``satori-host`` (hints ``host``): host hints for every VM but
      one set to ``off``; ``satori`` (hints ``guest``): the VM's setting, by default the guest
      driver when the image has it and host hints otherwise (a stock guest in a satori run);
    - an engine mode: the merge agent too, for every VM that has hints (a VM without hints has
      nothing to give the engine and is left out of its domain);
    - a ``pmem`` mode (dax): the dataset's pmem image, mounted with DAX by the guest.
    """
    source: str | None = None
    if mode.hints == "host":
        source = None if hints == "off" else "host"
    elif mode.hints == "guest":
        source = hint_source(hints, image)
    out = sharing_attachments(hints=source or "off", agent=mode.engine and source is not None)
    if mode.pmem:
        from harness.dax import PmemAttachment, pmem_image

        out.append(PmemAttachment(pmem_image(image, log)))
    return out, source


def ring_of(vm: VM) -> ProcFile | None:
    return vm.memfile(RING_KEY)


def agent_socket_of(vm: VM) -> Path | None:
    return vm.paths.work / "agent.sock" if vm.attached(MergeAgentAttachment.key) else None


def ring_of_state(state: dict) -> ProcFile | None:
    return state_memfile(state, RING_KEY)


def agent_socket_of_state(state: dict) -> Path | None:
    """The agent socket of a background VM: always ``agent.sock`` in the folder its state was
    found in (the state only says whether there is one)."""
    if MergeAgentAttachment.key not in state.get("attached", {}):
        return None
    return state_paths(state).work / "agent.sock"
