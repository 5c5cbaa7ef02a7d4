"""Parameter count and GMACs of an evaluation network, measured the way the paper's Table 1 was, and of a
search network (every candidate op of an op set)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import lru_cache

import torch

from nas.errors import ConfigError
from nas.eval_network import EvalNetwork
from nas.genotypes import Genotype
from nas.opsets import OpSet


@dataclass(frozen=True)
class Complexity:
    params_m: float  # millions of parameters, auxiliary head excluded
    gmac: float  # multiply-accumulates (x1e9) for one image, auxiliary head off

    def to_dict(self) -> dict[str, float]:
        return {"params_m": self.params_m, "gmac": self.gmac}


# Counting builds the network: a bound keeps a typo (--layers 100000) from allocating gigabytes.
MAX_LAYERS = 200


def check_size(layers: int, channels: int) -> None:
    """Refuse a network size no one means (a typo), before building it."""
    if not 1 <= layers <= MAX_LAYERS:
        raise ConfigError(f"layers must be between 1 and {MAX_LAYERS}, got {layers}")
    if not 1 <= channels <= 1024:
        raise ConfigError(f"channels must be between 1 and 1024, got {channels}")


def complexity(genotype: Genotype, layers: int, channels: int = 36, num_classes: int = 10,
               in_channels: int = 3, image_size: int = 32) -> Complexity:
    """Params (M) and GMACs (ptflops, pytorch backend) of ``genotype`` evaluated at ``layers`` cells."""
    check_size(layers, channels)
    return _complexity(genotype, layers, channels, num_classes, in_channels, image_size)


def search_complexity(op_set: OpSet, layers: int = 8, channels: int = 16, nodes: int = 4, num_classes: int = 10,
                      in_channels: int = 3, image_size: int = 32) -> Complexity:
    """Params (M, alphas excluded) and GMACs of the search network for ``op_set``: one forward pass runs
    every candidate op on every edge."""
    check_size(layers, channels)
    from nas.search_network import SearchNetwork

    # edge by edge on any device: ptflops counts module calls, and the stacked cell calls no op modules
    model = SearchNetwork(op_set, channels, layers, nodes, num_classes, in_channels, stacked=False).eval()
    return _measure(model, in_channels, image_size)


def effective_ratios(ratio: float, channels: int, layers: int) -> dict[int, float]:
    """C_inv / C of the PIB and ConvNeXt blocks per cell width (C_inv = round(F C)): F where F C is whole."""
    from nas.ops import bottleneck_channels, cell_layout

    widths, c = [], channels
    for reduction in cell_layout(layers):
        c = 2 * c if reduction else c
        widths.append(c)
    return {w: bottleneck_channels(w, ratio) / w for w in sorted(set(widths))}


@lru_cache(maxsize=4096)
def _complexity(genotype: Genotype, layers: int, channels: int, num_classes: int, in_channels: int,
                image_size: int) -> Complexity:
    """The evaluation network's count as the sum of its parts (stem, each cell, pooling + classifier):
    ptflops counts module by module, so the parts add up to the whole network's count exactly
    (tests/test_genotypes_complexity.py checks it), and a cell of a given genotype, widths and input sizes
    costs the same wherever it sits. A grid over 19 depths thus measures a few dozen distinct cells, not
    19 networks (a 1,045-trial dry-run: seconds, not a minute)."""
    from nas.ops import cell_layout

    c_curr = 3 * channels  # EvalNetwork's stem_multiplier
    params, macs = _part("stem", in_channels, c_curr, image_size)
    c_pp, c_p, c = c_curr, c_curr, channels
    size_pp = size_p = image_size
    reduction_prev = False
    for reduction in cell_layout(layers):
        if reduction:
            c *= 2
        p, m, c_out, size_out = _cell(genotype, c_pp, c_p, c, reduction, reduction_prev, size_pp, size_p)
        params, macs = params + p, macs + m
        c_pp, c_p, size_pp, size_p, reduction_prev = c_p, c_out, size_p, size_out, reduction
    p, m = _part("head", c_p, num_classes, size_p)
    return Complexity(params_m=(params + p) / 1e6, gmac=(macs + m) / 1e9)


@lru_cache(maxsize=4096)
def _part(kind: str, c_in: int, c_out: int, size: int) -> tuple[int, float]:
    """(params, MACs) of the stem (``c_in`` image channels -> ``c_out``) or of the head (global pooling and
    the classifier over ``c_in`` channels -> ``c_out`` classes), as in ``EvalNetwork``."""
    from nas.kernels import GlobalAvgPool2d
    from nas.ops import stem

    if kind == "stem":
        module = stem(c_in, c_out)
    else:
        module = torch.nn.Sequential(GlobalAvgPool2d(), torch.nn.Flatten(1), torch.nn.Linear(c_in, c_out))
    return _count(module.eval(), torch.zeros(1, c_in, size, size))


@lru_cache(maxsize=4096)
def _cell(genotype: Genotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool, size_pp: int,
          size_p: int) -> tuple[int, float, int, int]:
    """(params, MACs, output channels, output size) of one evaluation cell with inputs of these widths and
    sizes."""
    from nas.eval_network import EvalCell

    cell = EvalCell(genotype, c_pp, c_p, c, reduction, reduction_prev).eval()
    inputs = {"s0": torch.zeros(1, c_pp, size_pp, size_pp), "s1": torch.zeros(1, c_p, size_p, size_p)}
    with torch.no_grad():
        out = cell(**inputs)
    params, macs = _count(cell, inputs)
    return params, macs, int(out.shape[1]), int(out.shape[-1])


def _count(module: torch.nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> tuple[int, float]:
    """(params, MACs) of ``module`` run on ``inputs``, counted by ptflops (pytorch backend) with every conv a
    module call (the CPU rewrites compute some convs functionally)."""
    from ptflops import get_model_complexity_info

    from nas.reference import reference_modules

    from nas.plugins import stated_macs_hooks

    module = reference_modules(module)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = get_model_complexity_info(module, (1,), input_constructor=lambda _: inputs, as_strings=False,
                                            print_per_layer_stat=False, verbose=False, backend="pytorch",
                                            custom_modules_hooks=stated_macs_hooks(module))
    return sum(p.numel() for p in module.parameters()), float(macs)


def _measure(model: torch.nn.Module, in_channels: int, image_size: int) -> Complexity:
    from ptflops import get_model_complexity_info

    from nas.reference import reference_modules

    # every conv a module call, as ptflops counts them (the CPU rewrites compute some convs functionally)
    from nas.plugins import stated_macs_hooks

    model = reference_modules(model)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = get_model_complexity_info(model, (in_channels, image_size, image_size), as_strings=False,
                                            print_per_layer_stat=False, verbose=False, backend="pytorch",
                                            custom_modules_hooks=stated_macs_hooks(model))
    params = sum(p.numel() for n, p in model.named_parameters() if "auxiliary" not in n and not n.startswith("alpha_"))
    return Complexity(params_m=params / 1e6, gmac=float(macs) / 1e9)
