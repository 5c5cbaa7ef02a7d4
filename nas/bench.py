"""``dartsweep bench``: the fast search/eval step against a plain, research-code-style version.

The plain version is written here on purpose, the way the original DARTS code does a step: a Python sum
over every candidate op of each edge (``none`` included), a fresh model built and loaded for the unrolled
step, finite-difference Hessian-vector products, contiguous NCHW float32, and a per-image PIL/torchvision
DataLoader. Both run in this process's children (one each, so peak RSS is each one's own) on the same
network, batch and input; the figures printed are images/s, peak memory and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.data import ImageData, make_batch
from nas.eval_network import EvalNetwork
from nas.genotypes import PIBCONV, load_genotype
from nas.opsets import resolve_op_set
from nas.graphs import GraphedStep

from nas.reference import CIFAR_MEAN, CIFAR_STD, PlainArchitect, plain_loader, plain_network, reference_modules
from nas.search_network import SearchNetwork
from nas.train import autocast_factory, eval_step, keep_freed_memory, search_step


# ----------------------------------------------------------------------------------------- measurements

def _synthetic(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _device_data(images: np.ndarray, labels: np.ndarray, device: torch.device) -> ImageData:
    """CIFAR-shaped uint8 images held on ``device``, as the fast pipeline keeps them."""
    return ImageData("bench", torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
                     torch.from_numpy(labels).to(device), torch.empty(0), torch.empty(0), CIFAR_MEAN, CIFAR_STD,
                     10, 4, 16)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2 ** 20


def _peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else _rss_mb()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def sampled_gpu_busy(device: torch.device, every_s: float = 0.1) -> Iterator[list[float]]:
    """Samples, while the block runs, the fraction of time the GPU was running a kernel (NVML's
    utilisation, what ``nvidia-smi`` shows as GPU-Util) into the list it yields. Empty off CUDA or
    without NVML (``pip install nvidia-ml-py``). NVML averages over its own window (1/6 to 1 s), so
    samples from the first second, which still see what ran before the block, are dropped."""
    samples: list[float] = []
    try:
        usable = device.type == "cuda" and torch.cuda.utilization(device) >= 0
    except Exception:  # noqa: BLE001 - no NVML: no figure, not an error
        usable = False
    if not usable:
        yield samples
        return
    stop, start = threading.Event(), time.perf_counter()

    def sample() -> None:
        while not stop.wait(every_s):
            if time.perf_counter() - start >= 1.0:
                samples.append(torch.cuda.utilization(device) / 100.0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def _timed(step, steps: int, batch: int, device: torch.device, base_rss_mb: float) -> dict[str, float]:
    """One warm-up step, then ``steps`` timed ones: images/s, peak memory (RSS growth on CPU),
    ``cpu_busy``, the process's CPU seconds per wall second over the timed steps (how many cores it kept
    busy; less than its threads when another process competed for the cores, see :func:`contended_rounds`),
    and on CUDA ``gpu_busy`` (:func:`sampled_gpu_busy`; needs a few seconds of steps to mean much)."""
    step(0)
    _sync(device)
    with sampled_gpu_busy(device) as gpu_samples:
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(1, steps + 1):
            step(i)
        _sync(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _peak_memory(device)
    result = {"images_per_s": steps * batch / elapsed, "step_s": elapsed / steps, "peak_memory_mb": peak,
              "step_memory_mb": peak - base_rss_mb if device.type == "cpu" else peak, "cpu_busy": cpu / elapsed}
    if gpu_samples:
        result["gpu_busy"] = float(np.mean(gpu_samples))
    return result


def run_search_bench(fast: bool, args: dict[str, Any]) -> dict[str, float]:
    base = _current_rss_mb()
    images, labels = _synthetic(args["batch"] * (args["steps"] + 1) * 2, args["size"])
    step = _search_step(fast, args, images, labels)
    return _timed(step, args["steps"], args["batch"], torch.device(args["device"]), base)


def _search_step(fast: bool, args: dict[str, Any], images: np.ndarray, labels: np.ndarray):
    """The search network's step (alpha step + weight step, fast or plain) over ``images``; step(i) takes
    batches 2i (weights) and 2i+1 (alpha), wrapping around."""
    torch.manual_seed(0)
    device = torch.device(args["device"])
    op_set = resolve_op_set(args.get("op_set") or "pibconv")
    batch = args["batch"]
    fmt = torch.channels_last if fast and args["channels_last"] else torch.contiguous_format
    if fast:
        model = SearchNetwork(op_set, args["C"], args["layers"], checkpoint_cells=args["checkpoint_cells"])
    else:
        model = plain_network(op_set, args["C"], args["layers"])
    model = model.to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=True)
    graphs = fast and args.get("cuda_graphs", False)
    arch_opt = torch.optim.Adam(model.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3,
                                foreach=True, capturable=graphs and device.type == "cuda")
    autocast = autocast_factory(fast and args["amp"], device)
    plain = None if fast else PlainArchitect(
        model, lambda: plain_network(op_set, args["C"], args["layers"]).to(device), 0.9, 3e-4)
    data = _device_data(images, labels, device)
    gen = torch.Generator(device=device).manual_seed(0)
    loader = None if fast else iter(plain_loader(images, labels, batch))

    pairs = len(labels) // (2 * batch)
    graphed = GraphedStep(lambda xt, yt, xv, yv: search_step(
        model, opt, arch_opt, (xt, yt), (xv, yv), 0.025, order=args["order"], momentum=0.9, weight_decay=3e-4,
        grad_clip=5.0, autocast=autocast), device, graphs, name="search step")

    def batch_pair(i: int):
        if fast:
            idx = torch.arange(2 * (i % pairs) * batch, 2 * (i % pairs + 1) * batch, device=device)
            x = make_batch(data, data.train_x[idx], augment=True, generator=gen, memory_format=fmt)
            y = data.train_y[idx]
            return (x[:batch], y[:batch]), (x[batch:], y[batch:])
        (xt, yt), (xv, yv) = next(loader), next(loader)
        return (xt.to(device), yt.to(device)), (xv.to(device), yv.to(device))

    def step(i: int) -> None:
        train, valid = batch_pair(i)
        if fast:  # the product's own step (nas.train), as run_search runs it
            graphed(0.025, *train, *valid)
            return
        arch_opt.zero_grad(set_to_none=True)
        grads = plain.alpha_grads(train, valid, 0.025, opt, unrolled=args["order"] == 2)
        for a, g in zip(model.arch_parameters(), grads):
            a.grad = g
        arch_opt.step()
        opt.zero_grad(set_to_none=True)
        # research code's loss.backward() also fills alpha's .grad
        F.cross_entropy(model(train[0]), train[1]).backward()
        nn.utils.clip_grad_norm_(model.weights(), 5.0, foreach=True)
        opt.step()

    return step


def _eval_step(fast: bool, args: dict[str, Any], images: np.ndarray, labels: np.ndarray):
    """The evaluation network's training step (fast or plain) over ``images``; step(i) trains on batch i."""
    torch.manual_seed(0)
    device = torch.device(args["device"])
    batch = args["batch"]
    fmt = torch.channels_last if fast and args["channels_last"] else torch.contiguous_format
    model = EvalNetwork(load_genotype(args.get("genotype") or PIBCONV), args["C"], args["layers"], 10, 3,
                        auxiliary=True)
    model = (model if fast else reference_modules(model)).to(device).to(memory_format=fmt)
    model.drop_path_prob = 0.2
    model.train()
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=True)
    autocast = autocast_factory(fast and args["amp"], device)
    data = _device_data(images, labels, device)
    gen = torch.Generator(device=device).manual_seed(0)
    loader = None if fast else iter(plain_loader(images, labels, batch, cutout=16))

    batches = len(labels) // batch
    graphed = GraphedStep(lambda x, y: eval_step(model, opt, x, y, aux_weight=0.4, grad_clip=5.0, autocast=autocast),
                          device, fast and args.get("cuda_graphs", False), name="eval step")

    def step(i: int) -> None:
        if fast:
            idx = torch.arange(i % batches * batch, (i % batches + 1) * batch, device=device)
            x = make_batch(data, data.train_x[idx], augment=True, generator=gen, cutout_length=16,
                           memory_format=fmt)
            y = data.train_y[idx]
        else:
            x, y = next(loader)
            x, y = x.to(device), y.to(device)
        graphed(0, x, y)  # the product's step

    return step


def count_ops(kind: str, fast: bool, args: dict[str, Any], path: str = "cuda") -> int:
    """ATen ops dispatched by one step (the second; the first warms up), the yardstick of host cost that
    needs no GPU: on a GPU each is a host-side dispatch and most a kernel launch. ``path="cuda"`` runs the
    CUDA code path on CPU tensors: kernels native (:func:`nas.kernels.native_kernels`), the fast side in
    bf16 autocast (CPU autocast's op lists, close to CUDA's) and channels_last; the plain side is float32
    NCHW either way. Deterministic."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nas.kernels import native_kernels

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):  # noqa: ANN001 - torch's signature
            self.count += 1
            return func(*args_, **(kwargs or {}))

    args = {**args, "device": "cpu", "amp": fast and path == "cuda"}
    images, labels = _synthetic(args["batch"] * 4, args["size"])
    with native_kernels() if path == "cuda" else contextlib.nullcontext():
        step = STEP_BUILDERS[kind](fast, args, images, labels)
        step(0)
        with Counter() as counter:
            step(1)
    return counter.count


def run_eval_bench(fast: bool, args: dict[str, Any]) -> dict[str, float]:
    base = _current_rss_mb()
    images, labels = _synthetic(args["batch"] * (args["steps"] + 1), args["size"])
    step = _eval_step(fast, args, images, labels)
    return _timed(step, args["steps"], args["batch"], torch.device(args["device"]), base)


def run_data_bench(fast: bool, args: dict[str, Any]) -> dict[str, float]:
    """Batches/s of the augmentation pipeline alone (crop, flip, cutout, normalise)."""
    n = args["batch"] * 20
    images, labels = _synthetic(n, args["size"])
    device = torch.device(args["device"])
    if fast:
        data = _device_data(images, labels, device)
        gen = torch.Generator(device=device).manual_seed(0)
        make_batch(data, data.train_x[:args["batch"]], augment=True, generator=gen, cutout_length=16)  # warm-up:
        _sync(device)  # CUDA loads each kernel on its first call
        start = time.perf_counter()
        for i in range(20):
            idx = torch.arange(i * args["batch"], (i + 1) * args["batch"], device=device)
            make_batch(data, data.train_x[idx], augment=True, generator=gen, cutout_length=16)
        _sync(device)
    else:
        start = time.perf_counter()
        for x, y in plain_loader(images, labels, args["batch"], cutout=16):
            x.to(device)
        _sync(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": n / elapsed, "step_s": elapsed / 20, "peak_memory_mb": _peak_memory(device),
            "step_memory_mb": 0.0}


RUNNERS = {"search": run_search_bench, "eval": run_eval_bench, "data": run_data_bench}


# ------------------------------------------------------------------------------ trials sharing one device

STEP_BUILDERS = {"search": _search_step, "eval": _eval_step}


def _pack_child(args: dict[str, Any], ready: mp.Queue, go: Any, results: mp.Queue) -> None:
    """One trial's training steps (the fast side of ``bench search`` or ``bench eval``, by ``args['phase']``):
    warm up, report ready, wait for the common start, then train for ``args['seconds']``."""
    torch.set_num_threads(args["threads"])
    try:
        device = torch.device(args["device"])
        if device.type == "cpu" and args["keep_memory"]:
            keep_freed_memory()
        step = STEP_BUILDERS[args["phase"]](True, args, *_synthetic(args["batch"] * 16, args["size"]))
        for i in range(3):
            step(i)
        _sync(device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(None)
    go.wait()
    try:
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < args["seconds"]:
            step(steps)
            steps += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        results.put(("ok", {"images_per_s": steps * args["batch"] / elapsed, "steps": steps,
                            "peak_memory_mb": _peak_memory(device)}))
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory with too many trials on the GPU
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def run_trials_together(trials: int, args: dict[str, Any]) -> dict[str, Any]:
    """``trials`` search or evaluation trials training at once on one device, each in its own process (as Ray
    runs trials with ``gpu: 1/trials``): their summed images/s, each one's, and the device's busy fraction."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_pack_child, args=(args, ready, go, results)) for _ in range(trials)]
    for proc in procs:
        proc.start()
    try:
        errors = [e for e in (ready.get(timeout=600) for _ in procs) if e is not None]
        if errors:
            raise RuntimeError(f"{trials} trials at once: {errors[0]}")
        with sampled_gpu_busy(torch.device(args["device"])) as gpu_samples:
            go.set()
            outcomes = [results.get(timeout=args["seconds"] + 600) for _ in procs]
        errors = [payload for status, payload in outcomes if status != "ok"]
        if errors:
            raise RuntimeError(f"{trials} trials at once: {errors[0]}")
        each = [payload for _, payload in outcomes]
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    total = sum(r["images_per_s"] for r in each)
    return {"trials": trials, "images_per_s": total, "per_trial_images_per_s": total / trials,
            "peak_memory_mb": max(r["peak_memory_mb"] for r in each),
            "gpu_busy": float(np.mean(gpu_samples)) if gpu_samples else None, "threads": args["threads"]}


def pack_bench(trial_counts: list[int], **args: Any) -> dict[str, Any]:
    """For each count in ``trial_counts``: that many trials at once on one device. ``gain`` is the summed
    images/s over one trial's, which is the factor on trials finished per hour per device;
    ``recommended_trials`` the fewest that reach 90 % of the best summed throughput (``gpu: 1/n``)."""
    cores = len(usable_cores())
    rows = []
    for n in trial_counts:
        threads = args.get("threads") or max(1, cores // n)
        print(f"bench pack: {n} {args['phase']} trial(s) at once, {threads} thread(s) each, {args['seconds']} s",
              file=sys.stderr)
        rows.append(run_trials_together(n, {**args, "threads": threads}))
    one = next((r["images_per_s"] for r in rows if r["trials"] == 1), None)
    for r in rows:
        r["gain"] = r["images_per_s"] / one if one else None
    best = max(r["images_per_s"] for r in rows)
    recommended = min(r["trials"] for r in rows if r["images_per_s"] >= 0.9 * best)
    return {"rows": rows, "recommended_trials": recommended, "config": {"kind": "pack", **args}}

# a side whose threads were busy less of the time than this had to share its cores with something else
CONTENDED_BELOW = 0.85


def usable_cores() -> set[int]:
    """The cores this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_cores(cores: set[int], seconds: float = 0.5) -> float | None:
    """How much of ``cores`` all the machine's processes kept busy over ``seconds``, in cores (time stolen
    by the hypervisor counts as busy), from ``/proc/stat``; None where there is no ``/proc/stat``."""

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat") as fh:
            for line in fh:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                    total, idle = total + sum(ticks), idle + ticks[3] + ticks[4]
        return total, idle

    try:
        total, idle = sample()
        time.sleep(seconds)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total:
        return None
    return (1.0 - (idle_after - idle) / (total_after - total)) * len(cores)


def contention_warning(busy: float | None, cores: int, threads: int) -> str | None:
    """A line for when ``threads`` torch threads would have to share ``cores`` with ``busy`` cores' worth
    of other work. OpenMP threads that share a core wait on each other at every op: on this project's
    2-core machine, one busy process made a 2-thread conv 18x slower (a 1-thread one was unaffected)."""
    if busy is None or busy < 0.3:
        return None
    free = max(1, int(cores - busy))
    if threads <= free:
        return None
    return (f"bench: warning: other processes keep {busy:.1f} of the {cores} cores this process may use busy, "
            f"and {threads} torch threads sharing them wait on each other at every op, so the figures would be "
            f"off: stop them, or pass --threads {free}")


def contended_rounds(result: dict[str, Any], threads: int) -> list[str]:
    """One line per round and side whose threads were busy less than :data:`CONTENDED_BELOW` of the time
    (``cpu_busy``, CPU runs of the search and eval benches): something else took their cores."""
    lines = []
    for i, round_ in enumerate(result["rounds"], 1):
        for side in ("fast", "plain"):
            busy = round_[side].get("cpu_busy")
            if busy is not None and busy < CONTENDED_BELOW * threads:
                lines.append(f"bench: warning: round {i}, {side}: its {threads} threads kept only {busy:.2f} cores "
                             f"busy; another process took the rest, so this round's figures are off")
    return lines


def _child(kind: str, fast: bool, args: dict[str, Any], queue: mp.Queue) -> None:
    torch.set_num_threads(args["threads"])
    from nas.plugins import load_plugin

    for ref in args.get("plugins") or []:  # a fresh process: its registries hold the built-ins only
        load_plugin(ref, check=False)
    if fast and args["keep_memory"] and args["device"] == "cpu":
        keep_freed_memory()  # as run_search / run_eval do on CPU
    try:
        queue.put(("ok", RUNNERS[kind](fast, args)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure(kind: str, fast: bool, args: dict[str, Any]) -> dict[str, float]:
    """Run one side in a fresh process, so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, fast, args, queue))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def bench(kind: str, repeats: int = 1, **args: Any) -> dict[str, Any]:
    """{'fast', 'plain', 'speedup', 'memory_ratio', 'config', 'rounds'} for ``kind`` in search | eval | data.

    With ``repeats`` > 1 the two sides alternate (fast, plain, fast, plain, ...) and every figure is the
    median over the rounds, the speedup the median of each round's own ratio: on a shared machine whose
    speed drifts, a ratio taken within one round is the steadier figure.
    """
    rounds = []
    for _ in range(repeats):
        fast, plain = measure(kind, True, args), measure(kind, False, args)
        rounds.append({"fast": fast, "plain": plain, "speedup": fast["images_per_s"] / plain["images_per_s"],
                       "memory_ratio": fast["step_memory_mb"] / plain["step_memory_mb"]
                       if plain["step_memory_mb"] else None})

    def median(values: list[float]) -> float:
        return float(np.median(values))

    sides = {side: {key: median([r[side][key] for r in rounds]) for key in rounds[0][side]}
             for side in ("fast", "plain")}
    ratios = [r["memory_ratio"] for r in rounds if r["memory_ratio"] is not None]
    return {**sides, "speedup": median([r["speedup"] for r in rounds]),
            "memory_ratio": median(ratios) if ratios else None, "config": {"kind": kind, **args},
            "rounds": rounds}


DEFAULTS = {"search": {"C": 16, "layers": 5, "batch": 16}, "eval": {"C": 36, "layers": 10, "batch": 32},
            "data": {"C": 0, "layers": 0, "batch": 96}, "pack": {"C": 36, "layers": 2, "batch": 96},
            # DARTS' search recipe: C 16, 8 cells, batch 64 (the train and validation halves, 64 each)
            "pack_search": {"C": 16, "layers": 8, "batch": 64}}


def _trial_counts(text: str) -> list[int]:
    from nas.errors import ConfigError

    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--trials takes trial counts such as 1,2,4,8; got {text!r}")
    return sorted(set(counts))


def _print_pack(result: dict[str, Any]) -> None:
    print(f"{'trials':>6} {'images/s':>10} {'per trial':>10} {'gain':>6} {'peak MB':>9} {'gpu busy':>9}")
    for r in result["rows"]:
        gain = f"{r['gain']:.2f}x" if r["gain"] is not None else "n/a"
        busy = f"{r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else "n/a"
        print(f"{r['trials']:>6} {r['images_per_s']:>10.1f} {r['per_trial_images_per_s']:>10.1f} {gain:>6} "
              f"{r['peak_memory_mb']:>9.0f} {busy:>9}")
    n = result["recommended_trials"]
    share = f"resources: {{gpu: {1 / n:.3g}}}" if result["config"]["device"] == "cuda" else f"{n} CPU trials at once"
    print(f"fewest {result['config']['phase']} trials within 90 % of the best throughput: {n} ({share}); "
          "gain = trials finished per hour, against one trial per device")


def cmd_bench(ns: argparse.Namespace) -> int:
    from nas.errors import ConfigError

    if ns.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here; use --device cpu")
    d = DEFAULTS["pack_search" if ns.kind == "pack" and ns.phase == "search" else ns.kind]
    if ns.kind == "pack":
        counts = _trial_counts(ns.trials)
        if ns.seconds <= 0:
            raise ConfigError(f"--seconds must be positive, got {ns.seconds}")
        result = pack_bench(counts, C=ns.C or d["C"], layers=ns.layers or d["layers"], batch=ns.batch or d["batch"],
                            size=ns.size, device=ns.device, seconds=ns.seconds, channels_last=not ns.no_channels_last,
                            keep_memory=not ns.no_keep_memory, amp=ns.device == "cuda" and not ns.no_amp,
                            threads=ns.threads, phase=ns.phase, order=ns.order, checkpoint_cells=ns.checkpoint_cells)
        if ns.json:
            print(json.dumps(result))
        else:
            _print_pack(result)
        return 0
    args = {"C": ns.C or d["C"], "layers": ns.layers or d["layers"], "batch": ns.batch or d["batch"],
            "size": ns.size, "steps": ns.steps, "order": ns.order, "device": ns.device,
            "channels_last": not ns.no_channels_last, "checkpoint_cells": ns.checkpoint_cells,
            "keep_memory": not ns.no_keep_memory,
            "amp": ns.device == "cuda" and not ns.no_amp, "threads": ns.threads or torch.get_num_threads(),
            "cuda_graphs": ns.cuda_graphs, "op_set": ns.op_set, "genotype": ns.genotype,
            "plugins": [str(Path(p).resolve()) if p.endswith(".py") else p for p in ns.plugin]}
    if ns.op_set:
        resolve_op_set(ns.op_set)  # an unknown name: one line here, not an error in each child
    if ns.genotype:
        load_genotype(ns.genotype)
    if ns.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {ns.repeats}")
    if ns.count_ops:
        if ns.kind not in ("search", "eval"):
            raise ConfigError("--count-ops counts a search or an eval step")
        counts = {side: count_ops(ns.kind, side == "fast", args, ns.path) for side in ("fast", "plain")}
        if ns.json:
            print(json.dumps({"ops_per_step": counts, "path": ns.path, "config": {"kind": ns.kind, **args}}))
        else:
            print(f"ATen ops per {ns.kind} step ({ns.path} code path): fast {counts['fast']:,}, plain "
                  f"{counts['plain']:,} ({counts['fast'] / counts['plain']:.2f}x)")
        return 0
    print(f"bench {ns.kind}: {args}, {ns.repeats} round(s)", file=sys.stderr)
    cores = usable_cores()
    warning = contention_warning(busy_cores(cores), len(cores), args["threads"]) if ns.device == "cpu" else None
    if warning:
        print(warning, file=sys.stderr)
    result = bench(ns.kind, ns.repeats, **args)
    for line in contended_rounds(result, args["threads"]) if ns.device == "cpu" else []:
        print(line, file=sys.stderr)
    if ns.json:
        print(json.dumps(result))
        return 0
    for side in ("fast", "plain"):
        r = result[side]
        busy = f"  cpu {r['cpu_busy']:.2f} cores" if "cpu_busy" in r else ""
        print(f"{side:>5}: {r['images_per_s']:9.1f} images/s  {r['step_s'] * 1e3:8.1f} ms/step  "
              f"peak {r['peak_memory_mb']:8.1f} MB  (step {r['step_memory_mb']:.1f} MB){busy}")
    mem = f"{result['memory_ratio']:.2f}x" if result["memory_ratio"] is not None else "n/a"
    if ns.repeats > 1:
        per_round = ", ".join(f"{r['speedup']:.2f}x" for r in result["rounds"])
        print(f"per round: speedup {per_round}")
    print(f"speedup {result['speedup']:.2f}x   memory ratio (fast/plain) {mem}"
          + ("   (medians)" if ns.repeats > 1 else ""))
    return 0


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="fast vs plain (research-code) step: images/s, peak memory, ratios")
    p.add_argument("kind", choices=("search", "eval", "data", "pack"),
                   help="pack: search or evaluation trials training at once on one device (fractional GPUs)")
    p.add_argument("--phase", choices=("search", "eval"), default="eval",
                   help="pack: which trials share the device (search: C 16, 8 cells, batch 64 unless given)")
    p.add_argument("--order", type=int, choices=(1, 2), default=2)
    p.add_argument("--op-set", help="search: the op set (a preset, a plugin's included; default pibconv)")
    p.add_argument("--genotype", help="eval: the genotype (a built-in name or a JSON file; default PIBCONV)")
    p.add_argument("--C", type=_positive_int, help="channels (search 16, eval 36)")
    p.add_argument("--layers", type=_positive_int, help="cells (search 5, eval 10)")
    p.add_argument("--batch", type=_positive_int, help="batch size (search 16, eval 32)")
    p.add_argument("--size", type=_positive_int, default=32, help="image size (default 32)")
    p.add_argument("--steps", type=_positive_int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate fast and plain this many rounds; report medians (steadier on a shared machine)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: all)")
    p.add_argument("--no-channels-last", action="store_true", help="fast side without channels_last")
    p.add_argument("--checkpoint-cells", action="store_true", help="fast side with per-cell checkpointing")
    p.add_argument("--no-keep-memory", action="store_true",
                   help="CPU: fast side with glibc's default malloc trimming (see nas.train.keep_freed_memory)")
    p.add_argument("--no-amp", action="store_true", help="CUDA: fast side in float32 (cuDNN's TF32 convs)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: fast side replays each step as a captured CUDA graph (nas.graphs)")
    p.add_argument("--trials", default="1,2,4,8", help="pack: trial counts to run at once (default 1,2,4,8)")
    p.add_argument("--seconds", type=_positive_float, default=20.0, help="pack: seconds each count trains (default 20)")
    p.add_argument("--count-ops", action="store_true",
                   help="print ATen ops dispatched per step for both sides instead of timing (no GPU needed)")
    p.add_argument("--path", choices=("cpu", "cuda"), default="cuda",
                   help="with --count-ops: the code path counted (cuda: the CUDA path on CPU tensors)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
