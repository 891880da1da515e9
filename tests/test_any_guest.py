"""Any guest: a second, stock image (Debian trixie, 6.12, no guest patch) built like the first
and booted; sharing with it comes from host-observed hints (QEMU's own reads)."""

from __future__ import annotations

import hashlib

import pytest

from harness.image import IMAGES_DIR, ensure_image
from harness.vm import VM, VMSpec

pytestmark = pytest.mark.integration

TRIXIE = IMAGES_DIR / "trixie.yaml"


def dataset_md5(files: range) -> str:
    h = hashlib.md5()
    for i in files:
        h.update(hashlib.shake_256(f"satori-dataset:/data/set1:1:{i}".encode()).digest(4 << 20))
    return h.hexdigest()


@pytest.fixture(scope="session")
def trixie():
    return ensure_image(TRIXIE, log=lambda m: print(m, flush=True))


def test_second_image_builds_and_boots(trixie, image):
    assert trixie.recipe_hash != image.recipe_hash and not trixie.hints
    assert trixie.name == "trixie-stock" and trixie.abi.startswith("6.12.")
    with VM(VMSpec("trixie1", memory_mb=384), trixie) as vm:
        assert vm.ssh.check("uname -r").strip() == trixie.abi
        assert "13" in vm.ssh.check("cat /etc/debian_version")
        # the stock driver, no ring module: nothing of satori in the guest kernel
        assert "satori" not in vm.ssh.check("cat /proc/modules")
        assert "satori.hints=0" in vm.ssh.check("cat /proc/cmdline")
        # the dataset is the same bytes as in the first image
        assert vm.ssh.check("cat /data/set1/f000[0-2].bin | md5sum").split()[0] == dataset_md5(range(3))
