"""Ray Tune trainables for the search and eval phases, and a layer-grouped ASHA scheduler.

Where they sit in a sweep (``sweeps.driver``): the driver runs one Ray Tune experiment per stage; each
trial calls one of these functions with its config (an op-set or genotype id, F, layers, seed and the
stage's fixed settings) plus the stage's tables and the data set from Ray's object store; the function
builds a ``SearchConfig``/``EvalConfig`` and runs ``nas.train.run_search``/``run_eval``, reporting every
epoch into the trial's folder.

Each trainable is a plain function: it reads its config, restores from the newest complete checkpoint
in its own folder on the sweep's storage (``sweeps.checkpoints``: dartsweep owns trial checkpoints, so
no kill loses one; ``tune.get_checkpoint()`` for sweeps written before), continues from the epoch after
it, runs the ``nas`` loop and calls ``tune.report(metrics)`` every epoch. Tune's TensorBoard logger
writes every reported number (losses, accuracies, lr, alpha entropy) into the trial folder.

Every checkpoint also holds ``history.json``: every epoch reported so far on the line that led to it.
Ray's ``result.json`` is not a reliable record after a restore (the driver can copy a lagging stored
copy over its own, and a driver killed mid-sync leaves a truncated one), so ``analysis`` fills the
epochs result.json lost from the newest checkpoint's history.

Ray runs a function trainable in a thread of its own, not the worker's main thread. Nothing here may
run a parallel torch op in the worker's main thread (module-level code included): libgomp would then
keep two thread teams on the trial's cores, stop spinning between parallel regions, and every small op
of the trial would wait for a wake-up (measured: small CPU ops 5x slower, the digits eval step 2x).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from nas.complexity import complexity
from nas.config import EvalConfig, SearchConfig
from nas.data import ImageData, from_arrays, load_dataset
from nas.errors import DivergenceError
from nas.io import load_checkpoint
from nas.plugins import import_shipped
from nas.train import run_eval, run_search
from sweeps.checkpoints import TrialStore
from sweeps.loggers import REPLAYED
from sweeps.stopping import TrialControl

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


def _device() -> str:
    """CUDA only when this trial was given a GPU share (0-GPU trials must not grab a GPU)."""
    try:
        gpus = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    except Exception:  # noqa: BLE001 - outside Tune
        gpus = 0
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _set_threads() -> None:
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def _trial_store() -> TrialStore | None:
    """This trial's folder on the sweep's storage (where it keeps its own checkpoints); None outside Tune,
    which is what Ray's context answers there. Inside a trial any failure is an error: a trial that could
    not checkpoint would restart from scratch after every kill."""
    import warnings

    with warnings.catch_warnings():  # outside Tune, Ray warns "meant to only be called inside..." and says None
        warnings.simplefilter("ignore")
        storage = tune.get_context().get_storage()
    if storage is None:
        return None
    return TrialStore.at(storage.trial_fs_path, storage.storage_filesystem)


def _trial_id() -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tune.get_context().get_trial_id() or ""


def _restore(store: TrialStore | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(training state, epochs reported up to it) of the trial's newest complete checkpoint on storage
    (``sweeps.checkpoints``), or of the Ray Tune checkpoint a sweep written before this release restores
    it from, whichever is newer; (None, []) on a fresh start."""
    found: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    newest = store.read_newest((STATE_FILE, HISTORY_FILE)) if store is not None else None
    if newest is not None:
        _, files = newest
        found.append((load_checkpoint(io.BytesIO(files[STATE_FILE])), json.loads(files[HISTORY_FILE])))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            history_file = Path(folder) / HISTORY_FILE
            found.append((load_checkpoint(Path(folder) / STATE_FILE),
                          json.loads(history_file.read_text()) if history_file.exists() else []))
    if not found:
        return None, []
    state, history = max(found, key=lambda item: item[0]["epoch"])
    return state, [h for h in history if h.get("epoch", 0) <= state["epoch"]]


def _reporter(every: int, total_epochs: int, fixed: dict[str, Any], history: list[dict[str, Any]],
              store: TrialStore | None, control: TrialControl):
    """on_epoch hook: report metrics every epoch; write a checkpoint (``sweeps.checkpoints``, before the
    report) every ``every`` epochs, at the end, and when the driver asks for one (it is being stopped).

    ``history`` (the reported epochs restored with the checkpoint) is extended in place and saved in
    every checkpoint.
    """

    def on_epoch(metrics: dict[str, Any], make_checkpoint) -> None:
        metrics = {**metrics, **fixed, "diverged": False, "node_id": _node_id()}
        history.append(metrics)
        epoch = metrics["epoch"]
        wanted = control.checkpoint_wanted()
        last = epoch == total_epochs or "stop_reason" in metrics  # the end, or the search stopped early
        if store is not None and (wanted or epoch % every == 0 or last):
            buffer = io.BytesIO()
            torch.save(make_checkpoint(), buffer)
            files = {STATE_FILE: buffer.getvalue(), HISTORY_FILE: json.dumps(history, default=str).encode()}
            if "genotype" in metrics:
                files["genotype.json"] = json.dumps(metrics["genotype"]).encode()
            store.save(epoch, files)
            if wanted:
                control.checkpointed(epoch)
        tune.report(metrics)

    return on_epoch


def _run_trial(run, cfg: Any, images: ImageData, fixed: dict[str, Any], config: Mapping[str, Any],
               stop_board: str | None) -> None:
    """Restore, train and report one trial (``run`` is ``run_search`` or ``run_eval``)."""
    store = _trial_store()
    control = TrialControl(stop_board, _trial_id())
    try:
        state, history = _restore(store)
        if state is not None and history and (state["epoch"] >= cfg.epochs or "stop_reason" in history[-1]):
            # finished before its driver saw it: report the end again for Tune, marked so that the loggers
            # (sweeps.loggers) write the epochs their files lack from the checkpoint's history
            tune.report({**history[-1], REPLAYED: True})
            return
        if state is not None and history:
            # the checkpoint's last epoch again, marked: the driver's loggers write every epoch up to it
            # that their files lack (a driver stopped with the whole job never logged the last one)
            tune.report({**history[-1], REPLAYED: True})
        # every report says which checkpoint this attempt started from (0: from scratch)
        fixed = {**fixed, "resumed_from": int(state["epoch"]) if state is not None else 0}
        try:
            run(cfg, data=images, device=_device(), resume=state,
                on_epoch=_reporter(config.get("checkpoint_every", 1), cfg.epochs, fixed, history, store, control))
        except DivergenceError as exc:
            _report_divergence(exc, state, history, fixed)
    finally:
        control.ended()


def _report_divergence(exc: DivergenceError, state: dict[str, Any] | None, history: list[dict[str, Any]],
                       fixed: dict[str, Any]) -> None:
    """A diverged trial ends (no retry would help) with the error in its last result, for ``status``.

    The result's epoch is the one that diverged (one past the last reported), so it reads as the latest.
    """
    epoch = (history[-1]["epoch"] if history else state["epoch"] if state else 0) + 1
    tune.report({**fixed, "epoch": epoch, "diverged": True, "error": f"DivergenceError: {exc}"})


def _data(shipped: Mapping[str, Any] | None, dataset: str, data_dir: str) -> ImageData:
    """The data set the driver shipped (numpy arrays in Ray's object store, read once per node), else the
    one in ``data_dir`` (``data_transfer: shared_path``: a folder every node sees; never downloaded here)."""
    return from_arrays(shipped) if shipped is not None else load_dataset(dataset, data_dir, download=False)


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config with an extension part's grid point (``point``: op set / genotype, layers, F, seed)
    lifted to the top, where a stage's own trials have them."""
    return {**config, **config.get("point", {})}


def search_trainable(config: dict[str, Any], op_sets: Mapping[str, Any],
                     data: Mapping[str, Any] | None = None, stop_board: str | None = None,
                     plugins: list[Mapping[str, Any]] | None = None) -> None:
    """One DARTS search. config: op_set (id), F, seed, base (SearchConfig fields); op_sets: id -> mapping,
    data (see ``_data``), the driver's stop board (``sweeps.stopping``) and the sweep's plugin records
    (``nas.plugins``), shared by the stage's trials."""
    _set_threads()
    import_shipped(plugins or [])
    config = flat_config(config)
    op_set = dict(op_sets[config["op_set"]])
    if config.get("F") is not None:
        op_set["bottleneck_ratio"] = float(config["F"])
    lam = {"cost_weight": float(config["cost_weight"])} if config.get("cost_weight") is not None else {}
    cfg = SearchConfig(**{**config["base"], "op_set": op_set, "seed": int(config["seed"]), **lam})
    resolved = cfg.resolved_op_set()
    images = _data(data, cfg.dataset, cfg.data_dir)
    fixed = {"stage": "search", "op_set": resolved.id, "seed": cfg.seed,
             "F": resolved.used_bottleneck_ratio, "train_images": len(images.train_y), **lam}
    _run_trial(run_search, cfg, images, fixed, config, stop_board)


def eval_trial_config(config: dict[str, Any], genotypes: Mapping[str, Any]) -> tuple[EvalConfig, dict[str, Any]]:
    """The EvalConfig of an eval trial and its fixed report fields (genotype id, op set id, F, params, GMAC)."""
    from nas.data import dataset_shape
    from sweeps.spec import genotype_for_trial, op_set_id_for

    entry = genotypes[config["genotype"]]
    genotype = genotype_for_trial(entry["genotype"], config.get("F"))
    cfg = EvalConfig(**{**config["base"], "genotype": genotype.to_dict(), "layers": int(config["layers"]),
                        "seed": int(config["seed"])})
    in_ch, size, classes = dataset_shape(cfg.dataset)
    cost = complexity(genotype, cfg.layers, cfg.channels, classes, in_ch, size)
    fixed = {"stage": "eval", "genotype_id": genotype.id, "op_set": entry.get("op_set") or op_set_id_for(genotype),
             **({"cost_weight": entry["cost_weight"]} if entry.get("cost_weight") is not None else {}),
             "F": genotype.used_bottleneck_ratio, "layers": cfg.layers, "seed": cfg.seed,
             "params_m": cost.params_m, "gmac": cost.gmac, "source_trial": entry.get("source_trial")}
    return cfg, fixed


def eval_trainable(config: dict[str, Any], genotypes: Mapping[str, Any],
                   data: Mapping[str, Any] | None = None, stop_board: str | None = None,
                   plugins: list[Mapping[str, Any]] | None = None) -> None:
    """One evaluation training. config: genotype (id), layers, seed, F, base; genotypes: id -> entry
    (``{"genotype": ..., "op_set": ..., "source_trial": ...}``), data (see ``_data``) and the driver's stop
    board and the sweep's plugin records, shared by the stage's trials."""
    _set_threads()
    import_shipped(plugins or [])
    config = flat_config(config)
    cfg, fixed = eval_trial_config(config, genotypes)
    images = _data(data, cfg.dataset, cfg.data_dir)
    fixed["train_images"] = len(images.train_y)
    if cfg.latency:
        fixed.update(_latency(cfg, images))
    _run_trial(run_eval, cfg, images, fixed, config, stop_board)


def _latency(cfg: EvalConfig, data: ImageData) -> dict[str, Any]:
    """The trained network's forward latency (batch 1) and throughput (the training batch size), measured
    on the trial's device before training, in the precision and layout it trains in. It shares the device
    with whatever else runs there (other trials of a packed GPU): a sweep's figures compare like with like
    only under the same packing."""
    from nas.eval_network import EvalNetwork
    from nas.latency import measure_latency

    device = torch.device(_device())
    model = EvalNetwork(cfg.resolved_genotype(), cfg.channels, cfg.layers, data.num_classes, data.in_channels,
                        auxiliary=False)
    result = measure_latency(model, (data.in_channels, data.image_size, data.image_size), device,
                             (1, cfg.batch_size), amp=cfg.amp, channels_last=cfg.channels_last)
    return {"latency_ms": result["latency_ms"], "throughput_img_s": result["throughput_img_s"],
            "device": result["device"]}


def trial_dirname(trial: Any) -> str:
    """Short, readable trial folder names: stage, what varies, and the trial id."""
    c = flat_config(trial.config)
    if "op_set" in c:
        f = f"_F{c['F']:g}" if c.get("F") is not None else ""
        lam = f"_lam{c['cost_weight']:g}" if c.get("cost_weight") is not None else ""
        return f"search_{c['op_set']}{f}{lam}_s{c['seed']}_{trial.trial_id}"
    f = f"_F{float(c['F']):.3g}" if c.get("F") is not None else ""  # a folded grid's genotype id says its F
    return f"eval_{c['genotype']}_L{c['layers']}{f}_s{c['seed']}_{trial.trial_id}"


class GroupedASHA(FIFOScheduler):
    """ASHA run separately per layer count: a trial is only ever compared with trials of the same depth.

    Shallow and deep networks learn at different speeds, so a shared ASHA rung would stop deep networks
    early for being slow starters; one bracket per ``layers`` value keeps each comparison fair.
    """

    def __init__(self, group_key: str = "layers", **asha_kwargs: Any) -> None:
        super().__init__()
        self._group_key = group_key
        self._asha_kwargs = asha_kwargs
        self._groups: dict[Any, AsyncHyperBandScheduler] = {}

    def _group(self, trial: Any) -> AsyncHyperBandScheduler:
        key = trial.config.get(self._group_key)
        if key not in self._groups:
            self._groups[key] = AsyncHyperBandScheduler(**self._asha_kwargs)
        return self._groups[key]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._group(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("diverged"):
            return TrialScheduler.STOP
        return self._group(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._group(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._group(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "GroupedASHA: " + ", ".join(f"layers={k}" for k in sorted(self._groups, key=str))
