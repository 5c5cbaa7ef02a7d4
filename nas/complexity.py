"""Parameter count and GMACs of an evaluation network, measured the way the paper's Table 1 was."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import lru_cache

import torch

from nas.errors import ConfigError
from nas.eval_network import EvalNetwork
from nas.genotypes import Genotype


@dataclass(frozen=True)
class Complexity:
    params_m: float  # millions of parameters, auxiliary head excluded
    gmac: float  # multiply-accumulates (x1e9) for one image, auxiliary head off

    def to_dict(self) -> dict[str, float]:
        return {"params_m": self.params_m, "gmac": self.gmac}


def count_params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for n, p in model.named_parameters() if "auxiliary" not in n) / 1e6


def complexity(genotype: Genotype, layers: int, channels: int = 36, num_classes: int = 10,
               in_channels: int = 3, image_size: int = 32) -> Complexity:
    """Params (M) and GMACs (ptflops, pytorch backend) of ``genotype`` evaluated at ``layers`` cells."""
    if layers < 1:
        raise ConfigError(f"layers must be >= 1, got {layers}")
    return _complexity(genotype, layers, channels, num_classes, in_channels, image_size)


@lru_cache(maxsize=256)
def _complexity(genotype: Genotype, layers: int, channels: int, num_classes: int, in_channels: int,
                image_size: int) -> Complexity:
    from ptflops import get_model_complexity_info

    from nas.ops import reference_modules

    # every conv a module call, as ptflops counts them (the CPU rewrites compute some convs functionally)
    model = reference_modules(EvalNetwork(genotype, channels, layers, num_classes, in_channels, auxiliary=False)).eval()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = get_model_complexity_info(model, (in_channels, image_size, image_size), as_strings=False,
                                            print_per_layer_stat=False, verbose=False, backend="pytorch")
    return Complexity(params_m=count_params_m(model), gmac=float(macs) / 1e9)
