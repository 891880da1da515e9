"""Build the two guest kernel modules of the hint path, out of tree, for one Debian kernel ABI.

- ``satori_ring.ko`` from ``guest_patches/satori_ring/`` (the ivshmem ring producer);
- ``virtio_blk.ko``: ``drivers/block/virtio_blk.c`` of Debian's ``linux-source-X.Y`` at exactly
  the version of ``linux-image-<abi>``, with ``guest_patches/virtio_blk-hints.patch`` applied.

How: the .debs of ``linux-source-X.Y``, ``linux-headers-<abi>``, its ``-common`` package and
``linux-kbuild-X.Y`` (names taken from ``apt-cache depends``, all at the image kernel's version)
are downloaded once into ``cache_dir()/debs`` with ``apt-get download``.  The three header
packages are extracted with ``dpkg-deb -x`` under one private root (cached per version in
``cache_dir()/guestmod``); their relative symlinks then resolve inside it, and the one absolute
``include /usr/src/...`` of the arch headers' Makefile is rewritten to the private root, so
nothing is installed into the host's /usr/src.  Only ``virtio_blk.c`` (and any local
``#include "..."`` it has) is taken out of the source tarball, also cached per version.  Host
tools the build needs (make, patch, xz, kmod, and the headers' own dependencies such as
``linux-compiler-gcc-12-x86`` and ``libelf1``) are installed with apt-get when missing (root) or
reported as :class:`~harness.errors.ToolMissing`.

Cost *measured* on the 2-core dev box (6.1.0-56-amd64): first build 23-56 s (downloading the
four .debs ~2 s plus a one-time apt-get install of ``linux-compiler-gcc-12-x86`` ~25 s;
extracting the header packages 5-14 s depending on host I/O load; ``virtio_blk.c`` out of the
140 MB source tarball 2 s thanks to ``tar --occurrence``; two module builds ~3 s each); later
builds from the cache 8.5 s (apt-cache look-ups 2.7 s, compile 5.6 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import ImageError, ToolMissing
from .paths import cache_dir

Log = Callable[[str], None]

REPO_ROOT = Path(__file__).resolve().parent.parent
PATCHES_DIR = REPO_ROOT / "guest_patches"
RING_SRC = PATCHES_DIR / "satori_ring"
VIRTIO_PATCH = PATCHES_DIR / "virtio_blk-hints.patch"
VIRTIO_REL = "drivers/block/virtio_blk.c"

# host packages the build always needs (binary -> package)
_HOST_TOOLS = {"make": "make", "patch": "patch", "xz": "xz-utils", "modinfo": "kmod", "tar": "tar"}


# -- small helpers -----------------------------------------------------------------------------


def _run(
    cmd: list[str],
    what: str,
    *,
    cwd: Path | None = None,
    env: dict | None = None,
    input_text: str | None = None,
) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, input=input_text, capture_output=True, text=True)
    except FileNotFoundError:
        raise ToolMissing(f"{what}: '{cmd[0]}' is not installed") from None
    if p.returncode != 0:
        out = (p.stdout + p.stderr).strip()
        raise ImageError(
            f"{what} failed (exit {p.returncode})", context=f"$ {' '.join(cmd)}\n{out[-4000:]}"
        )
    return p.stdout


def _apt_candidate(pkg: str) -> str | None:
    out = _run(["apt-cache", "policy", pkg], f"apt-cache policy {pkg}")
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
    if not m or m.group(1) == "(none)":
        return None
    return m.group(1)


def _apt_versions(pkg: str) -> list[str]:
    out = _run(["apt-cache", "madison", pkg], f"apt-cache madison {pkg}")
    return [line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2]


def _apt_depends(pkg: str) -> list[list[str]]:
    """Direct Depends of ``pkg`` (candidate version) as groups of alternatives."""
    out = _run(
        [
            "apt-cache",
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            pkg,
        ],
        f"apt-cache depends {pkg}",
    )
    groups: list[list[str]] = []
    alt = False
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("|Depends:") or s.startswith("Depends:"):
            name = s.split(":", 1)[1].strip().strip("<>")
            if alt and groups:
                groups[-1].append(name)
            else:
                groups.append([name])
            alt = s.startswith("|")
    return groups


def _installed(pkg: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return (
        p.returncode == 0
        and p.stdout.strip().endswith("installed")
        and "not-installed" not in p.stdout
    )


def _ensure_host_packages(pkgs: list[str], log: Log) -> None:
    missing = sorted({p for p in pkgs if not _installed(p)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise ToolMissing(
            f"building the guest modules needs these packages: {' '.join(missing)} "
            f"(apt-get install {' '.join(missing)})"
        )
    log(f"[guestmod] apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(
            [
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "-o",
                "DPkg::Lock::Timeout=300",
                *missing,
            ],
            "apt-get install (guest module build tools)",
            env=env,
        )
    except ImageError as e:
        raise ToolMissing(f"could not install {' '.join(missing)}", context=e.context) from None


def _deb_path(debs: Path, pkg: str, version: str) -> Path | None:
    ver = version.split(":", 1)[-1]  # apt drops the epoch (or writes %3a) in file names
    for cand in sorted(debs.glob(f"{pkg}_*{ver}_*.deb")):
        return cand
    return None


def _download(debs: Path, pkg: str, version: str, log: Log) -> Path:
    found = _deb_path(debs, pkg, version)
    if found:
        return found
    if version not in _apt_versions(pkg):
        avail = ", ".join(_apt_versions(pkg)) or "none"
        raise ImageError(
            f"{pkg} {version} (the guest kernel's version) is not available from apt; "
            f"available: {avail}. Run apt-get update, or pick the kernel whose source is there."
        )
    log(f"[guestmod] apt-get download {pkg}={version}")
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
        _run(
            ["apt-get", "download", f"{pkg}={version}"],
            f"apt-get download {pkg}={version}",
            cwd=Path(tmp),
        )
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageError(f"apt-get download {pkg}={version} produced {len(got)} files")
        dest = debs / got[0].name
        os.replace(got[0], dest)
    return dest


def _fix_absolute_symlinks(root: Path) -> None:
    """Point absolute symlinks of an extracted package tree into ``root`` itself."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                target = os.readlink(p)
                if target.startswith("/"):
                    p.unlink()
                    p.symlink_to(root / target.lstrip("/"))


# -- the steps ---------------------------------------------------------------------------------


def _packages(abi: str) -> tuple[str, dict[str, str], list[str]]:
    """(version, {role: package}, host packages the headers depend on)."""
    image_pkg = f"linux-image-{abi}"
    version = _apt_candidate(image_pkg)
    if not version:
        raise ImageError(f"apt knows no {image_pkg}: cannot build guest modules for kernel {abi}")
    m = re.match(r"(\d+)\.(\d+)", abi)
    if not m:
        raise ImageError(f"unexpected kernel ABI name {abi!r}")
    series = f"{m.group(1)}.{m.group(2)}"
    headers = f"linux-headers-{abi}"
    pkgs = {"source": f"linux-source-{series}", "headers": headers}
    host: list[str] = []
    deps = _apt_depends(headers)
    for group in deps:
        name = group[0]
        if name.startswith("linux-headers-") and name.endswith("-common"):
            pkgs["common"] = name
        elif name.startswith("linux-kbuild-"):
            pkgs["kbuild"] = name
        else:
            host.append(name)  # e.g. linux-compiler-gcc-12-x86
    for role in ("common", "kbuild"):
        if role not in pkgs:
            raise ImageError(
                f"{headers} has no {role} dependency",
                context="\n".join(" | ".join(g) for g in deps),
            )
    return version, pkgs, host


def _deb_depends(deb: Path) -> list[list[str]]:
    """The Depends field of a .deb file as groups of alternatives (no apt-cache round trip)."""
    field = _run(["dpkg-deb", "-f", str(deb), "Depends"], f"dpkg-deb -f {deb.name}").strip()
    groups = []
    for item in field.split(","):
        alts = [re.sub(r"[\s(:].*", "", a.strip()) for a in item.split("|")]
        alts = [a for a in alts if a]
        if alts:
            groups.append(alts)
    return groups


def _header_tree(abi: str, version: str, debs: dict[str, Path], log: Log) -> Path:
    """Extracted headers+kbuild under one private root (cached); returns the headers dir."""
    base = cache_dir() / "guestmod" / f"{abi}_{version.replace(':', '%3a')}"
    root = base / "root"
    hdir = root / "usr" / "src" / f"linux-headers-{abi}"
    ready = base / "headers.ready"
    if ready.exists() and (hdir / "Makefile").exists():
        return hdir
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for role in ("headers", "common", "kbuild"):
        _run(["dpkg-deb", "-x", str(debs[role]), str(root)], f"dpkg-deb -x {debs[role].name}")
    _fix_absolute_symlinks(root)
    mk = hdir / "Makefile"
    if not mk.exists():
        raise ImageError(f"{debs['headers'].name} has no usr/src/linux-headers-{abi}/Makefile")
    text = mk.read_text()
    # "include /usr/src/linux-headers-<ver>-common/Makefile": keep it inside the private root
    fixed = re.sub(
        r"(?m)^(\s*-?include\s+)/usr/src/", lambda m: f"{m.group(1)}{root}/usr/src/", text
    )
    mk.write_text(fixed)
    for needed in (hdir / "scripts" / "mod" / "modpost", hdir / ".config", hdir / "Module.symvers"):
        if not needed.exists():
            raise ImageError(
                f"kernel headers tree incomplete: {needed} missing "
                "(symlink into linux-kbuild not resolved?)"
            )
    ready.write_text(version + "\n")
    log(f"[guestmod] headers for {abi} {version} ready in {hdir}")
    return hdir


def _pristine_source(abi: str, version: str, source_deb: Path, log: Log) -> Path:
    """``drivers/block`` files of the source tarball that virtio_blk.c needs (cached)."""
    base = cache_dir() / "guestmod" / f"{abi}_{version.replace(':', '%3a')}"
    src = base / "src"
    ready = base / "src.ready"
    if ready.exists() and (src / VIRTIO_REL).exists():
        return src
    if src.exists():
        shutil.rmtree(src)
    with tempfile.TemporaryDirectory(
        dir=base.parent if base.parent.exists() else None, prefix=".src-"
    ) as tmp:
        t = Path(tmp)
        # the tarball only: dpkg-deb --fsys-tarfile streams the data, tar takes one member
        deb_root = t / "deb"
        deb_root.mkdir()
        _run(["dpkg-deb", "-x", str(source_deb), str(deb_root)], f"dpkg-deb -x {source_deb.name}")
        tarballs = sorted((deb_root / "usr" / "src").glob("linux-source-*.tar.*"))
        if not tarballs:
            raise ImageError(f"{source_deb.name} holds no usr/src/linux-source-*.tar.*")
        tarball = tarballs[0]
        top = tarball.name.split(".tar")[0]
        wanted = [VIRTIO_REL]
        seen: set[str] = set()
        out = t / "x"
        out.mkdir()
        log(f"[guestmod] extracting {VIRTIO_REL} from {tarball.name}")
        while wanted:
            members = [f"{top}/{w}" for w in wanted]
            _run(
                ["tar", "-xf", str(tarball), "-C", str(out), "--occurrence=1", *members],
                f"tar -x {' '.join(wanted)} from {tarball.name}",
            )
            seen.update(wanted)
            nxt = []
            for w in wanted:
                for inc in re.findall(
                    r'(?m)^\s*#\s*include\s+"([^"]+)"', (out / top / w).read_text()
                ):
                    rel = os.path.normpath(os.path.join(os.path.dirname(w), inc))
                    if rel not in seen and not rel.startswith(".."):
                        nxt.append(rel)
            wanted = nxt
        base.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out / top), str(src))
        # unlink the 140 MB tarball copy right away (the .deb stays in the cache)
        shutil.rmtree(deb_root)
    ready.write_text(version + "\n")
    return src


@contextlib.contextmanager
def _cache_lock(log: Log):
    d = cache_dir() / "guestmod"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("[guestmod] waiting for another build to finish preparing the kernel headers")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make(hdir: Path, mdir: Path, what: str, extra: list[str] | None = None) -> None:
    jobs = str(os.cpu_count() or 1)
    _run(["make", "-j", jobs, "-C", str(hdir), f"M={mdir}", *(extra or []), "modules"], what)


def _vermagic(ko: Path) -> str:
    return _run(["modinfo", "-F", "vermagic", str(ko)], f"modinfo {ko.name}").strip()


def build_guest_modules(abi: str, out_dir: Path, log: Log = print) -> dict[str, Path]:
    """Build ``satori_ring.ko`` and the patched ``virtio_blk.ko`` for kernel ``abi``
    (e.g. ``6.1.0-56-amd64``) and copy them into ``out_dir``.

    Returns ``{"satori_ring": path, "virtio_blk": path}``.  Raises
    :class:`~harness.errors.ImageError` when a package at the kernel's exact version is missing,
    the patch does not apply, or a build fails (with the tool's output as context), and
    :class:`~harness.errors.ToolMissing` when host build tools are missing and cannot be
    installed.
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    if not VIRTIO_PATCH.exists() or not (RING_SRC / "satori_ring.c").exists():
        raise ImageError(f"guest patches missing in {PATCHES_DIR}")
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query"):
        if not shutil.which(tool):
            raise ToolMissing(f"building guest modules needs Debian's '{tool}'")

    version, pkgs, host_deps = _packages(abi)
    log(f"[guestmod] kernel {abi} version {version}: {', '.join(pkgs.values())}")

    debdir = cache_dir() / "debs"
    debdir.mkdir(parents=True, exist_ok=True)
    # several image builds may run at once and share the cache: one prepares it at a time
    with _cache_lock(log):
        debs = {role: _download(debdir, pkg, version, log) for role, pkg in pkgs.items()}
        for role in ("kbuild", "common"):  # the prebuilt kbuild tools need libelf1, libssl3...
            for group in _deb_depends(debs[role]):
                if not any(n in pkgs.values() for n in group):
                    host_deps.append(group[0])
        _ensure_host_packages([*_HOST_TOOLS.values(), *host_deps], log)
        t_dl = time.monotonic()

        hdir = _header_tree(abi, version, debs, log)
        src = _pristine_source(abi, version, debs["source"], log)
        t_prep = time.monotonic()

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="satori-guestmod-") as tmp:
        work = Path(tmp)
        ring = work / "satori_ring"
        shutil.copytree(
            RING_SRC,
            ring,
            ignore=shutil.ignore_patterns(
                "*.o", "*.ko", "*.cmd", "*.mod*", "Module.symvers", "modules.order"
            ),
        )
        vblk = work / "virtio_blk"
        shutil.copytree(src, vblk)
        try:
            p = subprocess.run(
                [
                    "patch",
                    "-p1",
                    "--forward",
                    "--batch",
                    "--fuzz=0",
                    "--no-backup-if-mismatch",
                    "-i",
                    str(VIRTIO_PATCH),
                ],
                cwd=vblk,
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            raise ToolMissing("'patch' is not installed (apt-get install patch)") from None
        if p.returncode != 0:
            raise ImageError(
                f"{VIRTIO_PATCH.name} does not apply to {VIRTIO_REL} of {pkgs['source']} {version}",
                context=(p.stdout + p.stderr).strip(),
            )
        # build flat: the Kbuild sits beside the patched file
        flat = work / "vblk"
        shutil.copytree(vblk / "drivers" / "block", flat)
        (flat / "Kbuild").write_text("obj-m := virtio_blk.o\n")

        log("[guestmod] building satori_ring.ko")
        _make(hdir, ring, "build satori_ring.ko")
        log("[guestmod] building patched virtio_blk.ko")
        _make(
            hdir,
            flat,
            "build patched virtio_blk.ko",
            [f"KBUILD_EXTRA_SYMBOLS={ring / 'Module.symvers'}"],
        )

        result: dict[str, Path] = {}
        for name, ko in (
            ("satori_ring", ring / "satori_ring.ko"),
            ("virtio_blk", flat / "virtio_blk.ko"),
        ):
            if not ko.exists():
                raise ImageError(f"build of {name} produced no {ko.name}")
            vm = _vermagic(ko)
            if vm.split()[:1] != [abi]:
                raise ImageError(f"{ko.name} has vermagic '{vm}', expected kernel {abi}")
            dest = out_dir / ko.name
            shutil.copy2(ko, dest)
            result[name] = dest
    t_end = time.monotonic()
    log(
        f"[guestmod] built satori_ring.ko + virtio_blk.ko for {abi} in {t_end - t0:.1f} s "
        f"(packages {t_dl - t0:.1f} s, headers+source {t_prep - t_dl:.1f} s, "
        f"compile {t_end - t_prep:.1f} s)"
    )
    return result
