"""The dax mode's pmem image: the dataset's exact bytes in an ext4 image QEMU can map."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from harness import dax
from harness.image import Image


def fake_image(root: Path, datasets: list[dict]) -> Image:
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"abi": "x", "recipe_hash": "y", "datasets": datasets}))
    return Image(root, root / "vmlinuz", root / "initrd.img", root / "rootfs.raw", root / "key", "x", "y", False)


def test_pmem_image_holds_the_datasets_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SATORI_CACHE", str(tmp_path / "cache"))
    spec = {"path": "/data/set1", "files": 3, "file_kb": 64, "seed": 1}
    img = fake_image(tmp_path / "img", [spec])
    p = dax.pmem_image(img, log=lambda m: None)
    assert p.mount == "/data/set1" and p.files == 3 and p.data_bytes == 3 * 64 * 1024
    assert p.size % dax.ALIGN == 0 and p.path.stat().st_size == p.size
    assert p.path.stat().st_mode & 0o777 == 0o400
    for i in range(3):  # the same bytes as the guest image's /data/set1/f000i.bin
        want = hashlib.shake_256(f"satori-dataset:/data/set1:1:{i}".encode()).digest(64 * 1024)
        got = subprocess.run(["debugfs", "-R", f"cat /f{i:04d}.bin", str(p.path)],
                             capture_output=True, check=True).stdout
        assert got == want
    info = subprocess.run(["dumpe2fs", "-h", str(p.path)], capture_output=True, text=True).stdout
    assert "Block size:               4096" in info and "has_journal" not in info
    mtime = p.path.stat().st_mtime_ns
    assert dax.pmem_image(img, log=lambda m: None) == p and p.path.stat().st_mtime_ns == mtime  # cached


def test_pmem_args_map_read_only_and_mount_with_dax(tmp_path):
    p = dax.PmemImage(tmp_path / "a,b.ext4", 4 << 20, "/data/set1", 1, 4096)
    args, kargs = dax.pmem_args(p)
    assert args[1] == f"memory-backend-file,id=pmem0,share=on,readonly=on,mem-path={tmp_path}/a,,b.ext4,size={4 << 20}"
    assert args[2:] == ["-device", "virtio-pmem-pci,memdev=pmem0,id=pmemdev0"]
    assert kargs == {"satori.pmem": "/data/set1"}


def test_an_image_without_a_dataset_is_refused(tmp_path):
    with pytest.raises(Exception, match="no dataset"):
        dax.pmem_image(fake_image(tmp_path / "img", []), log=lambda m: None)
    assert not os.path.exists(tmp_path / "cache")
