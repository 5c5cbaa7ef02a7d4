"""Sweep definition files: YAML (``safe_load``), validated completely before Ray starts.

A sweep has an optional ``search`` stage (grid over op sets, F and seeds) and an optional ``eval`` stage
(grid over genotypes, layers, seeds and optionally F). Every key is checked: a typo, an unknown op set
or primitive, F <= 0, layers < 1, an empty grid or a missing data set is one error naming the key and the
bad value. Nothing in the file is evaluated as code.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from nas.config import EvalConfig, SearchConfig, config_from_mapping
from nas.errors import ConfigError
from nas.genotypes import GENOTYPES, Genotype, load_genotype
from nas.opsets import OP_SETS, OpSet, resolve_op_set
from nas.registry import DATASETS

TOP_KEYS = {"name", "description", "plugins", "dataset", "data_dir", "data_transfer", "storage", "search", "eval",
            "failure", "max_concurrent_trials", "format", "tracking"}
# The sweep.yaml a driver freezes says `format: 3`; one without it was written by dartsweep's first release,
# whose preset names and option-less mappings meant the first release's networks (see nas.ops
# FIRST_RELEASE_OPTIONS), and whose trial configs name op sets and genotypes by first-release ids. Format 2
# (the second and third releases) built the patchify stem with a conv bias: its op sets resume with stem
# `patchify_bias`, under their old table keys.
SWEEP_FORMAT = 3
READABLE_FORMATS = (2, 3)
# how trials get their data: the driver loads it once and Ray's object store carries it to every node
# (default), or each trial reads data_dir itself, which must then be a folder every node sees
DATA_TRANSFERS = ("object_store", "shared_path")
STAGE_KEYS = {"seeds", "checkpoint_every", "resources", "search_alg", "scheduler"}
SEARCH_GRID_KEYS = {"op_sets", "F", "cost_weight"}  # cost_weight: lambda of cost-aware search
EVAL_GRID_KEYS = {"genotypes", "layers", "F"}
SEARCH_ALGS = ("grid", "random", "optuna")
SEARCHED = "searched"
# per-data-set input shape (channels, size, classes): lets a dry run price trials without loading data


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _grid(stage: Mapping[str, Any], key: str, where: str, default: Any = None) -> Any:
    """A grid axis: a non-empty list, or a {min, max} range (random/optuna only)."""
    value = stage.get(key, default)
    if value is None:
        if key in stage and default is not None:
            raise _fail(f"{where}.{key}", "is null; give a list (or leave the key out for its default)")
        return None
    if isinstance(value, Mapping):
        if set(value) != {"min", "max"}:
            raise _fail(f"{where}.{key}", f"a range needs exactly 'min' and 'max', got {dict(value)}")
        if not all(isinstance(value[k], (int, float)) and not isinstance(value[k], bool) for k in ("min", "max")) \
                or value["min"] > value["max"]:
            raise _fail(f"{where}.{key}", f"range min/max must be numbers with min <= max, got {dict(value)}")
        return dict(value)
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise _fail(f"{where}.{key}", "is an empty list; give at least one value")
    return list(value)


@dataclass(frozen=True)
class SearchAlg:
    type: str = "grid"
    num_samples: int = 1
    metric: tuple[str, ...] = ()
    mode: tuple[str, ...] = ()
    seed: int | None = None  # the sampler's seed (random, optuna)
    storage: str | None = None  # optuna: a database URL for the study; default a journal file in the sweep

    @property
    def multi_objective(self) -> bool:
        return len(self.metric) > 1


# what trials report that a search algorithm or scheduler can optimise
METRICS = {"search": ("valid_acc", "valid_loss", "train_acc", "train_loss"),
           "eval": ("test_acc", "best_test_acc", "test_loss", "train_acc", "train_loss", "gmac", "params_m")}


def _search_alg(raw: Any, where: str, default_metric: str) -> SearchAlg:
    if raw is not None and not isinstance(raw, (str, Mapping)):
        raise _fail(where, f"must be a name (grid, random, optuna) or a mapping, got {raw!r}")
    raw = {"type": raw} if isinstance(raw, str) else dict(raw or {})
    unknown = set(raw) - {"type", "num_samples", "metric", "mode", "seed", "storage"}
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: metric, mode, num_samples, seed, storage, type")
    kind = raw.get("type", "grid")
    if kind not in SEARCH_ALGS:
        raise _fail(f"{where}.type", f"unknown search algorithm {kind!r}; use one of {', '.join(SEARCH_ALGS)}")
    num = raw.get("num_samples", 1)
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise _fail(f"{where}.num_samples", f"must be an integer >= 1, got {num!r}")
    allowed = METRICS["search" if default_metric == "valid_acc" else "eval"]
    metric = raw.get("metric", default_metric)
    metric = tuple(metric) if isinstance(metric, list) else (metric,)
    if not metric or any(m not in allowed for m in metric):
        raise _fail(f"{where}.metric", f"must be one or a list of {', '.join(allowed)}, got {raw.get('metric')!r}")
    mode = raw.get("mode", ["max" if m.endswith("acc") else "min" for m in metric])
    mode = tuple(mode) if isinstance(mode, list) else (mode,)
    if len(mode) != len(metric) or any(m not in ("max", "min") for m in mode):
        raise _fail(f"{where}.mode", f"needs one of max|min per metric {list(metric)}, got {list(mode)}")
    if kind != "optuna" and len(metric) > 1:
        raise _fail(f"{where}.metric", "several objectives need type: optuna")
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _fail(f"{where}.seed", f"must be an integer, got {seed!r}")
    storage = raw.get("storage")
    if storage is not None and (kind != "optuna" or not isinstance(storage, str) or "://" not in storage):
        raise _fail(f"{where}.storage", f"an Optuna database URL (postgresql://..., mysql://...) with type: optuna, "
                                        f"got {storage!r}")
    return SearchAlg(kind, num, metric, mode, seed, storage)


def _resources(raw: Any, where: str) -> dict[str, float]:
    if raw is not None and not isinstance(raw, Mapping):
        raise _fail(where, f"must be a mapping like {{cpu: 2, gpu: 0.25}}, got {raw!r}")
    raw = dict(raw or {"cpu": 1})
    unknown = set(raw) - {"cpu", "gpu"}
    if unknown:
        raise _fail(where, f"unknown resource(s) {sorted(unknown)}; use cpu and gpu")
    for k, v in raw.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise _fail(f"{where}.{k}", f"must be a number >= 0, got {v!r}")
    if raw.get("cpu", 1) <= 0 and raw.get("gpu", 0) <= 0:
        raise _fail(where, "a trial needs some cpu or gpu")
    gpu = raw.get("gpu", 0)
    if gpu > 1 and int(gpu) != gpu:
        raise _fail(f"{where}.gpu", f"more than one GPU must be a whole number, got {gpu}")
    return {"cpu": float(raw.get("cpu", 1)), "gpu": float(gpu)}


def _check_ratios(F: list | dict | None, where: str) -> None:
    values = F if isinstance(F, list) else [F["min"], F["max"]] if F else []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise _fail(where, f"bottleneck ratio F must be a positive number, got {value!r}")


def _seeds(raw: Mapping[str, Any], where: str) -> list[int]:
    seeds = _grid(raw, "seeds", where, default=[0])
    if isinstance(seeds, dict) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise _fail(f"{where}.seeds", f"must be a list of integers, got {raw.get('seeds')!r}")
    return seeds


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(where, f"must be an integer >= 1, got {value!r}")
    return value


def _scheduler(raw: Any, where: str, default_metric: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, (str, Mapping)):
        raise _fail(where, f"must be 'asha' or a mapping like {{type: asha, grace_period: 100}}, got {raw!r}")
    raw = {"type": raw} if isinstance(raw, str) else dict(raw)
    if raw.get("type") != "asha":
        raise _fail(f"{where}.type", f"unknown scheduler {raw.get('type')!r}; the only one is asha")
    unknown = set(raw) - {"type", "grace_period", "reduction_factor", "metric", "mode"}
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: grace_period, metric, mode, reduction_factor")
    out = {"type": "asha", "grace_period": raw.get("grace_period", 1), "reduction_factor": raw.get("reduction_factor", 3),
           "metric": raw.get("metric", default_metric), "mode": raw.get("mode", "max")}
    _positive_int(out["grace_period"], f"{where}.grace_period")
    if not isinstance(out["reduction_factor"], (int, float)) or out["reduction_factor"] <= 1:
        raise _fail(f"{where}.reduction_factor", f"must be > 1, got {out['reduction_factor']!r}")
    return out


def stage_epochs(kind: str, base: Mapping[str, Any]) -> int:
    """Epochs a stage trains: its own setting, else the phase config's default (50 search, 600 eval)."""
    return base.get("epochs", (SearchConfig if kind == "search" else EvalConfig).epochs)


@dataclass(frozen=True)
class Stage:
    """One stage: the grid axes, the fixed config fields, and how Ray runs it."""

    kind: str  # "search" | "eval"
    axes: dict[str, Any]  # search: op_sets (id->mapping), F, seeds; eval: genotypes, layers, F, seeds
    base: dict[str, Any]  # fixed SearchConfig / EvalConfig fields
    resources: dict[str, float]
    checkpoint_every: int
    search_alg: SearchAlg
    scheduler: dict[str, Any] | None
    first_release: bool = False  # a stage of a sweep written by the first release (see SWEEP_FORMAT)

    @property
    def epochs(self) -> int:
        return stage_epochs(self.kind, self.base)

    @property
    def metric(self) -> str:
        return "valid_acc" if self.kind == "search" else "test_acc"


@dataclass(frozen=True)
class SweepSpec:
    name: str
    dataset: str
    data_dir: str  # absolute
    data_transfer: str  # one of DATA_TRANSFERS
    storage: str | None  # absolute path or URI
    search: Stage | None
    eval: Stage | None
    max_failures: int
    max_concurrent_trials: int | None
    raw: dict[str, Any]  # the resolved file, frozen into the sweep directory
    first_release: bool = False  # written by dartsweep's first release (see SWEEP_FORMAT)
    plugins: tuple[dict[str, Any], ...] = ()  # each plugin's record (source, sha256, module, what it registers)
    tracking: dict[str, str] | None = None  # {"mlflow": URI, "experiment": NAME}: every trial logged there too

    @property
    def uses_searched(self) -> bool:
        return self.eval is not None and SEARCHED in self.eval.axes["genotypes"]


def _config_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _split_stage(raw: Mapping[str, Any], kind: str, where: str) -> dict[str, Any]:
    """The stage's fixed config fields, after rejecting unknown keys."""
    cls = SearchConfig if kind == "search" else EvalConfig
    grid_keys = SEARCH_GRID_KEYS if kind == "search" else EVAL_GRID_KEYS
    owned = {"dataset", "data_dir", "seed", "op_set", "bottleneck_ratio", "genotype"}
    allowed = (STAGE_KEYS | grid_keys | _config_fields(cls)) - (owned - grid_keys)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    base = {k: v for k, v in raw.items() if k in _config_fields(cls) and k not in grid_keys}
    return base


def table_key(item: OpSet | Genotype, first_release: bool) -> str:
    """The id a stage's table (and so its trials' configs) uses for an op set or genotype: its id, or in a
    sweep written by the first release the id that release gave it."""
    return item.first_release_id if first_release else item.id


def _search_stage(raw: Any, dataset: str, data_dir: str, base_dir: Path, first_release: bool = False,
                  biased_patchify: bool = False) -> Stage:
    where = "search"
    if not isinstance(raw, Mapping):
        raise _fail(where, "must be a mapping of settings")
    base = _split_stage(raw, "search", where)
    if base.get("cost_lut") is not None:  # relative to the sweep file, like every path in it
        base["cost_lut"] = resolve_path(base["cost_lut"], base_dir, f"{where}.cost_lut")
    op_specs = _grid(raw, "op_sets", where, default=["pibconv"])
    if isinstance(op_specs, dict):
        raise _fail(f"{where}.op_sets", "must be a list of op set names or mappings, not a range")
    F = _grid(raw, "F", where)
    alg = _search_alg(raw.get("search_alg"), f"{where}.search_alg", "valid_acc")
    if isinstance(F, dict) and alg.type == "grid":
        raise _fail(f"{where}.F", "a {min, max} range needs search_alg random or optuna; give a list for a grid")
    _check_ratios(F, f"{where}.F")
    weights = _grid(raw, "cost_weight", where)
    if isinstance(weights, dict) and alg.type == "grid":
        raise _fail(f"{where}.cost_weight", "a {min, max} range needs search_alg random or optuna; give a list")
    for w in (weights if isinstance(weights, list) else [weights["min"], weights["max"]] if weights else []):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise _fail(f"{where}.cost_weight", f"each lambda must be a number >= 0, got {w!r}")
    op_sets: dict[str, dict] = {}
    for i, spec in enumerate(op_specs):
        try:
            preset = resolve_op_set(spec, first_release=first_release)
        except ConfigError as exc:
            raise _fail(f"{where}.op_sets[{i}]", str(exc)) from None
        for ratio in (F if isinstance(F, list) else [None]):
            op_set = preset.with_ratio(float(ratio)) if ratio is not None and preset.uses_bottleneck_ratio else preset
            key = table_key(op_set, first_release)
            if biased_patchify and op_set.stem == "patchify":  # format 2: the stem had a bias; same key
                op_set = dataclasses.replace(op_set, stem="patchify_bias")
            op_sets[key] = op_set.to_dict()
    seeds = _seeds(raw, where)
    base_full = {**base, "dataset": dataset, "data_dir": data_dir}
    for seed in seeds:  # every trial's config is built once here, so bad values fail now
        for mapping in op_sets.values():
            config_from_mapping(SearchConfig, {**base_full, "op_set": mapping, "seed": seed}, where)
    axes = {"op_sets": op_sets, "F": F if isinstance(F, dict) else None, "seeds": seeds,
            "cost_weight": [float(w) for w in weights] if isinstance(weights, list) else weights}
    resources = _resources(raw.get("resources"), f"{where}.resources")
    if base.get("cost_lut") is not None:  # the trials' device: GPU trials time on CUDA, the others on CPU
        from nas.lut import read_lut

        lut_device = read_lut(base["cost_lut"], f"{where}.cost_lut:")["device_type"]
        trial_device = "cuda" if resources.get("gpu", 0) > 0 else "cpu"
        if lut_device != trial_device:
            raise _fail(f"{where}.cost_lut", f"the LUT was built for device {lut_device}, but the trials run on "
                        f"{trial_device} (resources.gpu {resources.get('gpu', 0)}); build one on {trial_device}")
    return Stage("search", axes, base_full, resources,
                 _positive_int(raw.get("checkpoint_every", 1), f"{where}.checkpoint_every"), alg,
                 _scheduler(raw.get("scheduler"), f"{where}.scheduler", "valid_acc"), first_release)


def _eval_stage(raw: Any, dataset: str, data_dir: str, base_dir: Path, has_search: bool,
                first_release: bool = False) -> Stage:
    where = "eval"
    if not isinstance(raw, Mapping):
        raise _fail(where, "must be a mapping of settings")
    base = _split_stage(raw, "eval", where)
    specs = _grid(raw, "genotypes", where, default=[SEARCHED] if has_search else None)
    if specs is None or isinstance(specs, dict):
        raise _fail(f"{where}.genotypes", "needs a list: 'searched', built-in names or genotype JSON files")
    genotypes: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        if spec == SEARCHED:
            if not has_search:
                raise _fail(f"{where}.genotypes[{i}]", "'searched' needs a search stage in this sweep")
            genotypes[SEARCHED] = SEARCHED
            continue
        if isinstance(spec, str) and spec not in GENOTYPES and not Path(spec).is_absolute():
            spec = str(base_dir / spec) if (base_dir / spec).is_file() else spec
        try:
            g = load_genotype(spec, first_release)
        except ConfigError as exc:
            raise _fail(f"{where}.genotypes[{i}]", str(exc)) from None
        genotypes[table_key(g, first_release)] = g.to_dict()
    layers = _grid(raw, "layers", where, default=[20])
    F = _grid(raw, "F", where)
    alg = _search_alg(raw.get("search_alg"), f"{where}.search_alg", "test_acc")
    for key, axis in (("layers", layers), ("F", F)):
        if isinstance(axis, dict) and alg.type == "grid":
            raise _fail(f"{where}.{key}", "a {min, max} range needs search_alg random or optuna; give a list for a grid")
    for value in (layers if isinstance(layers, list) else [layers["min"], layers["max"]]):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(f"{where}.layers", f"every layer count must be an integer >= 1, got {value!r}")
    _check_ratios(F, f"{where}.F")
    seeds = _seeds(raw, where)
    base_full = {**base, "dataset": dataset, "data_dir": data_dir}
    for g in genotypes.values():  # every field checked now, also when only searched cells will come
        config_from_mapping(EvalConfig, {**base_full, "genotype": "DARTS_V2" if g == SEARCHED else g, "layers": 1,
                                         "seed": seeds[0]}, where)
    if not genotypes:
        raise _fail(f"{where}.genotypes", "is empty")
    scheduler = _scheduler(raw.get("scheduler"), f"{where}.scheduler", "test_acc")
    if scheduler and alg.multi_objective:
        raise _fail(f"{where}.scheduler", "ASHA cannot prune a multi-objective search; drop the scheduler")
    axes = {"genotypes": genotypes, "layers": layers, "F": F, "seeds": seeds}
    return Stage("eval", axes, base_full, _resources(raw.get("resources"), f"{where}.resources"),
                 _positive_int(raw.get("checkpoint_every", 1), f"{where}.checkpoint_every"), alg, scheduler,
                 first_release)


def resolve_path(value: Any, base_dir: Path, where: str) -> str:
    """A path from a sweep file made absolute against ``base_dir`` (the file's folder); URIs stay as given."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a path (a string), got {value!r}")
    if "://" in value:
        return value.rstrip("/")
    return str((base_dir / Path(value).expanduser()).resolve())


COST_KEYS = {"metric": "cost_metric", "weight": "cost_weight", "lut": "cost_lut"}


def _flatten_cost(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``search.cost: {metric, weight, lut}`` as the search settings it spells (cost_metric, cost_weight:
    one lambda or a list of them, an axis; cost_lut), so the frozen sweep.yaml holds one spelling."""
    search = raw.get("search")
    if not isinstance(search, Mapping) or "cost" not in search:
        return dict(raw)
    cost, where = search["cost"], "search.cost"
    if not isinstance(cost, Mapping):
        raise _fail(where, f"must be a mapping like {{metric: gmac, weight: [0, 0.5]}}, got {cost!r}")
    unknown = sorted(set(cost) - set(COST_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: lut, metric, weight")
    clash = sorted(COST_KEYS[k] for k in cost if COST_KEYS[k] in search)
    if clash:
        raise _fail(where, f"also given as {', '.join(clash)}; use one spelling")
    flat = {k: v for k, v in search.items() if k != "cost"}
    flat.update({COST_KEYS[k]: v for k, v in cost.items()})
    return {**raw, "search": flat}


PLUGIN_MODES = ("import", "accept", "optional")


def sweep_plugins(raw: Any, base_dir: Path, mode: str = "import") -> list[dict[str, Any]]:
    """Import a sweep's plugins (before anything names their ops, presets or datasets) and return their
    records. Items are paths/module names (a sweep file) or records (a frozen sweep.yaml). A frozen plugin
    whose content changed is refused (``mode`` "import"), taken as it is now ("accept":
    --accept-plugin-change), or, where it cannot be imported, stood in for by placeholders ("optional":
    analysis and status, which need its names, not its code)."""
    from nas.plugins import load_plugin, plugin_sha256, register_placeholders

    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"plugins: must be a list of .py files (relative to the sweep file) or module names, "
                          f"got {raw!r}")
    out = []
    for item in raw:
        if isinstance(item, str) and item:
            out.append(load_plugin(item, base_dir).record())
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("source"), str) or "sha256" not in item:
            raise ConfigError(f"plugins: each item must be a .py file or a module name, got {item!r}")
        try:
            source, sha = plugin_sha256(item["source"])
            if sha != item["sha256"] and mode != "accept":
                raise ConfigError(f"plugin {source} changed since the sweep was frozen (sha256 {item['sha256'][:12]} "
                                  f"-> {sha[:12]}); restore it, or take it as it is now with --accept-plugin-change")
            out.append(load_plugin(item["source"]).record())
        except ConfigError as exc:
            if mode != "optional":
                raise
            register_placeholders(item, str(exc))
            out.append(dict(item))
    return out


def parse_sweep(raw: Any, base_dir: Path = Path("."), first_release: bool = False,
                plugins: str = "import") -> SweepSpec:
    """Validate a parsed sweep file; relative paths in it (data_dir, storage, genotype files, plugins)
    resolve against ``base_dir``, the sweep file's folder. ``first_release``: a frozen sweep.yaml written by
    the first release (see SWEEP_FORMAT). ``plugins``: see :func:`sweep_plugins`."""
    if not isinstance(raw, Mapping):
        raise ConfigError("a sweep file must be a YAML mapping with at least 'name' and a 'search' or 'eval' stage")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(TOP_KEYS))}")
    raw = _flatten_cost(raw)
    plugin_records = sweep_plugins(raw.get("plugins"), base_dir.expanduser().resolve(), plugins)
    if not isinstance(raw.get("description", ""), str):
        raise ConfigError(f"description: must be a string, got {raw['description']!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name: must be a folder name (no '/'), got {name!r}")
    dataset = raw.get("dataset", "cifar10")
    folder = None
    if isinstance(dataset, Mapping):  # {image_folder: PATH, size: 32, ...}: see nas.image_folder
        from nas.image_folder import folder_spec

        folder = folder_spec(dataset, base_dir.expanduser().resolve())
        dataset = folder.name
        DATASETS.get(dataset)  # lists its classes: a folder without class folders fails here
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise ConfigError(f"dataset: unknown dataset {dataset!r}; use one of {', '.join(DATASETS.names())} (or a "
                          "plugin's, named under plugins:)")
    base_dir = base_dir.expanduser().resolve()
    data_dir = resolve_path(raw.get("data_dir", "./data"), base_dir, "data_dir")
    if "://" in data_dir:
        raise ConfigError(f"data_dir: must be a folder on this machine, got {data_dir!r}; the driver ships the "
                          "data to the trials")
    data_transfer = raw.get("data_transfer", "object_store")
    if data_transfer not in DATA_TRANSFERS:
        raise ConfigError(f"data_transfer: must be one of {', '.join(DATA_TRANSFERS)}, got {data_transfer!r}")
    if "search" not in raw and "eval" not in raw:
        raise ConfigError("a sweep needs a 'search' stage, an 'eval' stage, or both")
    fmt = raw.get("format", SWEEP_FORMAT)
    if fmt not in READABLE_FORMATS:
        raise ConfigError(f"format: this dartsweep writes format {SWEEP_FORMAT} and reads "
                          f"{', '.join(map(str, READABLE_FORMATS))}, got {fmt!r}")
    search = (_search_stage(raw["search"], dataset, data_dir, base_dir, first_release, biased_patchify=fmt == 2)
              if "search" in raw else None)
    evaluation = (_eval_stage(raw["eval"], dataset, data_dir, base_dir, search is not None, first_release)
                  if "eval" in raw else None)
    failure = raw.get("failure")
    failure = {} if failure is None else failure
    if not isinstance(failure, Mapping) or set(failure) - {"max_failures"}:
        raise ConfigError(f"failure: only 'max_failures' is allowed, got {failure!r}")
    max_failures = failure.get("max_failures", 2)
    if not isinstance(max_failures, int) or isinstance(max_failures, bool) or max_failures < 0:
        raise ConfigError(f"failure.max_failures: must be an integer >= 0, got {max_failures!r}")
    mct = raw.get("max_concurrent_trials")
    if mct is not None:
        _positive_int(mct, "max_concurrent_trials")
    tracking = _tracking(raw.get("tracking"), name)
    resolved = copy.deepcopy(dict(raw))
    if evaluation is not None:  # freeze genotype files into the sweep so later edits cannot change it
        resolved["eval"]["genotypes"] = [SEARCHED if v == SEARCHED else v for v in evaluation.axes["genotypes"].values()]
    storage = None if raw.get("storage") is None else resolve_path(raw["storage"], base_dir, "storage")
    resolved["data_dir"] = data_dir  # the frozen sweep.yaml records absolute paths
    if folder is not None:
        resolved["dataset"] = folder.to_dict()
    if storage is not None:
        resolved["storage"] = storage
    if search is not None and search.base.get("cost_lut") is not None:
        resolved["search"]["cost_lut"] = search.base["cost_lut"]
    resolved["format"] = fmt  # a frozen format-2 sweep stays format 2 (its stems keep their bias)
    if plugin_records:
        resolved["plugins"] = plugin_records  # path, content hash and names of each: frozen with the sweep
    return SweepSpec(name, dataset, data_dir, data_transfer, storage, search, evaluation, max_failures, mct,
                     resolved, first_release, tuple(plugin_records), tracking)


def _tracking(raw: Any, name: str) -> dict[str, str] | None:
    """``tracking: {mlflow: URI, experiment: NAME}``: an MLflow tracking server every trial is logged to as
    well (the experiment defaults to the sweep's name). Credentials go in MLflow's own variables
    (MLFLOW_TRACKING_TOKEN, ..._USERNAME/_PASSWORD), never in the URI: the file is frozen into the sweep."""
    if raw is None:
        return None
    from urllib.parse import urlsplit

    if not isinstance(raw, Mapping) or set(raw) - {"mlflow", "experiment"} or "mlflow" not in raw:
        raise ConfigError(f"tracking: expected {{mlflow: URI, experiment: NAME (optional)}}, got {raw!r}")
    uri, experiment = raw["mlflow"], raw.get("experiment", name)
    if not isinstance(uri, str) or not uri.strip() or not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError(f"tracking.mlflow: an MLflow tracking URI (http://host:5000, file:./mlruns), got {uri!r}")
    if urlsplit(uri).username or urlsplit(uri).password:
        raise ConfigError("tracking.mlflow: no credentials in the URI (it is written into the sweep folder); set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    return {"mlflow": uri, "experiment": experiment}


def builtin_sweeps() -> dict[str, Path]:
    folder = resources.files("sweeps") / "definitions"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_sweep(file_or_name: str | Path) -> SweepSpec:
    """Load a sweep from a YAML path or a built-in definition name (``quickstart``, ``paper_table1``, ...).

    Relative paths in a file resolve against the file's folder; in a built-in definition (which lives
    inside the installed package) against the current directory."""
    text = str(file_or_name)
    path = Path(text)
    base_dir = path.parent
    if not path.is_file():
        known = builtin_sweeps()
        if text not in known:
            raise ConfigError(f"sweep {text!r} is neither a file nor a built-in definition ({', '.join(sorted(known))})")
        path, base_dir = known[text], Path.cwd()
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return parse_sweep(raw, base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------------------- trial tables

def search_trials(stage: Stage) -> list[dict[str, Any]]:
    """The grid's search trials (op set id, F, seed, and the cost weight lambda where the stage sweeps it);
    random/optuna stages list their space instead."""
    weights = stage.axes.get("cost_weight")
    lambdas = weights if isinstance(weights, list) else [None]
    return [{"op_set": op_id, "F": OpSet.from_dict(m).used_bottleneck_ratio, "seed": seed,
             **({"cost_weight": w} if w is not None else {})}
            for op_id, m in stage.axes["op_sets"].items() for w in lambdas for seed in stage.axes["seeds"]]


def fold_ratios(stage: Stage, genotypes: Mapping[str, Any]) -> dict[str, Any] | None:
    """The genotypes a grid over an F list trains (id -> entry), with F folded in: a genotype whose ops use F
    once per F, as that F's variant (``PIBCONV-F3``, ``g-ae04bd0a-F3`` for a searched cell; its entry holds
    the variant), and a genotype whose ops ignore F (DARTS_V2) once, where genotypes x F would train the same
    network at every F. None when there is no F list to fold (no F axis, or a sampler draws F)."""
    ratios = stage.axes["F"]
    if not isinstance(ratios, list) or stage.search_alg.type != "grid":
        return None
    cells: dict[str, Any] = {}
    for gid, entry in genotypes.items():
        if not Genotype.from_dict(entry["genotype"]).uses_bottleneck_ratio:
            cells[gid] = entry
            continue
        for ratio in ratios:
            variant = genotype_for_trial(entry["genotype"], ratio)
            key = table_key(variant, stage.first_release)
            if key == gid:
                cells[gid] = entry
            else:  # the source's op set and F no longer describe the variant: trials name its own op set
                cells[key] = {**{k: v for k, v in entry.items() if k not in ("op_set", "F")},
                                     "genotype": variant.to_dict(), "variant_of": gid}
    return cells


def ratio_of(entry: Mapping[str, Any]) -> float | None:
    """The F of a genotype table entry's network; None where its ops ignore F."""
    return Genotype.from_dict(entry["genotype"]).used_bottleneck_ratio


def eval_table(stage: Stage, genotypes: Mapping[str, Any]) -> dict[str, Any]:
    """Every genotype an eval trial's config may name (id -> entry): the stage's and their F variants."""
    return {**genotypes, **(fold_ratios(stage, genotypes) or {})}


def eval_trials(stage: Stage, genotypes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Grid eval trials (genotype id, layers, F, seed) for the given resolved genotypes (id -> entry), an F
    list folded into the genotypes (:func:`fold_ratios`); F is None where the genotype's ops ignore it."""
    folded = fold_ratios(stage, genotypes)
    return [{"genotype": gid, "layers": n, "F": None if folded is None else ratio_of(entry), "seed": seed}
            for gid, entry in (genotypes if folded is None else folded).items()
            for n, seed in itertools.product(stage.axes["layers"], stage.axes["seeds"])]


def genotype_for_trial(genotype: Mapping[str, Any], F: float | None) -> Genotype:
    """``genotype`` with bottleneck ratio F; another F than its own is named after it: PIBCONV-F3, or, for
    a searched cell (a hash id), g-ae04bd0a-F3."""
    g = Genotype.from_dict(genotype)
    if F is None or g.options.bottleneck_ratio == float(F):
        return g
    from dataclasses import replace

    return replace(g, options=replace(g.options, bottleneck_ratio=float(F)),
                   name=f"{g.first_release_id}-F{float(F):g}")


def op_set_id_for(genotype: Genotype) -> str:
    """The preset an (unannotated) genotype's ops and options come from (with its form: ``pibconv-gelu_all``
    for the first release's PIBCONV), else 'custom'."""
    for name, preset in OP_SETS.items():
        if genotype.primitives <= set(preset.primitives) and genotype.options.activation == preset.options.activation \
                and genotype.options.norm == preset.options.norm:
            from dataclasses import replace

            return replace(preset, options=genotype.options).id
    return "custom"
