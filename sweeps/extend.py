"""Grow a sweep: more op sets, F values or seeds for the search; more genotypes, layers, F or seeds for
the eval. Only the new grid points train; finished trials are reused where they are.

Ray Tune cannot add points to an experiment, so each extension runs the points no experiment of the
stage holds yet as a new experiment of that stage, a *part* (``search-2/``, ``eval-2/``, ...) whose
param space lists exactly those points. ``state.json`` records every part's points (``"points"``), so
the driver knows what is missing: after new search trials find new cells, the eval stage's missing
points include those cells at every layer count, F and seed, and run as one more part. ``status`` and
``analyze`` read every part as one sweep. A change that alters how an existing trial trains (epochs, lr,
batch size, data set, ...) is refused; extending works on grid stages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nas.config import EvalConfig, SearchConfig
from nas.errors import ConfigError
from sweeps.spec import SEARCHED, Stage, SweepSpec, eval_trials, parse_sweep, search_trials

GRID_KEYS = {"search": ("op_sets", "F", "seeds", "cost_weight"), "eval": ("genotypes", "layers", "F", "seeds")}
POINT_KEYS = {"search": ("op_set", "F", "seed", "cost_weight"), "eval": ("genotype", "layers", "F", "seed")}
# what identifies a grid point: a grid folds F into the op set id (pibconv-F3) or the genotype id (PIBCONV-F3),
# so F is not part of it (a trial's config holds F None where the grid folded it)
IDENTITY = {"search": ("op_set", "seed", "cost_weight"), "eval": ("genotype", "layers", "seed")}


def _key(point: dict[str, Any], kind: str) -> tuple:
    return tuple(point.get(k) for k in IDENTITY[kind])  # 2 == 2.0 and hash alike: numbers need no normalising


def parts_of(state: dict[str, Any], kind: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(part, points) recorded for a stage, its own experiment first."""
    parts = [(p, pts) for p, pts in state.get("points", {}).items() if p == kind or p.startswith(kind + "-")]
    return sorted(parts, key=lambda item: 0 if item[0] == kind else int(item[0].rsplit("-", 1)[1]))


def next_part(state: dict[str, Any], kind: str) -> str:
    return f"{kind}-{len(parts_of(state, kind)) + 1}"


def record_points(sweep: Any, part: str, points: list[dict[str, Any]]) -> None:
    state = sweep.read_state()
    state.setdefault("points", {})[part] = points
    sweep.write_json(state, "state.json")


def stage_points(stage: Stage, genotypes: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every grid point of the stage (search: op set, F, seed; eval: genotype, layers, F, seed)."""
    return search_trials(stage) if stage.kind == "search" else eval_trials(stage, genotypes or {})


def missing_points(state: dict[str, Any], stage: Stage, genotypes: dict[str, Any] | None) -> list[dict[str, Any]]:
    held = {_key(p, stage.kind) for _, pts in parts_of(state, stage.kind) for p in pts}
    return [p for p in stage_points(stage, genotypes) if _key(p, stage.kind) not in held]


def experiment_points(sweep: Any, part: str) -> list[dict[str, Any]]:
    """The grid points of a finished experiment's trials, from their configs."""
    from ray import tune

    kind = part.split("-")[0]
    points = []
    for trial in tune.ExperimentAnalysis(sweep.join(part)).trials:
        config = {**trial.config, **trial.config.get("point", {})}
        point = {k: config.get(k) for k in POINT_KEYS[kind]}
        if point.get("cost_weight", 0) is None:  # a stage without a lambda axis: its points have no such key
            del point["cost_weight"]
        points.append(point)
    return points


def _effective(kind: str, base: dict[str, Any]) -> dict[str, Any]:
    cls = SearchConfig if kind == "search" else EvalConfig
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: v for k, v in {**defaults, **base}.items() if k not in ("data_dir", "op_set", "genotype", "seed",
                                                                        "layers", "bottleneck_ratio")}


def check_extension(old: SweepSpec, new: SweepSpec, file: str) -> None:
    """Refuse what would change how existing trials train, or what extending cannot do."""
    if old.first_release:
        raise ConfigError("this sweep was written by dartsweep's first release; start a new sweep (analyze can "
                          "merge the two)")
    if old.search is not None and any(m.get("stem") == "patchify_bias" for m in old.search.axes["op_sets"].values()):
        raise ConfigError("this sweep's search networks have the third release's biased patchify stem; start a new "
                          "sweep (analyze can merge the two)")
    if new.dataset != old.dataset:
        raise ConfigError(f"dataset: {old.dataset} in the sweep, {new.dataset} in {file}; extending cannot change "
                          "how existing trials train (start a new sweep)")
    for kind in ("search", "eval"):
        was, now = getattr(old, kind), getattr(new, kind)
        if now is None:
            continue
        if was is None:
            raise ConfigError(f"{kind}: the sweep has no {kind} stage; extending adds grid points, not stages")
        if "grid" != was.search_alg.type or "grid" != now.search_alg.type:
            raise ConfigError(f"{kind}.search_alg: extending works on grid stages (a sampler's stage grows with "
                              "a new sweep)")
        a, b = _effective(kind, was.base), _effective(kind, now.base)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if changed:
            k = changed[0]
            raise ConfigError(f"{kind}.{k}: {a.get(k)!r} in the sweep, {b.get(k)!r} in {file}; extending cannot "
                              f"change how existing trials train (start a new sweep)"
                              + (f"; also {', '.join(changed[1:])}" if len(changed) > 1 else ""))


def union_raw(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The sweep file with each stage's grid lists the union of the two (the sweep's values first)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in old.items()}
    for kind, keys in GRID_KEYS.items():
        if kind not in new or kind not in out:
            continue
        stage = out[kind] = dict(out[kind])
        for key in keys:
            values = [*_as_list(stage.get(key)), *_as_list(new[kind].get(key))]
            merged: list[Any] = []
            for v in values:
                if v not in merged:
                    merged.append(v)
            if merged:
                stage[key] = merged
    if new.get("plugins"):  # the file's plugins as they are now (a changed one got past the frozen check)
        out["plugins"] = new["plugins"]
    return out


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def plan(sweep: Any, old: SweepSpec, union: SweepSpec) -> list[dict[str, Any]]:
    """The new trials an extension runs (what ``--dry-run`` prints): new search points, new eval points of
    the genotypes known now, and a line for the cells new search trials may add."""
    state = sweep.read_state()
    recorded = state if "points" in state else {"points": _current_points(sweep, old)}
    rows: list[dict[str, Any]] = []
    new_search = missing_points(recorded, union.search, None) if union.search else []
    rows += [{"stage": "search", **p, "epochs": union.search.epochs} for p in new_search]
    if union.eval is not None:
        from sweeps.driver import eval_genotypes, read_searched

        genotypes = eval_genotypes(union, read_searched(sweep.location))
        rows += [{"stage": "eval", **p, "epochs": union.eval.epochs} for p in missing_points(recorded, union.eval,
                                                                                              genotypes)]
        if new_search and SEARCHED in union.eval.axes["genotypes"]:
            rows.append({"stage": "eval", "genotype": f"<cells of the {len(new_search)} new search trial(s)>",
                         "layers": union.eval.axes["layers"], "F": union.eval.axes["F"],
                         "seed": union.eval.axes["seeds"], "epochs": union.eval.epochs})
    return rows


def _current_points(sweep: Any, spec: SweepSpec) -> dict[str, list[dict[str, Any]]]:
    """Each finished stage's points, read from its experiment; refused while a stage is unfinished."""
    stages = sweep.read_state().get("stages", {})
    out = {}
    for kind in ("search", "eval"):
        if getattr(spec, kind) is None:
            continue
        status = stages.get(kind)
        if status == "skipped_no_genotypes":
            out[kind] = []
        elif status not in ("done", "done_with_errors"):
            raise ConfigError(f"{kind}: the stage is {status or 'not started'}; finish the sweep first "
                              f"(`dartsweep sweep resume {sweep.location}`), then extend it")
        else:
            out[kind] = experiment_points(sweep, kind)
    return out


def prepare_extension(sweep: Any, file: str | Path, accept_plugin_change: bool = False) -> tuple[SweepSpec, SweepSpec]:
    """(the sweep's spec, the extended spec) after every check; nothing written."""
    from sweeps.spec import load_sweep

    mode = "accept" if accept_plugin_change else "import"
    old = sweep.load_spec(mode)
    new = load_sweep(file)
    check_extension(old, new, str(file))
    union = parse_sweep(union_raw(old.raw, new.raw), Path.cwd(), plugins=mode)
    return old, union


def apply_extension(sweep: Any, old: SweepSpec, union: SweepSpec) -> None:
    """Record the existing experiments' points (first extension only), then freeze the extended file."""
    import yaml

    from sweeps.driver import SWEEP_FILE

    state = sweep.read_state()
    if "points" not in state:
        state["points"] = _current_points(sweep, old)
    state.setdefault("extensions", 0)
    state["extensions"] += 1
    sweep.write_json(state, "state.json")
    sweep.write_text(yaml.safe_dump({**union.raw, "storage": old.raw.get("storage")}, sort_keys=False), SWEEP_FILE)


def _stage_fields(stage: Stage) -> dict[str, Any]:
    """What a stage's trials are, as ``up`` compares a file with the frozen sweep: its grid (ids of op sets and
    genotypes, F, seeds, layers, lambdas), every training setting (defaults filled in) and how Ray runs them."""
    grid = {key: (list(value) if isinstance(value, dict) and key in ("op_sets", "genotypes") else value)
            for key, value in stage.axes.items()}
    return {**grid, **_effective(stage.kind, stage.base), "resources": stage.resources,
            "checkpoint_every": stage.checkpoint_every, "search_alg": dataclasses.asdict(stage.search_alg),
            "scheduler": stage.scheduler}


def _subset(small: Any, big: Any) -> bool:
    return isinstance(small, list) and isinstance(big, list) and all(v in big for v in small)


def spec_differences(frozen: SweepSpec, new: SweepSpec, extended: bool = False) -> list[tuple[str, Any, Any]]:
    """(key, frozen value, new value) for everything ``new`` changes about the frozen sweep; an extended
    sweep's grid lists may be supersets of the file's (the file it was first run with)."""
    out: list[tuple[str, Any, Any]] = []
    for key in ("dataset", "data_transfer", "max_failures", "max_concurrent_trials"):
        if getattr(frozen, key) != getattr(new, key):
            out.append((key, getattr(frozen, key), getattr(new, key)))
    was_plugins, now_plugins = ([p["source"] for p in spec.plugins] for spec in (frozen, new))
    if was_plugins != now_plugins and not (extended and set(was_plugins) <= set(now_plugins)):
        out.append(("plugins", was_plugins, now_plugins))
    for kind in ("search", "eval"):
        was, now = getattr(frozen, kind), getattr(new, kind)
        if (was is None) != (now is None):
            out.append((kind, "a stage" if was else None, "a stage" if now else None))
            continue
        if was is None:
            continue
        a, b = _stage_fields(was), _stage_fields(now)
        for key in sorted(set(a) | set(b)):
            if a.get(key) == b.get(key):
                continue
            if extended and key in GRID_KEYS[kind] and _subset(b.get(key), a.get(key)):
                continue
            out.append((f"{kind}.{key}", a.get(key), b.get(key)))
    return out


def check_unchanged(sweep: Any, new: SweepSpec, file: str, accept_plugin_change: bool = False) -> None:
    """Refuse (ConfigError naming the key) a file that no longer describes the sweep frozen in ``sweep``
    (a changed plugin: unless ``accept_plugin_change``)."""
    frozen = sweep.load_spec("accept" if accept_plugin_change else "import")
    extended = bool(sweep.read_state().get("extensions"))
    diffs = spec_differences(frozen, new, extended)
    if not diffs:
        return
    key, was, now = diffs[0]
    grid = key.split(".")[-1] in GRID_KEYS.get(key.split(".")[0], ())
    how = (f"grow it with `dartsweep sweep extend {sweep.location} {file}`" if grid else
           "a sweep's training settings cannot change once it runs; give the sweep another name")
    also = f" (also {', '.join(k for k, _, _ in diffs[1:])})" if len(diffs) > 1 else ""
    raise ConfigError(f"{key}: {_short(now)} in {file}, but the sweep in {sweep.location} was frozen with "
                      f"{_short(was)}{also}; {how}, or continue it as frozen with `dartsweep sweep resume "
                      f"{sweep.location}`")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
