"""The public plugin API: one registry per kind (candidate ops, op-set presets, datasets).

The paper's ops, the presets of its roadmap and the bundled datasets register through exactly these
functions (``nas.ops``, ``nas.opsets``, ``nas.data``), as a user's plugin does::

    from nas.registry import register_op

    @register_op("my_conv_3x3")
    def my_conv_3x3(C, stride, affine, options):
        return nn.Sequential(...)          # (N, C, H, W) -> (N, C, H / stride, W / stride)

A sweep file names its plugins (``plugins: [my_ops.py, some.package.module]``, see ``nas.plugins``);
installed packages can also register through the ``dartsweep.plugins`` entry-point group. A name is
registered once: a plugin never shadows a built-in or another plugin (refused, naming both sources).
Looking a name up is a dict lookup: a registered op costs nothing per training step.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Generic, Iterator, TypeVar

from nas.errors import ConfigError

BUILTIN = "dartsweep (built-in)"
ENTRY_POINT_GROUP = "dartsweep.plugins"

# Who is registering right now: the built-in modules, or the plugin nas.plugins is importing.
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dartsweep_registering", default=None)
# The names registered under the current source, per kind, while a plugin imports (to refuse duplicates).
_ADDED: contextvars.ContextVar[dict[str, list[str]] | None] = contextvars.ContextVar("dartsweep_added", default=None)

T = TypeVar("T")


@dataclass(frozen=True)
class OpEntry:
    """A candidate operation: ``factory(C, stride, affine, options) -> nn.Module`` maps (N, C, H, W) to
    (N, C, H / stride, W / stride). ``uses_bottleneck_ratio``: F changes what it builds (so F is swept
    and reported for op sets that hold it). ``pooling``: a parameter-free pooling op (DARTS puts an
    affine-free BN after it in the search network). ``macs(module, input, output) -> int``: its
    multiply-accumulates for one forward pass, where ptflops cannot count what the module does."""

    name: str
    factory: Callable[..., Any]
    uses_bottleneck_ratio: bool = False
    pooling: bool = False
    macs: Callable[..., int] | None = None
    source: str = BUILTIN
    placeholder: bool = False  # named by a frozen sweep whose plugin is not importable here


@dataclass(frozen=True)
class OpSetEntry:
    """An op-set preset: ``build()`` returns its ``nas.opsets.OpSet`` (primitives and options)."""

    name: str
    build: Callable[[], Any]
    source: str = BUILTIN
    placeholder: bool = False


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset: ``load(data_dir, download) -> nas.data.ImageData`` (uint8 N x C x H x W images, int labels, class
    names, mean/std), plus its shape, known before it is loaded (dry runs, cost estimates)."""

    name: str
    load: Callable[..., Any]
    in_channels: int
    image_size: int
    num_classes: int
    source: str = BUILTIN
    placeholder: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.in_channels, self.image_size, self.num_classes


class Registry(Generic[T]):
    """Names -> entries of one kind, each recording the source that registered it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        # name prefix -> entry factory: a family of names made from parameters (``image_folder:PATH?...``)
        self.families: dict[str, Callable[[str], T]] = {}

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{self.kind} name must be letters, digits, '_' or '-', got {name!r}")
        source = entry.source  # type: ignore[attr-defined]
        added = _ADDED.get()
        if added is not None:
            if name in added.setdefault(self.kind, []):
                raise ConfigError(f"{source} registers {self.kind} {name!r} twice")
            added[self.kind].append(name)
        old = self._entries.get(name)
        if old is not None and old.source != source and not old.placeholder:  # type: ignore[attr-defined]
            raise ConfigError(f"{self.kind} {name!r} from {source} is already registered by {old.source}; "  # type: ignore[attr-defined]
                              "rename it in one of them")
        self._entries[name] = entry  # the same source again (a plugin re-imported in one process): replaced
        return entry

    def get(self, name: str) -> T:
        _ensure_builtins()
        try:
            return self._entries[name]
        except KeyError:
            family = next((f for p, f in self.families.items() if isinstance(name, str) and name.startswith(p)), None)
            if family is not None:
                entry = self._entries[name] = family(name)
                return entry
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))} (a plugin "
                              "of yours? name it under `plugins:` in the sweep file, or --plugin)") from None

    def __contains__(self, name: object) -> bool:
        _ensure_builtins()
        return name in self._entries or (isinstance(name, str) and any(name.startswith(p) for p in self.families))

    def names(self) -> list[str]:
        _ensure_builtins()
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        _ensure_builtins()
        return iter(list(self._entries.items()))

    def from_source(self, source: str) -> list[str]:
        return [n for n, e in self._entries.items() if e.source == source]  # type: ignore[attr-defined]

    def view(self, value: Callable[[T], Any]) -> "RegistryView":
        """A read-only mapping name -> ``value(entry)`` over this registry, as it is at each lookup."""
        return RegistryView(self, value)


class RegistryView(Mapping):
    """See :meth:`Registry.view` (``nas.ops.PRIMITIVES``, ``nas.opsets.OP_SETS``)."""

    def __init__(self, registry: Registry, value: Callable[[Any], Any]) -> None:
        self._registry, self._value = registry, value

    def __getitem__(self, name: str) -> Any:
        if name not in self._registry:
            raise KeyError(name)
        return self._value(self._registry.get(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __len__(self) -> int:
        return len(self._registry.names())


OPS: Registry[OpEntry] = Registry("primitive")
OP_SET_PRESETS: Registry[OpSetEntry] = Registry("op set")
DATASETS: Registry[DatasetEntry] = Registry("dataset")


def _source() -> str:
    source = _SOURCE.get()
    if source is None:  # a script or notebook registering directly, outside any plugin import
        source = "<this process>"
    return source


def register_op(name: str, factory: Callable[..., Any] | None = None, *, uses_bottleneck_ratio: bool = False,
                pooling: bool = False, macs: Callable[..., int] | None = None) -> Any:
    """Register candidate op ``name``; usable as ``register_op(name, factory)`` or as a decorator.

    ``factory(C, stride, affine, options)`` gets the op set's options (``nas.ops.OpOptions``: activation,
    norm, bottleneck_ratio F, ...). Give ``macs`` only where ptflops cannot count the module (custom
    autograd functions, say); the sweep refuses an op with weights that counts 0 MACs otherwise."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise ConfigError(f"op {name!r}: the factory must be callable (C, stride, affine, options) -> nn.Module")
        OPS.add(name, OpEntry(name, fn, bool(uses_bottleneck_ratio), bool(pooling), macs, _source()))
        return fn

    return add if factory is None else add(factory)


def register_op_set(name: str, primitives: Any, **options: Any) -> None:
    """Register op-set preset ``name``: its primitives (registered op names) and options (activation, norm,
    bottleneck_ratio, activation_scope, pib_groups, stem, pooling_bn), usable as ``op_sets: [name]``.
    Checked at once: every primitive must be registered by then."""
    from nas.opsets import OpSet

    op_set = primitives if isinstance(primitives, OpSet) else OpSet.from_dict({"primitives": list(primitives),
                                                                               **options})
    OP_SET_PRESETS.add(name, OpSetEntry(name, lambda: op_set, _source()))


def register_dataset(name: str, load: Callable[..., Any] | None = None, *, in_channels: int, image_size: int,
                     num_classes: int) -> Any:
    """Register dataset ``name``: ``load(data_dir: Path, download: bool)`` returns a ``nas.data.ImageData`` (see
    ``nas.data.image_data`` to build one from tensors); the shape it declares is checked when it loads.
    Usable as a decorator."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"dataset {name!r}: {key} must be a positive integer, got {value!r}")
        if num_classes < 2:
            raise ConfigError(f"dataset {name!r}: needs at least 2 classes, got {num_classes}")
        DATASETS.add(name, DatasetEntry(name, fn, in_channels, image_size, num_classes, _source()))
        return fn

    return add if load is None else add(load)


@contextlib.contextmanager
def registering(source: str) -> Iterator[dict[str, list[str]]]:
    """Attribute every registration inside to ``source``; yields the names it registered, per kind."""
    added: dict[str, list[str]] = {}
    token, token_added = _SOURCE.set(source), _ADDED.set(added)
    try:
        yield added
    finally:
        _SOURCE.reset(token)
        _ADDED.reset(token_added)


_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    """Import the modules that register the built-ins (once), so a plugin can never take a built-in name,
    then the installed packages' entry points."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import nas.data  # noqa: F401 - registers cifar10, cifar100, digits
    import nas.ops  # noqa: F401 - registers the DARTS, ConvNeXt and PIBConv ops
    import nas.opsets  # noqa: F401 - registers the roadmap's presets

    from nas.plugins import load_entry_points

    load_entry_points()
