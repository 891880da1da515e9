"""The ``dax`` mode's shared data: one read-only image of the dataset, mapped by every VM.

What people use instead of deduplication for read-only data shared by many VMs (Kata
Containers, Firecracker): the data sits on one host file that every guest maps through a
``virtio-pmem`` device and mounts with FS-DAX, so a guest's reads map the host's page cache of
that file directly and its own page cache never holds a copy. It saves the data's pages from
the first read, with no scanning and no hints; but only for data placed there by hand, and
never for what a guest writes.

This module owns:

- :func:`pmem_image`: the ext4 image of an image recipe's dataset (the same deterministic
  bytes as ``/data/...`` in the guest image, :func:`harness.image.write_dataset`), built once
  into ``<cache>/pmem/<key>.ext4`` (mode 0400: QEMU maps it read-only), 4 KiB blocks (FS-DAX
  needs block size == page size), no journal, its size a multiple of 2 MiB;
- :func:`pmem_args`: the QEMU arguments (``memory-backend-file,share=on,readonly=on`` +
  ``virtio-pmem-pci``) and the kernel argument ``satori.pmem=<folder>`` that makes the guest's
  init load ``virtio_pmem``/``nd_pmem`` and mount the device ``-o ro,dax=always`` over the
  dataset's folder (``images/rc.sysinit``); a mount without DAX fails there rather than
  silently using the page cache;
- :class:`PmemAttachment`: all of that for one VM (plus the device memory ``-m`` needs);
- :func:`device_regions`: where a running VM's pmem device is mapped in its QEMU (to measure
  its pages like guest RAM: the frames are the host file's page cache, one copy for all VMs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness.accounting import parse_gpa2hva
from harness.errors import HarnessError, ImageError
from harness.image import Image, write_dataset
from harness.paths import cache_dir
from harness.vm import VM, Attachment

FORMAT = 1  # bump when the layout of the pmem image changes
ALIGN = 2 << 20  # virtio-pmem regions are hot-plugged in 2 MiB sub-sections
MEMDEV_ID = "pmem0"


@dataclasses.dataclass(frozen=True)
class PmemImage:
    """A built dataset image for virtio-pmem."""

    path: Path
    size: int  # bytes, a multiple of ALIGN
    mount: str  # the guest folder it is mounted over (the dataset's path)
    files: int
    data_bytes: int


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps([FORMAT, spec], sort_keys=True).encode()).hexdigest()[:16]


def _dataset(image: Image) -> dict:
    specs = image.manifest.get("datasets") or []
    if not specs:
        raise HarnessError(f"image {image.root} has no dataset to put on a pmem device")
    if len(specs) > 1:
        raise HarnessError(f"image {image.root}: the dax mode shares one dataset, the image has {len(specs)}")
    return dict(specs[0])


def pmem_image(image: Image, log: Callable[[str], None] = print) -> PmemImage:
    """The pmem image of ``image``'s dataset, built once (a few seconds) and cached."""
    spec = _dataset(image)
    data_bytes = int(spec["files"]) * int(spec["file_kb"]) * 1024
    # ext4 with 4 KiB blocks: data + inode tables and bitmaps (~3%) + a margin, rounded up
    size = -(-(data_bytes * 104 // 100 + (8 << 20)) // ALIGN) * ALIGN
    folder = cache_dir() / "pmem"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{_key(spec)}.ext4"
    out = PmemImage(path, size, spec["path"], int(spec["files"]), data_bytes)
    if path.is_file() and path.stat().st_size == size:
        return out
    log(f"[dax] building the pmem image of {spec['path']} ({data_bytes >> 20} MB) -> {path}")
    with tempfile.TemporaryDirectory(prefix="pmem-", dir=folder) as tmp:
        tree = Path(tmp) / "tree"
        write_dataset(tree, spec)  # the same bytes as in the guest image
        img = Path(tmp) / "image.ext4"
        cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal",
               "-E", "root_owner=0:0", "-L", "satori-pmem", "-d", str(tree / spec["path"].lstrip("/")),
               str(img), f"{size >> 10}K"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise ImageError("mkfs.ext4 of the pmem image failed", context=" ".join(cmd) + "\n" + p.stderr)
        os.chmod(img, 0o400)  # QEMU maps it read-only; nobody else reads it
        os.replace(img, path)
    return out


def pmem_args(pmem: PmemImage) -> tuple[list[str], dict[str, str]]:
    """(QEMU arguments, kernel arguments) that give a VM the pmem image, mounted with DAX.
    The VM needs ``pmem.size`` bytes of device memory (``-m ...,slots=,maxmem=``)."""
    opt = os.fspath(pmem.path).replace(",", ",,")
    args = [
        "-object",
        f"memory-backend-file,id={MEMDEV_ID},share=on,readonly=on,mem-path={opt},size={pmem.size}",
        "-device", f"virtio-pmem-pci,memdev={MEMDEV_ID},id=pmemdev0",
    ]
    return args, {"satori.pmem": pmem.mount}


class PmemAttachment(Attachment):
    """The dataset's pmem image, mapped read-only into the VM and mounted with FS-DAX over the
    dataset's folder by the guest's init (the root disk's copy is hidden under the mount)."""

    key = "pmem"

    def __init__(self, pmem: PmemImage) -> None:
        self.pmem = pmem

    def pre_launch(self, vm: VM) -> None:
        args, kargs = pmem_args(self.pmem)
        vm.add_device_memory(self.pmem.size)
        vm.add_args(*args)
        for k, v in kargs.items():
            vm.set_kernel_arg(k, v)

    def state(self, vm: VM) -> dict[str, str | int | None]:
        return {"image": str(self.pmem.path), "mount": self.pmem.mount, "size": self.pmem.size}

    def host_memory(self, vm: VM) -> int:
        # the image's page cache: one copy whatever the number of VMs mapping it, and clean
        # (read-only), so the kernel can drop it under pressure: nothing to reserve per VM
        return 0


def device_regions(vm: VM) -> list[tuple[int, int]]:
    """(host virtual address, size) of each virtio-pmem device of a running VM in its QEMU
    (QMP ``query-memory-devices`` for the guest-physical address, HMP ``gpa2hva`` for the host's)."""
    out = []
    for d in vm.qmp("query-memory-devices") or []:
        if d.get("type") != "virtio-pmem":
            continue
        data = d["data"]
        text = vm.qmp("human-monitor-command", **{"command-line": f"gpa2hva {int(data['memaddr']):#x}"})
        out.append((parse_gpa2hva(text), int(data["size"])))
    return out


def dax_mounted(vm: VM, folder: str) -> bool:
    """Whether the guest has ``folder`` mounted from a pmem device with DAX (``/proc/mounts``)."""
    for line in vm.ssh.check("cat /proc/mounts").splitlines():
        f = line.split()
        if len(f) >= 4 and f[1] == folder and f[0].startswith("/dev/pmem"):
            return any(o in ("dax", "dax=always") for o in f[3].split(","))
    return False


@dataclasses.dataclass(frozen=True)
class PmemSharing:
    """The pmem pages a set of VMs touch, counted like guest RAM (METRICS.md G/F/R): ``G`` every
    (VM, present pmem page), ``F`` the distinct host frames behind them (the pmem file's page
    cache: one copy whoever maps it), ``R = G - F`` the pages saved against each VM holding its
    own copy."""

    G: int
    F: int

    @property
    def R(self) -> int:
        return self.G - self.F


def pmem_sharing(vms: list[VM]) -> PmemSharing:
    """:class:`PmemSharing` of running dax VMs, from their QEMUs' pagemaps (root)."""
    import numpy as np

    from harness.accounting import decode_pagemap, read_pagemap

    g, frames = 0, []
    for vm in vms:
        for hva, size in device_regions(vm):
            present, pfn = decode_pagemap(read_pagemap(vm.pid, hva, size // 4096))
            g += int(present.sum())
            frames.append(pfn[present])
    f = len(np.unique(np.concatenate(frames))) if frames else 0
    return PmemSharing(g, f)
