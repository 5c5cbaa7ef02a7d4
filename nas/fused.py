"""The search cell's stacked path (used on CUDA): per source state, every outgoing edge's ops of one family
run as one op over channels stacked side by side.

A DARTS cell computes 14 edges x ~10 candidate ops, each a chain of small modules on tensors too small to
fill a GPU, so a step is bound by the host launching ~100k kernels. All edges leaving one state read the
same input, and the ops of one family (``pib_conv_3x3/5x5/7x7``, ``dil_conv_3x3/5x5``, ...) differ only in
kernel size. So, per source state and family: one conv whose filters are every member's, zero-padded to the
family's largest kernel (exact for odd, centred kernels of one dilation); grouped convs where members follow
each other along channels; one BatchNorm over the stacked channels (per channel, so exact); parameter-free
ops computed once per state; one weighted sum per family. The parameters and buffers stay each op's own
(same ``state_dict``); the stacked filters are built from them in every pass, so autograd, ``functional_call``
and the architect's in-place weight swaps see them as before. What is equal to what, and to which
tolerance: tests/test_fused.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.ops import FactorizedReduce, LayerNorm2d, UnevenGroupedConv2d, shifted_by_one

_ACTIVATIONS = (nn.ReLU, nn.GELU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def layers_of(op: nn.Module) -> list[nn.Module]:
    """``op`` as a flat chain of layers (nested ``nn.Sequential`` unrolled, identities dropped)."""
    if isinstance(op, nn.Sequential):
        return [layer for child in op for layer in layers_of(child)]
    return [] if isinstance(op, nn.Identity) else [op]


def _centred(conv: nn.Conv2d) -> bool:
    """Odd kernel with padding dilation * (k - 1) / 2 on both axes: padding it with zeros to a larger odd
    size (and its padding to match) computes the same output."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and all(
        k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))


def _conv_signature(conv: nn.Conv2d) -> tuple:
    shape = "centred" if _centred(conv) else (conv.kernel_size, conv.padding, conv.padding_mode)
    return ("conv", conv.in_channels, conv.out_channels, conv.groups, conv.stride, conv.dilation,
            conv.bias is not None, shape)


def _norm_signature(norm: nn.Module) -> tuple:
    if isinstance(norm, LayerNorm2d):
        return ("ln", norm.norm.normalized_shape, norm.norm.elementwise_affine, norm.norm.eps)
    return ("bn", norm.num_features, norm.affine, norm.track_running_stats, norm.eps, norm.momentum)


def signature(op: nn.Module) -> tuple | None:
    """What two ops must share to run stacked: per layer its kind and every setting but an odd, centred
    kernel's size. None where a layer has no stacked form (the op then runs on its own)."""
    out = []
    for layer in layers_of(op):
        if isinstance(layer, _ACTIVATIONS):
            out.append((type(layer).__name__, getattr(layer, "approximate", None)))
        elif isinstance(layer, _POOLS):
            out.append((type(layer).__name__, repr(layer)))
        elif isinstance(layer, nn.Conv2d):
            out.append(_conv_signature(layer))
        elif isinstance(layer, (nn.BatchNorm2d, LayerNorm2d)):
            out.append(_norm_signature(layer))
        elif isinstance(layer, UnevenGroupedConv2d):
            out.append(("uneven", layer.split, _conv_signature(layer.wide), _conv_signature(layer.narrow)))
        elif isinstance(layer, FactorizedReduce):
            out.append(("factorized_reduce", _conv_signature(layer.conv_1), type(layer.act).__name__,
                        _norm_signature(layer.norm)))
        else:
            return None
    return tuple(out)


class _StackedFilters(torch.autograd.Function):
    """Filters one after another along output channels, each zero-padded to ``k_max`` (one pad per run of
    equal kernel sizes, not per filter). Its backward hands every filter its gradient with one ``split``
    per run rather than a slice per filter (autograd's for ``cat``): one dispatch, not dozens, per layer."""

    @staticmethod
    def forward(ctx, k_max, *weights):  # noqa: ANN001 - autograd signature
        runs, start = [], 0
        while start < len(weights):
            end = start
            while end < len(weights) and weights[end].shape[2:] == weights[start].shape[2:]:
                end += 1
            runs.append((start, end))
            start = end
        ctx.runs, ctx.k_max = runs, k_max
        ctx.shapes = [w.shape for w in weights]
        blocks = []
        for start, end in runs:
            w = weights[start] if end - start == 1 else torch.cat(weights[start:end])
            ph, pw = ((k_max[i] - w.shape[2 + i]) // 2 for i in range(2))
            blocks.append(F.pad(w, (pw, pw, ph, ph)) if ph or pw else w)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        shapes = ctx.shapes
        sizes = [sum(shapes[i][0] for i in range(start, end)) for start, end in ctx.runs]
        grads = []
        for (start, end), part in zip(ctx.runs, grad.split(sizes) if len(sizes) > 1 else (grad,)):
            kh, kw = shapes[start][2:]
            ph, pw = (ctx.k_max[0] - kh) // 2, (ctx.k_max[1] - kw) // 2
            if ph or pw:
                part = part[:, :, ph:ph + kh, pw:pw + kw]
            grads += part.split([shapes[i][0] for i in range(start, end)]) if end - start > 1 else [part]
        return None, *grads


def stacked_filters(convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    """The convs' filters one after another along output channels, each zero-padded to the largest kernel
    (:class:`_StackedFilters`)."""
    if len(convs) == 1:
        return convs[0].weight
    return _StackedFilters.apply(max(c.kernel_size for c in convs), *(c.weight for c in convs))


def _stacked_conv(x: torch.Tensor, shared: bool, convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    """Every member's conv at once. ``shared``: ``x`` is every member's input (a dense conv then just has
    more filters; a grouped one reads ``x`` once per member); else member m's input is the m-th block of
    ``x``'s channels, and the conv is grouped by member."""
    first, members = convs[0], len(convs)
    weight = stacked_filters(convs)
    bias = torch.cat([c.bias for c in convs]) if first.bias is not None else None
    if _centred(first):
        padding = tuple(d * (k - 1) // 2 for k, d in zip(weight.shape[2:], first.dilation))
    else:
        padding = first.padding
    groups = first.groups
    if not (shared and groups == 1):
        if shared:
            x = x.repeat(1, members, 1, 1)
        groups *= members
    return F.conv2d(x, weight, bias, first.stride, padding, first.dilation, groups)


def _stacked_norm(x: torch.Tensor, norms: Sequence[nn.Module], running: dict) -> torch.Tensor:
    """Every member's norm over its own channels of ``x``: one BatchNorm over all channels (BN is per
    channel), on running statistics the cell gathered for the pass (``running``; see
    :meth:`StackedCell._gather_running_stats`), or one LayerNorm over each member's channels."""
    first, members = norms[0], len(norms)
    if isinstance(first, LayerNorm2d):
        n, _, h, w = x.shape
        c = first.norm.normalized_shape[0]
        y = F.layer_norm(x.reshape(n, members, c, h, w).permute(0, 1, 3, 4, 2), (c,), None, None, first.norm.eps)
        if first.norm.elementwise_affine:
            y = torch.addcmul(torch.stack([m.norm.bias for m in norms]).view(members, 1, 1, c), y,
                              torch.stack([m.norm.weight for m in norms]).view(members, 1, 1, c))
        return y.permute(0, 1, 4, 2, 3).reshape(n, members * c, h, w)
    means, variances = running.get(id(first), (None, None))
    momentum = first.momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d (the cell has counted this batch)
        momentum = 1.0 / float(first.num_batches_tracked) if first.training and first.track_running_stats else 0.0
    weight = torch.cat([m.weight for m in norms]) if first.affine else None
    bias = torch.cat([m.bias for m in norms]) if first.affine else None
    return F.batch_norm(x, means, variances, weight, bias, first.training or not first.track_running_stats,
                        momentum, first.eps)


def _stacked_uneven(x: torch.Tensor, convs: Sequence[UnevenGroupedConv2d]) -> torch.Tensor:
    """PIBConv's uneven grouped conv (non-integer F) for every member: the wide and the narrow groups of
    all members as two grouped convs, their outputs interleaved back per member."""
    first, members = convs[0], len(convs)
    n, channels, h, w = x.shape
    per = x.reshape(n, members, channels // members, h, w)
    wide = _stacked_conv(per[:, :, :first.split].reshape(n, -1, h, w), False, [c.wide for c in convs])
    narrow = _stacked_conv(per[:, :, first.split:].reshape(n, -1, h, w), False, [c.narrow for c in convs])
    ho, wo = wide.shape[2:]
    return torch.cat([wide.reshape(n, members, -1, ho, wo), narrow.reshape(n, members, -1, ho, wo)],
                     2).reshape(n, -1, ho, wo)


def _stacked_factorized_reduce(x: torch.Tensor, reduces: Sequence[FactorizedReduce], activated: dict,
                               running: dict) -> torch.Tensor:
    """Every member's FactorizedReduce of the shared input ``x`` (DARTS' form: the two offset stride-2
    1x1 convs of all members as two convs, their halves interleaved per member, then one norm)."""
    first, members = reduces[0], len(reduces)
    a = _activate(x, first.act, x, activated)
    shifted = shifted_by_one(a)  # first, as FactorizedReduce.darts_forward does (the gradient's layout)
    even = _stacked_conv(a, True, [r.conv_1 for r in reduces])
    odd = _stacked_conv(shifted, True, [r.conv_2 for r in reduces])
    n, _, h, w = even.shape
    y = torch.cat([even.view(n, members, -1, h, w), odd.view(n, members, -1, h, w)], 2).reshape(n, -1, h, w)
    return _stacked_norm(y, [r.norm for r in reduces], running)


def _activate(t: torch.Tensor, act: nn.Module, source: torch.Tensor, activated: dict) -> torch.Tensor:
    """``act(t)``, computed once per source state for the state itself (every family opening with it shares it)."""
    if t is not source:
        return act(t)
    key = (type(act), getattr(act, "approximate", None))
    if key not in activated:
        activated[key] = act(t)
    return activated[key]


def run_stacked(x: torch.Tensor, chains: Sequence[Sequence[nn.Module]], activated: dict,
                running: dict) -> tuple[torch.Tensor, bool]:
    """Members' layer chains (one signature) over the shared input ``x``: (output, shared). ``shared``:
    every member's output is this one tensor (parameter-free chains); else member m's output is the m-th
    block of the output's channels. ``activated``: activations of ``x`` already computed; ``running``:
    the BatchNorms' running statistics for this pass."""
    members = len(chains)
    t, shared = x, True
    for position in range(len(chains[0])):
        layers = [chain[position] for chain in chains]
        first = layers[0]
        if isinstance(first, _ACTIVATIONS):
            t = _activate(t, first, x, activated)
        elif isinstance(first, _POOLS):  # per channel: one call serves shared and stacked inputs alike
            t = first(t)
        elif isinstance(first, nn.Conv2d):
            t, shared = _stacked_conv(t, shared, layers), False
        elif isinstance(first, (nn.BatchNorm2d, LayerNorm2d)):
            t, shared = _stacked_norm(t.repeat(1, members, 1, 1) if shared else t, layers, running), False
        elif isinstance(first, UnevenGroupedConv2d):
            t, shared = _stacked_uneven(t.repeat(1, members, 1, 1) if shared else t, layers), False
        elif isinstance(first, FactorizedReduce):
            t, shared = _stacked_factorized_reduce(t, layers, activated, running), False
        else:  # unreachable: signature() admits only the kinds above
            raise TypeError(f"no stacked form for {type(first).__name__}")
    return t, shared


@dataclass(frozen=True)
class _Family:
    """Ops of one signature on every edge leaving a source: ``chains`` ordered op-major, edge-minor (each a
    chain of layers, or the op itself where it has no stacked form), and ``shared`` where the chain is
    parameter-free (its output is the same for every edge: computed once)."""

    chains: tuple[tuple[nn.Module, ...], ...]
    ops: int
    stackable: bool
    shared: bool


class StackedCell(nn.Module):
    """The stacked computation of a search cell's nodes from its two preprocessed inputs. It holds only
    index buffers and reads the ops (and so their current parameters) from ``edges`` in every pass."""

    def __init__(self, edges: nn.ModuleList, nodes: int, num_primitives: int) -> None:
        super().__init__()
        self.nodes = nodes
        self.families: list[list[_Family]] = []
        self.norm_groups: list[list[nn.BatchNorm2d]] = []  # the stacked BatchNorms' members
        # a source state's first target node: states 0 and 1 feed every node, node i feeds nodes i+1...
        self.first_target = [max(0, source - 1) for source in range(nodes + 1)]
        offsets = [sum(i + 2 for i in range(node)) for node in range(nodes)]
        for source in range(nodes + 1):
            edge_ids = [offsets[node] + source for node in range(self.first_target[source], nodes)]
            ops = edges[edge_ids[0]].ops
            by_signature: dict[tuple, list[int]] = {}
            alone = []  # ops with no stacked form: each its own family
            for position, op in enumerate(ops):
                sig = signature(op)
                if sig is None:
                    alone.append(position)
                else:
                    by_signature.setdefault(sig, []).append(position)
            families = []
            for positions, stackable in [(p, True) for p in by_signature.values()] + [([p], False) for p in alone]:
                chains = tuple(tuple(layers_of(edges[e].ops[p])) if stackable else (edges[e].ops[p],)
                               for p in positions for e in edge_ids)
                shared = stackable and all(isinstance(layer, _ACTIVATIONS + _POOLS) for layer in chains[0])
                index = [e * num_primitives + edges[e].index[p] for p in positions for e in edge_ids]
                families.append((_Family(chains, len(positions), stackable, shared), index))
            # stacked families first, then the shared ones, each family's weights op-major, edge-minor
            families.sort(key=lambda pair: pair[0].shared)
            self.families.append([family for family, _ in families])
            for family, _ in families:
                if family.stackable and not family.shared:
                    for position, layer in enumerate(family.chains[0]):
                        if isinstance(layer, nn.BatchNorm2d):
                            self.norm_groups.append([chain[position] for chain in family.chains])
                        elif isinstance(layer, FactorizedReduce) and isinstance(layer.norm, nn.BatchNorm2d):
                            self.norm_groups.append([chain[position].norm for chain in family.chains])
            self.register_buffer(f"weight_index_{source}", torch.tensor([i for _, index in families for i in index]),
                                 persistent=False)

    def _source(self, source: int, x: torch.Tensor, weights: torch.Tensor, running: dict) -> torch.Tensor:
        """Every op of every edge leaving state ``x``, mixed per edge: (N, edges, C, H, W)."""
        edges = self.nodes - self.first_target[source]
        mixing = weights.reshape(-1).index_select(0, getattr(self, f"weight_index_{source}"))
        activated: dict = {}
        total, start, shared_outputs = None, 0, []
        for family in self.families[source]:
            if family.shared:  # one output for every edge, mixed below with the other shared ones
                shared_outputs += [run_stacked(x, family.chains[:1], activated, running)[0]] * family.ops
                continue
            if family.stackable:
                y = run_stacked(x, family.chains, activated, running)[0]
            else:
                y = torch.cat([chain[0](x) for chain in family.chains], 1)
            n, _, h, w = y.shape
            count = family.ops * edges
            part = (y.reshape(n, family.ops, edges, -1, h, w)
                    * mixing[start:start + count].view(1, family.ops, edges, 1, 1, 1)).sum(1)
            start += count
            total = part if total is None else total + part
        if shared_outputs:
            ops = len(shared_outputs)
            part = (torch.stack(shared_outputs, 1).unsqueeze(2) * mixing[start:].view(1, ops, edges, 1, 1, 1)).sum(1)
            total = part if total is None else total + part
        return total

    def _gather_running_stats(self) -> tuple[dict, list[nn.BatchNorm2d], torch.Tensor | None, torch.Tensor | None]:
        """The running statistics of every stacked BatchNorm of the cell, gathered into one mean and one
        variance tensor (each stacked norm updates its block in place), and their batch counters advanced:
        a handful of dispatches per cell rather than several per norm."""
        groups = [g for g in self.norm_groups if g[0].track_running_stats]
        norms = [m for g in groups for m in g]
        if not norms:
            return {}, [], None, None
        if norms[0].training:
            with torch.no_grad():
                torch._foreach_add_([m.num_batches_tracked for m in norms], 1)
        means = torch.cat([m.running_mean for m in norms])
        variances = torch.cat([m.running_var for m in norms])
        sizes = [sum(m.num_features for m in g) for g in groups]
        running = {id(g[0]): pair for g, pair in zip(groups, zip(means.split(sizes), variances.split(sizes)))}
        return running, norms, means, variances

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        running, norms, means, variances = self._gather_running_stats()
        states = [s0, s1]
        mixed: list[torch.Tensor] = []
        for node in range(self.nodes):
            while len(mixed) < len(states):
                mixed.append(self._source(len(mixed), states[len(mixed)], weights, running))
            value = None
            for source in range(node + 2):
                term = mixed[source].select(1, node - self.first_target[source])
                value = term if value is None else value + term
            states.append(value)
        if norms and norms[0].training:  # each norm's statistics back into its own buffers
            with torch.no_grad():
                sizes = [m.num_features for m in norms]
                torch._foreach_copy_([m.running_mean for m in norms] + [m.running_var for m in norms],
                                     [*means.split(sizes), *variances.split(sizes)])
        return torch.cat(states[2:], dim=1)
