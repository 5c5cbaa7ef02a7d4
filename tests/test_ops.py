import math

import pytest
import torch

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


def test_pib_params_F_1_5_grouped_form():
    C, K, F = 16, 3, 1.5
    c_inv = round(F * C)  # 24
    groups = math.gcd(c_inv, C)  # 8
    op = build_op("pib_conv_3x3", C, 1, False, OpOptions("gelu", "bn", F))
    expected = K * K * C + C * c_inv + (c_inv // groups) * C * K * K + C * C
    assert conv_weights(op) == expected == 1216


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
