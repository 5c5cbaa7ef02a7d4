"""The DARTS search network: every cell edge is a softmax(alpha)-weighted mix of all candidate ops."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from nas.fused import StackedCell
from nas.genotypes import Genotype
from nas.kernels import GlobalAvgPool2d, cuda_code_path
from nas.ops import (build_op, is_pooling, cell_layout, cell_preprocessing, make_activation,
                     make_norm, stem)
from nas.opsets import OpSet


def _opening_activation(op: nn.Module) -> str | None:
    """'relu' or 'gelu' when ``op`` is a sequence that opens with that activation, else None."""
    if isinstance(op, nn.Sequential) and len(op) > 1:
        return {nn.ReLU: "relu", nn.GELU: "gelu"}.get(type(op[0]))
    return None


class MixedOp(nn.Module):
    """sum_o w_o * o(x) over the op set. ``none`` contributes exactly zero, so it is not computed
    (its weight still takes part in the softmax). Ops that open with the same activation (dilated convs
    and 7x1-1x7 with ReLU, separable convs with the op set's) share one act(x): computed once, and kept
    once for backward. Pooling outputs are normalised (affine-free BN) when the op set says so (DARTS)."""

    def __init__(self, op_set: OpSet, channels: int, stride: int) -> None:
        super().__init__()
        self.index = [i for i, name in enumerate(op_set.primitives) if name != "none"]
        # on the weights' device already: indexing with a list copies it there, and waits, every call
        self.register_buffer("op_index", torch.tensor(self.index), persistent=False)
        ops = []
        for i in self.index:
            name = op_set.primitives[i]
            op = build_op(name, channels, stride, False, op_set.options)
            if is_pooling(name) and op_set.pooling_bn:
                op = nn.Sequential(op, make_norm("bn", channels, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)
        opening = [_opening_activation(op) for op in ops]
        # one shared module per activation that opens two or more ops (not registered: no parameters)
        self.shared_acts = {kind: make_activation(kind) for kind in sorted(set(opening) - {None})
                            if opening.count(kind) > 1}
        self._shared = [kind if kind in self.shared_acts else None for kind in opening]
        # plain tuples, not registered twice: the modules stay owned (and named) by self.ops
        self._tails = [tuple(op)[1:] if kind is not None else None for op, kind in zip(ops, self._shared)]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out + sum_o w_o * o(x)`` (``out`` lets a node accumulate all its edges in one tensor)."""
        activated = {kind: act(x) for kind, act in self.shared_acts.items()}
        outputs = []
        for op, tail, kind in zip(self.ops, self._tails, self._shared):
            if tail is None:
                y = op(x)
            else:
                y = activated[kind]
                for module in tail:
                    y = module(y)
            outputs.append(y)
        return _WeightedSum.apply(weights.index_select(0, self.op_index), out, *outputs)


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s elements in memory order as a 1-D view (NCHW or channels_last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return None


class _WeightedSum(torch.autograd.Function):
    """``out + sum_o w[o] * y_o``, whose backward takes w's gradient as dot products <grad, y_o>: autograd's
    own (addcmul's) would first write every grad * y_o out in full, one more activation-sized tensor per
    op. ``out`` may be None."""

    @staticmethod
    def forward(ctx, w, out, *ys):  # noqa: ANN001 - autograd signature
        ctx.has_out = out is not None
        for i, y in enumerate(ys):
            out = y * w[i] if out is None else torch.addcmul(out, y, w[i])
        ctx.save_for_backward(w, *ys)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        w, *ys = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[0]:
            flat_grad = _flat(grad)
            dots = []
            for y in ys:
                same_layout = flat_grad is not None and y.stride() == grad.stride() and y.dtype == grad.dtype
                flat_y = _flat(y) if same_layout else None
                dots.append(torch.dot(flat_grad, flat_y) if flat_y is not None else (grad * y).sum())
            grad_w = torch.stack(dots).to(w.dtype)
        return (grad_w, grad if ctx.has_out else None,
                *(grad * w[i] if ctx.needs_input_grad[2 + i] else None for i in range(len(ys))))


class SearchCell(nn.Module):
    """A DARTS search cell. Its nodes are computed edge by edge (each a :class:`MixedOp`; the CPU path) or,
    per source state, with each op family of all outgoing edges stacked (:class:`nas.fused.StackedCell`;
    the CUDA path): ``stacked`` None picks by device, True/False forces one."""

    def __init__(self, op_set: OpSet, nodes: int, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool, mixed_op: type[nn.Module] = MixedOp, stacked: bool | None = None) -> None:
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.pre0, self.pre1 = cell_preprocessing(c_prev_prev, c_prev, c, reduction_prev, False,
                                                   op_set.options.outer_activation)
        self.edges = nn.ModuleList(
            mixed_op(op_set, c, 2 if reduction and j < 2 else 1) for i in range(nodes) for j in range(i + 2))
        self.stacked = stacked
        self.stacked_cell = StackedCell(self.edges, nodes, len(op_set.primitives)) if mixed_op is MixedOp else None

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        use_stacked = cuda_code_path(s0) if self.stacked is None else self.stacked
        if use_stacked and self.stacked_cell is not None:
            return self.stacked_cell(self.pre0(s0), self.pre1(s1), weights)
        states = [self.pre0(s0), self.pre1(s1)]
        offset = 0
        for _ in range(self.nodes):
            node = None
            for j, h in enumerate(states):
                node = self.edges[offset + j](h, weights[offset + j], node)
            offset += len(states)
            states.append(node)
        return torch.cat(states[2:], dim=1)


def _checkpointed(cell: SearchCell, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``cell(s0, s1, weights)`` without keeping its activations: backward recomputes them.

    The recomputation runs with the tensors the cell held in the forward pass: inside ``functional_call``
    (the exact-hypergradient reference) those are the substituted weights, not the module's own. Buffers
    get throwaway copies on recomputation, so BN's running statistics are updated once, as without
    checkpointing.
    """
    params = dict(cell.named_parameters())
    buffers = dict(cell.named_buffers())
    calls = 0

    def run(s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        state = buffers if calls == 1 else {n: b.clone() for n, b in buffers.items()}
        return functional_call(cell, {**params, **state}, (s0, s1, weights))

    return checkpoint(run, s0, s1, weights, use_reentrant=False)


def num_edges(nodes: int) -> int:
    return sum(i + 2 for i in range(nodes))


class SearchNetwork(nn.Module):
    """DARTS' search network: stem (multiplier 3; the op set's ``stem``), ``layers`` cells, separate alphas
    for normal and reduction cells, BN without affine parameters inside the mixed ops."""

    def __init__(self, op_set: OpSet, channels: int = 16, layers: int = 8, nodes: int = 4, num_classes: int = 10,
                 in_channels: int = 3, stem_multiplier: int = 3, checkpoint_cells: bool = False,
                 mixed_op: type[nn.Module] = MixedOp, stacked: bool | None = None) -> None:
        super().__init__()
        self.op_set = op_set
        self.nodes = nodes
        self.checkpoint_cells = checkpoint_cells  # recompute cell activations in backward: less memory
        c_curr = stem_multiplier * channels
        self.stem = stem(in_channels, c_curr, op_set.stem)
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for reduction in cell_layout(layers):
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(op_set, nodes, c_pp, c_p, c_curr, reduction, reduction_prev, mixed_op,
                                         stacked))
            reduction_prev = reduction
            c_pp, c_p = c_p, nodes * c_curr
        self.global_pooling = GlobalAvgPool2d()
        self.classifier = nn.Linear(c_p, num_classes)
        k, n_ops = num_edges(nodes), len(op_set.primitives)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(k, n_ops))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(k, n_ops))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def named_weights(self) -> dict[str, nn.Parameter]:
        """Every parameter except the alphas, by name (for functional calls with substituted weights)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("alpha_")}

    def weights(self) -> list[nn.Parameter]:
        return list(self.named_weights().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alpha_normal, dim=-1)
        w_reduce = F.softmax(self.alpha_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            weights = w_reduce if cell.reduction else w_normal
            if self.checkpoint_cells and torch.is_grad_enabled():
                s0, s1 = s1, _checkpointed(cell, s0, s1, weights)
            else:
                s0, s1 = s1, cell(s0, s1, weights)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self) -> Genotype:
        return derive_genotype(F.softmax(self.alpha_normal, -1), F.softmax(self.alpha_reduce, -1), self.op_set,
                               self.nodes)


def derive_genotype(weights_normal: torch.Tensor, weights_reduce: torch.Tensor, op_set: OpSet,
                    nodes: int = 4) -> Genotype:
    """DARTS' discretisation: per node keep the two incoming edges whose strongest non-``none`` op is
    strongest, each with that op. All nodes are concatenated."""
    prims = op_set.primitives
    allowed = [i for i, p in enumerate(prims) if p != "none"]

    def parse(weights: torch.Tensor) -> list[tuple[str, int]]:
        w = weights.detach().float().cpu()
        gene, start = [], 0
        for i in range(nodes):
            block = w[start:start + i + 2][:, allowed]
            best_val, best_idx = block.max(dim=1)
            inputs = sorted(range(i + 2), key=lambda j: -best_val[j].item())[:2]
            gene += [(prims[allowed[best_idx[j].item()]], j) for j in inputs]
            start += i + 2
        return gene

    concat = tuple(range(2, nodes + 2))
    return Genotype(tuple(parse(weights_normal)), concat, tuple(parse(weights_reduce)), concat, op_set.options)


def alpha_entropy(weights: torch.Tensor) -> float:
    """Mean per-edge entropy (nats) of softmax(alpha): how undecided the search still is."""
    w = weights.detach().float().clamp_min(1e-12)
    return float(-(w * w.log()).sum(-1).mean())
