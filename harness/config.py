"""The experiment config: one YAML file describes one experiment, validated with file:line errors.

An experiment names its VMs, how they are grouped into sharing domains, the sharing modes to
compare, the workloads to run, how often to sample and how many times to repeat. Example::

    name: quickstart
    vms: {count: 2, memory_mb: 512}          # or a list: - {name: a, memory_mb: 512}, ...
    modes: [none, ksm, satori]
    workloads:
      - name: identical-readers
        params: {files: 50}                  # of /data/set1, 4 MiB each
    repetitions: 1

What this module owns:

- the schema (pydantic v2 models, every model ``extra="forbid"`` and strict types: YAML already
  types its scalars, so ``memory_mb: "512"`` is an error, not a silent conversion);
- validation that reports *every* error at once, in one :class:`~harness.errors.ConfigError`,
  one line each: ``configs/x.yaml:7: vms.memory_mb: memory 40000 MB is more than this host can
  give (23000 MB free)``. Line numbers come from the YAML node tree (``node.start_mark``) of the
  same load that made the data; pydantic's error ``loc`` paths are mapped onto it;
- checks pydantic cannot make alone: memory larger than the host can give (``MemAvailable`` of
  ``/proc/meminfo``, or ``host_mem_mb=`` for tests), entitlement above max, duplicate VM names,
  a VM named in a sharing domain that does not exist (or in two domains), a mode that merges
  through the engine with no sharing domain named (sharing is opt-in), a mode listed twice,
  an adversary that is not one of the VMs, surplus on with no VM below its max, an image recipe
  that does not exist, a key given twice in one YAML mapping;
- the CLI functions ``satori config check FILE`` (:func:`cmd_config_check`) and ``satori config
  schema`` (:func:`cmd_config_schema`, the JSON schema of the file format).

Memory terms (the surplus manager's): ``memory_mb`` is a VM's *max*: QEMU boots it with that
much RAM; ``entitlement_mb`` is its own allocation, where the balloon holds it until sharing
frees memory to give back (default: the max, i.e. no balloon). The host must be able to give
every VM its entitlement at once; surplus above it only ever comes out of realized sharing.

Workload parameters are checked loosely: each kind has a fixed set of known keys, all optional,
with the type their default implies (or the one a module declares in ``PARAM_TYPES``: the
adversary's ``attacks`` is a list of the four known attacks). The workload modules own them
(``PARAMS`` of each class in :func:`harness.workloads.registry`: the defaults there are the
defaults here, and the config as run records them). An unknown key is an error. The modes are
the table of :mod:`harness.modes`.

Sharing domains (``sharing_domains: {name: [VM, ...]}``) are opt-in: see :data:`DOMAIN_HELP`.
A domain name is checked (:func:`check_domain_name`) before it reaches any path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import difflib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model

from harness import modes
from harness.errors import ConfigError

MODES: tuple[str, ...] = modes.NAMES
Mode = Literal[MODES]  # type: ignore[valid-type]

NAME_PATTERN = r"^[A-Za-z0-9_-]+$"  # the same rule as harness.vm.VMSpec
DOMAIN_NAME_MAX = 64  # a domain name goes into file names and QEMU options: short and plain
# Modes that merge pages across VMs through the sharing engine: they need sharing domains (opt-in).
# Modes whose ksmd scans merge across every mergeable process of the host: domains cannot bound them.
ENGINE_MODES: tuple[str, ...] = tuple(m.name for m in modes.MODES.values() if m.engine)
KSM_MODES: tuple[str, ...] = tuple(m.name for m in modes.MODES.values() if m.scans)
DOMAIN_HELP = ("a sharing domain is a group of VMs that trust each other: only VMs of one domain are "
               "ever merged together, because merging is a timing side channel (a write to a merged "
               "page is slow, so a VM can tell whether another VM of its domain holds a page)")
DEFAULT_MEMORY_MB = 512
MAX_LOWMEM_MB = 3072  # must equal harness.vm.MAX_LOWMEM_MB (a test checks it)
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_TEXT_BYTES = 4 << 20  # a config is a few KB; a bigger file is a mistake, not a config


def _param_type(default: Any) -> Any:
    """The type a parameter's default implies (a float parameter also takes a whole number)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, int | float | str):
        return type(default)
    if isinstance(default, list):
        return list[type(default[0])] if default else list[Any]
    return Any


def _workload_params() -> dict[str, dict[str, tuple[Any, Any]]]:
    """kind -> {param: (type, default)}: the workload modules' ``PARAMS``."""
    from harness.workloads import registry

    return {kind: {name: (cls.PARAM_TYPES.get(name) or _param_type(d), d) for name, d in cls.PARAMS.items()}
            for kind, cls in registry().items()}


# The one table of workload kinds and their parameters; a workload module's PARAMS is the truth.
WORKLOAD_PARAMS: dict[str, dict[str, tuple[Any, Any]]] = _workload_params()
WORKLOAD_KINDS: tuple[str, ...] = tuple(WORKLOAD_PARAMS)

# ---------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DiskThrottle(_Model):
    """A QEMU throttle group on the VM's root disk, like a real disk (both optional)."""

    iops: int | None = Field(None, ge=1, description="I/O operations per second")
    bps: int | None = Field(None, ge=1, description="bytes per second")


class _VMSettings(_Model):
    image: str | None = Field(
        None, description="image recipe (path, or a name in images/); default: the built-in recipe"
    )
    memory_mb: int = Field(DEFAULT_MEMORY_MB, ge=64, description="max memory: the VM boots with this")
    entitlement_mb: int | None = Field(
        None, ge=64, description="the VM's own allocation (balloon holds it there); default: memory_mb"
    )
    vcpus: int = Field(1, ge=1, le=64)
    disk: DiskThrottle = Field(default_factory=DiskThrottle)
    hints: Literal["guest", "host", "off"] | None = Field(
        None, description="who reports this VM's disk reads in modes with hints: the patched guest "
                          "driver, QEMU on the host (any guest kernel), or nobody; default: guest "
                          "when the image has the driver, host otherwise (satori-host: always host)"
    )


class VMGroup(_VMSettings):
    """``count`` VMs with the same settings, named ``<name_prefix>1..N``."""

    count: int = Field(ge=1, le=64)
    name_prefix: str = Field("vm", pattern=NAME_PATTERN)


class VMEntry(_VMSettings):
    """One named VM."""

    name: str = Field(pattern=NAME_PATTERN)


def _vms_form(v: Any) -> str | None:
    if isinstance(v, dict):
        return "group"
    if isinstance(v, list):
        return "list"
    if isinstance(v, VMGroup):
        return "group"
    return None


VMs = Annotated[
    Union[Annotated[VMGroup, Tag("group")], Annotated[list[VMEntry], Tag("list")]],  # noqa: UP007
    Discriminator(_vms_form),
]


def _params_model(kind: str, params: dict[str, tuple[Any, Any]]) -> type[BaseModel]:
    fields = {k: (t, Field(default=d)) for k, (t, d) in params.items()}
    cls_name = "".join(p.capitalize() for p in kind.split("-")) + "Params"
    return create_model(cls_name, __base__=_Model, **fields)  # type: ignore[call-overload]


PARAMS_MODELS: dict[str, type[BaseModel]] = {k: _params_model(k, p) for k, p in WORKLOAD_PARAMS.items()}


def _workload_model(kind: str) -> type[BaseModel]:
    params_cls = PARAMS_MODELS[kind]
    cls_name = "".join(p.capitalize() for p in kind.split("-")) + "Workload"
    return create_model(  # type: ignore[call-overload]
        cls_name,
        __base__=_Model,
        name=(Literal[kind], ...),  # type: ignore[valid-type]
        params=(params_cls, Field(default_factory=params_cls)),
    )


WORKLOAD_MODELS: dict[str, type[BaseModel]] = {k: _workload_model(k) for k in WORKLOAD_KINDS}
Workload = Annotated[
    Union[tuple(WORKLOAD_MODELS.values())],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="name"),
]


class SurplusPolicy(_Model):
    """How the surplus is lent and taken back when sharing collapses (harness.surplus.Policy,
    docs/isolation.md)."""

    reserve: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the saving never lent")
    guard: bool = Field(False, description="reclaim ahead of breaks when the host budget is at risk")
    horizon_s: float = Field(2.0, ge=0.0, description="how far ahead the guard looks at host use")
    margin: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the budget the guard keeps free")
    cooldown_s: float = Field(10.0, ge=0.0, description="no new grant this long after the guard acted")
    budget_cap: bool = Field(False, description="never grant more than the host's headroom below the budget")


@dataclasses.dataclass(frozen=True)
class VMConfig:
    """One VM, resolved: names given, defaults filled in."""

    name: str
    image: str | None
    memory_mb: int
    entitlement_mb: int
    vcpus: int
    disk_iops: int | None
    disk_bps: int | None
    hints: str | None = None  # "guest" | "host" | "off" | None (the default rule)


DomainName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=DOMAIN_NAME_MAX)]


def check_domain_name(name: str) -> str:
    """``name`` if it may name a sharing domain (letters, digits, '-', '_'; 1-64 characters);
    otherwise a ConfigError, before the name reaches any path or QEMU option."""
    if not isinstance(name, str) or not 1 <= len(name) <= DOMAIN_NAME_MAX or not all(
            c.isascii() and (c.isalnum() or c in "-_") for c in name):
        raise ConfigError(f"sharing domain name {name!r}: use letters, digits, '-' and '_' only, "
                          f"1-{DOMAIN_NAME_MAX} characters (the name goes into file names)")
    return name


class ExperimentConfig(_Model):
    """One experiment: what the ``satori run`` of a YAML file does."""

    name: str = Field(pattern=NAME_PATTERN, description="names the result folder")
    description: str = ""
    vms: VMs = Field(description="`count: N` with shared settings, or a list of named VMs")
    sharing_domains: dict[DomainName, Annotated[list[str], Field(min_length=1)]] | None = Field(
        None, description="domain -> VM names; only VMs of one domain are ever merged together; "
                          "required by the modes that merge through the engine (sharing is opt-in)"
    )
    modes: list[Mode] = Field(default_factory=lambda: list(MODES), min_length=1)
    workloads: list[Workload] = Field(min_length=1)  # type: ignore[valid-type]
    surplus: bool = Field(False, description="give the memory sharing frees back to the VMs via balloons")
    surplus_policy: SurplusPolicy = Field(default_factory=SurplusPolicy)
    engine_priority: Literal["normal", "realtime"] = Field(
        "normal", description="realtime: the engine and merge-agent threads at SCHED_RR 1, ahead of "
                              "the guests (lower merge lag on a busy host, more CPU per page saved; "
                              "harness/sharing/priority.py)")
    sample_interval_s: float = Field(1.0, ge=0.5, le=10.0)
    repetitions: int = Field(1, ge=1)
    output: str | None = Field(None, description="result folder; default results/<name>-<timestamp>")
    seed: int = 0

    def vm_list(self) -> list[VMConfig]:
        """Every VM with its name and defaults resolved, in config order."""
        if isinstance(self.vms, VMGroup):
            g = self.vms
            entries = [(f"{g.name_prefix}{i + 1}", g) for i in range(g.count)]
        else:
            entries = [(v.name, v) for v in self.vms]
        return [
            VMConfig(
                name=n, image=s.image, memory_mb=s.memory_mb,
                entitlement_mb=s.entitlement_mb if s.entitlement_mb is not None else s.memory_mb,
                vcpus=s.vcpus, disk_iops=s.disk.iops, disk_bps=s.disk.bps, hints=s.hints,
            )
            for n, s in entries
        ]

    def domains(self) -> dict[str, list[str]]:
        """The sharing domains the config names (none: nothing is merged by the engine)."""
        return {d: list(names) for d, names in (self.sharing_domains or {}).items()}

    def groups(self) -> dict[str, list[str]]:
        """The groups of VMs measured together: the sharing domains, or without any (allowed
        only when no mode merges through the engine) one group, ``all``, of every VM."""
        return self.domains() or {"all": [v.name for v in self.vm_list()]}

    def domain_notes(self) -> list[str]:
        """What the config's modes can and cannot isolate (for ``config check`` and ``run``)."""
        ksm = [m for m in self.modes if m in KSM_MODES]
        domains = self.domains()
        outside = [v.name for v in self.vm_list() if not any(v.name in n for n in domains.values())]
        if not ksm or not domains or (len(domains) < 2 and not outside):
            return []
        apart = ", ".join(domains) + (f" and VMs outside every domain ({', '.join(outside)})"
                                      if outside else "")
        mixed = [m for m in ksm if m in ENGINE_MODES]
        both = (f" (in {', '.join(mixed)} the engine honours domains, the KSM part does not)"
                if mixed else "")
        return [f"note: mode(s) {', '.join(ksm)} run KSM, which merges across every mergeable process "
                f"on the host: it cannot keep sharing domains {apart} apart{both}"]

    def output_dir(self, now: _dt.datetime | None = None) -> Path:
        if self.output:
            return Path(self.output)
        now = now or _dt.datetime.now()
        return Path("results") / f"{self.name}-{now.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- YAML with line numbers

Loc = tuple[str | int, ...]


@dataclasses.dataclass
class _Problem:
    loc: Loc
    message: str
    line: int | None = None


def _walk_nodes(node: yaml.Node, loc: Loc, lines: dict[Loc, int], dups: list[_Problem]) -> None:
    if isinstance(node, yaml.MappingNode):
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                continue
            key_loc = (*loc, knode.value)
            line = knode.start_mark.line + 1
            if key_loc in lines:  # YAML keeps the last value: so do the line numbers
                dups.append(_Problem(key_loc, f"key given twice (first on line {lines[key_loc]})", line))
                for k in [k for k in lines if k[: len(key_loc)] == key_loc]:
                    del lines[k]
            lines[key_loc] = line
            _walk_nodes(vnode, key_loc, lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*loc, i)] = item.start_mark.line + 1
            _walk_nodes(item, (*loc, i), lines, dups)


def load_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int], list[_Problem]]:
    """Data, the line of every mapping key / sequence item, and duplicate-key problems."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{source}:{line}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    lines: dict[Loc, int] = {}
    dups: list[_Problem] = []
    if node is not None:
        _walk_nodes(node, (), lines, dups)
    return data, lines, dups


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def format_loc(loc: Loc) -> str:
    out = ""
    for c in loc:
        out += f"[{c}]" if isinstance(c, int) else (f".{c}" if out else str(c))
    return out


# ---------------------------------------------------------------- pydantic errors -> problems

_TAGS = {"group", "list", *WORKLOAD_KINDS}


def _clean_loc(loc: tuple, data: Any) -> Loc:
    """Drop pydantic's union tags from an error location, guided by the data itself."""
    out: list[str | int] = []
    cur = data
    for c in loc:
        if isinstance(cur, dict) and c in cur:
            out.append(c)
            cur = cur[c]
        elif isinstance(cur, list) and isinstance(c, int) and 0 <= c < len(cur):
            out.append(c)
            cur = cur[c]
        elif c in _TAGS:
            continue
        else:
            out.append(c)
            cur = None
    return tuple(out)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "nothing (null)"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return str(v)


def _get(data: Any, loc: Loc) -> Any:
    for c in loc:
        if isinstance(data, dict) and c in data:
            data = data[c]
        elif isinstance(data, list) and isinstance(c, int) and 0 <= c < len(data):
            data = data[c]
        else:
            return None
    return data


def _known_keys(parent: Loc, data: Any) -> list[str]:
    """The keys allowed in the mapping at ``parent``."""
    model: type[BaseModel] | None = None
    if parent == ():
        model = ExperimentConfig
    elif parent == ("vms",):
        model = VMGroup
    elif len(parent) == 2 and parent[0] == "vms":
        model = VMEntry
    elif parent and parent[-1] == "disk":
        model = DiskThrottle
    elif len(parent) == 2 and parent[0] == "workloads":
        return ["name", "params"]
    elif len(parent) == 3 and parent[0] == "workloads" and parent[2] == "params":
        kind = _get(data, (*parent[:2], "name"))
        return list(WORKLOAD_PARAMS.get(kind, {})) if isinstance(kind, str) else []
    return list(model.model_fields) if model else []


def _message(err: dict, loc: Loc, data: Any) -> tuple[Loc, str]:
    t = err["type"]
    v = err.get("input")
    ctx = err.get("ctx") or {}
    if loc and loc[-1] == "[key]":
        if len(loc) == 3 and loc[0] == "sharing_domains":
            return loc[:-1], (f"sharing domain name {_show(v)}: use letters, digits, '-' and '_' only, "
                              f"1-{DOMAIN_NAME_MAX} characters (the name goes into file names)")
        return loc[:-1], f"bad key {_show(v)}"
    if t == "missing":
        return loc, "required"
    if t == "extra_forbidden":
        known = _known_keys(loc[:-1], data)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(known)
        return loc, f"unknown key ({hint})" if known else "unknown key"
    if t in ("int_type", "int_parsing", "int_from_float"):
        return loc, f"expected a whole number, got {_show(v)}"
    if t in ("float_type", "float_parsing"):
        return loc, f"expected a number, got {_show(v)}"
    if t in ("bool_type", "bool_parsing"):
        return loc, f"expected true or false, got {_show(v)}"
    if t == "string_type":
        return loc, f"expected text, got {_show(v)}"
    if t == "list_type":
        return loc, f"expected a list, got {_show(v)}"
    if t in ("dict_type", "model_type", "model_attributes_type"):
        return loc, f"expected a mapping (key: value), got {_show(v)}"
    if t in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        op = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[t]
        bound = next(iter(ctx.values()), "?")
        return loc, f"must be {op} {bound}, not {_show(v)}"
    if t == "too_short":
        return loc, "must not be empty"
    if t == "string_pattern_mismatch":
        return loc, f"{_show(v)}: use letters, digits, '-' and '_' only"
    if t == "literal_error":
        if loc and loc[0] == "modes":
            return loc, f"unknown mode {_show(v)} (modes: {', '.join(MODES)})"
        return loc, f"{_show(v)} is not one of {ctx.get('expected', '?')}"
    if t == "union_tag_invalid":
        return (*loc, "name"), f"unknown workload {_show(ctx.get('tag'))} (kinds: {', '.join(WORKLOAD_KINDS)})"
    if t == "union_tag_not_found":
        if loc == ("vms",):
            return loc, f"expected `count: N` with shared settings, or a list of named VMs, got {_show(v)}"
        return (*loc, "name"), f"required (kinds: {', '.join(WORKLOAD_KINDS)})"
    return loc, err.get("msg", t)


# ---------------------------------------------------------------- checks beyond the schema


def host_mem_available_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` of the host, in MB (MiB)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise ConfigError(f"{meminfo} has no MemAvailable line")


def _raw_vms(data: dict) -> Iterator[tuple[Loc, str | None, dict, int]]:
    """(location, name, settings, how many) of each VM entry in unvalidated data."""
    vms = data.get("vms")
    if isinstance(vms, dict):
        count = vms.get("count")
        count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1
        yield ("vms",), None, vms, count
    elif isinstance(vms, list):
        for i, v in enumerate(vms):
            if isinstance(v, dict):
                name = v.get("name")
                yield ("vms", i), name if isinstance(name, str) else None, v, 1


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _vm_names(data: dict) -> list[str]:
    vms = data.get("vms")
    if isinstance(vms, dict):
        prefix = vms.get("name_prefix", "vm")
        count = _int(vms.get("count")) or 0
        return [f"{prefix}{i + 1}" for i in range(count)]
    return [n for _, n, _, _ in _raw_vms(data) if n]


def recipe_path(image: str | None, config_dir: Path | None = None) -> Path | None:
    """The image recipe a VM's ``image:`` names (next to the config, as given, or in
    ``images/``, with or without ``.yaml``); ``None`` for the built-in default recipe."""
    if image is None:
        return None
    found = _find_recipe(image, config_dir or Path.cwd())
    if found is None:
        raise ConfigError(f"image recipe {image!r} not found (next to the config, or in images/)")
    return found


def _find_recipe(image: str, config_dir: Path) -> Path | None:
    candidates = [config_dir / image, Path(image), REPO_ROOT / "images" / image,
                  REPO_ROOT / "images" / f"{image}.yaml"]
    return next((p for p in candidates if p.is_file()), None)


def _semantic_problems(data: dict, host_mb: int, config_dir: Path) -> list[_Problem]:
    probs: list[_Problem] = []
    total_ent = 0
    host_exceeded = False
    seen: dict[str, Loc] = {}
    rooms: list[int] = []
    for loc, name, s, count in _raw_vms(data):
        mem = _int(s.get("memory_mb", DEFAULT_MEMORY_MB))
        ent = _int(s.get("entitlement_mb", mem))
        if mem is not None:
            if mem > host_mb:
                host_exceeded = True
                probs.append(_Problem((*loc, "memory_mb"),
                                      f"memory {mem} MB is more than this host can give ({host_mb} MB free)"))
            elif mem > MAX_LOWMEM_MB:
                probs.append(_Problem((*loc, "memory_mb"),
                                      f"memory {mem} MB is above the {MAX_LOWMEM_MB} MB a guest can have "
                                      "(guest RAM stays below the PCI hole)"))
        if mem is not None and ent is not None and ent > mem:
            probs.append(_Problem((*loc, "entitlement_mb"),
                                  f"entitlement {ent} MB is above the VM's max memory ({mem} MB)"))
        if ent is not None:
            total_ent += ent * count
        if mem is not None and ent is not None:
            rooms.append(mem - ent)
        if name is not None:
            if name in seen:
                probs.append(_Problem((*loc, "name"),
                                      f"VM name {name!r} is used twice (first at {format_loc(seen[name])})"))
            else:
                seen[name] = loc
        image = s.get("image")
        if isinstance(image, str) and _find_recipe(image, config_dir) is None:
            probs.append(_Problem((*loc, "image"),
                                  f"image recipe {image!r} not found (next to the config, or in images/)"))
    if total_ent > host_mb and not host_exceeded:
        vms = data.get("vms")
        if isinstance(vms, dict):
            key = "entitlement_mb" if "entitlement_mb" in vms else "memory_mb"
            per = _int(vms.get(key)) or 0
            probs.append(_Problem(("vms", key),
                                  f"{total_ent // max(per, 1)} VMs x {per} MB = {total_ent} MB is more "
                                  f"than this host can give ({host_mb} MB free)"))
        else:
            probs.append(_Problem(("vms",), f"the VMs' entitlements add up to {total_ent} MB, more "
                                            f"than this host can give ({host_mb} MB free)"))

    if data.get("surplus") is True and rooms and not any(rooms):
        probs.append(_Problem(("surplus",), "surplus is on, but every VM's entitlement equals its "
                                            "max memory: no room to give any back (set "
                                            "entitlement_mb below memory_mb)"))

    names = _vm_names(data)
    domains = data.get("sharing_domains")
    if isinstance(domains, dict):
        member_of: dict[str, str] = {}
        for d, members in domains.items():
            if not isinstance(members, list):
                continue
            for j, vm in enumerate(members):
                if not isinstance(vm, str):
                    continue
                loc = ("sharing_domains", d, j)
                if vm not in names:
                    probs.append(_Problem(loc, f"no VM named {vm!r} (VMs: {', '.join(names) or 'none'})"))
                elif vm in member_of:
                    probs.append(_Problem(loc, f"VM {vm!r} is already in domain {member_of[vm]!r}: "
                                               "a VM belongs to one sharing domain"))
                else:
                    member_of[vm] = str(d)

    modes = data.get("modes")
    if isinstance(modes, list):
        for i, m in enumerate(modes):
            if isinstance(m, str) and m in modes[:i]:
                probs.append(_Problem(("modes", i), f"mode {m!r} is listed twice"))
    probs += _opt_in_problems(data, names)

    workloads = data.get("workloads")
    if isinstance(workloads, list):
        for i, w in enumerate(workloads):
            params = w.get("params") if isinstance(w, dict) else None
            if isinstance(w, dict) and w.get("name") == "adversary" and isinstance(params, dict):
                att = params.get("attacker")
                if isinstance(att, str) and att not in names:
                    probs.append(_Problem(("workloads", i, "params", "attacker"),
                                          f"no VM named {att!r} (VMs: {', '.join(names) or 'none'})"))
    return probs


def _opt_in_problems(data: dict, names: list[str]) -> list[_Problem]:
    """Sharing is opt-in: a mode that merges across VMs through the engine needs named domains."""
    if data.get("sharing_domains") is not None:
        return []
    modes = data.get("modes", list(MODES))
    if not isinstance(modes, list):
        return []
    engine = [(i, m) for i, m in enumerate(modes) if isinstance(m, str) and m in ENGINE_MODES]
    if not engine:
        return []
    i, m = engine[0]
    loc: Loc = ("modes", i) if "modes" in data else ("modes",)
    which = f"mode {m!r}" if "modes" in data else f"the default modes (all: {', '.join(MODES)}) include {m!r}, which"
    example = ", ".join(names[:2]) if names else "vm1, vm2"
    return [_Problem(loc, f"{which} merges pages across VMs, but no sharing domain is named: sharing "
                          f"is opt-in. {DOMAIN_HELP[0].upper()}{DOMAIN_HELP[1:]}. Name the VMs that may "
                          f"share, e.g. `sharing_domains: {{trusted: [{example}]}}`, or leave out the "
                          f"modes {', '.join(ENGINE_MODES)}")]


# ---------------------------------------------------------------- entry points


def validate(
    data: Any,
    *,
    source: str = "<config>",
    lines: dict[Loc, int] | None = None,
    host_mem_mb: int | None = None,
    config_dir: Path = Path("."),
    extra_problems: list[_Problem] | None = None,
) -> ExperimentConfig:
    """Validate already-loaded data; raise one ConfigError listing every problem."""
    lines = lines or {}
    probs: list[_Problem] = list(extra_problems or [])
    if data is None:
        raise ConfigError(f"{source}:1: the file is empty: an experiment needs at least "
                          "name, vms and workloads")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: expected a mapping (key: value) at the top, got {_show(data)}")
    cfg: ExperimentConfig | None = None
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc, msg = _message(err, _clean_loc(err["loc"], data), data)
            probs.append(_Problem(loc, msg))
    host = host_mem_mb if host_mem_mb is not None else host_mem_available_mb()
    taken = {p.loc for p in probs}
    probs += [p for p in _semantic_problems(data, host, config_dir) if p.loc not in taken]
    if not probs:
        assert cfg is not None
        return cfg
    for p in probs:
        if p.line is None:
            p.line = _line_of(p.loc, lines)
    probs.sort(key=lambda p: p.line or 0)
    out = []
    for p in probs:
        field = format_loc(p.loc)
        out.append(f"{source}:{p.line}: {field}: {p.message}" if field else f"{source}:{p.line}: {p.message}")
    raise ConfigError("\n".join(out))


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a file a user named; a missing, unreadable, non-regular, binary or non-UTF-8
    file is one clear :class:`ConfigError` (the CLI prints it, exit status 1)."""
    p = Path(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO or device would block or never end
            kind = "a folder" if p.is_dir() else "not a regular file"
            raise ConfigError(f"{path}: {kind}: a {what} must be a YAML text file")
        with open(p, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_TEXT_BYTES >> 20} MiB: not a {what}")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: binary data (a NUL byte at offset {nul}), not a {what}: "
                          "expected YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}): a {what} must be YAML text") from None


def load_config(path: str | os.PathLike, host_mem_mb: int | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML file.

    ``host_mem_mb`` overrides the host's ``MemAvailable`` (tests). Raises one
    :class:`ConfigError` whose message has one ``file:line: field: problem`` line per error.
    """
    p = Path(path)
    source = str(path)
    text = read_text(p, "config")
    data, lines, dups = load_yaml(text, source)
    return validate(data, source=source, lines=lines, host_mem_mb=host_mem_mb,
                    config_dir=p.parent, extra_problems=dups)


def json_schema() -> dict:
    """JSON schema of the experiment file (for editors and for ``satori config schema``)."""
    schema = ExperimentConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "satori experiment"
    return schema


def config_as_run(cfg: ExperimentConfig) -> dict:
    """The config with every default filled in: what a result records as run."""
    d = cfg.model_dump(mode="json")
    d["vm_list"] = [dataclasses.asdict(v) for v in cfg.vm_list()]
    d["domains"] = cfg.domains()
    d["groups"] = cfg.groups()
    return d


# ---------------------------------------------------------------- CLI


def cmd_config_check(args: argparse.Namespace) -> int:
    """``satori config check FILE...``: validate, print a one-line summary per file."""
    files = args.file if isinstance(args.file, list) else [args.file]
    errors = []
    for f in files:
        try:
            cfg = load_config(f)
        except ConfigError as e:
            errors.append(e.message)
            continue
        vms = cfg.vm_list()
        print(f"{f}: ok: {cfg.name}: {len(vms)} VMs "
              f"({', '.join(f'{v.name} {v.entitlement_mb}/{v.memory_mb} MB' for v in vms)}), "
              f"modes {', '.join(cfg.modes)}, workloads {', '.join(w.name for w in cfg.workloads)}, "
              f"{cfg.repetitions} repetition(s), sharing domains "
              f"{', '.join(f'{d} ({len(n)} VMs)' for d, n in cfg.domains().items()) or 'none'}")
        for note in cfg.domain_notes():
            print(f"{f}: {note}")
    if errors:
        raise ConfigError("\n".join(errors))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:  # noqa: ARG001
    """``satori config schema``: print the JSON schema of the experiment file."""
    print(json.dumps(json_schema(), indent=2))
    return 0
