"""The stacked search cell (the CUDA path, nas.fused) computes what the per-op reference network computes,
given the same weights: logits, weight and alpha gradients, running statistics, first and second order.
The CUDA code path runs here on CPU tensors (nas.kernels.native_kernels), in float64."""

import pytest
import torch
import torch.nn.functional as F

from nas import architect
from nas.fused import StackedCell
from nas.kernels import native_kernels
from nas.ops import OpOptions
from nas.opsets import OP_SETS, OpSet, first_release_preset, resolve_op_set
from nas.reference import PlainArchitect, plain_network
from nas.search_network import SearchNetwork

OP_SET_CASES = {
    "pibconv": OP_SETS["pibconv"],
    "darts": OP_SETS["darts"],  # sep convs (two stacked units), pooling followed by BN
    "convnext": OP_SETS["convnext"],
    "darts_gelu_ln": OP_SETS["darts_gelu_ln"],  # LayerNorm in the ops
    "pibconv_released": OP_SETS["pibconv_released"],
    "pibconv F2.5": resolve_op_set("pibconv", 2.5),  # uneven groups
    "pibconv F2.5 gcd": first_release_preset("pibconv").with_ratio(2.5),
}
# smooth (GELU everywhere) for the second-order finite differences, every op family present
SMOOTH = OpSet(OP_SETS["pibconv"].primitives, OpOptions("gelu", "bn", 2.0, activation_scope="all"))


def fast_name(fast, name):
    """The fast network's name for a plain network's parameter or buffer (fast edges skip 'none')."""
    parts = name.split(".")
    if "ops" in parts:
        i = parts.index("ops")
        edge = fast.get_submodule(".".join(parts[:i]))
        j = int(parts[i + 1])
        if j not in edge.index:
            return None
        parts[i + 1] = str(edge.index.index(j))
    return ".".join(parts)


def twins(op_set, layers=3, stacked=True, checkpoint_cells=False):
    torch.manual_seed(0)
    plain = plain_network(op_set, 4, layers, num_classes=3, in_channels=3).double()
    fast = SearchNetwork(op_set, 4, layers, 4, 3, 3, checkpoint_cells=checkpoint_cells, stacked=stacked).double()
    state = {fast_name(fast, n): v for n, v in plain.state_dict().items() if fast_name(fast, n) is not None}
    fast.load_state_dict(state)
    with torch.no_grad():
        for a, b in zip(fast.arch_parameters(), plain.arch_parameters()):
            a.normal_(0, 0.5)
            b.copy_(a)
    return fast, plain


def batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=gen)
    return (x[:4], torch.tensor([0, 1, 2, 0])), (x[4:], torch.tensor([2, 1, 0, 1]))


def assert_same_state(fast, plain, grads=True):
    fast_params = dict(fast.named_parameters())
    for name, p in plain.named_parameters():
        mine = fast_params.get(fast_name(fast, name))
        if mine is None:
            assert name.split(".")[-2] == "0" or p.grad is None or not p.grad.abs().any()  # 'none' has no weights
            continue
        torch.testing.assert_close(mine, p, rtol=0, atol=1e-6, msg=name)
        if grads:
            torch.testing.assert_close(mine.grad, p.grad, rtol=1e-6, atol=1e-6, msg=f"grad of {name}")
    fast_buffers = dict(fast.named_buffers())
    for name, b in plain.named_buffers():
        if fast_name(fast, name) is not None:
            torch.testing.assert_close(fast_buffers[fast_name(fast, name)].double(), b.double(), rtol=1e-6,
                                       atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(OP_SET_CASES))
def test_stacked_cell_equals_the_reference_network(case):
    """Logits, every weight gradient, alpha's gradient and the BN running statistics, after a training
    pass; then logits in eval mode (which read those statistics)."""
    fast, plain = twins(OP_SET_CASES[case])
    (x, y), _ = batches()
    with native_kernels():
        logits = fast(x)
    torch.testing.assert_close(logits, plain(x), rtol=1e-6, atol=1e-6)
    with native_kernels():
        F.cross_entropy(fast(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    assert_same_state(fast, plain)
    fast.eval(), plain.eval()
    with torch.no_grad(), native_kernels():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2])
def test_stacked_alpha_gradients_equal_plain_darts(order):
    fast, plain = twins(SMOOTH)
    train, valid = batches()
    opt_f = torch.optim.SGD(fast.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    opt_p = torch.optim.SGD(plain.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    with native_kernels():
        for model, opt in ((fast, opt_f), (plain, opt_p)):  # one weight step: momentum buffers in play
            opt.zero_grad()
            F.cross_entropy(model(train[0]), train[1]).backward()
            opt.step()
        if order == 2:
            g_fast = architect.second_order_alpha_grads(fast, train, valid, 0.1, 0.9, 3e-4,
                                                        architect.momentum_buffers(opt_f, fast))
        else:
            g_fast = architect.first_order_alpha_grads(fast, valid)
    ref = PlainArchitect(plain, lambda: plain_network(SMOOTH, 4, 3, num_classes=3, in_channels=3).double(), 0.9,
                         3e-4)
    g_plain = ref.alpha_grads(train, valid, 0.1, opt_p, unrolled=order == 2)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_stacked_exact_hypergradient_equals_the_per_op_one():
    """Double backward (create_graph) through the stacked filters, norms and mixing."""
    grads = []
    for stacked in (False, True):
        fast, _ = twins(SMOOTH, layers=2, stacked=stacked)
        train, valid = batches()
        buffers = {n: torch.full_like(p, 0.01) for n, p in fast.named_weights().items()}
        with native_kernels():
            grads.append(architect.exact_unrolled_alpha_grads(fast, train, valid, 0.1, 0.9, 3e-4, buffers))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_stacked_cell_with_checkpointing_updates_statistics_once():
    states = []
    for checkpoint_cells in (False, True):
        fast, _ = twins(OP_SETS["pibconv"], checkpoint_cells=checkpoint_cells)
        (x, y), _ = batches()
        with native_kernels():
            F.cross_entropy(fast(x), y).backward()
        states.append(({n: b.clone() for n, b in fast.named_buffers()},
                       {n: p.grad.clone() for n, p in fast.named_weights().items() if p.grad is not None}))
    for a, b in zip(*states):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=name)


def test_the_device_picks_the_path(monkeypatch):
    """CPU tensors take the per-edge MixedOps, the CUDA code path the stacked cell; ``stacked`` forces one."""
    calls = []
    original = StackedCell.forward
    monkeypatch.setattr(StackedCell, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    x = torch.randn(2, 3, 8, 8)
    auto = SearchNetwork(OP_SETS["pibconv"], 4, 2, 4, 3, 3)
    auto(x)
    assert calls == []
    with native_kernels():
        auto(x)
    assert len(calls) == 2  # one per cell
    SearchNetwork(OP_SETS["pibconv"], 4, 2, 4, 3, 3, stacked=True)(x)
    assert len(calls) == 4
    with native_kernels():
        SearchNetwork(OP_SETS["pibconv"], 4, 2, 4, 3, 3, stacked=False)(x)
    assert len(calls) == 4


def test_stacked_cell_keeps_the_state_dict():
    """Same keys and shapes with and without the stacked path: checkpoints load either way."""
    a = SearchNetwork(OP_SETS["pibconv"], 4, 3, 4, 3, 3, stacked=True).state_dict()
    b = SearchNetwork(OP_SETS["pibconv"], 4, 3, 4, 3, 3, stacked=False).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_first_order_step_dispatch_count_stays_under_the_target():
    """The yardstick that needs no GPU (``dartsweep bench search --count-ops``): ATen ops one first-order
    search step dispatches on the CUDA code path at the bench config (C 16, 5 layers, 4 nodes, pibconv).
    Deterministic; the target is 9,500 (the per-op step dispatched ~30,000)."""
    from nas.bench import count_ops

    args = {"C": 16, "layers": 5, "batch": 2, "size": 8, "order": 1, "channels_last": True,
            "checkpoint_cells": False, "device": "cpu", "threads": 2, "steps": 1}
    assert count_ops("search", True, args, "cuda") <= 9500
