"""How much wall time Ray Tune adds: the same eval trials in-process one after another vs as a sweep.

The sweep runs one trial at a time with every CPU (``resources: {cpu: N}``), so both sides do the same
work with the same threads; the difference is Ray's start-up, scheduling, reporting and checkpointing.
In-process runs come before and after every sweep and each sweep is compared with the mean of its two
neighbours, so a machine whose speed drifts (shared VMs drift 10-30 % within minutes) does not bias the
figure; the drift itself is reported. With ``repeats`` > 1 the sweeps and in-process runs alternate
(in-process, sweep, in-process, sweep, ..., in-process) and the round with the median overhead is the
headline, every round listed beside it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from nas.config import EvalConfig
from nas.data import load_dataset
from nas.errors import ConfigError
from nas.train import run_eval


def _in_process(trials: int, base: dict[str, Any], data: Any) -> tuple[float, float]:
    """(wall seconds, seconds inside epochs) of the trials run in this process one after another."""
    wall = in_epochs = 0.0
    for seed in range(trials):
        t = time.perf_counter()
        result = run_eval(EvalConfig(genotype="DARTS_V2", layers=2, seed=seed, **base), data=data, device="cpu")
        wall += time.perf_counter() - t
        in_epochs += sum(h["epoch_time_s"] for h in result.history)
    return wall, in_epochs


def _as_sweep(trials: int, base: dict[str, Any], cpus: int, checkpoint_every: int) -> tuple[float, pd.DataFrame]:
    """(wall seconds, per-epoch history) of the same trials as a Ray Tune sweep, Ray's start and stop included."""
    from analysis.frames import history_frame
    from sweeps.driver import run_sweep
    from sweeps.spec import parse_sweep

    raw = {"name": "overhead", "dataset": "digits",
           "eval": {**{k: v for k, v in base.items() if k != "dataset"}, "genotypes": ["DARTS_V2"], "layers": [2],
                    "seeds": list(range(trials)), "resources": {"cpu": cpus}, "checkpoint_every": checkpoint_every},
           "failure": {"max_failures": 0}}
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        run_sweep(parse_sweep(raw), storage=storage, verbose=0)  # starts and stops its own Ray
        swept = time.perf_counter() - start
        history = history_frame(Path(storage, "overhead")).sort_values(["trial_id", "epoch"])
    return swept, history


def _round(before: tuple[float, float], swept: float, history: pd.DataFrame,
           after: tuple[float, float]) -> dict[str, Any]:
    """One sweep against the mean of the in-process runs either side of it, split by where the time went."""
    sequential = (before[0] + after[0]) / 2
    # Tune's time_this_iter_s runs from one report to the next; epoch_time_s is the training loop's own
    first = history.groupby("trial_id").head(1)
    rest = history.drop(first.index)
    in_trials = float(history.time_this_iter_s.sum())  # each trial's wall time as Tune measured it
    return {"sequential_s": sequential, "sweep_s": swept,
            "sequential_before_s": before[0], "sequential_after_s": after[0],
            "drift": after[0] / before[0] - 1,  # the machine's own speed change (and warm-up) over the round
            "overhead": swept / sequential - 1,
            # where it goes: once per sweep (Ray and Tune start-up, scheduling, shutdown) vs inside the trials
            "fixed_s": swept - in_trials, "in_trial_overhead": in_trials / sequential - 1,
            # inside the trials: starting (worker imports, trial setup: the first report's extra time),
            # reporting and checkpointing between epochs, and the epochs themselves against in-process
            "trial_start_s": float((first.time_this_iter_s - first.epoch_time_s).sum()),
            "reporting_s": float((rest.time_this_iter_s - rest.epoch_time_s).sum()),
            "epochs_slowdown": float(history.epoch_time_s.sum()) / ((before[1] + after[1]) / 2) - 1}


def measure_overhead(trials: int = 8, epochs: int = 90, cpus: int | None = None, checkpoint_every: int = 10,
                     repeats: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ray Tune's wall-time overhead on ``trials`` tiny eval trials (digits, DARTS_V2, 2 layers, C 8).

    Returns the median round's figures at the top level (for one round, that round's), with every round
    under ``rounds`` and their overheads under ``overhead_rounds``.
    """
    if trials < 1 or epochs < 1 or repeats < 1 or checkpoint_every < 1:
        raise ConfigError(f"--trials, --epochs, --repeats and --checkpoint-every must be >= 1, got {trials}, "
                          f"{epochs}, {repeats} and {checkpoint_every}")
    cpus = cpus or os.cpu_count() or 1
    base = {"dataset": "digits", "channels": 8, "batch_size": 64, "lr": 0.05, "epochs": epochs}
    data = load_dataset("digits")
    torch.set_num_threads(cpus)
    say = progress or (lambda _: None)

    say(f"in-process 1/{repeats + 1}")
    rounds: list[dict[str, Any]] = []
    before = _in_process(trials, base, data)
    for r in range(repeats):
        say(f"sweep {r + 1}/{repeats}")
        swept, history = _as_sweep(trials, base, cpus, checkpoint_every)
        say(f"in-process {r + 2}/{repeats + 1}")
        after = _in_process(trials, base, data)
        rounds.append(_round(before, swept, history, after))
        before = after
    median = sorted(rounds, key=lambda d: d["overhead"])[(len(rounds) - 1) // 2]
    sequential = median["sequential_s"]
    return {"trials": trials, "epochs": epochs, "cpus": cpus, "checkpoint_every": checkpoint_every,
            "repeats": repeats, "mean_trial_s": sequential / trials, **median,
            "overhead_rounds": [d["overhead"] for d in rounds], "rounds": rounds}
