"""How much wall time Ray Tune adds: the same eval trials in-process one after another vs as a sweep.

The sweep runs one trial at a time with every CPU (``resources: {cpu: N}``), so both sides do the same
work with the same threads; the difference is Ray's start-up, scheduling, reporting and checkpointing.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nas.config import EvalConfig
from nas.data import load_dataset
from nas.train import run_eval


def measure_overhead(trials: int = 3, epochs: int = 75, cpus: int | None = None,
                     checkpoint_every: int = 10) -> dict[str, Any]:
    from sweeps.driver import run_sweep
    from sweeps.spec import parse_sweep

    cpus = cpus or os.cpu_count() or 1
    base = {"dataset": "digits", "channels": 8, "batch_size": 64, "lr": 0.05, "epochs": epochs}
    data = load_dataset("digits")
    torch.set_num_threads(cpus)
    start = time.perf_counter()
    per_trial = []
    for seed in range(trials):
        t = time.perf_counter()
        run_eval(EvalConfig(genotype="DARTS_V2", layers=2, seed=seed, **base), data=data, device="cpu")
        per_trial.append(time.perf_counter() - t)
    sequential = time.perf_counter() - start
    raw = {"name": "overhead", "dataset": "digits",
           "eval": {**{k: v for k, v in base.items() if k != "dataset"}, "genotypes": ["DARTS_V2"], "layers": [2],
                    "seeds": list(range(trials)), "resources": {"cpu": cpus}, "checkpoint_every": checkpoint_every},
           "failure": {"max_failures": 0}}
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        run_sweep(parse_sweep(raw), storage=storage, verbose=0)
        swept = time.perf_counter() - start
        import ray

        ray.shutdown()
        from analysis.frames import history_frame

        # a trial's own wall time as Tune measured it: its last result's time_total_s
        in_trials = float(history_frame(Path(storage, "overhead")).groupby("trial_id")["time_total_s"].max().sum())
    return {"trials": trials, "epochs": epochs, "cpus": cpus, "mean_trial_s": sum(per_trial) / trials,
            "checkpoint_every": checkpoint_every, "sequential_s": sequential, "sweep_s": swept,
            "overhead": swept / sequential - 1,
            # where it goes: once per sweep (Ray and Tune start-up, first worker) vs inside the trials
            "fixed_s": swept - in_trials, "in_trial_overhead": in_trials / sequential - 1}

