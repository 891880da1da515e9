"""The guest image: build it from a recipe in ``images/``, cache it by hash, find it again.

A build makes, in ``<cache>/images/<recipe hash>/``:

- ``vmlinuz``: Debian's kernel (the current ABI of ``linux-image-amd64``),
- ``initrd.img``: a busybox initramfs that loads virtio/ext4 (and the patched virtio_blk that
  reports page hashes to the host, when the guest patch builds) and ``switch_root``s,
- ``rootfs.raw``: an ext4 image made with ``mkfs.ext4 -d`` from a ``debootstrap --variant=minbase``
  tree (no loop mount), with the kernel's modules, a small init, sshd and the datasets,
- ``id_ed25519`` / ``id_ed25519.pub``: the key pair made at build time for SSH as root,
- ``manifest.json``: what was built from what (recipe hash, kernel ABI and version, mirror...).

The hash covers the recipe, every file the recipe pulls in from ``images/`` and
``guest_patches/``, and the resolved kernel ABI: the same inputs give the same folder, and a
second build is a no-op. The folder is written under a temporary name and renamed when
complete, so a half-built image is never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from harness.errors import ImageError, ToolMissing
from harness.paths import cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO_ROOT / "images"
PATCHES_DIR = REPO_ROOT / "guest_patches"
DEFAULT_RECIPE = IMAGES_DIR / "bookworm.yaml"

# host tool -> Debian package that provides it
HOST_TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "depmod": "kmod",
    "modprobe": "kmod",
    "cpio": "cpio",
    "mkfs.ext4": "e2fsprogs",
    "ssh-keygen": "openssh-client",
    "dpkg-deb": "dpkg",
    "zstd": "zstd",
}
BUSYBOX_STATIC = Path("/bin/busybox")  # from busybox-static

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Image:
    """A built guest image: the files a VM boots from."""

    root: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    key: Path
    abi: str
    recipe_hash: str
    hints: bool  # the initramfs holds the patched virtio_blk and the ring module
    name: str | None = None  # the recipe's name (manifest), for results

    @classmethod
    def load(cls, root: Path) -> Image:
        manifest = json.loads((root / "manifest.json").read_text())
        return cls(
            root=root,
            kernel=root / "vmlinuz",
            initrd=root / "initrd.img",
            rootfs=root / "rootfs.raw",
            key=root / "id_ed25519",
            abi=manifest["abi"],
            recipe_hash=manifest["recipe_hash"],
            hints=bool(manifest.get("hints")),
            name=manifest.get("name"),
        )

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())


# ---------------------------------------------------------------- apt sources / mirror


@dataclasses.dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse a deb822 ``.sources`` file into its ``Types: deb`` entries (comments ignored)."""
    out: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                fields[key] = val.strip()
        if not fields or "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(
                AptSource(
                    uri=uri.rstrip("/"),
                    suites=tuple(fields.get("suites", "").split()),
                    components=tuple(fields.get("components", "").split()),
                )
            )
    return out


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Parse classic ``sources.list`` lines (``deb [opts] URI SUITE COMPONENT...``)."""
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line[4:]).split()
        if len(line) >= 2:
            out.append(AptSource(uri=line[0].rstrip("/"), suites=(line[1],), components=tuple(line[2:])))
    return out


def host_apt_sources(root: Path = Path("/etc/apt")) -> list[AptSource]:
    sources: list[AptSource] = []
    files: list[Path] = []
    if (root / "sources.list").is_file():
        files.append(root / "sources.list")
    d = root / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for f in files:
        text = f.read_text(errors="replace")
        sources += parse_deb822_sources(text) if f.suffix == ".sources" else parse_one_line_sources(text)
    return sources


def pick_mirror(sources: Iterable[AptSource], suite: str) -> str:
    """The URI of the machine's own apt source that serves ``suite`` with component main."""
    for s in sources:
        if suite in s.suites and ("main" in s.components or not s.components):
            return s.uri
    raise ImageError(
        f"no apt source on this machine serves '{suite} main'; "
        "set SATORI_MIRROR=<debian mirror URI> to choose one"
    )


def archive_mirror(sources: Iterable[AptSource], suite: str) -> str:
    """The archive URI for ``suite``: the machine's own source that serves it or, when none
    does (a guest of another Debian release than the host's), the URI that serves the host's
    own release: one Debian archive serves every release."""
    sources = list(sources)
    try:
        return pick_mirror(sources, suite)
    except ImageError:
        pass
    for s in sources:
        if any("-" not in x for x in s.suites) and ("main" in s.components or not s.components):
            return s.uri
    return pick_mirror(sources, suite)  # the clear error


def security_mirror(sources: Iterable[AptSource]) -> str | None:
    """The URI of the machine's Debian security archive (a suite ``*-security``), if any."""
    for s in sources:
        if any(x.endswith("-security") for x in s.suites):
            return s.uri
    return None


def debian_mirror(suite: str) -> str:
    return os.environ.get("SATORI_MIRROR") or archive_mirror(host_apt_sources(), suite)


# ---------------------------------------------------------------- apt for another release


PRIVATE_APT_MAX_AGE_S = 7 * 86400


@dataclasses.dataclass(frozen=True)
class Apt:
    """How to ask apt about a recipe's suite: the machine's own apt (no options) when its sources
    serve the suite, else a private apt state for that suite in the cache (its own sources list
    and package lists; the host's apt configuration and dpkg state are never touched)."""

    options: tuple[str, ...] = ()
    root: Path | None = None

    def cmd(self, tool: str, *args: str) -> list[str]:
        return [tool, *self.options, *args]


def private_apt_sources(suite: str, mirror: str, security: str | None) -> str:
    """sources.list of a private apt state for ``suite`` (and its security updates)."""
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    lines = [f"deb [signed-by={key}] {mirror} {suite} main"]
    if security:
        lines.append(f"deb [signed-by={key}] {security} {suite}-security main")
    return "\n".join(lines) + "\n"


def apt_for(suite: str, log: Log = print, refresh: bool = False) -> Apt:
    """An :class:`Apt` that knows ``suite``; a private one is set up (``apt-get update``, a few
    MB from the mirror) the first time, or again when ``refresh``."""
    sources = host_apt_sources()
    if any(suite in s.suites for s in sources) and not os.environ.get("SATORI_MIRROR"):
        return Apt()
    mirror = debian_mirror(suite)
    root = cache_dir() / "apt" / suite
    sources_text = private_apt_sources(suite, mirror, security_mirror(sources))
    opts = (
        "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={root / 'sources.list.d'}",
        "-o", f"Dir::Etc::Preferences={root / 'preferences'}",
        "-o", f"Dir::Etc::PreferencesParts={root / 'preferences.d'}",
        "-o", f"Dir::State={root / 'state'}",
        "-o", f"Dir::State::status={root / 'status'}",
        "-o", f"Dir::Cache={root / 'cache'}",
        "-o", "APT::Sandbox::User=root",  # the cache folder is root's own (0700)
        "-o", "Acquire::Languages=none",
    )
    apt = Apt(opts, root)
    lists = root / "state" / "lists"
    stale = not (root / "sources.list").exists() or (root / "sources.list").read_text() != sources_text
    packages = list(lists.glob("*_Packages*"))
    stamp = root / "updated"  # written after each update (apt dates the lists by the server)
    if not stamp.exists() or time.time() - stamp.stat().st_mtime > PRIVATE_APT_MAX_AGE_S:
        stale = True  # a week old: the kernel it names may be gone from the mirror
    if refresh or stale or not packages:
        for d in ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "sources.list").write_text(sources_text)
        (root / "preferences").touch()
        (root / "status").touch()
        log(f"[image] apt-get update for {suite} (private apt state in {root})")
        _run(apt.cmd("apt-get", "-q", "update"), f"apt-get update ({suite}, {mirror})")
        stamp.touch()
    return apt


# ---------------------------------------------------------------- recipe + hash


def load_recipe(path: Path = DEFAULT_RECIPE) -> dict:
    from harness.config import read_text
    from harness.errors import ConfigError

    if not Path(path).exists():
        raise ImageError(f"image recipe not found: {path}")
    try:
        recipe = yaml.safe_load(read_text(path, "image recipe"))
    except ConfigError as e:
        raise ImageError(e.message) from None
    except yaml.YAMLError as e:
        raise ImageError(f"image recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ImageError(f"image recipe {path}: expected a YAML mapping (key: value)")
    for key in ("suite", "packages", "kernel", "initramfs_modules", "image_size_mb"):
        if key not in recipe:
            raise ImageError(f"image recipe {path}: missing field '{key}'")
    return recipe


def recipe_inputs(recipe_path: Path) -> list[Path]:
    """Every file whose content goes into the image, in a stable order (the guest patch only
    for a recipe that builds it)."""
    files = [recipe_path]
    files += sorted(p for p in IMAGES_DIR.iterdir() if p.is_file() and p != recipe_path and p.suffix != ".yaml")
    if not load_recipe(recipe_path).get("guest_patch", True):
        return [*files, Path(__file__)]
    if PATCHES_DIR.is_dir():
        files += sorted(p for p in PATCHES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    guestmod = REPO_ROOT / "harness" / "guestmod.py"
    if guestmod.exists():
        files.append(guestmod)
    files.append(Path(__file__))
    return files


def recipe_hash(recipe_path: Path, abi: str, extra: dict | None = None) -> str:
    h = hashlib.sha256()
    for f in recipe_inputs(recipe_path):
        rel = f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f
        h.update(str(rel).encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    h.update(abi.encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- host tools


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise ToolMissing(f"{what}: '{cmd[0]}' is not installed") from None
    if p.returncode != 0:
        raise ImageError(
            f"{what} failed (exit {p.returncode})",
            context="$ " + " ".join(cmd) + "\n" + (p.stdout[-2000:] + p.stderr[-3000:]).strip(),
        )
    return p.stdout


def ensure_host_tools(log: Log, install: bool = True) -> None:
    """Install the Debian packages of missing host tools (as root), or say what to install."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not _is_static(BUSYBOX_STATIC):
        missing.append("busybox-static")
    if not missing:
        return
    if not install or os.geteuid() != 0:
        raise ToolMissing(
            "missing host tools; install them with:\n  apt-get install -y " + " ".join(missing)
        )
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        _run(["apt-get", "install", "-y", "-q", *missing], "apt-get install " + " ".join(missing), env=env)


def _is_static(path: Path) -> bool:
    """True if ``path`` is a statically linked executable (ldd says so)."""
    if not path.exists():
        return False
    p = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    return "not a dynamic executable" in (p.stdout + p.stderr) or "statically linked" in p.stdout


def resolve_kernel_abi(metapackage: str, apt: Apt | None = None) -> tuple[str, str]:
    """``linux-image-amd64`` -> (``6.1.0-NN-amd64``, Debian version of that package)."""
    apt = apt or Apt()
    out = _run(apt.cmd("apt-cache", "depends", metapackage), f"apt-cache depends {metapackage}")
    m = re.search(r"Depends:\s+linux-image-(\S+)", out)
    if not m:
        raise ImageError(
            f"cannot resolve the kernel ABI of {metapackage}: run 'apt-get update' first", context=out
        )
    abi = m.group(1)
    pol = _run(apt.cmd("apt-cache", "policy", f"linux-image-{abi}"), "apt-cache policy")
    v = re.search(r"Candidate:\s+(\S+)", pol)
    if not v or v.group(1) == "(none)":
        raise ImageError(f"no installable version of linux-image-{abi}", context=pol)
    return abi, v.group(1)


# ---------------------------------------------------------------- build steps


class Progress:
    """Step-wise progress on the terminal: one line per step with its duration."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.t0 = time.monotonic()
        self.times: dict[str, float] = {}

    def step(self, name: str):
        prog = self

        class _Step:
            def __enter__(self):
                self.t = time.monotonic()
                prog.log(f"[image] {name} ...")

            def __exit__(self, *exc):
                dt = time.monotonic() - self.t
                prog.times[name] = round(dt, 1)
                if exc[0] is None:
                    prog.log(f"[image] {name}: done in {dt:.1f} s")

        return _Step()


def _debootstrap(recipe: dict, mirror: str, target: Path, log: Log) -> None:
    cmd = [
        "debootstrap",
        f"--variant={recipe.get('variant', 'minbase')}",
        "--include=" + ",".join(recipe["packages"]),
        recipe["suite"],
        str(target),
        mirror,
    ]
    log("[image] $ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    counts = {"Retrieving": 0, "Extracting": 0, "Unpacking": 0, "Configuring": 0}
    last = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        for k in counts:
            if line.startswith(f"I: {k}"):
                counts[k] += 1
        if time.monotonic() - last > 5:
            last = time.monotonic()
            log("[image]   debootstrap: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items()))
    rc = proc.wait()
    if rc != 0:
        raise ImageError(f"debootstrap failed (exit {rc}) from mirror {mirror}", context="\n".join(tail))


def _debootstrap_cached(recipe: dict, mirror: str, target: Path, log: Log) -> None:
    """debootstrap, reusing a tarball of an earlier run with the same suite and packages."""
    key = hashlib.sha256(
        json.dumps([recipe["suite"], recipe.get("variant", "minbase"), sorted(recipe["packages"])]).encode()
    ).hexdigest()[:16]
    tarball = cache_dir() / "debootstrap" / f"{recipe['suite']}-{key}.tar"
    if tarball.exists():
        log(f"[image] reusing debootstrap tree {tarball}")
        target.mkdir(parents=True)
        _run(["tar", "-C", str(target), "-xpf", str(tarball)], "tar -x debootstrap tree")
        return
    _debootstrap(recipe, mirror, target, log)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_suffix(".tmp")
    _run(["tar", "-C", str(target), "-cpf", str(tmp), "."], "tar -c debootstrap tree")
    tmp.rename(tarball)


def _apt_download(pkgs: list[str], dest: Path, apt: Apt | None = None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    apt = apt or Apt()
    _run(apt.cmd("apt-get", "download", *pkgs), "apt-get download " + " ".join(pkgs), cwd=dest)
    out = []
    for p in pkgs:
        name, _, ver = p.partition("=")
        found = sorted(dest.glob(f"{name}_*.deb"))
        if ver:
            found = [f for f in found if f.name.startswith(f"{name}_{ver.replace(':', '%3a')}")] or found
        if not found:
            raise ImageError(f"apt-get download {p}: no .deb appeared in {dest}")
        out.append(found[-1])
    return out


def _extract_kernel(abi: str, version: str, work: Path, apt: Apt | None = None) -> Path:
    """Download and extract the kernel package; returns the extraction root."""
    debs = _apt_download([f"linux-image-{abi}={version}"], cache_dir() / "debs", apt)
    root = work / "kernel"
    root.mkdir()
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], "dpkg-deb -x kernel")
    if (root / "usr" / "lib" / "modules").is_dir() and not (root / "lib").exists():
        (root / "lib").symlink_to("usr/lib")  # merged-/usr kernels (trixie): depmod looks in lib/
    return root


def _module_deps(modroot: Path, abi: str, modules: list[str]) -> list[Path]:
    """Module files to insmod, dependencies first, via modprobe --show-depends."""
    seen: list[Path] = []
    for m in modules:
        out = _run(
            ["modprobe", "-d", str(modroot), "-S", abi, "--show-depends", m],
            f"modprobe --show-depends {m}",
        )
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"]:
                p = Path(parts[1])
                if p not in seen:
                    seen.append(p)
            elif parts[:1] == ["builtin"]:
                continue
    return seen


def _decompressed(src: Path, dst_dir: Path) -> Path:
    """Copy a module into dst_dir, decompressing .ko.xz/.ko.zst (busybox insmod wants plain .ko)."""
    name = src.name
    dst_dir.mkdir(parents=True, exist_ok=True)
    if name.endswith(".ko.xz"):
        dst = dst_dir / name[:-3]
        dst.write_bytes(subprocess.run(["xz", "-dc", str(src)], capture_output=True, check=True).stdout)
    elif name.endswith(".ko.zst"):
        dst = dst_dir / name[:-4]
        dst.write_bytes(subprocess.run(["zstd", "-dc", str(src)], capture_output=True, check=True).stdout)
    else:
        dst = dst_dir / name
        shutil.copy2(src, dst)
    return dst


def _make_initramfs(
    kroot: Path, abi: str, recipe: dict, patched: dict[str, Path] | None, work: Path, out: Path
) -> None:
    ir = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules/stock", "lib/modules/satori"):
        (ir / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX_STATIC, ir / "bin" / "busybox")
    shutil.copy2(IMAGES_DIR / "initramfs-init", ir / "init")
    os.chmod(ir / "init", 0o755)
    modroot = kroot
    deps = _module_deps(modroot, abi, list(recipe["initramfs_modules"]))
    order = []
    for p in deps:
        src = p if p.is_absolute() and p.exists() else modroot / str(p).lstrip("/")
        dst = _decompressed(src, ir / "lib" / "modules" / "stock")
        order.append(f"stock/{dst.name}")
    if not any(o.endswith("/virtio_blk.ko") for o in order):
        raise ImageError("virtio_blk.ko not found among the kernel's modules", context="\n".join(order))
    (ir / "lib" / "modules" / "load.order").write_text("\n".join(order) + "\n")
    if patched:
        for name, path in patched.items():
            shutil.copy2(path, ir / "lib" / "modules" / "satori" / f"{name}.ko")
    # newc cpio, gzip-compressed: what every kernel can unpack
    files = subprocess.run(["find", "."], cwd=ir, capture_output=True, text=True, check=True).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=ir, input=files.encode(), capture_output=True, check=True
    ).stdout
    import gzip

    out.write_bytes(gzip.compress(cpio, compresslevel=6))


def _copy_modules(kroot: Path, abi: str, skip: list[str], rootfs: Path) -> None:
    src = kroot / "lib" / "modules" / abi
    dst = rootfs / "lib" / "modules" / abi
    if dst.exists():
        shutil.rmtree(dst)
    skip_set = {src / s for s in skip}

    def ignore(d: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(d) / n in skip_set]

    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    for link in ("build", "source"):
        (dst / link).unlink(missing_ok=True)
    _run(["depmod", "-b", str(rootfs), abi], "depmod -b rootfs")


def write_dataset(rootfs: Path, spec: dict) -> int:
    """Deterministic pseudo-random files (SHAKE-256 of name+seed): identical in every image."""
    base = rootfs / spec["path"].lstrip("/")
    base.mkdir(parents=True, exist_ok=True)
    total = 0
    size = int(spec["file_kb"]) * 1024
    for i in range(int(spec["files"])):
        seed = f"satori-dataset:{spec['path']}:{spec['seed']}:{i}".encode()
        data = hashlib.shake_256(seed).digest(size)
        (base / f"f{i:04d}.bin").write_bytes(data)
        total += size
    return total


def _configure_rootfs(rootfs: Path, pubkey: str, recipe: dict) -> None:
    sat = rootfs / "etc" / "satori"
    sat.mkdir(parents=True, exist_ok=True)
    for name in ("rc.sysinit", "rc.shutdown"):
        shutil.copy2(IMAGES_DIR / name, sat / name)
        os.chmod(sat / name, 0o755)
    shutil.copy2(IMAGES_DIR / "inittab", rootfs / "etc" / "inittab")
    shutil.copy2(IMAGES_DIR / "guest-init", rootfs / "sbin" / "satori-init")
    os.chmod(rootfs / "sbin" / "satori-init", 0o755)
    ssh = rootfs / "root" / ".ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey)
    os.chmod(ssh / "authorized_keys", 0o600)
    (rootfs / "etc" / "hostname").write_text("satori\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost satori\n")
    # sshd: root by key only, fast logins
    conf = rootfs / "etc" / "ssh" / "sshd_config.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "satori.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
        "KbdInteractiveAuthentication no\nPrintMotd no\n"
    )
    # host keys (debootstrap's postinst may have made them; make sure they exist)
    if not list((rootfs / "etc" / "ssh").glob("ssh_host_*_key")):
        _run(["ssh-keygen", "-A", "-f", str(rootfs)], "ssh-keygen -A")
    # apt caches are of no use in the guest and cost image space
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- entry points


def image_root(rhash: str) -> Path:
    return cache_dir() / "images" / rhash


def build_image(recipe_path: Path = DEFAULT_RECIPE, log: Log = print, force: bool = False,
                _retried: bool = False) -> Image:
    """Build (or reuse) the image of ``recipe_path``. Returns the cached image."""
    t_start = time.monotonic()
    recipe = load_recipe(recipe_path)
    ensure_host_tools(log)
    apt = apt_for(recipe["suite"], log)
    abi, kver = resolve_kernel_abi(recipe["kernel"], apt)
    rhash = recipe_hash(recipe_path, abi)
    root = image_root(rhash)
    if (root / "manifest.json").exists() and not force:
        log(f"[image] cached: {root} (recipe {rhash}, kernel {abi}); nothing to do")
        return Image.load(root)
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (debootstrap, device nodes)")
    mirror = debian_mirror(recipe["suite"])
    log(f"[image] building {recipe.get('name', recipe_path.stem)} recipe {rhash}: kernel {abi} ({kver}), mirror {mirror}")
    root.parent.mkdir(parents=True, exist_ok=True)
    prog = Progress(log)
    with tempfile.TemporaryDirectory(prefix=f"build-{rhash}-", dir=root.parent) as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        rootfs = work / "rootfs"
        with prog.step("debootstrap"):
            _debootstrap_cached(recipe, mirror, rootfs, log)
        with prog.step("kernel"):
            try:
                kroot: Path | None = _extract_kernel(abi, kver, work, apt)
            except ImageError:
                if apt.root is None or _retried:
                    raise
                kroot = None  # the private lists named a kernel the mirror has replaced since
            if kroot is not None:
                shutil.copy2(kroot / "boot" / f"vmlinuz-{abi}", out / "vmlinuz")
        if kroot is None:
            apt_for(recipe["suite"], log, refresh=True)
            return build_image(recipe_path, log, force, _retried=True)
        patched: dict[str, Path] | None = None
        if recipe.get("guest_patch", True):
            with prog.step("guest patch (virtio_blk hints)"):
                patched = _build_patched(abi, work / "guestmod", log)
        else:
            log("[image] stock kernel, no guest patch (recipe guest_patch: false): host hints only")
        with prog.step("modules"):
            _copy_modules(kroot, abi, list(recipe.get("skip_module_dirs", [])), rootfs)
            # depmod the extracted tree too, for modprobe --show-depends
            _run(["depmod", "-b", str(kroot), abi], "depmod -b kernel")
        with prog.step("initramfs"):
            _make_initramfs(kroot, abi, recipe, patched, work, out / "initrd.img")
        with prog.step("ssh key + rootfs config"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"satori-{rhash}", "-f", str(out / "id_ed25519")], "ssh-keygen")
            _configure_rootfs(rootfs, (out / "id_ed25519.pub").read_text(), recipe)
        data_bytes = 0
        with prog.step("datasets"):
            for spec in recipe.get("datasets", []):
                data_bytes += write_dataset(rootfs, spec)
        with prog.step("mkfs.ext4 -d"):
            size = int(recipe["image_size_mb"])
            _run(
                ["mkfs.ext4", "-q", "-F", "-L", "satori-root", "-O", "^has_journal", "-E", "root_owner=0:0",
                 "-d", str(rootfs), str(out / "rootfs.raw"), f"{size}M"],
                "mkfs.ext4 -d",
            )
        manifest = {
            "recipe": str(recipe_path.relative_to(REPO_ROOT) if recipe_path.is_relative_to(REPO_ROOT) else recipe_path),
            "recipe_hash": rhash,
            "name": recipe.get("name", recipe_path.stem),
            "suite": recipe["suite"],
            "abi": abi,
            "kernel_version": kver,
            "mirror": mirror,
            "hints": bool(patched),
            "datasets": recipe.get("datasets", []),
            "dataset_bytes": data_bytes,
            "step_seconds": prog.times,
            "build_seconds": round(time.monotonic() - t_start, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        out.rename(root)
    log(f"[image] built {root} in {time.monotonic() - t_start:.0f} s")
    return Image.load(root)


def _build_patched(abi: str, work: Path, log: Log) -> dict[str, Path] | None:
    """Build the patched virtio_blk and the ring module (harness.guestmod)."""
    try:
        from harness import guestmod
    except ImportError:
        log("[image] guest patch not available in this checkout: image without hints")
        return None
    work.mkdir(parents=True, exist_ok=True)
    return guestmod.build_guest_modules(abi, work, log=log)


def ensure_image(recipe_path: Path = DEFAULT_RECIPE, log: Log = print) -> Image:
    """The cached image, building it first if needed; ``$SATORI_IMAGE`` names a built image
    folder to use instead of the default recipe's (other recipes are built as usual)."""
    pinned = os.environ.get("SATORI_IMAGE")
    if pinned and Path(recipe_path).resolve() == DEFAULT_RECIPE.resolve():
        if not (Path(pinned) / "manifest.json").exists():
            raise ImageError(f"SATORI_IMAGE={pinned} is not a built image folder (no manifest.json)")
        return Image.load(Path(pinned))
    return build_image(recipe_path, log=log)
