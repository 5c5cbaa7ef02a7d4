"""Launch, resume and inspect two-stage sweeps (search -> genotypes -> eval) on Ray Tune.

How a sweep flows: the YAML file is parsed and checked into a ``SweepSpec`` (``sweeps.spec``) before any
cluster work; ``run_sweep`` loads the data set once, takes the sweep's lock (``sweeps.lock``), freezes the
spec into the sweep folder and runs the stages one after another (``_run_stages``): each stage is one Ray
Tune experiment whose trials are ``sweeps.trainables.search_trainable`` / ``eval_trainable`` (plain
functions calling ``nas.train``), given the op-set or genotype table and the data through Ray's object
store. After the search stage, ``collect_genotypes`` writes every derived cell to ``genotypes/`` and they
become the eval stage's ``searched`` genotypes. ``resume_sweep`` restores each stage that is not done;
``up_sweep`` (what job scripts call) runs a sweep or resumes it, whichever its folder calls for. A driver
given a ``sweeps.stopping.GracefulStop`` has every running trial checkpoint on SIGTERM/SIGUSR1 and stops.

Sweep directory (``<storage>/<name>/``):

- ``sweep.yaml``   the frozen, resolved sweep file (genotype files embedded, absolute paths, ``format: 3``)
- ``state.json``   which stage is done (or interrupted); a resumed sweep continues with the right stage
- ``driver.lock``  the running driver (``sweeps.lock``); ``driver.log``: Ray's console output
- ``search/``      the search stage's Ray Tune experiment; each trial folder keeps its own checkpoints
                   (``checkpoints/epoch_NNNNNN/``, ``sweeps.checkpoints``)
- ``genotypes/``   one JSON per derived genotype plus ``index.json`` (written atomically)
- ``eval/``        the eval stage's Ray Tune experiment

One driver runs the stages one after another (Ray does not support concurrent Tuners in one job);
each stage is idempotent: a stage whose experiment exists is restored, never restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from nas.registry import DATASETS
from nas.data import CIFAR_FOLDERS, ImageData, dataset_shape, load_dataset, nbytes, to_arrays
from nas.errors import ConfigError
from sweeps import ray_auth
from nas.genotypes import Genotype
from nas.io import write_text_atomic
from sweeps.spec import (SEARCHED, SWEEP_FORMAT, Stage, SweepSpec, eval_table, eval_trials,
                         fold_ratios, parse_sweep, search_trials, table_key)

SWEEP_FILE, STATE_FILE, GENOTYPE_DIR = "sweep.yaml", "state.json", "genotypes"


@dataclass(frozen=True)
class SweepDir:
    """A sweep folder on a local or shared filesystem (a path) or in cloud storage (a URI Ray supports,
    e.g. ``s3://bucket/sweeps/name``), read and written through pyarrow's filesystems as Ray does."""

    location: str

    @staticmethod
    def at(location: str | Path) -> "SweepDir":
        text = str(location)
        if "://" not in text:
            return SweepDir(str(Path(text).expanduser().resolve()))
        base, sep, query = text.partition("?")  # s3://bucket/prefix?endpoint_override=...&region=...
        return SweepDir(base.rstrip("/") + sep + query)

    @property
    def is_local(self) -> bool:
        return "://" not in self.location

    @property
    def path(self) -> Path:
        """The local folder (status and analysis read local copies: :meth:`mirror` for a remote sweep)."""
        if not self.is_local:
            raise ConfigError(f"{self.location} is remote; read it through a local copy (SweepDir.mirror)")
        return Path(self.location)

    @property
    def name(self) -> str:
        return self.location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]

    def mirror(self, dest: str | Path, skip: tuple[str, ...] = ("state.pt",)) -> Path:
        """A local copy of a remote sweep folder in ``dest``/<name>, for reading (status, analysis): every
        object but the trials' weights (``skip``), which stand as empty sparse files of their size, so
        checkpoints still count as complete and their history is read. A local sweep is its own copy."""
        if self.is_local:
            return self.path
        import pyarrow.fs as pafs

        fs, root = self._fs()
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise ConfigError(f"{self.location} does not exist (or this machine's AWS credentials cannot see it)")
        target = Path(dest, self.name)
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            local = target / info.path[len(root):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            if info.base_name in skip:
                with open(local, "wb") as fh:
                    fh.truncate(info.size)
                continue
            with fs.open_input_stream(info.path) as src, open(local, "wb") as fh:
                fh.write(src.read())
        return target

    def join(self, *parts: str) -> str:
        """A path or URI below this folder; a URI's query (endpoint_override, scheme, region) stays at its end."""
        if self.is_local:
            return str(Path(self.location, *parts))
        base, sep, query = self.location.partition("?")
        return "/".join([base, *parts]) + sep + query

    def _fs(self):
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.location
        return pafs.FileSystem.from_uri(self.location)

    def check_reachable(self) -> None:
        """Refuse, in one line naming the URI, cloud storage whose bucket is missing or cannot be read with
        this machine's credentials (before any data is loaded or any trial starts)."""
        if self.is_local:
            return
        import pyarrow.fs as pafs

        try:
            fs, root = self._fs()
            if isinstance(fs, pafs.LocalFileSystem):  # file://: a folder, made when needed
                return
            bucket = root.split("/", 1)[0]
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"storage {self.location}: cannot reach it ({first}); check the URI and the AWS "
                              "credentials (AWS_* variables or ~/.aws)") from None
        if not found:
            raise ConfigError(f"storage {self.location}: bucket {bucket!r} does not exist (or these credentials "
                              "cannot see it); create it first")

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        fs, root = self._fs()
        return fs.get_file_info("/".join([root, *parts])).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        import pyarrow.fs as pafs

        fs, root = self._fs()
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return True
        return not fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))

    def read_text(self, *parts: str) -> str:
        fs, root = self._fs()
        with fs.open_input_stream("/".join([root, *parts])) as fh:
            return fh.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        """Atomic: a rename on filesystems, a single object put in cloud storage."""
        if self.is_local:
            write_text_atomic(Path(self.location, *parts), text)
            return
        fs, root = self._fs()
        path = "/".join([root, *parts])
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as fh:
            fh.write(text.encode())

    def remove(self, *parts: str) -> None:
        fs, root = self._fs()
        try:
            fs.delete_file("/".join([root, *parts]))
        except (FileNotFoundError, OSError):
            pass

    def write_json(self, data: Any, *parts: str) -> None:
        self.write_text(json.dumps(data, indent=2) + "\n", *parts)

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.read_text(STATE_FILE)) if self.exists(STATE_FILE) else {"stages": {}}

    def mark(self, stage: str, status: str) -> None:
        state = self.read_state()
        state.setdefault("stages", {})[stage] = status
        self.write_json(state, STATE_FILE)

    def is_sweep(self) -> bool:
        return self.exists(SWEEP_FILE)

    def load_spec(self, plugins: str = "import") -> SweepSpec:
        """The frozen sweep; ``plugins``: how its plugins are taken (``sweeps.spec.sweep_plugins``)."""
        if not self.is_sweep():
            raise ConfigError(f"{self.location} is not a sweep directory (no {SWEEP_FILE}); "
                              "pass the folder that `dartsweep sweep run` printed")
        # sweep.yaml holds absolute paths (embedded genotypes); one written before that held a data_dir
        # relative to where its driver ran, which resume keeps. One without a format was written by the
        # first release: its names mean that release's networks.
        raw = yaml.safe_load(self.read_text(SWEEP_FILE))
        return parse_sweep(raw, Path.cwd(), first_release=isinstance(raw, dict) and "format" not in raw,
                           plugins=plugins)


def _print(msg: str) -> None:
    print(f"[dartsweep] {msg}", file=sys.stderr, flush=True)


class SweepInterrupted(Exception):
    """The driver was stopped (Ctrl-C) with trials of a stage unfinished or never started; Ray Tune saved
    the experiment and the stage is not marked done, so ``resume`` runs them."""


# ------------------------------------------------------------------------------------------------ dry run

def trial_table(spec: SweepSpec, searched: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every trial the sweep will run, with params and GMAC for eval trials of known genotypes."""
    from nas.complexity import complexity

    rows: list[dict[str, Any]] = []
    if spec.search is not None:
        for t in search_trials(spec.search):
            rows.append({"stage": "search", **t, "epochs": spec.search.epochs})
    if spec.eval is not None:
        stage = spec.eval
        known = {k: {"genotype": v} for k, v in stage.axes["genotypes"].items() if v != SEARCHED}
        known.update(searched or {})
        in_ch, size, classes = dataset_shape(spec.dataset)
        channels = stage.base.get("channels", 36)
        if stage.search_alg.type != "grid":  # sampled: list the space, not a grid
            for gid in known:
                rows.append({"stage": "eval", "genotype": gid, "layers": stage.axes["layers"], "F": stage.axes["F"],
                             "seed": stage.axes["seeds"], "epochs": stage.epochs,
                             "samples": f"{stage.search_alg.num_samples} ({stage.search_alg.type})"})
            return rows
        table = eval_table(stage, known)
        costs: dict[tuple[str, int], Any] = {}  # once per network: the seeds of a grid share it
        for t in eval_trials(stage, known):
            g = Genotype.from_dict(table[t["genotype"]]["genotype"])
            key = (json.dumps(g.to_dict(), sort_keys=True), t["layers"])
            if key not in costs:
                costs[key] = complexity(g, t["layers"], channels, classes, in_ch, size)
            cost = costs[key]
            rows.append({"stage": "eval", **t, "genotype": g.id, "epochs": stage.epochs,
                         "params_m": round(cost.params_m, 3), "gmac": round(cost.gmac, 4)})
        if SEARCHED in stage.axes["genotypes"] and not searched:
            n = len(search_trials(spec.search)) if spec.search else 0
            rows.append({"stage": "eval", "genotype": f"<searched: up to {n}>", "layers": stage.axes["layers"],
                         "F": stage.axes["F"], "seed": stage.axes["seeds"], "epochs": stage.epochs})
    return rows


def plan_summary(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    """How many trials each stage will run, from ``trial_table``'s rows: a grid's count, a sampler's
    ``num_samples``, and the most the searched cells can add (the search decides how many cells there are)."""
    search = f"{sum(r['stage'] == 'search' for r in rows)} search trial(s)"
    stage = spec.eval
    if stage is None:
        return search
    if stage.search_alg.type != "grid":
        return f"{search}, {stage.search_alg.num_samples} eval trial(s) sampled by {stage.search_alg.type}"
    listed = [r for r in rows if r["stage"] == "eval" and isinstance(r.get("layers"), int)]
    text = f"{search}, {len(listed)} eval trial(s)"
    if len(listed) < sum(r["stage"] == "eval" for r in rows):  # the searched cells' row
        cells = len(search_trials(spec.search)) if spec.search else 0
        F = stage.axes["F"]
        per_cell = len(stage.axes["layers"]) * (len(F) if isinstance(F, list) else 1) * len(stage.axes["seeds"])
        text += f" + up to {cells * per_cell} on the searched cells ({per_cell} per cell, up to {cells} cells)"
    return text


def data_summary(spec: SweepSpec) -> str:
    """Where the sweep's data comes from and how trials get it (for ``--dry-run``)."""
    entry = DATASETS.get(spec.dataset)
    if spec.dataset == "digits":
        where = "scikit-learn's bundled copy"
    elif spec.dataset not in CIFAR_FOLDERS:
        where = entry.source
    else:
        present = (Path(spec.data_dir) / CIFAR_FOLDERS[spec.dataset]).is_dir()
        where = f"{spec.data_dir} ({'present' if present else 'missing: the driver downloads it when online'})"
    how = ("loaded once by the driver and shipped to the trials through Ray's object store"
           if spec.data_transfer == "object_store" else "read by every trial from that folder (shared_path)")
    return (f"data: {spec.dataset} from {where}, {how}; relative paths in a sweep file resolve against its "
            "folder (a built-in definition's against the current directory)")


def format_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    if not rows:
        return "(no trials)"
    frame = pd.DataFrame(rows).astype(object).where(lambda d: d.notna(), "")
    return frame.to_string(index=False)


# ------------------------------------------------------------------------------------------------ running

def _ray_init(address: str | None, verbose: int = 1, plugins: tuple[dict[str, Any], ...] = ()) -> bool:
    """Connect to ``address``, or start an embedded single-machine Ray; True when this call started or joined
    Ray (so the caller stops it), False when Ray was already initialised by someone else. The sweep's
    plugins travel with the job (``runtime_env`` py_modules): Ray ships them to every node, which needs no
    shared file system and no copy of its own."""
    import ray

    from nas.plugins import load_plugin, ship_folder

    if ray.is_initialized():
        return False
    modules = ship_folder([load_plugin(p["source"]) for p in plugins])
    runtime_env = {"py_modules": modules} if modules else None
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")  # 0-GPU trials see no GPU (#54868)
    if verbose < 2:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    global _PRIVATE_TOKEN
    _PRIVATE_TOKEN = ray_auth.prepare(address)  # token authentication, always (sweeps.ray_auth)
    try:
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)  # worker lines: to the sweep's log (sweeps.console)
        else:  # an embedded single-machine Ray: its nodes on loopback, no dashboard; Ray's control store
            # listens on every interface whatever it is told, so the token is what keeps others out
            # "local": always a fresh instance; with no address Ray would join the last cluster started here
            ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False,
                     runtime_env=runtime_env)
    except BaseException:
        ray_auth.remove_private_token(_PRIVATE_TOKEN)
        _PRIVATE_TOKEN = None
        raise
    return True


_PRIVATE_TOKEN: Path | None = None  # the embedded Ray's own token file, removed by _ray_stop


def _ray_session_name() -> str | None:
    """The embedded Ray's session name (``session_<date>_<pid>``), which every one of its processes carries
    on its command line; None where this Ray version does not say (Ray has no public call for it)."""
    import ray

    name = getattr(getattr(ray._private.worker, "_global_node", None), "session_name", None)
    return name if isinstance(name, str) and name.startswith("session_") else None


def _ray_stop() -> None:
    """Disconnect from Ray, stopping the embedded instance if this process started one.

    Ray stops its control store before the autoscaler's monitor process, whose SIGTERM handler then tries
    to report to the stopped store until Ray's 1-s grace period runs out and it is killed: a second of
    every sweep spent waiting. An embedded single-machine Ray has nothing to autoscale, so the monitor is
    killed first. (``ray.shutdown`` is also what Ray's exit hook would run, after a further 0.5-s pause.)
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and node.head:
        with contextlib.suppress(Exception):  # a private API: if it changes, the plain shutdown still works
            node.kill_monitor(check_alive=False)
    ray.shutdown()
    global _PRIVATE_TOKEN
    ray_auth.remove_private_token(_PRIVATE_TOKEN)
    _PRIVATE_TOKEN = None


def _param_space(stage: Stage, genotypes: dict[str, Any] | None = None,
                 points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from ray import tune

    alg = stage.search_alg
    if points is not None:  # an extension's part: exactly these grid points (see sweeps.extend)
        return {"base": stage.base, "checkpoint_every": stage.checkpoint_every, "point": tune.grid_search(points)}

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
        space = {**common, "op_set": axis(list(stage.axes["op_sets"])), "F": axis(stage.axes["F"])}
        if stage.axes.get("cost_weight") is not None:  # lambda, a sweep axis like F
            space["cost_weight"] = axis(stage.axes["cost_weight"])
        return space
    assert genotypes is not None
    # ids only (op set, genotype): their tables go to the trainable through Ray's object store
    # (``_trainable``), not into every trial's config, params.json and every line of its result.json.
    # A grid's F list is folded into the genotype ids (PIBCONV-F3), so that genotypes whose ops ignore F run
    # once. (Not F as a tune.sample_from of the genotype: Ray 2.60 restores such trials with the placeholder.)
    folded = fold_ratios(stage, genotypes)
    return {**common, "genotype": axis(list(genotypes if folded is None else folded)),
            "layers": axis(stage.axes["layers"]), "F": axis(stage.axes["F"]) if folded is None else None}


OPTUNA_JOURNAL = "optuna-{kind}.journal"


def optuna_storage(stage: Stage, sweep: SweepDir):
    """Where an optuna stage keeps its study, so Optuna's tools (``optuna.load_study``, optuna-dashboard) open
    it and a resumed driver continues it: the database URL given (``search_alg.storage``, for many
    nodes), else a journal file in the sweep folder (``optuna-<stage>.journal``; local or shared
    filesystems). A sweep in cloud storage without a URL keeps the study in Ray's searcher state only."""
    import optuna

    if stage.search_alg.storage:
        return optuna.storages.RDBStorage(stage.search_alg.storage)
    if not sweep.is_local:
        _print(f"{stage.kind}: the Optuna study lives in Ray's searcher state only; give search_alg.storage (a "
               "database URL) to keep it where Optuna's tools can open it")
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(sweep.location).mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(Path(sweep.location, OPTUNA_JOURNAL.format(kind=stage.kind)))))


def _tune_config(stage: Stage, spec: SweepSpec, sweep: SweepDir):
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
        kwargs["search_alg"] = OptunaSearch(metric=metric, mode=mode, seed=alg.seed,
                                            study_name=f"{spec.name}-{stage.kind}", storage=optuna_storage(stage, sweep))
    elif alg.type == "random" and alg.seed is not None:
        from ray.tune.search import BasicVariantGenerator

        kwargs["search_alg"] = BasicVariantGenerator(random_state=alg.seed)
    if stage.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        from sweeps.trainables import GroupedASHA

        s = stage.scheduler
        epochs = stage.epochs
        # epochs, not Tune's iteration count: a trial restored from its own checkpoint counts iterations anew
        asha = dict(time_attr="epoch", metric=s["metric"], mode=s["mode"], max_t=epochs,
                    grace_period=min(s["grace_period"], epochs), reduction_factor=s["reduction_factor"])
        kwargs["scheduler"] = GroupedASHA(**asha) if stage.kind == "eval" else ASHAScheduler(**asha)
    return tune.TuneConfig(**kwargs)


def _trial_dirname(trial: Any) -> str:
    from sweeps.trainables import trial_dirname

    return trial_dirname(trial)


def _trainable(stage: Stage, genotypes: dict[str, Any] | None = None, data: ImageData | None = None,
               stop_board: str | None = None, plugins: tuple[dict[str, Any], ...] = ()) -> Callable:
    """The stage's trainable with its resources; the search stage's gets its op sets (id -> mapping), the
    eval stage's ``genotypes`` (id -> entry). Both get ``data`` (the driver's copy of the data set) through
    Ray's object store (without it, ``data_transfer: shared_path``, each trial reads its ``data_dir``) and
    the name of the driver's stop board (``sweeps.stopping``), and the records of the sweep's plugins, which
    each trial imports (Ray shipped their code with the job's runtime_env) before it looks a name up."""
    from ray import tune

    from sweeps import trainables

    shipped = {"data": None if data is None else to_arrays(data), "stop_board": stop_board,
               "plugins": list(plugins)}
    if stage.kind == "search":
        fn = tune.with_parameters(trainables.search_trainable, op_sets=stage.axes["op_sets"], **shipped)
    else:
        assert genotypes is not None
        fn = tune.with_parameters(trainables.eval_trainable, genotypes=eval_table(stage, genotypes), **shipped)
    res = {"cpu": stage.resources["cpu"], "gpu": stage.resources["gpu"]}
    return tune.with_resources(fn, res)


@dataclass
class Run:
    """How this driver runs: console verbosity, progress cadence, and its signal handling and stop board
    (``sweeps.stopping``; None where the caller handles no signals)."""

    verbose: int = 1
    progress_every: float | None = None  # seconds between progress lines; None: 30 on a terminal, else 60
    stop: Any = None  # sweeps.stopping.GracefulStop
    board: Any = None  # the stop board actor, once Ray is up
    board_name: str | None = None
    interactive: bool = False  # stderr is a terminal


def _run_stage(spec: SweepSpec, sweep: SweepDir, stage: Stage, genotypes: dict | None = None,
               run: Run | None = None, data: ImageData | None = None, part: str | None = None,
               points: list[dict[str, Any]] | None = None) -> Any:
    """Run (or restore) one Ray Tune experiment of a stage: the stage's own grid, or an extension's
    ``part`` (``eval-2``, ...) over exactly ``points``."""
    from ray import tune

    from sweeps.console import ProgressView
    from sweeps.loggers import CSVLogger, JsonLogger, TensorBoardLogger

    run = run or Run()
    verbose = run.verbose
    part = part or stage.kind
    stage_path = sweep.join(part)
    trainable = _trainable(stage, genotypes, data, run.board_name, spec.plugins)
    if tune.Tuner.can_restore(stage_path):
        _print(f"{part}: continuing the experiment in {stage_path}")
        tuner = tune.Tuner.restore(stage_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        _print(f"{part}: starting {stage_path}")
        run_config = tune.RunConfig(
            name=part, storage_path=sweep.location, verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[JsonLogger(), CSVLogger(), TensorBoardLogger(), *_trackers(spec, genotypes)],
        )
        tuner = tune.Tuner(trainable, param_space=_param_space(stage, genotypes, points),
                           tune_config=_tune_config(stage, spec, sweep), run_config=run_config)
    expected = len(points) if points is not None else expected_trials(stage, genotypes)
    view = ProgressView(Path(stage_path), stage.kind, expected, stage.epochs, stage.metric,
                        interactive=run.interactive, every=run.progress_every) \
        if verbose >= 1 and sweep.is_local else contextlib.nullcontext()
    with view, (run.stop.stage(run.board) if run.stop is not None else contextlib.nullcontext()):
        results = tuner.fit()
    statuses = [t.status for t in tune.ExperimentAnalysis(stage_path).trials]
    unfinished = max(expected, len(statuses)) - sum(s in ("TERMINATED", "ERROR") for s in statuses)
    signalled = run.stop is not None and run.stop.signum is not None
    if signalled and any(s != "TERMINATED" for s in statuses):
        # SLURM signals every process of a job at once (scontrol requeue, preemption): trials whose workers
        # died with it are errors of the signal's making, not of the trials. The stage is interrupted, the
        # CLI exits 128 + signal, and `sweep up` continues them from their checkpoints
        unfinished = max(unfinished, sum(s != "TERMINATED" for s in statuses))
    if unfinished > 0:  # Ctrl-C or a signal: Tune saved the experiment and returned; the stage is not done
        sweep.mark(part, "interrupted")
        raise SweepInterrupted(f"{part}: stopped with {unfinished} of {max(expected, len(statuses))} trial(s) "
                               f"unfinished or not started; `dartsweep sweep resume {sweep.location}` runs them")
    errors = len(results.errors)
    sweep.mark(part, "done" if errors == 0 else "done_with_errors")
    _print(f"{part}: {len(results)} trials, {errors} errored")
    return results


def _trackers(spec: SweepSpec, genotypes: dict[str, Any] | None) -> list[Any]:
    """Ray's JSON, CSV and TensorBoard loggers (each epoch once) come first; then MLflow where the sweep file
    asks for it (``tracking``)."""
    if not spec.tracking:
        return []
    try:
        from sweeps.tracking import MLflowTracker
    except ImportError:
        _print("warning: tracking.mlflow is set but MLflow is not installed (pip install 'dartsweep[mlflow]'); "
               "the sweep runs untracked there")
        return []
    return [MLflowTracker(spec.tracking["mlflow"], spec.tracking["experiment"], genotypes)]


def expected_trials(stage: Stage, genotypes: dict[str, Any] | None = None) -> int:
    """How many trials the stage has when complete: its grid's size, or a sampler's ``num_samples``."""
    if stage.search_alg.type != "grid":
        return stage.search_alg.num_samples
    if stage.kind == "search":
        return len(search_trials(stage))
    return len(eval_trials(stage, genotypes or {}))


def plugins_used(ops: set[str], plugins: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The plugins (source, content hash, ops) whose ops a genotype uses: what its JSON records."""
    return [{"source": p["source"], "sha256": p["sha256"], "ops": sorted(ops & set(p.get("ops", {})))}
            for p in plugins if ops & set(p.get("ops", {}))]


def collect_genotypes(sweep: SweepDir, spec: SweepSpec) -> dict[str, Any]:
    """Derived genotypes of the finished search trials, written to ``genotypes/`` (atomic) and returned,
    by table key (:func:`sweeps.spec.table_key`); each entry names the op set by its id."""
    from ray import tune

    from nas.opsets import OpSet

    first_release = spec.first_release
    op_set_ids = {key: OpSet.from_dict(m).id for key, m in spec.search.axes["op_sets"].items()} if spec.search else {}
    found: dict[str, Any] = {}
    trials = [t for part in stage_parts(sweep, "search") for t in tune.ExperimentAnalysis(sweep.join(part)).trials]
    for trial in trials:
        last = trial.last_result or {}
        if trial.status != "TERMINATED" or last.get("diverged") or "genotype" not in last:
            continue
        g = Genotype.from_dict(last["genotype"], first_release)  # the first release's reports lack form keys
        entry = {"genotype": g.to_dict(), "op_set": op_set_ids.get(last.get("op_set"), last.get("op_set")),
                 "F": last.get("F"), "seed": last.get("seed"), "valid_acc": last.get("valid_acc"),
                 "source_trial": trial.trial_id,
                 **({"cost_weight": last["cost_weight"]} if last.get("cost_weight") is not None else {})}
        used = plugins_used(g.primitives, spec.plugins)
        if used:
            entry["plugins"] = used
        key = table_key(g, first_release)
        if key not in found:
            found[key] = entry
            sweep.write_json(entry, GENOTYPE_DIR, f"{key}.json")
    sweep.write_json({k: {kk: v for kk, v in e.items() if kk != "genotype"} for k, e in found.items()},
                     GENOTYPE_DIR, "index.json")
    return found


def read_searched(sweep_folder: Path) -> dict[str, Any]:
    """The searched cells a sweep folder holds (``genotypes/<key>.json``), by table key."""
    return {p.stem: json.loads(p.read_text()) for p in (Path(sweep_folder) / GENOTYPE_DIR).glob("*.json")
            if p.name != "index.json"}


def eval_genotypes(spec: SweepSpec, searched: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in spec.eval.axes["genotypes"].items():  # type: ignore[union-attr]
        if value == SEARCHED:
            out.update(searched)
        else:
            out[key] = {"genotype": value}
    return out


def run_sweep(spec: SweepSpec, storage: str | None = None, address: str | None = None,
              verbose: int = 1, force: bool = False, stop: Any = None, progress_every: float | None = None,
              accept_plugin_change: bool = False) -> str:
    """Launch a new sweep; refuses to touch an existing sweep directory (use ``resume_sweep``). ``stop``:
    the caller's ``sweeps.stopping.GracefulStop`` (signals), ``progress_every``: seconds between progress
    lines (default 30 on a terminal, 60 otherwise)."""
    root, sweep = sweep_location(spec, storage)
    root.check_reachable()
    if not _fresh(sweep):
        raise ConfigError(f"{sweep.location} already exists; continue it with `dartsweep sweep resume "
                          f"{sweep.location}` (or `sweep up`) or change the sweep's name")
    check_resources(spec, address)
    data = load_sweep_data(spec)
    lock = acquire_lock(sweep, force)
    try:
        if sweep.is_sweep():  # another driver started it while this one loaded the data
            raise ConfigError(f"{sweep.location} was started by another driver meanwhile; continue it with "
                              f"`dartsweep sweep up` or `sweep resume {sweep.location}`")
        sweep.write_text(yaml.safe_dump({**spec.raw, "storage": root.location, "format": SWEEP_FORMAT},
                                        sort_keys=False), SWEEP_FILE)
        sweep.write_json({"stages": {}}, STATE_FILE)
        return _continue(spec, sweep, address, _run(verbose, stop, progress_every), data, lock)
    finally:
        with finishing(stop):
            lock.release()


def sweep_location(spec: SweepSpec, storage: str | None = None) -> tuple[SweepDir, SweepDir]:
    """(storage root, sweep folder) of a sweep: ``storage`` (the CLI's --storage), else the file's, else
    ./results."""
    root = SweepDir.at(storage or spec.storage or "./results")
    return root, SweepDir.at(root.join(spec.name))


# What a driver leaves in a sweep folder before it has written sweep.yaml (killed while loading the data)
_PRE_SWEEP_FILES = {"driver.lock", "driver.log"}


def _fresh(sweep: SweepDir) -> bool:
    """Whether ``sweep`` holds no sweep yet: missing, empty, or only what a driver killed before writing
    sweep.yaml left (its lock and log)."""
    if sweep.is_empty():
        return True
    if not sweep.is_local or sweep.is_sweep():
        return False
    return {p.name for p in sweep.path.iterdir()} <= _PRE_SWEEP_FILES


def resume_sweep(location: str | Path, address: str | None = None, verbose: int = 1, force: bool = False,
                 stop: Any = None, progress_every: float | None = None, accept_plugin_change: bool = False) -> str:
    """Continue a sweep: unfinished and errored trials from their last checkpoints; finished ones are kept.
    A plugin changed since the sweep was frozen is refused unless ``accept_plugin_change``."""
    sweep = SweepDir.at(location)
    spec = sweep.load_spec("accept" if accept_plugin_change else "import")
    check_resources(spec, address)
    lock = acquire_lock(sweep, force)  # before anything is read that a live driver may be writing
    try:
        record_plugin_change(sweep, spec)
        state = sweep.read_state().get("stages", {})
        pending = [s.kind for s in (spec.search, spec.eval) if s is not None and state.get(s.kind) != "done"]
        return _continue(spec, sweep, address, _run(verbose, stop, progress_every),
                         load_sweep_data(spec) if pending else None, lock)
    finally:
        with finishing(stop):
            lock.release()


def record_plugin_change(sweep: SweepDir, spec: SweepSpec) -> None:
    """Where ``spec`` took plugins whose content differs from the frozen records (--accept-plugin-change):
    freeze the new records and say so in the sweep's driver.log."""
    from sweeps.console import LOG_FILE

    raw = yaml.safe_load(sweep.read_text(SWEEP_FILE))
    was = {p["source"]: p["sha256"] for p in raw.get("plugins") or [] if isinstance(p, dict)}
    changed = [p for p in spec.plugins if was.get(p["source"], p["sha256"]) != p["sha256"]]
    if not changed:
        return
    sweep.write_text(yaml.safe_dump({**raw, "plugins": list(spec.plugins)}, sort_keys=False), SWEEP_FILE)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = "".join(f"[dartsweep] {stamp} plugin {p['source']} changed (sha256 {was[p['source']][:12]} -> "
                    f"{p['sha256'][:12]}); accepted with --accept-plugin-change\n" for p in changed)
    for line in lines.splitlines():
        _print(line.removeprefix("[dartsweep] "))
    old = sweep.read_text(LOG_FILE) if sweep.exists(LOG_FILE) else ""
    sweep.write_text(old + lines, LOG_FILE)


def up_sweep(file_or_name: str | Path, storage: str | None = None, address: str | None = None, verbose: int = 1,
             force: bool = False, stop: Any = None, progress_every: float | None = None,
             accept_plugin_change: bool = False) -> str:
    """The idempotent entry point job scripts and requeues call: run the sweep when its folder holds none,
    resume it when it does, as long as the file still describes the frozen sweep (a differing grid or
    training setting is refused naming the key; ``extend`` grows a sweep)."""
    from sweeps.extend import check_unchanged
    from sweeps.spec import load_sweep

    spec = load_sweep(file_or_name)
    root, sweep = sweep_location(spec, storage)
    root.check_reachable()
    if _fresh(sweep):
        _print(f"{sweep.location}: no sweep there yet; starting it")
        return run_sweep(spec, storage, address, verbose, force, stop, progress_every)
    check_unchanged(sweep, spec, str(file_or_name), accept_plugin_change)
    _print(f"{sweep.location}: continuing the sweep there")
    return resume_sweep(sweep.location, address, verbose, force, stop, progress_every, accept_plugin_change)


def _run(verbose: int, stop: Any, progress_every: float | None) -> Run:
    return Run(verbose=verbose, progress_every=progress_every, stop=stop, interactive=sys.stderr.isatty())


def check_resources(spec: SweepSpec, address: str | None) -> None:
    """On the embedded Ray (no ``address``) a trial asking for more CPUs or GPUs than this machine has would
    wait forever: refuse it. On a cluster, :func:`_warn_cluster_resources` compares once Ray is up. Ray's
    token authentication is checked here too (``sweeps.ray_auth``), before any cluster work."""
    ray_auth.check(address)
    if address:
        return
    import torch

    have = {"cpu": os.cpu_count() or 1, "gpu": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for stage in (spec.search, spec.eval):
        for kind in ("cpu", "gpu"):
            if stage is not None and stage.resources[kind] > have[kind]:
                raise ConfigError(f"{stage.kind}.resources.{kind}: a trial asks for {stage.resources[kind]:g} but this "
                                  f"machine has {have[kind]}; lower it, or run on a cluster with --address")


def _warn_cluster_resources(spec: SweepSpec) -> None:
    """Warn when no node of the cluster can give a stage's trial what it asks (it would pend until one joins)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for stage in (spec.search, spec.eval):
        if stage is None:
            continue
        need = {"CPU": stage.resources["cpu"], "GPU": stage.resources["gpu"]}
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
            best = ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes) or "none"
            _print(f"warning: no node of the cluster can run a {stage.kind} trial ({need['CPU']:g} CPU, "
                   f"{need['GPU']:g} GPU); its nodes have {best}; trials pend until such a node joins")


def extend_sweep(location: str | Path, file: str | Path, address: str | None = None, verbose: int = 1,
                 force: bool = False, stop: Any = None, progress_every: float | None = None,
                 accept_plugin_change: bool = False) -> str:
    """Add the grid points of ``file`` to a finished sweep and train only those (``sweeps.extend``)."""
    from sweeps.extend import apply_extension, prepare_extension

    sweep = SweepDir.at(location)
    old, union = prepare_extension(sweep, file, accept_plugin_change)
    check_resources(union, address)
    lock = acquire_lock(sweep, force)
    try:
        data = load_sweep_data(union)
        apply_extension(sweep, old, union)
        record_plugin_change(sweep, union)
        return _continue(sweep.load_spec("accept" if accept_plugin_change else "import"), sweep, address,
                         _run(verbose, stop, progress_every), data, lock)
    finally:
        with finishing(stop):
            lock.release()


def finishing(stop: Any) -> Any:
    """``stop.finishing()`` (``sweeps.stopping.GracefulStop``): cleanup that a signal cannot interrupt."""
    return stop.finishing() if stop is not None else contextlib.nullcontext()


def acquire_lock(sweep: SweepDir, force: bool = False):
    """The sweep's driver lock (``sweeps.lock``): refused (ConfigError) while another driver runs it."""
    from sweeps.lock import acquire

    return acquire(sweep, force, say=_print)


# Above this size a data set is better read by each trial from a shared folder (data_transfer: shared_path)
# than shipped: Ray's object store holds 30 % of a node's memory by default, and spills to disk past it.
SHIP_LIMIT_BYTES = 2 << 30


def _check_ship_size(spec: SweepSpec, size: int) -> None:
    if size > SHIP_LIMIT_BYTES:
        raise ConfigError(f"data: {spec.dataset} holds {size / 2**30:.1f} GiB, more than the "
                          f"{SHIP_LIMIT_BYTES / 2**30:g} GiB dartsweep ships through Ray's object store to every node; "
                          "set data_transfer: shared_path (every trial then reads it from a folder every node sees)")


def load_sweep_data(spec: SweepSpec) -> ImageData | None:
    """The data set the sweep's trials train on, loaded once by the driver (downloaded if it is missing and
    this machine is online), before any cluster work; None with ``data_transfer: shared_path``, after the
    same check, since then every trial reads ``data_dir`` itself."""
    from nas.image_folder import PREFIX, estimated_bytes, parse_name

    if spec.data_transfer == "object_store" and spec.dataset.startswith(PREFIX):  # refuse before decoding
        _check_ship_size(spec, estimated_bytes(parse_name(spec.dataset)))
    data = load_dataset(spec.dataset, spec.data_dir, download=True)
    if spec.data_transfer == "shared_path":
        _print(f"data: {spec.dataset} in {spec.data_dir}; every trial reads it there (data_transfer: "
               "shared_path), so that folder must exist on every node")
        return None
    size = nbytes(data)
    _check_ship_size(spec, size)
    where = DATASETS.get(spec.dataset).source if spec.dataset not in CIFAR_FOLDERS else spec.data_dir
    _print(f"data: {spec.dataset} from {where if spec.dataset != 'digits' else 'scikit-learn'} "
           f"({len(data.train_y)} training, {len(data.test_y)} test images, {size / 2**20:.0f} MiB), shipped to "
           "the trials through Ray's object store")
    return data


def _continue(spec: SweepSpec, sweep: SweepDir, address: str | None, run: Run,
              data: ImageData | None, lock: Any = None) -> str:
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state saved often: see README
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from sweeps.console import LOG_FILE, captured_console
    from sweeps.stopping import board_name, start_board

    log = Path(sweep.location, LOG_FILE) if sweep.is_local else None
    with captured_console(log, run.verbose):
        if log is not None and run.verbose < 2:
            _print(f"Ray's own output: {log}")
        started = _ray_init(address, run.verbose, spec.plugins)
        if run.stop is not None:
            run.stop.install()  # ray.init sets a SIGTERM handler of its own
            run.stop.lock = lock
        session = _ray_session_name() if started and not address and lock is not None else None
        if session:
            lock.record_ray_session(session)
        try:
            if address:
                _warn_cluster_resources(spec)
            run.board_name = board_name(sweep.location)
            run.board = start_board(run.board_name)
            _run_stages(spec, sweep, run, data)
        finally:
            with finishing(run.stop):  # a signal now must not cut the cleanup short
                if run.board is not None:
                    import ray

                    with contextlib.suppress(Exception):
                        ray.kill(run.board)
                    run.board = None
                if started:
                    _ray_stop()
                    if run.stop is not None:
                        run.stop.install()  # Ray's shutdown left SIGTERM at its default action (see finishing)
        loc = sweep.location
        _print(f"results in {loc}  (dartsweep sweep status {loc}; dartsweep analyze {loc})")
    return loc


def _run_stages(spec: SweepSpec, sweep: SweepDir, run: Run, data: ImageData | None) -> None:
    state = sweep.read_state()
    stages = state.get("stages", {})
    searched: dict[str, Any] = {}
    check = run.stop.check if run.stop is not None else (lambda: None)  # between stages: nothing new after a signal
    if spec.search is not None:
        if stages.get("search") != "done":
            _run_stage(spec, sweep, spec.search, run=run, data=data)
        for part, points in _extension_parts(sweep, spec.search, None):
            check()
            _run_stage(spec, sweep, spec.search, run=run, data=data, part=part, points=points)
        searched = collect_genotypes(sweep, spec)
        _print(f"search: {len(searched)} genotype(s) in {sweep.join(GENOTYPE_DIR)}")
    if spec.eval is not None:
        check()
        genotypes = eval_genotypes(spec, searched)
        if not genotypes:
            sweep.mark("eval", "skipped_no_genotypes")
            _print("eval: no genotypes to evaluate (every search trial failed); see `dartsweep sweep status`")
            return
        if stages.get("eval") != "done":
            _run_stage(spec, sweep, spec.eval, genotypes, run=run, data=data)
        for part, points in _extension_parts(sweep, spec.eval, genotypes):
            check()
            _run_stage(spec, sweep, spec.eval, genotypes, run=run, data=data, part=part, points=points)


def _extension_parts(sweep: SweepDir, stage: Stage, genotypes: dict[str, Any] | None):
    """(part, points) of an extended sweep's stage still to run: recorded parts not done, then the grid
    points no part holds yet (new values, and cells new search trials found) as a new part."""
    from sweeps.extend import missing_points, next_part, parts_of, record_points

    state = sweep.read_state()
    if "points" not in state:  # never extended: the stage's own experiment is the whole stage
        return
    for part, points in parts_of(state, stage.kind):
        if part != stage.kind and state.get("stages", {}).get(part) != "done":
            yield part, points
    missing = missing_points(sweep.read_state(), stage, genotypes)
    if missing:
        part = next_part(sweep.read_state(), stage.kind)
        record_points(sweep, part, missing)
        yield part, missing


def stage_parts(sweep: SweepDir, kind: str) -> list[str]:
    """The stage's Ray Tune experiments: its own, then an extended sweep's parts (``eval-2``, ...)."""
    from sweeps.extend import parts_of

    parts = [p for p, _ in parts_of(sweep.read_state(), kind)]
    return [p for p in ([kind] + [p for p in parts if p != kind]) if sweep.exists(p)]
