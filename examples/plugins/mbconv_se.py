"""An example plugin: MobileNetV2/EfficientNet's inverted bottleneck with squeeze-and-excitation (MBConv-SE)
as DARTS candidate ops, and a preset that searches them beside the paper's PIBConv blocks.

Name it in a sweep file (``plugins: [plugins/mbconv_se.py]``, relative to the sweep file) or pass it to a
command (``dartsweep complexity --op-set mbconv_pib --plugin examples/plugins/mbconv_se.py``). dartsweep
ships the file to every Ray node itself; nothing needs installing there.
"""

import torch
import torch.nn as nn

from nas.ops import OpOptions, bottleneck_channels, make_activation, make_norm
from nas.registry import register_op, register_op_set


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, a bottleneck of C/4, a sigmoid gate per channel."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(scale))))


def mbconv_se(C: int, kernel_size: int, stride: int, affine: bool, options: OpOptions) -> nn.Module:
    """1x1 expansion to F*C channels, k x k depthwise (stride), squeeze-excite, 1x1 projection back to C.
    The op set's F is the expansion ratio, its activation and norm are the block's."""
    hidden = bottleneck_channels(C, options.bottleneck_ratio)
    return nn.Sequential(
        nn.Conv2d(C, hidden, 1, bias=False), make_norm(options.norm, hidden, affine), make_activation(options.activation),
        nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
        make_norm(options.norm, hidden, affine), make_activation(options.activation),
        SqueezeExcite(hidden, max(1, C // 4)),
        nn.Conv2d(hidden, C, 1, bias=False), make_norm(options.norm, C, affine),
    )


for k in (3, 5):
    # F changes what the op builds: sweeps then vary and report F for op sets that hold it
    register_op(f"mbconv_se_{k}x{k}", lambda C, s, a, o, k=k: mbconv_se(C, k, s, a, o), uses_bottleneck_ratio=True)

# the paper's PIBConv op set with its two largest PIB blocks swapped for MBConv-SE
register_op_set("mbconv_pib", ["none", "skip_connect", "pib_conv_3x3", "mbconv_se_3x3", "mbconv_se_5x5",
                               "dil_conv_3x3", "max_pool_3x3", "avg_pool_3x3"],
                activation="gelu", norm="bn", bottleneck_ratio=2.0, pooling_bn=False)
