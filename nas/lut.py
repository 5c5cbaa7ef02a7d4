"""A per-op latency lookup table for DARTS-space evaluation networks (as FBNet and BINAS build them).

``build_lut`` times every candidate op of an op set at every (channels, stride, input size) a cell
position of a ``layers``-cell, ``channels``-wide network uses, in eval mode at one batch size, plus the
network's skeleton (stem, cell preprocessing, node sums and concatenations, head: the network with every
edge ``none``). ``predict`` adds a genotype's ops to the skeleton. ``check`` measures random genotypes of
the op set and compares: Spearman's rank correlation and the median absolute error. A table is only
valid for its op set options, channels, layers, device, batch and threads; ``predict`` refuses others.
Ops and networks are timed by their fastest pass (networks over interleaved rounds): on a shared machine
interference only adds time, and the median drifted 20-30 % between minutes on this project's CI VM.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any, Iterable

import torch

from nas.errors import ConfigError
from nas.genotypes import Genotype
from nas.ops import build_op, cell_layout
from nas.opsets import OpSet

KEY_SEP = "|"


def edge_keys(genotype_or_edges: Genotype, channels: int, layers: int, image_size: int) -> list[tuple]:
    """(op, channels, stride, input size) of every edge of the evaluation network, cell by cell."""
    keys, c, h = [], channels, image_size
    for reduction in cell_layout(layers):
        if reduction:
            c *= 2
        edges = genotype_or_edges.reduce if reduction else genotype_or_edges.normal
        for op, src in edges:
            stride = 2 if reduction and src < 2 else 1
            keys.append((op, c, stride, h if src < 2 or not reduction else math.ceil(h / 2)))
        if reduction:
            h = math.ceil(h / 2)
    return keys


def _positions(channels: int, layers: int, image_size: int, nodes: int = 4) -> set[tuple[int, int, int]]:
    """Every (channels, stride, input size) an edge of the network can have."""
    out, c, h = set(), channels, image_size
    for reduction in cell_layout(layers):
        if reduction:
            c *= 2
            out |= {(c, 2, h), (c, 1, math.ceil(h / 2))}
            h = math.ceil(h / 2)
        else:
            out.add((c, 1, h))
    return out


def _fastest_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """The fastest of ``repeats`` timed passes, in ms: on a shared machine interference only ever adds time,
    so the minimum is the steadiest estimate of what the op itself costs."""
    from nas.latency import timed_passes

    return 1e3 * min(timed_passes(module.eval(), x, repeats, warmup))


def _interleaved_fastest_ms(models: list[torch.nn.Module], x: torch.Tensor, rounds: int,
                            passes: int) -> list[float]:
    """Each model's fastest pass over ``rounds`` rounds that time every model ``passes`` times in turn, so a
    machine that slows down for a while slows every model alike instead of the ones timed then."""
    from nas.latency import timed_passes

    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            times[i] += timed_passes(model.eval(), x, passes, warmup=2)
    return [1e3 * min(t) for t in times]


def _input(c: int, h: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, c, h, h, device=device).contiguous(memory_format=torch.channels_last)


def skeleton(op_set: OpSet, nodes: int = 4) -> Genotype:
    """The genotype with every edge ``none``: what a network costs besides its ops."""
    edges = tuple(("none", j) for i in range(nodes) for j in (0, 1))
    concat = tuple(range(2, nodes + 2))
    return Genotype(edges, concat, edges, concat, op_set.options, name="skeleton")


def _network(genotype: Genotype, channels: int, layers: int, device: torch.device, in_channels: int = 3):
    from nas.eval_network import EvalNetwork

    model = EvalNetwork(genotype, channels, layers, 10, in_channels, auxiliary=False).to(device)
    return model.to(memory_format=torch.channels_last).eval()


def build_lut(op_set: OpSet, channels: int, layers: int, device: str | torch.device = "cpu", batch: int = 1,
              repeats: int = 30, image_size: int = 32, progress=None) -> dict[str, Any]:
    """Time every op of ``op_set`` at every position of the network (the fastest of ``repeats`` passes),
    and its skeleton."""
    device = torch.device(device)
    ops: dict[str, float] = {}
    positions = sorted(_positions(channels, layers, image_size))
    for i, (c, stride, h) in enumerate(positions):
        x = _input(c, h, batch, device)
        for name in op_set.primitives:
            module = build_op(name, c, stride, True, op_set.options).to(device).to(memory_format=torch.channels_last)
            ops[KEY_SEP.join(map(str, (name, c, stride, h)))] = _fastest_ms(module, x, repeats)
        if progress:
            progress(f"position {i + 1}/{len(positions)}: C={c} stride={stride} {h}x{h}")
    from nas.latency import device_name

    skeleton_net = _network(skeleton(op_set), channels, layers, device)
    return {"op_set": op_set.id, "op_set_spec": op_set.to_dict(), "channels": channels, "layers": layers,
            "image_size": image_size, "batch": batch, "device": device_name(device), "device_type": device.type,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
            "statistic": "fastest pass",
            "skeleton_ms": _fastest_ms(skeleton_net, _input(3, image_size, batch, device), repeats),
            "ops": ops, "scale": 1.0}


CALIBRATION_SEED = 1_000_003  # not a seed ``check`` uses by default


def calibrate(lut: dict[str, Any], count: int = 5, rounds: int = 6, passes: int = 10,
              progress=None) -> dict[str, Any]:
    """Fit the table's ``scale``: ops timed alone run with warm caches and come out faster than inside a
    network, so predictions scale the ops' sum by the median ratio measured on ``count`` random genotypes
    (their own seed, never the check's). The skeleton is timed again in the same interleaved rounds, so the
    two sides of the ratio see the machine alike."""
    genotypes = _random_genotypes(lut, count, CALIBRATION_SEED)
    measured = _measure(lut, [skeleton(OpSet.from_dict(lut["op_set_spec"]))] + genotypes, lut["device_type"],
                        rounds, passes, progress, "calibration")
    skeleton_ms, measured = measured[0], measured[1:]
    ratios = []
    for g, ms in zip(genotypes, measured):
        ops = _ops_ms({**lut, "scale": 1.0}, g)
        ratios.append((ms - skeleton_ms) / ops if ops > 0 else 1.0)
    return {**lut, "skeleton_ms": skeleton_ms, "scale": float(statistics.median(ratios))}


_SETTINGS = {"channels": "channels", "layers": "layers", "device": "device_type", "image size": "image_size"}


def _mismatch(lut: dict[str, Any], primitives: Iterable[str], options: Any,
              settings: dict[str, Any]) -> tuple | None:
    """How the table differs from what it is asked for, the first way found: ("lacks", missing primitives),
    ("options", the table's options) or (setting, the table's value, the value asked); None where it fits.
    Settings asked as None are not compared."""
    spec = OpSet.from_dict(lut["op_set_spec"])
    missing = sorted(set(primitives) - set(spec.primitives))
    if missing:
        return ("lacks", missing)
    if options != spec.options:
        return ("options", spec.options)
    for what, want in settings.items():
        have = lut[_SETTINGS[what]]
        if want is not None and want != have:
            return (what, have, want)
    return None


def check_compatible(lut: dict[str, Any], genotype: Genotype, channels: int | None = None,
                     layers: int | None = None, device: str | None = None) -> None:
    """Refuse a genotype or setting the table was not built for, naming the mismatch."""
    found = _mismatch(lut, genotype.primitives, genotype.options,
                      {"channels": channels, "layers": layers, "device": device})
    if found is None:
        return
    if found[0] == "lacks":
        raise ConfigError(f"the LUT was built for op set {lut['op_set']}, which lacks {', '.join(found[1])}")
    if found[0] == "options":
        raise ConfigError(f"the LUT was built for op set {lut['op_set']} (options {found[1]}); the genotype's "
                          f"options are {genotype.options}: build a LUT for them")
    what, have, want = found
    raise ConfigError(f"the LUT was built for {what} {have}, not {want}; build one for {want}")


def _ops_ms(lut: dict[str, Any], genotype: Genotype) -> float:
    """The sum over the network's edges of each op's time less the ``none`` the skeleton ran there."""
    total = 0.0
    for op, c, stride, h in edge_keys(genotype, lut["channels"], lut["layers"], lut["image_size"]):
        total += lut["ops"][KEY_SEP.join(map(str, (op, c, stride, h)))]
        total -= lut["ops"].get(KEY_SEP.join(map(str, ("none", c, stride, h))), 0.0)
    return total


def predict(lut: dict[str, Any], genotype: Genotype) -> float:
    """Predicted latency (ms) of ``genotype``'s network: the skeleton plus the scaled sum of its ops."""
    check_compatible(lut, genotype)
    return lut["skeleton_ms"] + lut.get("scale", 1.0) * _ops_ms(lut, genotype)


def random_genotype(op_set: OpSet, rng: random.Random, nodes: int = 4) -> Genotype:
    choices = [p for p in op_set.primitives if p != "none"]

    def cell() -> tuple:
        return tuple((rng.choice(choices), src) for i in range(nodes) for src in rng.sample(range(i + 2), 2))

    concat = tuple(range(2, nodes + 2))
    return Genotype(cell(), concat, cell(), concat, op_set.options)


def _random_genotypes(lut: dict[str, Any], count: int, seed: int) -> list[Genotype]:
    op_set = OpSet.from_dict(lut["op_set_spec"])
    rng = random.Random(seed)
    return [random_genotype(op_set, rng) for _ in range(count)]


def _measure(lut: dict[str, Any], genotypes: list[Genotype], device: str | torch.device, rounds: int, passes: int,
             progress=None, what: str = "check") -> list[float]:
    """Each genotype's network in the table's setting, timed in interleaved rounds (fastest pass, ms)."""
    device = torch.device(device)
    models = [_network(g, lut["channels"], lut["layers"], device) for g in genotypes]
    x = _input(3, lut["image_size"], lut["batch"], device)
    if progress:
        progress(f"{what}: timing {len(models)} networks, {rounds} interleaved rounds of {passes} passes")
    return _interleaved_fastest_ms(models, x, rounds, passes)


def check(lut: dict[str, Any], count: int = 10, seed: int = 0, device: str | torch.device | None = None,
          rounds: int = 6, passes: int = 10, progress=None) -> dict[str, Any]:
    """Predicted against measured latency (fastest pass over interleaved rounds) for ``count`` random
    genotypes of the table's op set: Spearman's rank correlation and the median absolute error."""
    import pandas as pd

    genotypes = _random_genotypes(lut, count, seed)
    op_set = OpSet.from_dict(lut["op_set_spec"])
    skeleton_ms, *measured = _measure(lut, [skeleton(op_set)] + genotypes, device or lut["device_type"], rounds,
                                      passes, progress)
    rows = [{"genotype": g.id, "predicted_ms": predict(lut, g), "measured_ms": ms}
            for g, ms in zip(genotypes, measured)]
    frame = pd.DataFrame(rows)
    errors = (frame.predicted_ms - frame.measured_ms).abs() / frame.measured_ms
    # the machine's speed now against when the table was built, from the skeleton timed in the same rounds
    speed = skeleton_ms / lut["skeleton_ms"]
    adjusted = (speed * frame.predicted_ms - frame.measured_ms).abs() / frame.measured_ms
    return {"genotypes": rows, "spearman": float(frame.predicted_ms.corr(frame.measured_ms, method="spearman")),
            "median_abs_error": float(errors.median()), "machine_speed": float(speed),
            "median_abs_error_at_build_speed": float(adjusted.median()), "count": count, "seed": seed,
            "rounds": rounds, "passes": passes}


def read_lut(path: str, where: str = "--lut") -> dict[str, Any]:
    """A table written by ``dartsweep lut build``; a clear error for anything else."""
    try:
        lut = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} {path}: not a readable LUT file ({type(exc).__name__}); build one with "
                          "`dartsweep lut build`") from None
    if not isinstance(lut, dict) or not {"ops", "op_set_spec", "skeleton_ms", "channels", "layers",
                                         "device_type", "image_size"} <= set(lut):
        raise ConfigError(f"{where} {path}: not a LUT file (built by `dartsweep lut build`)")
    return lut


def check_search_compatible(lut: dict[str, Any], op_set: OpSet, channels: int, layers: int,
                            device: str | None = None, image_size: int | None = None) -> None:
    """Refuse a table that was not built for this search network: another op set (primitives or options,
    F included), channel count, layer count, device type or image size; the message names the mismatch."""
    found = _mismatch(lut, op_set.primitives, op_set.options,
                      {"channels": channels, "layers": layers, "device": device, "image size": image_size})
    if found is None:
        return
    if found[0] in ("lacks", "options"):
        what = (f"lacks {', '.join(found[1])}" if found[0] == "lacks"
                else f"has options {found[1]}, not {op_set.options}")
        raise ConfigError(f"cost_lut: the LUT was built for op set {lut['op_set']}, which {what}; build one with "
                          f"`dartsweep lut build --op-set ... --channels {channels} --layers {layers}`")
    what, have, want = found
    raise ConfigError(f"cost_lut: the LUT was built for {what} {have}, but the search runs at {what} {want}; "
                      f"build one for {want}")


def search_costs(lut: dict[str, Any], model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(normal, reduce) per-(edge, primitive) latency (ms) of a SearchNetwork's ops from ``lut``, summed over
    the cells of each kind: each op at its cell's channels, stride and input size, less the ``none`` op timed
    there (so ``none`` costs nothing)."""
    sizes = []
    hooks = [cell.pre1.register_forward_hook(lambda m, i, out: sizes.append(tuple(out.shape[1:3])))
             for cell in model.cells]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, model.stem[0].in_channels, lut["image_size"], lut["image_size"],
                              device=model.alpha_normal.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    prims = model.op_set.primitives
    tables = {False: torch.zeros(model.alpha_normal.shape), True: torch.zeros(model.alpha_reduce.shape)}
    for cell, (c, h) in zip(model.cells, sizes):
        edge = 0
        for node in range(cell.nodes):
            for source in range(node + 2):
                stride = 2 if cell.reduction and source < 2 else 1
                size = h if source < 2 or not cell.reduction else math.ceil(h / 2)
                for p, name in enumerate(prims):
                    if name == "none":
                        continue
                    key = KEY_SEP.join(map(str, (name, c, stride, size)))
                    if key not in lut["ops"]:
                        raise ConfigError(f"cost_lut: the LUT has no timing of {name} at C={c}, stride {stride}, "
                                          f"{size}x{size}; build it for this network's channels and layers")
                    base = lut["ops"].get(KEY_SEP.join(map(str, ("none", c, stride, size))), 0.0)
                    tables[cell.reduction][edge, p] += max(0.0, lut["ops"][key] - base)
                edge += 1
    return tables[False], tables[True]
