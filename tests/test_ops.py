import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nas.errors import ConfigError
from nas.ops import PRIMITIVES, OpOptions, build_op
from nas.opsets import OP_SETS, OpSet, resolve_op_set


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("options", [OpOptions(), OpOptions("gelu", "ln", 1.5)])
def test_every_primitive_shapes(name, stride, options):
    op = build_op(name, 8, stride, True, options)
    for size in (8, 7):  # odd sizes too
        x = torch.randn(2, 8, size, size)
        y = op(x)
        expected = size if stride == 1 else math.ceil(size / 2)
        assert y.shape == (2, 8, expected, expected), (name, stride, size)


def conv_weights(module):
    return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 4)


@pytest.mark.parametrize("F", [1, 2, 3, 4])
@pytest.mark.parametrize("C,K", [(16, 3), (32, 5), (36, 7)])
def test_pib_params_whole_F_match_equation_2(F, C, K):
    op = build_op(f"pib_conv_{K}x{K}", C, 1, False, OpOptions("gelu", "bn", F))
    # Paper eq. (2): (F+1)C^2 + 2K^2C, where it counts the grouped kxk conv (C_inv -> C, groups = C) as K^2 C;
    # with groups = C each output channel sees F inputs, so the conv holds F K^2 C, i.e. (F-1)K^2C more.
    assert conv_weights(op) == (F + 1) * C * C + 2 * K * K * C + (F - 1) * K * K * C
    convs = [m for m in op.modules() if isinstance(m, torch.nn.Conv2d)]
    grouped = convs[2]  # dw kxk, 1x1 up, grouped kxk, 1x1
    assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (F * C, C, C)


def test_pib_params_F_1_5_both_groupings():
    C, K, F = 16, 3, 1.5
    c_inv = round(F * C)  # 24
    # per_channel (today's): every output channel reads 1 or 2 of the 24 channels: K^2 C_inv weights
    op = build_op("pib_conv_3x3", C, 1, False, OpOptions("gelu", "bn", F))
    assert conv_weights(op) == K * K * C + C * c_inv + K * K * c_inv + C * C == 1000
    # gcd (the first release's): gcd(24, 16) = 8 groups of 3 -> 2 channels
    groups = math.gcd(c_inv, C)
    op = build_op("pib_conv_3x3", C, 1, False, OpOptions("gelu", "bn", F, pib_groups="gcd"))
    assert conv_weights(op) == K * K * C + C * c_inv + (c_inv // groups) * C * K * K + C * C == 1216


@pytest.mark.parametrize("c_in,c_out", [(24, 16), (81, 36), (20, 16), (47, 16)])
def test_uneven_grouped_conv_is_a_masked_dense_conv(c_in, c_out):
    """Output channel o reads only its own input channels: equal to a dense conv whose weight is zero
    outside those blocks, with floor/ceil(c_in / c_out) channels per output."""
    from nas.ops import UnevenGroupedConv2d

    conv = UnevenGroupedConv2d(c_in, c_out, 3, 1).double()
    dense = torch.zeros(c_out, c_in, 3, 3, dtype=torch.float64)
    start, sizes = 0, []
    for o in range(c_out):
        part = conv.wide if o < conv.wide.out_channels else conv.narrow
        row = o if part is conv.wide else o - conv.wide.out_channels
        n = part.in_channels // part.groups
        dense[o, start:start + n] = part.weight[row, :]
        start, sizes = start + n, sizes + [n]
    assert start == c_in and set(sizes) <= {c_in // c_out, -(-c_in // c_out)}
    x = torch.randn(2, c_in, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, dense, padding=1))
    assert sum(p.numel() for p in conv.parameters()) == 9 * c_in


@pytest.mark.parametrize("C", [16, 36])
def test_pib_cost_grows_with_F(C):
    """F = 1 ... 4.5 in steps of 0.25: params and GMACs never decrease (the gcd grouping zig-zagged)."""
    from nas.complexity import complexity
    from nas.genotypes import PIBCONV

    costs = [complexity(replace(PIBCONV, options=replace(PIBCONV.options, bottleneck_ratio=1 + 0.25 * i)), 5, C)
             for i in range(15)]
    params, gmacs = [c.params_m for c in costs], [c.gmac for c in costs]
    assert params == sorted(params) and gmacs == sorted(gmacs) and params[0] < params[-1]


def test_convnext_params_equation_1():
    C, K = 16, 5
    op = build_op("convnext_5x5", C, 1, False, OpOptions("gelu", "bn", 4))
    assert conv_weights(op) == 2 * 4 * C * C + K * K * C


def test_op_options_validation():
    with pytest.raises(ConfigError, match="bottleneck ratio"):
        OpOptions(bottleneck_ratio=0)
    with pytest.raises(ConfigError, match="activation"):
        OpOptions(activation="swish")
    with pytest.raises(ConfigError, match="unknown primitive 'sep_conv_9x9'"):
        build_op("sep_conv_9x9", 8, 1, True, OpOptions())


def test_op_set_ids_are_stable_and_readable():
    assert resolve_op_set("pibconv").id == "pibconv"
    assert resolve_op_set("pibconv", 2.5).id == "pibconv-F2.5"
    assert resolve_op_set("darts", 3.0).id == "darts"  # F does not change DARTS ops
    custom = OpSet(("none", "skip_connect", "pib_conv_3x3"))
    assert custom.id.startswith("custom-") and custom.id == OpSet.from_dict(custom.to_dict()).id
    assert len(OP_SETS["pibconv"].primitives) == 10
    with pytest.raises(ConfigError, match="unknown op set"):
        resolve_op_set("nope")
    with pytest.raises(ConfigError, match="unknown primitive"):
        OpSet.from_dict({"primitives": ["none", "bogus"]})


def test_mixed_op_computes_a_shared_activation_once():
    from nas.search_network import MixedOp

    prims = ("none", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7", "pib_conv_3x3", "max_pool_3x3", "sep_conv_3x3",
             "sep_conv_5x5")
    # GELU everywhere (the first release's form): dilated, 7x1-1x7 and separable convs share one GELU
    mixed = MixedOp(OpSet(prims, OpOptions("gelu", "bn", 2.0, activation_scope="all")), 4, 1)
    assert set(mixed.shared_acts) == {"gelu"} and isinstance(mixed.shared_acts["gelu"], torch.nn.GELU)
    assert [t is not None for t in mixed._tails] == [True, True, True, False, False, True, True]
    # GELU in the blocks (the released code's): dilated and 7x1-1x7 share a ReLU, separable convs a GELU
    mixed = MixedOp(OpSet(prims, OpOptions("gelu", "bn", 2.0)), 4, 1)
    assert mixed._shared == ["relu", "relu", "relu", None, None, "gelu", "gelu"]
    calls = []
    for module in [*mixed.modules(), *mixed.shared_acts.values()]:
        if isinstance(module, (torch.nn.GELU, torch.nn.ReLU)):
            module.register_forward_hook(lambda m, i, o: calls.append(m))
    x = torch.randn(2, 4, 6, 6)
    weights = torch.softmax(torch.randn(8), 0)
    out = mixed(x, weights)
    # each shared one once, pib_conv's inner GELU, and the separable convs' second activations
    assert calls.count(mixed.shared_acts["relu"]) == 1 and calls.count(mixed.shared_acts["gelu"]) == 1
    assert len(calls) == 5
    expected = sum(weights[i] * op(x) for i, op in zip(mixed.index, mixed.ops))  # each op on its own
    torch.testing.assert_close(out, expected)


def _cl_grad(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_factorized_reduce_equals_its_stride_two_convs(size, channels_last):
    """FactorizedReduce's even-size path (activation and 1x1 convs on the even / odd pixels only) equals
    DARTS' definition: act, two offset stride-2 1x1 convs, concatenation, norm. The input's gradient keeps
    the input's layout."""
    from nas.ops import FactorizedReduce

    torch.manual_seed(0)
    reduce = FactorizedReduce(6, 8, affine=False, activation="gelu").double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    reduce = reduce.to(memory_format=fmt)
    x = torch.randn(3, 6, size, size, dtype=torch.float64).to(memory_format=fmt).requires_grad_()

    def reference(t):
        t = F.gelu(t)
        shifted = F.pad(t[:, :, 1:, 1:], (0, size % 2, 0, size % 2))
        halves = [F.conv2d(t, reduce.conv_1.weight, stride=2), F.conv2d(shifted, reduce.conv_2.weight, stride=2)]
        return F.batch_norm(torch.cat(halves, 1), None, None, training=True, eps=reduce.norm.eps)

    y = reduce(x)
    torch.testing.assert_close(y, reference(x))
    g = torch.randn_like(y)
    params = (x, reduce.conv_1.weight, reduce.conv_2.weight)
    grads = torch.autograd.grad(y, params, g)
    for a, b in zip(grads, torch.autograd.grad(reference(x), params, g)):
        torch.testing.assert_close(a, b)
    if channels_last:
        assert _cl_grad(grads[0])
    torch.autograd.gradgradcheck(lambda t: reduce(t).pow(2), (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_op_weighted_sum_gradients(channels_last):
    """MixedOp's weighted sum (alpha's gradient as dot products) gives autograd's gradients for x, the
    softmax weights, the running node sum and every op's weights, including second order."""
    from nas.search_network import MixedOp

    torch.manual_seed(0)
    op_set = OpSet(("none", "skip_connect", "pib_conv_3x3", "dil_conv_3x3", "max_pool_3x3"),
                   OpOptions("gelu", "bn", 2.0))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mixed = MixedOp(op_set, 4, 1).double().to(memory_format=fmt)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    node = torch.randn(2, 4, 6, 6, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    alpha = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def reference(x, node, alpha):
        w = torch.softmax(alpha, 0)
        return node + sum(w[i] * op(x) for i, op in zip(mixed.index, mixed.ops))

    inputs = (x, node, alpha, *mixed.parameters())
    g = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = mixed(x, torch.softmax(alpha, 0), node)
    torch.testing.assert_close(out, reference(x, node, alpha))
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(reference(x, node, alpha), inputs, g)):
        torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(mixed(x, torch.softmax(alpha, 0)).pow(2).sum(), alpha, create_graph=True)[0]
    ga_ref = torch.autograd.grad((reference(x, node, alpha) - node).pow(2).sum(), alpha, create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(ga.sum(), x)[0], torch.autograd.grad(ga_ref.sum(), x)[0])
