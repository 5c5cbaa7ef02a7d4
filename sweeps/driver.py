"""Launch, resume and inspect two-stage sweeps (search -> genotypes -> eval) on Ray Tune.

Sweep directory (``<storage>/<name>/``):

- ``sweep.yaml``   the frozen, resolved sweep file (genotype files embedded)
- ``state.json``   which stage is done; a resumed sweep continues with the right stage
- ``search/``      the search stage's Ray Tune experiment
- ``genotypes/``   one JSON per derived genotype plus ``index.json`` (written atomically)
- ``eval/``        the eval stage's Ray Tune experiment

One driver runs the stages one after another (Ray does not support concurrent Tuners in one job);
each stage is idempotent: a stage whose experiment exists is restored, never restarted.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from nas.errors import ConfigError
from nas.genotypes import Genotype
from nas.io import write_json_atomic, write_text_atomic
from sweeps.spec import (DATASET_SHAPES, SEARCHED, Stage, SweepSpec, eval_trials, genotype_for_trial, parse_sweep,
                         search_trials)

SWEEP_FILE, STATE_FILE, GENOTYPE_DIR = "sweep.yaml", "state.json", "genotypes"
STAGES = ("search", "eval")


@dataclass(frozen=True)
class SweepDir:
    path: Path

    @property
    def sweep_file(self) -> Path:
        return self.path / SWEEP_FILE

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    @property
    def genotype_dir(self) -> Path:
        return self.path / GENOTYPE_DIR

    def read_state(self) -> dict[str, Any]:
        f = self.path / STATE_FILE
        return json.loads(f.read_text()) if f.is_file() else {"stages": {}}

    def mark(self, stage: str, status: str) -> None:
        state = self.read_state()
        state.setdefault("stages", {})[stage] = status
        write_json_atomic(self.path / STATE_FILE, state)

    def is_sweep(self) -> bool:
        return self.sweep_file.is_file()

    def load_spec(self) -> SweepSpec:
        if not self.is_sweep():
            raise ConfigError(f"{self.path} is not a sweep directory (no {SWEEP_FILE}); "
                              "pass the folder that `dartsweep sweep run` printed")
        return parse_sweep(yaml.safe_load(self.sweep_file.read_text()), self.path)


def _print(msg: str) -> None:
    print(f"[dartsweep] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ dry run

def trial_table(spec: SweepSpec, searched: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every trial the sweep will run, with params and GMAC for eval trials of known genotypes."""
    from nas.complexity import complexity

    rows: list[dict[str, Any]] = []
    if spec.search is not None:
        for t in search_trials(spec.search):
            rows.append({"stage": "search", **t, "epochs": spec.search.base.get("epochs", 50)})
    if spec.eval is not None:
        stage = spec.eval
        known = {k: {"genotype": v} for k, v in stage.axes["genotypes"].items() if v != SEARCHED}
        known.update(searched or {})
        in_ch, size, classes = DATASET_SHAPES[spec.dataset]
        channels = stage.base.get("channels", 36)
        if stage.search_alg.type != "grid":  # sampled: list the space, not a grid
            for gid in known:
                rows.append({"stage": "eval", "genotype": gid, "layers": stage.axes["layers"], "F": stage.axes["F"],
                             "seed": stage.axes["seeds"], "epochs": stage.base.get("epochs", 600),
                             "samples": f"{stage.search_alg.num_samples} ({stage.search_alg.type})"})
            return rows
        for t in eval_trials(stage, known):
            g = genotype_for_trial(known[t["genotype"]]["genotype"], t["F"])
            cost = complexity(g, t["layers"], channels, classes, in_ch, size)
            rows.append({"stage": "eval", **t, "genotype": g.id, "epochs": stage.base.get("epochs", 600),
                         "params_m": round(cost.params_m, 3), "gmac": round(cost.gmac, 4)})
        if SEARCHED in stage.axes["genotypes"] and not searched:
            n = len(search_trials(spec.search)) if spec.search else 0
            rows.append({"stage": "eval", "genotype": f"<searched: up to {n}>", "layers": stage.axes["layers"],
                         "F": stage.axes["F"], "seed": stage.axes["seeds"], "epochs": stage.base.get("epochs", 600)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    if not rows:
        return "(no trials)"
    frame = pd.DataFrame(rows).astype(object).where(lambda d: d.notna(), "")
    return frame.to_string(index=False)


# ------------------------------------------------------------------------------------------------ running

def _ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")  # 0-GPU trials see no GPU (#54868)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # an embedded single-machine Ray, reachable from this machine only
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 log_to_driver=True, configure_logging=False)


def _param_space(stage: Stage, genotypes: dict[str, Any] | None = None) -> dict[str, Any]:
    from ray import tune

    alg = stage.search_alg

    def axis(values: list | dict | None) -> Any:
        if values is None:
            return None
        if isinstance(values, dict):
            lo, hi = values["min"], values["max"]
            both_int = all(isinstance(v, int) for v in (lo, hi))
            return tune.randint(lo, hi + 1) if both_int else tune.uniform(lo, hi)
        return tune.grid_search(values) if alg.type == "grid" else tune.choice(values)

    common = {"base": stage.base, "checkpoint_every": stage.checkpoint_every, "seed": axis(stage.axes["seeds"])}
    if stage.kind == "search":
        return {**common, "op_set": axis(list(stage.axes["op_sets"])), "F": axis(stage.axes["F"]),
                "op_sets": stage.axes["op_sets"]}
    assert genotypes is not None
    return {**common, "genotype": axis(list(genotypes)), "layers": axis(stage.axes["layers"]),
            "F": axis(stage.axes["F"]), "genotypes": genotypes}


def _tune_config(stage: Stage, spec: SweepSpec):
    from ray import tune

    alg = stage.search_alg
    kwargs: dict[str, Any] = {"num_samples": 1 if alg.type == "grid" else alg.num_samples,
                              "trial_dirname_creator": _trial_dirname, "trial_name_creator": _trial_dirname,
                              # a finished trial's worker runs the next one: no new process importing torch
                              "reuse_actors": True}
    if spec.max_concurrent_trials:
        kwargs["max_concurrent_trials"] = spec.max_concurrent_trials
    if alg.type == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        metric = list(alg.metric) if alg.multi_objective else alg.metric[0]
        mode = list(alg.mode) if alg.multi_objective else alg.mode[0]
        kwargs["search_alg"] = OptunaSearch(metric=metric, mode=mode)
    if stage.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        from sweeps.trainables import GroupedASHA

        s = stage.scheduler
        epochs = stage.base.get("epochs", 50 if stage.kind == "search" else 600)
        asha = dict(time_attr="training_iteration", metric=s["metric"], mode=s["mode"], max_t=epochs,
                    grace_period=min(s["grace_period"], epochs), reduction_factor=s["reduction_factor"])
        kwargs["scheduler"] = GroupedASHA(**asha) if stage.kind == "eval" else ASHAScheduler(**asha)
    return tune.TuneConfig(**kwargs)


def _trial_dirname(trial: Any) -> str:
    from sweeps.trainables import trial_dirname

    return trial_dirname(trial)


def _trainable(stage: Stage) -> Callable:
    from ray import tune

    from sweeps import trainables

    fn = trainables.search_trainable if stage.kind == "search" else trainables.eval_trainable
    res = {"cpu": stage.resources["cpu"], "gpu": stage.resources["gpu"]}
    return tune.with_resources(fn, res)


def _run_stage(spec: SweepSpec, sweep: SweepDir, stage: Stage, storage: str, genotypes: dict | None = None,
               verbose: int = 1) -> Any:
    from ray import tune

    stage_path = _join(storage, spec.name, stage.kind)
    trainable = _trainable(stage)
    if tune.Tuner.can_restore(stage_path):
        _print(f"{stage.kind}: continuing the experiment in {stage_path}")
        tuner = tune.Tuner.restore(stage_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        _print(f"{stage.kind}: starting {stage_path}")
        run_config = tune.RunConfig(
            name=stage.kind, storage_path=_join(storage, spec.name), verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        )
        tuner = tune.Tuner(trainable, param_space=_param_space(stage, genotypes), tune_config=_tune_config(stage, spec),
                           run_config=run_config)
    results = tuner.fit()
    errors = len(results.errors)
    sweep.mark(stage.kind, "done" if errors == 0 else "done_with_errors")
    _print(f"{stage.kind}: {len(results)} trials, {errors} errored")
    return results


def _join(storage: str, *parts: str) -> str:
    if "://" in storage:
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts).expanduser().resolve())


def collect_genotypes(sweep: SweepDir) -> dict[str, Any]:
    """Derived genotypes of the finished search trials, written to ``genotypes/`` (atomic) and returned."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(sweep.stage_dir("search")))
    found: dict[str, Any] = {}
    for trial in analysis.trials:
        last = trial.last_result or {}
        if trial.status != "TERMINATED" or last.get("diverged") or "genotype" not in last:
            continue
        g = Genotype.from_dict(last["genotype"])
        entry = {"genotype": g.to_dict(), "op_set": last.get("op_set"), "F": last.get("F"),
                 "seed": last.get("seed"), "valid_acc": last.get("valid_acc"), "source_trial": trial.trial_id}
        if g.id not in found:
            found[g.id] = entry
            write_json_atomic(sweep.genotype_dir / f"{g.id}.json", entry)
    write_json_atomic(sweep.genotype_dir / "index.json", {k: {kk: v for kk, v in e.items() if kk != "genotype"}
                                                          for k, e in found.items()})
    return found


def eval_genotypes(spec: SweepSpec, searched: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in spec.eval.axes["genotypes"].items():  # type: ignore[union-attr]
        if value == SEARCHED:
            out.update(searched)
        else:
            out[key] = {"genotype": value}
    return out


def run_sweep(spec: SweepSpec, storage: str | None = None, address: str | None = None,
              verbose: int = 1) -> Path:
    """Launch a new sweep; refuses to touch an existing sweep directory (use ``resume_sweep``)."""
    storage = storage or spec.storage or "./results"
    if "://" in storage:
        raise ConfigError("this version keeps the sweep folder on a local or shared filesystem; mount the bucket "
                          "or pass a shared path to --storage")
    sweep = SweepDir(Path(_join(storage, spec.name)))
    if sweep.path.exists() and any(sweep.path.iterdir()):
        raise ConfigError(f"{sweep.path} already exists; continue it with `dartsweep sweep resume {sweep.path}` "
                          "or change the sweep's name")
    from nas.data import check_dataset_available

    check_dataset_available(spec.dataset, spec.data_dir)
    sweep.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep.sweep_file, yaml.safe_dump({**spec.raw, "storage": str(Path(storage).resolve())},
                                                       sort_keys=False))
    write_json_atomic(sweep.path / STATE_FILE, {"stages": {}})
    return _continue(spec, sweep, address, verbose)


def resume_sweep(path: str | Path, address: str | None = None, verbose: int = 1) -> Path:
    """Continue a sweep: unfinished and errored trials from their last checkpoints; finished ones are kept."""
    sweep = SweepDir(Path(path).expanduser().resolve())
    spec = sweep.load_spec()
    from nas.data import check_dataset_available

    check_dataset_available(spec.dataset, spec.data_dir)
    return _continue(spec, sweep, address, verbose)


def _continue(spec: SweepSpec, sweep: SweepDir, address: str | None, verbose: int) -> Path:
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state saved often: see README
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage = str(sweep.path.parent)
    _ray_init(address)
    state = sweep.read_state().get("stages", {})
    searched: dict[str, Any] = {}
    if spec.search is not None:
        if state.get("search") != "done":
            _run_stage(spec, sweep, spec.search, storage, verbose=verbose)
        searched = collect_genotypes(sweep)
        _print(f"search: {len(searched)} genotype(s) in {sweep.genotype_dir}")
    if spec.eval is not None and state.get("eval") != "done":
        genotypes = eval_genotypes(spec, searched)
        if not genotypes:
            sweep.mark("eval", "skipped_no_genotypes")
            _print("eval: no genotypes to evaluate (every search trial failed); see `dartsweep sweep status`")
        else:
            _run_stage(spec, sweep, spec.eval, storage, genotypes, verbose=verbose)
    _print(f"results in {sweep.path}  (dartsweep sweep status {sweep.path}; dartsweep analyze {sweep.path})")
    return sweep.path
