"""Candidate operations of the DARTS cell: DARTS primitives, ConvNeXt blocks and PIBConv blocks.

Every primitive is built by a constructor ``(C, stride, affine, options) -> nn.Module`` registered by name
through ``nas.registry.register_op`` (the same call a user's plugin makes), so op sets and genotypes refer
to operations by name only. ``options``
(:class:`OpOptions`) carries the op-set-wide choices the paper's roadmap varies: activation,
normalisation and the inverted-bottleneck ratio F.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.errors import ConfigError
from nas.registry import BUILTIN, OPS, register_op, registering
from nas.kernels import DepthwiseConv2d, GroupedConv2d, LeanBatchNorm2d, every_other_pixel, pointwise, pointwise_conv

ACTIVATIONS = ("relu", "gelu")
NORMS = ("bn", "ln")
# Where the op set's activation applies. "blocks": inside the PIBConv / ConvNeXt blocks and the separable
# convs, as the released PIBConv code does; dilated convs, 7x1-1x7, FactorizedReduce and the cells'
# preprocessing keep ReLU. "all": everywhere (dartsweep's first release).
ACTIVATION_SCOPES = ("blocks", "all")
# How a PIB block's k x k conv (C_inv -> C channels) is grouped. "per_channel": each output channel reads
# floor(F) or ceil(F) of the C_inv channels (k^2 C_inv weights, growing with F). "gcd": gcd(C_inv, C)
# groups (the first release; denser, and costlier, between whole F). Both are groups = C for whole F.
PIB_GROUPINGS = ("per_channel", "gcd")
# The values a key takes when an artefact written by the first release (which had no such key) is read.
FIRST_RELEASE_OPTIONS = {"activation_scope": "all", "pib_groups": "gcd"}


@dataclass(frozen=True)
class OpOptions:
    """Op-set-wide options: activation (relu|gelu) and where it applies, normalisation (bn|ln), bottleneck
    ratio F and how the PIB block groups its k x k conv for non-integer F."""

    activation: str = "relu"
    norm: str = "bn"
    bottleneck_ratio: float = 2.0
    activation_scope: str = "blocks"
    pib_groups: str = "per_channel"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        ratio = self.bottleneck_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ConfigError(f"bottleneck ratio F must be a positive number, got {ratio!r}")
        object.__setattr__(self, "bottleneck_ratio", float(ratio))
        if self.activation_scope not in ACTIVATION_SCOPES:
            raise ConfigError(f"activation_scope: must be one of {', '.join(ACTIVATION_SCOPES)}, got "
                              f"{self.activation_scope!r}")
        if self.pib_groups not in PIB_GROUPINGS:
            raise ConfigError(f"pib_groups: must be one of {', '.join(PIB_GROUPINGS)}, got {self.pib_groups!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], first_release: bool = False) -> "OpOptions":
        """Options from a mapping; keys it lacks take the first release's values when ``first_release``
        (an artefact of a sweep written before those keys existed), else the defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"options must be a mapping, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(known)}")
        defaults = FIRST_RELEASE_OPTIONS if first_release else {}
        return cls(**{**defaults, **data})

    @property
    def outer_activation(self) -> str:
        """The activation of everything outside the blocks (see ACTIVATION_SCOPES)."""
        return self.activation if self.activation_scope == "all" else "relu"

    def identity(self) -> dict[str, Any]:
        """The options that change what a network computes, as ids and hashes see them: the scope only
        where it matters (a non-ReLU activation in the "blocks" form), the grouping only for non-integer F.
        The first release's forms drop out, so its ids and hashes stay what they were."""
        out = dataclasses.asdict(self)
        if self.activation == "relu" or self.activation_scope == "all":
            del out["activation_scope"]
        if self.pib_groups == "gcd" or self.bottleneck_ratio.is_integer():
            del out["pib_groups"]
        return out

    def form_suffix(self, uses_pib: bool) -> str:
        """The id suffix of the first release's forms (``-gelu_all``, ``-gcd``); '' for today's."""
        suffix = f"-{self.activation}_all" if self.activation != "relu" and self.activation_scope == "all" else ""
        if uses_pib and self.pib_groups == "gcd" and not self.bottleneck_ratio.is_integer():
            suffix += "-gcd"
        return suffix


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor (ConvNeXt's channels-first LN)."""

    def __init__(self, num_channels: int, affine: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(kind: str, channels: int, affine: bool) -> nn.Module:
    if kind == "ln":
        return LayerNorm2d(channels, affine=affine)
    return nn.BatchNorm2d(channels) if affine else LeanBatchNorm2d(channels, affine=False)


def make_activation(kind: str) -> nn.Module:
    return nn.ReLU(inplace=False) if kind == "relu" else nn.GELU()


def bottleneck_channels(channels: int, ratio: float) -> int:
    """C_inv = round(F * C), at least 1."""
    return max(1, int(round(ratio * channels)))


class Zero(nn.Module):
    """The ``none`` op: a zero tensor of the output shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convs (DARTS), odd sizes included."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True, activation: str = "relu", norm: str = "bn") -> None:
        super().__init__()
        if c_out % 2:
            raise ConfigError(f"FactorizedReduce needs an even channel count, got {c_out}")
        self.act = make_activation(activation)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.norm = make_norm(norm, c_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
            # each stride-2 1x1 conv reads only the even (conv_1) or the odd (conv_2) pixels, and the
            # activation is per pixel: activate and convolve just those (half the activation work, and
            # 1x1 convs at stride 1); 1.5-1.8x faster on CPU, forward and backward
            halves = [pointwise(self.act(every_other_pixel(x, first)), conv.weight)
                      for first, conv in ((0, self.conv_1), (1, self.conv_2))]
            return self.norm(torch.cat(halves, dim=1))
        return self.darts_forward(x)

    def darts_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as DARTS computes it: activate the whole map, then the two strided convs."""
        x = self.act(x)
        shifted = shifted_by_one(x)  # before conv_1: x's gradient then keeps conv_1's (the input's) layout
        return self.norm(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def shifted_by_one(x: torch.Tensor) -> torch.Tensor:
    """``x`` without its first row and column, zero-padded at the end where the map is odd: the input of
    FactorizedReduce's second stride-2 conv, which so reads the odd pixels."""
    shifted = x[:, :, 1:, 1:]
    if x.shape[2] % 2 or x.shape[3] % 2:
        shifted = F.pad(shifted, (0, x.shape[3] % 2, 0, x.shape[2] % 2))
    return shifted


class ActConvNorm(nn.Module):
    """activation -> conv -> norm; DARTS' ReLUConvBN, used for cell preprocessing."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True,
                 activation: str = "relu", norm: str = "bn") -> None:
        super().__init__()
        self.op = nn.Sequential(
            make_activation(activation),
            (pointwise_conv(c_in, c_out) if (kernel_size, stride, padding) == (1, 1, 0)
             else nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)),
            make_norm(norm, c_out, affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def dil_conv(c: int, kernel_size: int, stride: int, dilation: int, affine: bool, options: OpOptions,
             activation: str | None = None) -> nn.Sequential:
    """DARTS dilated separable conv: act -> dilated depthwise kxk -> 1x1 -> norm. Its activation is the
    op set's outer one (ReLU in the "blocks" scope) unless ``activation`` says otherwise."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        make_activation(activation or options.outer_activation),
        DepthwiseConv2d(c, c, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=c, bias=False),
        pointwise_conv(c, c),
        make_norm(options.norm, c, affine),
    )


def sep_conv(c: int, kernel_size: int, stride: int, affine: bool, options: OpOptions) -> nn.Sequential:
    """DARTS separable conv (paper Fig. 2a): the dilated-conv unit stacked twice, stride on the first. A
    block: the roadmap's GELU steps change its activation."""
    return nn.Sequential(
        *dil_conv(c, kernel_size, stride, 1, affine, options, options.activation),
        *dil_conv(c, kernel_size, 1, 1, affine, options, options.activation),
    )


def conv_7x1_1x7(c: int, stride: int, affine: bool, options: OpOptions) -> nn.Sequential:
    return nn.Sequential(
        make_activation(options.outer_activation),
        nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        make_norm(options.norm, c, affine),
    )


def convnext_block(c: int, kernel_size: int, stride: int, affine: bool, options: OpOptions) -> nn.Sequential:
    """ConvNeXt inverted bottleneck (paper Fig. 2b): dw kxk -> norm -> 1x1 C->F*C -> act -> 1x1 F*C->C."""
    c_inv = bottleneck_channels(c, options.bottleneck_ratio)
    return nn.Sequential(
        DepthwiseConv2d(c, c, kernel_size, stride=stride, padding=kernel_size // 2, groups=c, bias=False),
        make_norm(options.norm, c, affine),
        pointwise_conv(c, c_inv),
        make_activation(options.activation),
        pointwise_conv(c_inv, c),
    )


class UnevenGroupedConv2d(nn.Module):
    """A k x k conv from ``c_in`` to ``c_out`` channels (c_in >= c_out) in which each output channel reads
    its own floor(c_in / c_out) or ceil(c_in / c_out) input channels: groups = c_out with uneven group
    sizes, as two grouped convs (the first ``c_in % c_out`` outputs read one channel more). Weights:
    k^2 c_in, so cost grows with c_in (the PIB block's C_inv = F C) rather than jumping with gcd(c_in, c_out).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        per_out, wide = divmod(c_in, c_out)
        self.split = wide * (per_out + 1)  # input channels of the wider groups
        self.wide = GroupedConv2d(self.split, wide, kernel_size, padding=padding, groups=wide, bias=False)
        self.narrow = GroupedConv2d(c_in - self.split, c_out - wide, kernel_size, padding=padding,
                                    groups=c_out - wide, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x[:, :self.split]), self.narrow(x[:, self.split:])], dim=1)


def pib_grouped_conv(c_inv: int, c: int, kernel_size: int, pib_groups: str) -> nn.Module:
    """The PIB block's k x k conv C_inv -> C: groups = C where C divides C_inv (whole F, both forms);
    otherwise per ``pib_groups`` (see PIB_GROUPINGS). Below F = 1 (C_inv < C) every form is gcd's."""
    pad = kernel_size // 2
    if c_inv % c and pib_groups == "per_channel" and c_inv > c:
        return UnevenGroupedConv2d(c_inv, c, kernel_size, pad)
    return GroupedConv2d(c_inv, c, kernel_size, padding=pad, groups=math.gcd(c_inv, c), bias=False)


def pib_conv(c: int, kernel_size: int, stride: int, affine: bool, options: OpOptions) -> nn.Sequential:
    """PIBConv (paper Fig. 2c; the released ``PseudoInvBn``):
    dw kxk -> norm -> 1x1 C->C_inv -> grouped kxk C_inv->C -> act -> 1x1 C->C, C_inv = round(F C)."""
    c_inv = bottleneck_channels(c, options.bottleneck_ratio)
    pad = kernel_size // 2
    return nn.Sequential(
        DepthwiseConv2d(c, c, kernel_size, stride=stride, padding=pad, groups=c, bias=False),
        make_norm(options.norm, c, affine),
        pointwise_conv(c, c_inv),
        pib_grouped_conv(c_inv, c, kernel_size, options.pib_groups),
        make_activation(options.activation),
        pointwise_conv(c, c),
    )


def _skip(c: int, stride: int, affine: bool, options: OpOptions) -> nn.Module:
    if stride == 1:
        return nn.Identity()
    return FactorizedReduce(c, c, affine, options.outer_activation, options.norm)


OpConstructor = Callable[[int, int, bool, OpOptions], nn.Module]


def _register_builtins() -> None:
    """The paper's ops, registered exactly as a plugin registers its own (``nas.registry``)."""
    register_op("none", lambda c, s, a, o: Zero(s))
    register_op("skip_connect", _skip)
    register_op("max_pool_3x3", lambda c, s, a, o: nn.MaxPool2d(3, stride=s, padding=1), pooling=True)
    register_op("avg_pool_3x3", lambda c, s, a, o: nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
                pooling=True)
    register_op("conv_7x1_1x7", lambda c, s, a, o: conv_7x1_1x7(c, s, a, o))
    register_op("dil_conv_3x3", lambda c, s, a, o: dil_conv(c, 3, s, 2, a, o))
    register_op("dil_conv_5x5", lambda c, s, a, o: dil_conv(c, 5, s, 2, a, o))
    for k in (3, 5, 7):
        register_op(f"sep_conv_{k}x{k}", (lambda k: lambda c, s, a, o: sep_conv(c, k, s, a, o))(k))
    for k in (3, 5, 7):
        register_op(f"convnext_{k}x{k}", (lambda k: lambda c, s, a, o: convnext_block(c, k, s, a, o))(k),
                    uses_bottleneck_ratio=True)
    for k in (3, 5, 7):
        register_op(f"pib_conv_{k}x{k}", (lambda k: lambda c, s, a, o: pib_conv(c, k, s, a, o))(k),
                    uses_bottleneck_ratio=True)


with registering(BUILTIN):
    _register_builtins()


# name -> constructor, built-ins and loaded plugins alike (a view of the registry)
PRIMITIVES: Mapping[str, OpConstructor] = OPS.view(lambda entry: entry.factory)


def is_pooling(name: str) -> bool:
    """Whether op ``name`` is a parameter-free pooling op (followed by an affine-free BN in DARTS' search
    network)."""
    return OPS.get(name).pooling


def uses_bottleneck_ratio(name: str) -> bool:
    """Whether the bottleneck ratio F changes what op ``name`` builds."""
    return OPS.get(name).uses_bottleneck_ratio


def check_primitive(name: str) -> str:
    OPS.get(name)  # unknown: one line naming the known ops and how to add one
    return name


def build_op(name: str, channels: int, stride: int, affine: bool, options: OpOptions) -> nn.Module:
    """Build primitive ``name`` for ``channels`` channels; stride 2 halves the resolution."""
    from nas.plugins import tag_macs

    entry = OPS.get(name)
    return tag_macs(entry, entry.factory(channels, stride, affine, options))


def cell_preprocessing(c_prev_prev: int, c_prev: int, c: int, reduction_prev: bool, affine: bool,
                       activation: str = "relu") -> tuple[nn.Module, nn.Module]:
    """The two input adapters of a DARTS cell: bring both previous outputs to ``c`` channels and one size.

    ``activation`` is the op set's outer activation (ReLU, as in the released code, unless the scope is
    "all"); the norm is always BN.
    """
    pre0 = (FactorizedReduce(c_prev_prev, c, affine, activation) if reduction_prev
            else ActConvNorm(c_prev_prev, c, 1, 1, 0, affine, activation))
    return pre0, ActConvNorm(c_prev, c, 1, 1, 0, affine, activation)


def cell_layout(layers: int) -> list[bool]:
    """Which of ``layers`` cells reduce: those at 1/3 and 2/3 of the depth (DARTS)."""
    return [i in (layers // 3, 2 * layers // 3) for i in range(layers)]


STEMS = ("conv3x3", "patchify", "patchify_bias")


def stem(in_channels: int, out_channels: int, kind: str = "conv3x3") -> nn.Sequential:
    """The network's stem. "conv3x3": DARTS' 3x3 conv + BN. "patchify": the released PIBConv search network's
    4x4 stride-4 conv (padding 1, no bias) + channels-first LayerNorm, which makes 32x32 inputs 8x8 maps.
    "patchify_bias": the same with a conv bias, as dartsweep's third release built it (its sweeps resume
    as the networks they trained)."""
    if kind in ("patchify", "patchify_bias"):
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 4, stride=4, padding=1, bias=kind == "patchify_bias"),
                             LayerNorm2d(out_channels, eps=1e-6))
    if kind != "conv3x3":
        raise ConfigError(f"stem: must be one of {', '.join(STEMS)}, got {kind!r}")
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
