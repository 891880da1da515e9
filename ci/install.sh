#!/usr/bin/env bash
# Install everything satori needs on a Debian 12 host (run as root): QEMU and the image build
# tools from apt, then this package (editable) with its Python dependencies from PyPI.
# Safe to run again: apt and pip skip what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PKGS=(qemu-system-x86 qemu-utils debootstrap kmod cpio busybox-static e2fsprogs openssh-client
      gcc make libc6-dev libxxhash-dev patch xz-utils zstd libelf-dev bc flex bison)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] apt packages: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "[install] python package (pip install -e .[dev])"
python3 -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true
python3 -c "import harness, qemu.qmp, paramiko, xxhash, matplotlib, pytest" # fail here, not later, if pip did not work
