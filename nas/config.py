"""One frozen config per phase (search, eval), serialisable to and from plain JSON/YAML mappings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from nas.registry import DATASETS
from nas.errors import ConfigError
from nas.genotypes import Genotype, load_genotype
from nas.opsets import OpSet, resolve_op_set

C = TypeVar("C")


def _positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)) \
            or value < 0 or (value == 0 and not allow_zero):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a {kind} {bound}, got {value!r}")


_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_types(cfg: Any) -> None:
    """Every field of a plain type holds a value of that type (``cutout: "false"`` is a string, and would
    be truthy; a bool is not an int here). Union fields (op_set, genotype) are checked where resolved."""
    for f in dataclasses.fields(cfg):
        names = [t.strip() for t in str(f.type).split("|")]
        optional = "None" in names
        names = [n for n in names if n != "None"]
        if len(names) != 1 or names[0] not in _TYPES:
            continue
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        kinds = _TYPES[names[0]]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[names[0]]
            raise ConfigError(f"{f.name} must be {want}{' or null' if optional else ''}, got {value!r}")


def _common_checks(cfg: Any) -> None:
    _check_types(cfg)
    DATASETS.get(cfg.dataset)  # unknown: one line naming the known datasets
    for name in ("epochs", "batch_size", "channels", "layers"):
        _positive(name, getattr(cfg, name), integer=True)
    for name in ("lr", "grad_clip"):
        _positive(name, getattr(cfg, name))
    for name in ("lr_min", "momentum", "weight_decay"):
        _positive(name, getattr(cfg, name), allow_zero=True)
    if cfg.max_steps_per_epoch is not None:
        _positive("max_steps_per_epoch", cfg.max_steps_per_epoch, integer=True)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")


@dataclass(frozen=True)
class SearchConfig:
    """DARTS search; defaults are the paper's (50 epochs, batch 64, SGD 0.0025 cosine, Adam 3e-4 on alpha)."""

    op_set: str | dict = "pibconv"  # preset name or {"primitives": [...], "activation", "norm", "bottleneck_ratio"}
    bottleneck_ratio: float | None = None  # overrides the op set's F
    dataset: str = "cifar10"
    data_dir: str = "./data"
    epochs: int = 50
    batch_size: int = 64
    channels: int = 16
    layers: int = 8
    nodes: int = 4
    order: int = 2  # 1: first-order DARTS, 2: second-order (unrolled)
    lr: float = 0.0025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    arch_lr: float = 3e-4
    arch_beta1: float = 0.5
    arch_beta2: float = 0.999
    arch_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    train_portion: float = 0.5  # share of the training set for weights; the rest trains alpha
    seed: int = 0
    amp: bool | None = None  # bf16 autocast; None = on for CUDA only
    channels_last: bool = True
    checkpoint_cells: bool = False  # per-cell activation checkpointing: far less memory, ~30 % more compute
    cuda_graphs: bool = False  # replay each step as a captured CUDA graph (nas.graphs); off until measured
    max_steps_per_epoch: int | None = None  # cap for smoke runs
    cost_metric: str = "gmac"  # cost-aware search (nas.cost): gmac | params | latency
    cost_weight: float = 0.0  # lambda of the expected-cost term; 0: plain DARTS
    cost_lut: str | None = None  # latency: a table from `dartsweep lut build` for this network and device
    # early stopping (nas.train.search_stop_reason), each off by default, neither before stop_min_epochs:
    stop_when_stable: int | None = None  # stop when the derived genotype has not changed for this many epochs
    max_skip_connects: int | None = None  # DARTS+: stop, flagged collapsed, when the normal cell holds more
    stop_min_epochs: int = 10

    def __post_init__(self) -> None:
        _common_checks(self)
        _positive("nodes", self.nodes, integer=True)
        if self.stop_when_stable is not None:
            _positive("stop_when_stable", self.stop_when_stable, integer=True)
        if self.max_skip_connects is not None:
            _positive("max_skip_connects", self.max_skip_connects, integer=True, allow_zero=True)
        _positive("stop_min_epochs", self.stop_min_epochs, integer=True, allow_zero=True)
        _positive("cost_weight", self.cost_weight, allow_zero=True)
        if self.cost_metric not in ("gmac", "params", "latency"):
            raise ConfigError(f"cost_metric: must be one of gmac, params, latency, got {self.cost_metric!r}")
        if self.cost_metric == "latency" and self.cost_lut is None:
            raise ConfigError("cost_metric: latency needs cost_lut: a table from `dartsweep lut build --op-set ... "
                              f"--channels {self.channels} --layers {self.layers} --device cpu|cuda`")
        if self.cost_lut is not None:
            if self.cost_metric != "latency":
                raise ConfigError(f"cost_lut: is read only with cost_metric: latency (cost_metric is "
                                  f"{self.cost_metric})")
            from nas.lut import check_search_compatible, read_lut

            check_search_compatible(read_lut(self.cost_lut, "cost_lut:"), self.resolved_op_set(), self.channels,
                                    self.layers)
        _positive("arch_lr", self.arch_lr)
        _positive("arch_weight_decay", self.arch_weight_decay, allow_zero=True)
        if self.order not in (1, 2):
            raise ConfigError(f"order must be 1 or 2, got {self.order!r}")
        if not 0 < self.train_portion < 1:
            raise ConfigError(f"train_portion must be between 0 and 1, got {self.train_portion!r}")
        self.resolved_op_set()  # validates op set and F

    def resolved_op_set(self) -> OpSet:
        return resolve_op_set(self.op_set, self.bottleneck_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation training (DARTS NetworkCIFAR recipe): C 36, 600 epochs, batch 96, SGD 0.025 cosine to 0,
    auxiliary 0.4, drop path 0.2 ramped linearly, cutout."""

    genotype: str | dict = "PIBCONV"  # built-in name, JSON path, or genotype mapping
    layers: int = 20
    dataset: str = "cifar10"
    data_dir: str = "./data"
    epochs: int = 600
    batch_size: int = 96
    channels: int = 36
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path: float = 0.2
    cutout: bool = True
    cutout_length: int | None = None  # None: the data set's (16 for CIFAR)
    seed: int = 0
    amp: bool | None = None
    channels_last: bool = True
    max_steps_per_epoch: int | None = None
    cuda_graphs: bool = False  # replay each training step as a captured CUDA graph (nas.graphs)
    latency: bool = True  # sweeps: measure the network's forward latency on the trial's device and report it

    def __post_init__(self) -> None:
        _common_checks(self)
        _positive("auxiliary_weight", self.auxiliary_weight, allow_zero=True)
        if not isinstance(self.drop_path, (int, float)) or not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        if self.cutout_length is not None:
            _positive("cutout_length", self.cutout_length, integer=True, allow_zero=True)
        self.resolved_genotype()

    def resolved_genotype(self) -> Genotype:
        return load_genotype(self.genotype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_mapping(cls: type[C], data: Mapping[str, Any], where: str = "config") -> C:
    """Build a config dataclass, naming any unknown key (a typo) in the error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
                          f"allowed: {', '.join(sorted(fields))}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
