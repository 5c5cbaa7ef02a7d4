"""Loading plugins: a user's Python file or module that registers ops, op-set presets or datasets
through ``nas.registry``, checked on the driver, frozen with the sweep and shipped to every Ray node.

A file plugin ``my_ops.py`` is imported under a name made of its stem and content hash
(``dartsweep_plugin_my_ops_<sha>``): the driver ships exactly those bytes to every node through Ray's
``runtime_env={"py_modules": [...]}`` and each trial imports the same name before it looks an op up
(registries are per process). A module plugin (``some.package.module``) is imported by name; its top-level
package is shipped likewise unless it is installed in site-packages. Installed packages may instead
register through the ``dartsweep.plugins`` entry-point group (loaded in every process, never shipped).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from nas.errors import ConfigError
from nas.registry import (DATASETS, ENTRY_POINT_GROUP, OP_SET_PRESETS, OPS, DatasetEntry, OpEntry, OpSetEntry,
                          registering)

PREFIX = "dartsweep_plugin_"
KINDS = {"ops": OPS, "op_sets": OP_SET_PRESETS, "datasets": DATASETS}


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: where it came from, its content hash, the name every node imports it under, what
    Ray ships (None: installed on every node) and the names it registered."""

    source: str
    sha256: str
    module: str
    ship: str | None
    ops: tuple[str, ...] = ()
    op_sets: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """What sweep.yaml keeps of this plugin (and the genotype JSON of a network that uses it)."""
        return {"source": self.source, "sha256": self.sha256, "module": self.module,
                "ops": {n: _op_details(OPS.get(n)) for n in self.ops}, "op_sets": {
                    n: OP_SET_PRESETS.get(n).build().to_dict() for n in self.op_sets},
                "datasets": {n: list(DATASETS.get(n).shape) for n in self.datasets}}


def _op_details(entry: OpEntry) -> dict[str, bool]:
    return {"uses_bottleneck_ratio": entry.uses_bottleneck_ratio, "pooling": entry.pooling}


_LOADED: dict[tuple[str, str], Plugin] = {}  # (source, sha256) -> plugin, per process


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_sha256(folder: Path) -> str:
    """One hash over every .py file of a package folder (relative names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _is_file_ref(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or ref.startswith(".")


def plugin_sha256(ref: str, base_dir: Path = Path(".")) -> tuple[str, str]:
    """(source, sha256) of plugin ``ref`` as it is on disk now, without importing it."""
    if _is_file_ref(ref):
        path = (base_dir / Path(ref).expanduser()).resolve()
        if not path.is_file():
            raise ConfigError(f"plugin {ref}: no such file ({path}); paths are relative to the sweep file")
        return str(path), file_sha256(path)
    spec = _find_module(ref)
    return ref, _module_sha256(spec)


def _find_module(name: str) -> Any:
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", name):
        raise ConfigError(f"plugin {name!r}: give a .py file (relative to the sweep file) or a dotted module name")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"plugin {name}: cannot find it ({exc}); is its package installed or on PYTHONPATH?") from None
    if spec is None or spec.origin is None:
        raise ConfigError(f"plugin {name}: no such module; is its package installed or on PYTHONPATH?")
    return spec


def _top_package(name: str) -> Path | None:
    """The folder (or single file) of ``name``'s top-level package, to ship; None for installed ones."""
    spec = importlib.util.find_spec(name.split(".")[0])
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin)
    return None if {"site-packages", "dist-packages"} & set(path.parts) else path


def _module_sha256(spec: Any) -> str:
    top = _top_package(spec.name)
    if top is not None and top.is_dir():
        return folder_sha256(top)
    return file_sha256(Path(spec.origin))


def _where(exc: BaseException, path: str | None) -> str:
    """``file:line`` of the failure inside the plugin (the innermost frame in its file, else the last)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if path is not None and Path(f.filename) == Path(path)] or frames[-1:]
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else "?"


def _forget(source: str) -> None:
    for registry in KINDS.values():
        for name in registry.from_source(source):
            registry._entries.pop(name, None)  # noqa: SLF001 - rolling back a failed import


def _import(source: str, module: str, path: Path | None) -> dict[str, list[str]]:
    """Import ``module`` (from ``path`` for a file plugin) with its registrations attributed to ``source``;
    one ConfigError naming the file and line when it fails."""
    try:
        with registering(source) as added:
            if path is not None:
                spec = importlib.util.spec_from_file_location(module, path)
                loaded = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[module] = loaded
                spec.loader.exec_module(loaded)  # type: ignore[union-attr]
            else:
                if module in sys.modules:  # imported before, outside a plugin load: run it again to register
                    importlib.reload(sys.modules[module])
                else:
                    importlib.import_module(module)
    except ConfigError as exc:
        sys.modules.pop(module, None)
        _forget(source)
        raise ConfigError(f"plugin {source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error in the user's code is reported the same way
        sys.modules.pop(module, None)
        _forget(source)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"plugin {source} failed to import: {type(exc).__name__}: {first} (at "
                          f"{_where(exc, str(path) if path else None)})") from None
    return added


def load_plugin(ref: str, base_dir: Path = Path("."), check: bool = True) -> Plugin:
    """Import plugin ``ref`` (a .py path relative to ``base_dir``, or a dotted module) once per process and
    check what it registered (``check``: every op's shapes and MAC count, on the CPU)."""
    source, sha = plugin_sha256(ref, base_dir)
    cached = _LOADED.get((source, sha))
    if cached is not None:
        return cached
    OPS.names()  # the built-ins first: a plugin can never take one of their names
    if _is_file_ref(ref):
        stem = re.sub(r"\W", "_", Path(source).stem)
        module, path = f"{PREFIX}{stem}_{sha[:12]}", Path(source)
        added = _import(source, module, path)
        ship: str | None = source
    else:
        module, path = ref, None
        added = _import(source, module, None)
        top = _top_package(ref)
        ship = str(top) if top is not None else None
    names = {kind: tuple(added.get(registry.kind, [])) for kind, registry in KINDS.items()}
    if not any(names.values()):
        _forget(source)
        raise ConfigError(f"plugin {source} registers no op, op set or dataset; call nas.registry.register_op, "
                          "register_op_set or register_dataset in it")
    plugin = Plugin(source, sha, module, ship, **names)
    if check:
        try:
            for name in plugin.ops:
                check_op(OPS.get(name))
        except ConfigError:
            _forget(source)
            sys.modules.pop(module, None)
            raise
    _LOADED[(source, sha)] = plugin
    return plugin


def check_op(entry: OpEntry, channels: int = 8, size: int = 8) -> None:
    """One forward pass per stride on the CPU: the op maps (2, C, H, W) to (2, C, H / stride, W / stride)
    and returns a Tensor; and an op with weights counts more than 0 MACs (ptflops, or its own ``macs``)."""
    import torch

    from nas.ops import OpOptions

    x = torch.randn(2, channels, size, size)
    for stride, affine in ((1, True), (2, False)):
        try:
            module = entry.factory(channels, stride, affine, OpOptions())
            with torch.no_grad():
                out = module.eval()(x)
        except Exception as exc:  # noqa: BLE001 - the user's op, reported in one line
            raise ConfigError(f"op {entry.name!r} (from {entry.source}) fails on input {tuple(x.shape)} with stride "
                              f"{stride}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (at "
                              f"{_where(exc, entry.source)})") from None
        want = (2, channels, size // stride, size // stride)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"op {entry.name!r} (from {entry.source}) returns {type(out).__name__}, not a Tensor")
        if tuple(out.shape) != want:
            raise ConfigError(f"op {entry.name!r} (from {entry.source}) maps input {tuple(x.shape)} to "
                              f"{tuple(out.shape)} with stride {stride}; it must give {want}")
    from nas.complexity import _count

    module = tag_macs(entry, entry.factory(channels, 1, True, OpOptions())).eval()
    params, macs = _count(module, x[:1])
    if params and not macs:
        raise ConfigError(f"op {entry.name!r} (from {entry.source}) has {params} weights but ptflops counts 0 MACs "
                          "for it; pass macs=fn(module, input, output) to register_op")


MACS_ATTR = "_dartsweep_macs"


def tag_macs(entry: OpEntry, module: Any) -> Any:
    """Mark a built op whose plugin states its own MAC count, for ``nas.complexity``."""
    if entry.macs is not None:
        object.__setattr__(module, MACS_ATTR, entry.macs)
    return module


def stated_macs_hooks(module: Any) -> dict[type, Any]:
    """ptflops hooks for the ops in ``module`` whose plugins state their own MAC count."""

    def hook(m: Any, inputs: tuple, output: Any) -> None:
        m.__flops__ += int(getattr(m, MACS_ATTR)(m, inputs[0], output))

    return {type(m): hook for m in module.modules() if getattr(m, MACS_ATTR, None) is not None}


# ------------------------------------------------------------------------------------- sweeps and Ray

def ship_folder(plugins: list[Plugin]) -> list[str]:
    """The paths to give Ray's ``runtime_env["py_modules"]``: each file plugin copied under its import name
    (into a fresh temporary folder), each local module plugin's top-level package."""
    out: list[str] = []
    staging: Path | None = None
    for p in plugins:
        if p.ship is None:
            continue
        if p.module.startswith(PREFIX):
            staging = staging or Path(tempfile.mkdtemp(prefix="dartsweep-plugins-"))
            target = staging / f"{p.module}.py"
            shutil.copyfile(p.ship, target)
            out.append(str(target))
        elif p.ship not in out:
            out.append(p.ship)
    return out


def import_shipped(plugin_records: list[Mapping[str, Any]]) -> None:
    """In a trial: import every plugin of the sweep under the name the driver shipped it as (Ray put it on
    sys.path), once per worker process, and check it is the content the sweep was frozen with."""
    for rec in plugin_records:
        key = (rec["source"], rec["sha256"])
        if key in _LOADED:
            continue
        module = rec["module"]
        if module not in sys.modules:
            _import(rec["source"], module, None)
        origin = getattr(sys.modules[module], "__file__", None)
        if module.startswith(PREFIX) and origin and file_sha256(Path(origin)) != rec["sha256"]:
            raise ConfigError(f"plugin {rec['source']}: the copy this node imported differs from the one the sweep "
                              "was frozen with")
        _LOADED[key] = Plugin(rec["source"], rec["sha256"], module, None)


def register_placeholders(rec: Mapping[str, Any], why: str) -> None:
    """Register what a frozen plugin record names without its code (analysis of a finished sweep where the
    plugin is not importable): tables and plots work; building one of its networks says why it cannot."""
    from nas.opsets import OpSet

    source = rec["source"]

    def missing(*_: Any) -> Any:
        raise ConfigError(f"plugin {source} is needed to build this network but cannot be imported here ({why})")

    for name, flags in rec.get("ops", {}).items():
        if name not in OPS:
            OPS._entries[name] = OpEntry(name, missing, bool(flags.get("uses_bottleneck_ratio")),  # noqa: SLF001
                                         bool(flags.get("pooling")), None, source, placeholder=True)
    for name, (c, size, classes) in rec.get("datasets", {}).items():
        if name not in DATASETS:
            DATASETS._entries[name] = DatasetEntry(name, missing, c, size, classes, source,  # noqa: SLF001
                                                   placeholder=True)
    for name, op_set in rec.get("op_sets", {}).items():
        if name not in OP_SET_PRESETS:
            built = OpSet.from_dict(op_set)
            OP_SET_PRESETS._entries[name] = OpSetEntry(name, lambda built=built: built, source,  # noqa: SLF001
                                                       placeholder=True)


def load_entry_points() -> list[str]:
    """Import the installed packages that register through the ``dartsweep.plugins`` entry-point group."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        source = f"entry point {ep.name} ({ep.value})"
        try:
            with registering(source):
                target = ep.load()
                if callable(target) and not isinstance(target, type):
                    target()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"plugin {source} failed to load: {type(exc).__name__}: {exc}") from None
        loaded.append(source)
    return loaded
