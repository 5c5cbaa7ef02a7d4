"""Measured inference latency of a network: warm-up, then the median and spread of timed forward passes
in eval mode, per batch size, on the device, precision and memory format the network trains in.

GMACs are not time: depthwise and grouped convolutions (the PIB block is made of them) run far below a
device's peak, so a cell that wins on GMACs can lose on latency. This is the measurement the eval trials
report (``latency_ms`` at batch 1, ``throughput_img_s`` at the larger batch) and ``dartsweep latency``
prints.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from nas.errors import ConfigError


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_passes(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3,
                 autocast=contextlib.nullcontext) -> list[float]:
    """Seconds of ``repeats`` forward passes of ``model`` on ``x`` after ``warmup`` untimed ones, each
    synchronised with the device; the model runs in whatever mode it is in."""
    times = []
    for i in range(warmup + repeats):
        _sync(x.device)
        start = time.perf_counter()
        with autocast():
            model(x)
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu",
                    batch_sizes: Sequence[int] = (1, 256), repeats: int = 20, warmup: int = 3,
                    amp: bool | None = None, channels_last: bool = True) -> dict[str, Any]:
    """Latency of ``model`` on inputs of ``input_shape`` (C, H, W): per batch size the median and the
    spread (min, max, interquartile range) of ``repeats`` timed forward passes after ``warmup`` untimed
    ones, in eval mode; images/s at the largest batch; the device's name and torch's CPU threads.
    ``amp`` (None: on for CUDA) and ``channels_last`` as the network trains."""
    from nas.train import autocast_factory

    if repeats < 20:
        raise ConfigError(f"latency needs at least 20 timed passes for a median and spread, got {repeats}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    was_training = model.training
    model = model.to(device).to(memory_format=fmt).eval()
    autocast = autocast_factory(amp, device)
    per_batch = {}
    for batch in sorted(set(batch_sizes)):
        x = torch.randn(batch, *input_shape, device=device).contiguous(memory_format=fmt)
        times = timed_passes(model, x, repeats, warmup, autocast)
        q = statistics.quantiles(times, n=4)
        per_batch[batch] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                            "max_ms": 1e3 * max(times), "iqr_ms": 1e3 * (q[2] - q[0]), "repeats": repeats}
    model.train(was_training)
    largest = max(per_batch)
    return {"device": device_name(device), "threads": torch.get_num_threads(),
            "amp": bool(device.type == "cuda" if amp is None else amp), "channels_last": channels_last,
            "batches": per_batch, "latency_ms": per_batch[min(per_batch)]["median_ms"],
            "throughput_img_s": largest / (per_batch[largest]["median_ms"] / 1e3)}
