"""Cost-aware DARTS: an expected-cost term in the architecture loss (FBNet, ProxylessNAS).

The term is lambda * E[cost] / E_uniform[cost], with E[cost] = sum over cells, edges and ops of
softmax(alpha)_op * cost(op at that edge and cell), differentiable in alpha, and E_uniform the same sum
at uniform weights, so lambda is unitless (lambda = 1: the term equals 1 at the start of a search) and
the same lambda means the same pull on CIFAR or digits. The costs: GMACs (conv and linear
multiply-accumulates of each candidate op at the resolution its cell runs, counted by torch's
FlopCounterMode on the native kernels), parameters, or latency (ms) from a per-op lookup table built for
the search network's channels, layers and device (``nas.lut``). ``none`` costs nothing. The term does not depend
on the network's weights, so its gradient is exact for first- and second-order DARTS alike and is added
to alpha's gradient after the architect's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nas.errors import ConfigError

COST_METRICS = ("gmac", "params", "latency")


@dataclass(frozen=True)
class CostTerm:
    """Per-(edge, op) costs of the normal and reduction cells (summed over the cells of each kind)."""

    normal: torch.Tensor  # (edges, ops), on the alphas' device
    reduce: torch.Tensor
    metric: str
    weight: float
    uniform: float  # E[cost] at uniform weights, a plain number: the term reads nothing back from the device

    def expected(self, alpha_normal: torch.Tensor, alpha_reduce: torch.Tensor) -> torch.Tensor:
        """E[cost] under softmax(alpha), divided by its value at uniform weights."""
        normal = (F.softmax(alpha_normal.float(), -1) * self.normal.to(alpha_normal.device)).sum()
        reduce = (F.softmax(alpha_reduce.float(), -1) * self.reduce.to(alpha_reduce.device)).sum()
        return (normal + reduce) / max(self.uniform, 1e-12)

    def add_gradients(self, alphas: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``grads`` plus weight * d(expected)/d(alpha)."""
        leaves = [a.detach().requires_grad_() for a in alphas]
        with torch.enable_grad():
            extra = torch.autograd.grad(self.weight * self.expected(*leaves), leaves)
        return [g + e.to(g.dtype) for g, e in zip(grads, extra)]


def op_costs(model, metric: str, input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normal, reduce) cost tables of a SearchNetwork: per edge and primitive, summed over the cells of
    that kind; GMACs at one image of ``input_shape``, or millions of parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    from nas.kernels import native_kernels

    if metric not in COST_METRICS or metric == "latency":
        raise ConfigError(f"cost_metric: op_costs counts gmac or params, got {metric!r}")
    n_ops = len(model.op_set.primitives)
    tables = {True: torch.zeros(len(model.cells[0].edges), n_ops), False: torch.zeros(len(model.cells[0].edges), n_ops)}
    counts: dict[str, dict] = {}
    if metric == "gmac":
        was_training = model.training
        model.eval()
        modes = [cell.stacked for cell in model.cells]
        for cell in model.cells:  # edge by edge, so that every op is counted under its own module name
            cell.stacked = False
        try:
            with native_kernels(), torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, *input_shape, device=model.alpha_normal.device))
        finally:
            for cell, mode in zip(model.cells, modes):
                cell.stacked = mode
            model.train(was_training)
        counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    for c, cell in enumerate(model.cells):
        for e, edge in enumerate(cell.edges):
            for j, (prim, op) in enumerate(zip(edge.index, edge.ops)):
                if metric == "params":
                    value = sum(p.numel() for p in op.parameters()) / 1e6
                else:
                    name = f"SearchNetwork.cells.{c}.edges.{e}.ops.{j}"
                    value = counts.get(name)
                    if value is None:  # an op run as its tail (shared activation): its children's counts
                        value = sum(v for k, v in counts.items() if k.startswith(name + ".") and
                                    k[len(name) + 1:].isdigit())
                    value = value / 2 / 1e9  # flops -> multiply-accumulates, in GMAC
                tables[cell.reduction][e, prim] += value
    return tables[False], tables[True]


def cost_term(model, metric: str, weight: float, input_shape: tuple[int, int, int], lut_path: str | None = None,
              device: str | None = None) -> CostTerm | None:
    """The search's cost term; None when ``weight`` is 0 (the search is then exactly plain DARTS). Latency
    costs come from the table at ``lut_path``, which must be built for this network on ``device``."""
    if weight == 0:
        return None
    if metric == "latency":
        from nas.lut import check_search_compatible, read_lut, search_costs

        if lut_path is None:
            raise ConfigError("cost_metric: latency needs cost_lut: a table from `dartsweep lut build`")
        lut = read_lut(lut_path, "cost_lut:")
        channels = model.cells[0].pre1.op[1].out_channels
        check_search_compatible(lut, model.op_set, channels, len(model.cells), device, input_shape[1])
        normal, reduce = search_costs(lut, model)
    else:
        normal, reduce = op_costs(model, metric, input_shape)
    # on the alphas' device once (no host-to-device copy in every step, which a CUDA graph could not capture)
    device = model.alpha_normal.device
    return CostTerm(normal.to(device), reduce.to(device), metric, float(weight),
                    float(normal.mean(1).sum() + reduce.mean(1).sum()))
