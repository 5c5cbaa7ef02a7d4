"""What a sweep will cost before it is launched, and what it has cost so far.

A sweep's trials share few networks: five seeds train the same network, a grid over layers trains a
handful of depths. Each *distinct* network (a search network: op set, F and the search settings; an
evaluation network: genotype, layers and the training settings) is timed once, by running the product's
own training loop (``nas.train.run_search`` / ``run_eval``) for a few steps on synthetic data of the data
set's shape, on the device the trials will use. A trial then costs

    epochs x (training steps per epoch x step time + evaluated images per epoch x time per image)

and its device-hours are that times its share of a device (``resources.gpu``: a quarter GPU is a quarter
GPU-hour per hour; CPU trials count core-hours, ``resources.cpu`` each). Packed trials slow one another
down somewhat (``dartsweep bench pack`` measures by how much), so a packed sweep's figure is a lower bound.

Where the trials' device is not on this machine (a login node without a GPU), the step times come from a
table (``dartsweep sweep steps SWEEP --device cuda --out TABLE`` on a cluster GPU); a network missing from
the table is scaled from the measured ones by its GMACs, and the report says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from nas.config import EvalConfig, SearchConfig
from nas.data import ImageData
from nas.errors import ConfigError
from nas.data import dataset_shape
from sweeps.spec import SEARCHED, SweepSpec, eval_table, eval_trials, search_trials

DATASET_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}  # (train, test) images
TIMED_STEPS = 2  # after one warm-up step
TABLE_FORMAT = 1
# fields that do not change what one step costs
_COST_FREE = {"seed", "epochs", "data_dir", "max_steps_per_epoch", "lr", "lr_min", "arch_lr", "latency"}


@dataclass
class Network:
    """One distinct network of a sweep and the trials that train it."""

    kind: str  # search | eval
    config: SearchConfig | EvalConfig  # the first trial's
    label: str  # op set / genotype id and depth, for the report
    trials: int = 0
    epochs: int = 0
    device: str = "cpu"
    share: float = 1.0  # GPUs (cuda) or cores (cpu) per trial
    stand_in: bool = False  # a searched cell's cost, estimated with a preset cell of the same op set
    gmac: float = math.nan
    timing: dict[str, float] = field(default_factory=dict)  # step_s, image_s, source

    @property
    def key(self) -> str:
        return network_key(self.kind, self.config)


def network_key(kind: str, config: SearchConfig | EvalConfig) -> str:
    """What identifies a network's step cost: the config without seed, epochs and other cost-free fields."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _COST_FREE}
    return kind + ":" + json.dumps(fields, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------- the networks

def sweep_networks(spec: SweepSpec) -> list[Network]:
    """Every distinct network of the sweep with its trial count (searched cells: one stand-in per op set)."""
    from sweeps.trainables import eval_trial_config

    found: dict[str, Network] = {}

    def add(kind: str, cfg: Any, label: str, resources: dict[str, float], epochs: int, count: int = 1,
            stand_in: bool = False) -> None:
        key = network_key(kind, cfg)
        if key not in found:
            gpu = resources.get("gpu", 0)
            found[key] = Network(kind, cfg, label, epochs=epochs, device="cuda" if gpu > 0 else "cpu",
                                 share=gpu if gpu > 0 else resources.get("cpu", 1), stand_in=stand_in)
        found[key].trials += count

    search_op_sets: list[dict] = []
    if spec.search is not None:
        stage = spec.search
        for t in search_trials(stage):
            op_set = dict(stage.axes["op_sets"][t["op_set"]])
            search_op_sets.append(op_set)
            lam = {"cost_weight": float(t["cost_weight"])} if t.get("cost_weight") is not None else {}
            cfg = SearchConfig(**{**stage.base, "op_set": op_set, "seed": int(t["seed"]), **lam})
            add("search", cfg, f"{t['op_set']}", stage.resources, stage.epochs)
    if spec.eval is not None:
        stage = spec.eval
        known = {k: {"genotype": v} for k, v in stage.axes["genotypes"].items() if v != SEARCHED}
        _add_eval(add, stage, eval_table(stage, known), eval_trials(stage, known), 1, False, eval_trial_config)
        if SEARCHED in stage.axes["genotypes"] and spec.search is not None:
            for op_set_id, (stand_in, cells) in _stand_ins(spec).items():
                table = eval_table(stage, stand_in)
                _add_eval(add, stage, table, eval_trials(stage, stand_in), cells, True, eval_trial_config)
    return list(found.values())


def _add_eval(add: Callable, stage: Any, table: dict, trials: Iterable[dict], count: int, stand_in: bool,
              eval_trial_config: Callable) -> None:
    if stage.search_alg.type != "grid":
        return
    seeds: dict[tuple, list[dict]] = {}  # the seeds of a grid point train one network: build its config once
    for t in trials:
        seeds.setdefault((t["genotype"], t["layers"], t.get("F")), []).append(t)
    for group in seeds.values():
        cfg, fixed = eval_trial_config({**group[0], "base": stage.base}, table)
        label = f"{fixed['genotype_id']} L{fixed['layers']}" + (" (stand-in)" if stand_in else "")
        add("eval", cfg, label, stage.resources, stage.epochs, count * len(group), stand_in)


def _stand_ins(spec: SweepSpec) -> dict[str, tuple[dict[str, Any], int]]:
    """Per searched op set: a preset genotype of the same kind of ops (PIBCONV for PIB op sets, the DARTS
    cell otherwise) standing in for the cells the search will find, and how many cells it stands for."""
    from nas.genotypes import DARTS_V2, PIBCONV

    out: dict[str, tuple[dict[str, Any], int]] = {}
    seeds = len(spec.search.axes["seeds"])
    weights = spec.search.axes.get("cost_weight")
    per_op_set = seeds * (len(weights) if isinstance(weights, list) else 1)
    for op_id, mapping in spec.search.axes["op_sets"].items():
        pib = any("pib" in str(p) for p in mapping.get("primitives", []))
        g = PIBCONV if pib else DARTS_V2
        out[op_id] = ({g.id: {"genotype": g.to_dict()}}, per_op_set)
    return out


# -------------------------------------------------------------------------------------------- measuring

def synthetic_data(dataset: str, train: int, test: int) -> ImageData:
    """Random images of ``dataset``'s shape and normalisation (the cost of a step does not depend on them)."""
    from nas.data import load_dataset

    in_ch, size, classes = dataset_shape(dataset)
    if dataset == "digits":
        real = load_dataset("digits")
        mean, std, pad, cutout = real.mean, real.std, real.crop_padding, real.cutout_length
    elif dataset in DATASET_SIZES:
        from nas.reference import CIFAR_MEAN, CIFAR_STD

        mean, std, pad, cutout = CIFAR_MEAN, CIFAR_STD, 4, 16
    else:  # a plugin's dataset: the cost of a step depends on its shape only
        mean, std, pad, cutout = (0.5,) * in_ch, (0.25,) * in_ch, max(1, size // 8), max(1, size // 2)
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, in_ch, size, size), dtype=torch.uint8, generator=gen)

    return ImageData(dataset, images(train), torch.randint(0, classes, (train,), generator=gen), images(test),
                     torch.randint(0, classes, (test,), generator=gen), mean, std, classes, pad, cutout)


def dataset_sizes(dataset: str, data_dir: str = "./data") -> tuple[int, int]:
    """(training, test) images of ``dataset`` (CIFAR's known sizes; any other is loaded and counted)."""
    if dataset in DATASET_SIZES:
        return DATASET_SIZES[dataset]
    from nas.data import load_dataset

    real = load_dataset(dataset, data_dir, download=False)
    return len(real.train_y), len(real.test_y)


def measure(kind: str, config: SearchConfig | EvalConfig, device: str, threads: int | None = None) -> dict[str, float]:
    """Seconds per training step and per evaluated image of one network, from the product's own loop: one
    epoch of 1 + TIMED_STEPS steps on synthetic data, then its evaluation."""
    from nas.train import run_eval, run_search

    batch = config.batch_size
    eval_batch = max(batch, 256)
    steps = 1 + TIMED_STEPS
    if kind == "search":  # the loop splits the training set: weights on train_portion, alpha on the rest
        train = math.ceil(steps * batch / min(config.train_portion, 1 - config.train_portion)) + 2 * batch
        evaluated = train - round(train * config.train_portion)
    else:
        train, evaluated = steps * batch, eval_batch
    data = synthetic_data(config.dataset, train, eval_batch if kind == "eval" else 1)
    cfg = replace(config, epochs=1, max_steps_per_epoch=steps)
    stamps: list[float] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def on_step(step: int, total: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    ended: list[float] = []
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        run = run_search if kind == "search" else run_eval
        run(cfg, data=data, device=device, on_step=on_step, on_epoch=lambda m, c: ended.append(time.perf_counter()))
    finally:
        torch.set_num_threads(saved)
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"step_s": step_s, "image_s": max(ended[0] - stamps[-1], 0.0) / evaluated, "source": "measured"}


def epoch_seconds(network: Network, sizes: tuple[int, int]) -> float:
    """One epoch of ``network``'s trials: its training steps and its evaluation."""
    cfg = network.config
    train, test = sizes
    if network.kind == "search":
        weights = round(train * cfg.train_portion)
        steps, evaluated = weights // cfg.batch_size, train - weights
    else:
        steps, evaluated = train // cfg.batch_size, test
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    return steps * network.timing["step_s"] + evaluated * network.timing["image_s"]


def _gmac(network: Network) -> float:
    from nas.complexity import complexity, search_complexity

    cfg = network.config
    in_ch, size, classes = dataset_shape(cfg.dataset)
    if network.kind == "search":
        return search_complexity(cfg.resolved_op_set(), cfg.layers, cfg.channels, cfg.nodes, classes, in_ch,
                                 size).gmac
    return complexity(cfg.resolved_genotype(), cfg.layers, cfg.channels, classes, in_ch, size).gmac


# ---------------------------------------------------------------------------------------------- tables

def read_table(path: str | Path) -> dict[str, Any]:
    """A step-time table written by :func:`write_table` (``dartsweep sweep steps``)."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--step-times: {path} does not exist; make one with `dartsweep sweep steps SWEEP "
                          f"--device cuda --out {path}` on a cluster GPU") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--step-times: {path} is not a step-time table ({exc})") from None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not isinstance(table.get("networks"), dict):
        raise ConfigError(f"--step-times: {path} is not a step-time table (format {TABLE_FORMAT}) from "
                          f"`dartsweep sweep steps`")
    return table


def write_table(path: str | Path, networks: list[Network], device: str) -> None:
    """Save measured step times (atomically) for ``--step-times`` on another machine."""
    from nas.io import write_text_atomic

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    entries = {n.key: {"label": n.label, "gmac": n.gmac, "batch_size": n.config.batch_size,
                       "step_s": n.timing["step_s"], "image_s": n.timing["image_s"]} for n in networks}
    write_text_atomic(Path(path), json.dumps({"format": TABLE_FORMAT, "device": device, "device_name": name,
                                              "networks": entries}, indent=1))


def _from_table(network: Network, table: dict[str, Any]) -> dict[str, float] | None:
    """The network's times from the table, else scaled by GMAC x batch from the table's networks of its
    kind (mean seconds per GMAC-image), else None."""
    entries = table["networks"]
    if network.key in entries:
        e = entries[network.key]
        return {"step_s": e["step_s"], "image_s": e["image_s"], "source": "table"}
    same = [e for k, e in entries.items() if k.startswith(network.kind + ":") and e.get("gmac", 0) > 0]
    if not same or not network.gmac > 0:
        return None
    per_gmac_image = sum(e["step_s"] / (e["gmac"] * e["batch_size"]) for e in same) / len(same)
    per_gmac = sum(e["image_s"] / e["gmac"] for e in same) / len(same)
    return {"step_s": per_gmac_image * network.gmac * network.config.batch_size, "image_s": per_gmac * network.gmac,
            "source": "scaled"}


# ---------------------------------------------------------------------------------------------- report

def time_networks(spec: SweepSpec, device: str | None = None, table: str | Path | None = None,
                  progress: Callable[[str], None] = lambda msg: None) -> list[Network]:
    """The sweep's distinct networks with step times: from ``table`` where given, else measured here on
    ``device`` (default: the trials' own device; a trial device this machine lacks is left untimed)."""
    networks = sweep_networks(spec)
    loaded = read_table(table) if table is not None else None
    for i, n in enumerate(networks, 1):
        if loaded is not None:
            n.gmac = _gmac(n)
            n.timing = _from_table(n, loaded) or {}
            continue
        run_on = device or n.device
        if run_on == "cuda" and not torch.cuda.is_available():
            continue
        progress(f"timing network {i}/{len(networks)} ({n.kind} {n.label}, {run_on})")
        threads = int(n.share) if run_on == "cpu" and n.device == "cpu" else None
        n.timing = {**measure(n.kind, n.config, run_on, threads), "device": run_on}
    return networks


def estimate(spec: SweepSpec, networks: list[Network]) -> dict[str, Any]:
    """Per stage and in total: trials, device-hours (GPU-hours for GPU trials, core-hours for CPU ones)
    and the longest epoch (what a job script's warning signal must leave time for)."""
    sizes = dataset_sizes(spec.dataset, spec.data_dir)
    stages: dict[str, dict[str, Any]] = {}
    for n in networks:
        s = stages.setdefault(n.kind, {"trials": 0, "timed_trials": 0, "device_hours": 0.0, "unit": "",
                                       "longest_epoch_s": 0.0, "sources": set(), "stand_in": False})
        s["trials"] += n.trials
        s["unit"] = "GPU-hours" if n.device == "cuda" else "core-hours"
        s["stand_in"] |= n.stand_in
        if not n.timing:
            continue
        epoch_s = epoch_seconds(n, sizes)
        s["timed_trials"] += n.trials
        s["device_hours"] += n.trials * n.epochs * epoch_s / 3600 * n.share
        s["longest_epoch_s"] = max(s["longest_epoch_s"], epoch_s)
        s["sources"].add(n.timing["source"])
    for s in stages.values():
        s["sources"] = sorted(s["sources"])
    return stages


def estimate_report(spec: SweepSpec, rows: list[dict[str, Any]] | None = None, device: str | None = None,
                    table: str | Path | None = None, progress: Callable[[str], None] = lambda msg: None) -> list[str]:
    """The ``--dry-run`` lines on cost: per stage, then in total."""
    networks = time_networks(spec, device, table, progress)
    stages = estimate(spec, networks)
    lines = []
    for kind, s in stages.items():
        nets = sum(n.kind == kind for n in networks)
        if not s["timed_trials"]:
            lines.append(f"{kind}: {s['trials']} trial(s) on {nets} distinct network(s); {s['unit']} unknown: this "
                         "machine has no GPU. Pass --step-times TABLE from `dartsweep sweep steps SWEEP --device "
                         "cuda --out TABLE` run on a cluster GPU")
            continue
        text = (f"{kind}: {s['trials']} trial(s) on {nets} distinct network(s), ~{s['device_hours']:.3g} "
                f"{s['unit']}")
        if s["timed_trials"] < s["trials"]:
            text += f" for the {s['timed_trials']} timed trial(s)"
        text += f"; longest epoch ~{_duration(s['longest_epoch_s'])}"
        notes = []
        if "scaled" in s["sources"]:
            notes.append("some networks scaled by GMACs from the table")
        if s["stand_in"]:
            notes.append("searched cells costed as a preset cell of their op set")
        lines.append(text + (f" ({'; '.join(notes)})" if notes else ""))
    units = {s["unit"] for s in stages.values() if s["timed_trials"]}
    for unit in sorted(units):
        total = sum(s["device_hours"] for s in stages.values() if s["unit"] == unit)
        lines.append(f"total: ~{total:.3g} {unit} (step times from "
                     + ", ".join(sorted({src for s in stages.values() for src in s["sources"]})) + ")")
    longest = max((s["longest_epoch_s"] for s in stages.values()), default=0.0)
    if longest > 0:
        lines.append(f"a job script's warning signal (SLURM --signal=B:USR1@SECONDS) needs at least "
                     f"~{math.ceil(longest * 1.5 + 60)} s: a trial checkpoints at the end of its epoch")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def cost_so_far(spec: SweepSpec, trials: Any, expected: dict[str, int]) -> list[str]:
    """``sweep status``'s cost lines: per stage, device-hours spent in the epochs its trials have kept
    (``epoch_time_s`` times the trial's device share) and an estimate of what is left (epochs still to
    train, and trials not started yet, at the stage's mean epoch time so far)."""
    lines = []
    for stage in (spec.search, spec.eval):
        if stage is None:
            continue
        rows = trials[trials.stage == stage.kind]
        gpu = stage.resources.get("gpu", 0)
        share, unit = (gpu, "GPU-hours") if gpu > 0 else (stage.resources.get("cpu", 1), "core-hours")
        seconds, epochs = float(rows.wall_time_s.sum()), int(rows.epochs_done.sum())
        if not epochs:
            continue
        per_epoch = seconds / epochs
        open_rows = rows[rows.status == "unfinished"]
        left_epochs = int((open_rows.epochs_total - open_rows.epochs_done).clip(lower=0).sum())
        left_epochs += max(expected.get(stage.kind, 0) - len(rows), 0) * stage.epochs
        lines.append(f"{stage.kind}: ~{seconds * share / 3600:.3g} {unit} spent, ~{left_epochs * per_epoch * share / 3600:.3g}"
                     f" left ({left_epochs} epoch(s) to train at {per_epoch:.3g} s each so far)")
    return lines
