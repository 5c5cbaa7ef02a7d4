"""Candidate operations of the DARTS cell: DARTS primitives, ConvNeXt blocks and PIBConv blocks.

Every primitive is built by a constructor ``(C, stride, affine, options) -> nn.Module`` found in
:data:`PRIMITIVES`, so op sets and genotypes refer to operations by name only. ``options``
(:class:`OpOptions`) carries the op-set-wide choices the paper's roadmap varies: activation,
normalisation and the inverted-bottleneck ratio F.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.errors import ConfigError

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


class _BatchNormSavingOutput(torch.autograd.Function):
    """Training-mode batch norm without affine parameters that keeps its *output* for backward.

    Without gamma and beta the output is x_hat itself, and BN's backward needs only x_hat and 1/std:
    grad_x = (g - mean(g) - x_hat * mean(g * x_hat)) / std. The next op (a conv, or the mixed op's
    weighted sum) keeps the output anyway, so BN's input no longer has to be kept. 1/std is a second
    output so that double backward (the exact-hypergradient reference) sees it depend on x.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, momentum, eps):  # noqa: ANN001 - autograd signature
        y, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True, momentum,
                                                        eps)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, invstd)
        ctx.eps = eps
        return y, invstd

    @staticmethod
    def backward(ctx, grad_y, grad_invstd):  # noqa: ANN001
        y, invstd = ctx.saved_tensors
        per_channel = (1, -1, 1, 1)
        if grad_y is None:
            grad_x = torch.zeros_like(y)
        elif torch.is_grad_enabled():  # create_graph: the same formula in differentiable ops
            dims = (0, 2, 3)
            centred = grad_y - grad_y.mean(dims, keepdim=True) - y * (grad_y * y).mean(dims, keepdim=True)
            grad_x = centred * invstd.view(per_channel)
        else:  # ATen's kernel, given x_hat as the input (mean 0, 1/std 1) and 1/std as the weight
            ones = torch.ones_like(invstd)
            grad_x = torch.ops.aten.native_batch_norm_backward(grad_y, y, invstd, None, None, torch.zeros_like(invstd),
                                                               ones, True, ctx.eps, [True, False, False])[0]
        if grad_invstd is not None:  # d(1/std)/dx = -x_hat / (std^2 * n)
            n = y.numel() // y.shape[1]
            grad_x = grad_x - (grad_invstd * invstd.pow(2) / n).view(per_channel) * y
        return grad_x, None, None, None, None


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d(affine=False)`` that, in training, keeps its output rather than its input for
    backward (:class:`_BatchNormSavingOutput`): one activation less per norm in the search network,
    whose mixed ops all end in, or feed a conv from, such a norm. Same state_dict, statistics and
    results; eval mode, affine norms and reduced precision use ``nn.BatchNorm2d`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or self.affine or x.dim() != 4 \
                or x.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does it
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean, running_var = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _BatchNormSavingOutput.apply(x, running_mean, running_var, momentum, self.eps)[0]


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
        shifted = x[:, :, 1:, 1:]
        if x.shape[2] % 2 or x.shape[3] % 2:
            shifted = F.pad(shifted, (0, x.shape[3] % 2, 0, x.shape[2] % 2))
        return self.norm(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


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


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The gradient for a depthwise conv's weight ``(C, 1, kh, kw)``, computed as a depthwise conv *forward*.

    dW[c, i, j] = sum_{n,h,w} grad[n, c, h, w] * x_pad[n, c, d*i + s*h, d*j + s*w]: every (n, c) image of
    ``x`` correlated with its own ``grad`` image as the kernel (stride and dilation swap roles), then summed
    over n. oneDNN's forward kernels run this 2-4x faster on CPU than its depthwise weight-gradient kernel
    does for 5x5 and 7x7 filters and for dilated ones (``dartsweep bench search``); undilated filters up
    to 3x3 keep oneDNN's own (it is fast there; see ``_depthwise_backward``). Differentiable, so double
    backward (the exact-hypergradient reference) works through it.
    """
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho, wo = grad.shape[2:]
    out = F.conv2d(x.contiguous().view(1, n * c, h, w), grad.contiguous().view(n * c, 1, ho, wo), None,
                   tuple(dilation), tuple(padding), tuple(stride), n * c)
    return out[:, :, :kh, :kw].reshape(n, c, kh, kw).sum(0).unsqueeze(1)


_ONEDNN_WEIGHT_GRAD_MAX_AREA = 9  # undilated filters up to 3x3: oneDNN's weight gradient is the faster one


def depthwise_input_grad(grad: torch.Tensor, weight: torch.Tensor, padding: Sequence[int],
                         dilation: Sequence[int]) -> torch.Tensor:
    """The input gradient of a stride-1 depthwise conv, as a depthwise conv *forward* with the filters
    flipped: grad_x[h] = sum_i grad[h + p - d*i] * w[i]. oneDNN's forward kernel beats its backward-data
    kernel on CPU: 1.4-1.7x for 3x3-7x7 filters, about 8x for dilated ones (DARTS' dil_conv)."""
    k = weight.shape[2:]
    pad = [dilation[i] * (k[i] - 1) - padding[i] for i in range(2)]
    return F.conv2d(grad, weight.flip(2, 3), None, 1, pad, tuple(dilation), grad.shape[1])


def _depthwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], needs_input_grad: bool,
                        needs_weight_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(input, weight) gradients of a depthwise conv, each from whichever kernel is fastest on CPU: the
    input's from a forward conv (:func:`depthwise_input_grad`) at stride 1, the weight's from oneDNN's
    backward for small undilated filters and from :func:`depthwise_weight_grad` otherwise."""
    k = weight.shape[2:]
    stride_one = tuple(stride) == (1, 1) and weight.shape[0] == x.shape[1] \
        and all(dilation[i] * (k[i] - 1) >= padding[i] for i in range(2))
    native_input_grad = needs_input_grad and not stride_one
    native_weight_grad = needs_weight_grad and (
        (k[0] * k[1] <= _ONEDNN_WEIGHT_GRAD_MAX_AREA and tuple(dilation) == (1, 1))
        or weight.shape[0] != x.shape[1])  # depthwise_weight_grad takes one filter per input channel
    grad_x = grad_w = None
    if native_input_grad or native_weight_grad:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
            [native_input_grad, native_weight_grad, False])
    if needs_input_grad and stride_one:
        grad_x = depthwise_input_grad(grad, weight, padding, dilation)
    if needs_weight_grad and not native_weight_grad:
        grad_w = depthwise_weight_grad(x, grad, weight, stride, padding, dilation)
    return grad_x, grad_w


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise conv whose weight gradient comes from :func:`depthwise_weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_memory_format_of(x))
        return (*_depthwise_backward(grad, x, weight, *ctx.conf, ctx.needs_input_grad[0], ctx.needs_input_grad[1]),
                None, None, None)


class _DepthwiseThenGroupSum(torch.autograd.Function):
    """A grouped conv computed as one depthwise conv (every input channel times each of its group's
    output filters) followed by a sum over each group's inputs. Saves only the input and the weight, and
    hands the depthwise backward a contiguous gradient in the input's memory format, written in one copy."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        y = F.conv2d(x, _depthwise_weight(weight, groups), None, stride, padding, dilation, x.shape[1])
        n, _, h, w = y.shape
        per_in = x.shape[1] // groups
        per_out = weight.shape[0] // groups
        parts = y.view(n, groups, per_in, per_out, h, w).unbind(2)
        out = parts[0] if per_in == 1 else torch.add(parts[0], parts[1])
        for part in parts[2:]:  # adding the strided views is ~10x faster than .sum(2) in channels_last
            out = out.add_(part)
        return out.reshape(n, groups * per_out, h, w).contiguous(memory_format=_memory_format_of(x))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        per_in, per_out = x.shape[1] // groups, weight.shape[0] // groups
        n, _, h, w = grad.shape
        grad_y = torch.empty(n, groups * per_in * per_out, h, w, dtype=grad.dtype, device=grad.device,
                             memory_format=_memory_format_of(x))
        grad_y.view(n, groups, per_in, per_out, h, w).copy_(
            grad.reshape(n, groups, 1, per_out, h, w).expand(n, groups, per_in, per_out, h, w))
        grad_x, grad_w = _depthwise_backward(grad_y, x, _depthwise_weight(weight, groups), stride, padding, dilation,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_w is not None:
            k = weight.shape[2:]
            grad_w = grad_w.view(groups, per_in, per_out, *k).transpose(1, 2).reshape(weight.shape)
        return grad_x, grad_w, None, None, None, None


def _depthwise_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(G*b, a, k, k) grouped filters as (G*a*b, 1, k, k) depthwise ones, ordered input-channel-major."""
    out_ch, per_in, *k = weight.shape
    per_out = out_ch // groups
    return weight.view(groups, per_out, per_in, *k).transpose(1, 2).reshape(groups * per_in * per_out, 1, *k)


class _EveryOtherPixel(torch.autograd.Function):
    """``x[:, :, first::2, first::2]``, dense, in ``x``'s memory format, with a gradient in that format too.

    Slicing's own backward allocates the input's gradient in the contiguous (NCHW) format; on a
    channels_last network that one NCHW gradient then slows every op behind it (oneDNN's depthwise convs
    run about 10x slower on NCHW).
    """

    @staticmethod
    def forward(ctx, x, first):  # noqa: ANN001 - autograd signature
        ctx.first, ctx.shape, ctx.fmt = first, x.shape, _memory_format_of(x)
        return x[:, :, first::2, first::2].contiguous(memory_format=ctx.fmt)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        grad_x = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.fmt).zero_()
        grad_x[:, :, ctx.first::2, ctx.first::2] = grad
        return grad_x, None


def every_other_pixel(x: torch.Tensor, first: int) -> torch.Tensor:
    """The pixels at even (``first`` 0) or odd (1) rows and columns, as a dense tensor in ``x``'s memory
    format whose gradient keeps that format (:class:`_EveryOtherPixel`)."""
    return _EveryOtherPixel.apply(x, first)


class _GlobalAvgPool(torch.autograd.Function):
    """Mean over H and W, keeping them as size 1, whose gradient comes back in the input's memory format
    (autograd's own for ``adaptive_avg_pool2d`` and ``mean`` is NCHW, which slowed every op of a
    channels_last network's last cell)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001 - autograd signature
        ctx.shape, ctx.fmt = x.shape, _memory_format_of(x)
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        n, c, h, w = ctx.shape
        return (grad / (h * w)).expand(n, c, h, w).contiguous(memory_format=ctx.fmt)


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` (the classifier's pooling) whose input gradient keeps the input's
    memory format (:class:`_GlobalAvgPool`)."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GlobalAvgPool.apply(x) if x.dim() == 4 else super().forward(x)


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv (stride 1, no bias) with ``weight`` (C_out, C_in, 1, 1); a matrix product where ``x`` is
    channels_last on CPU (:class:`PointwiseConv2d`)."""
    if x.device.type != "cpu" or x.dim() != 4 or _memory_format_of(x) != torch.channels_last:
        return F.conv2d(x, weight)
    return F.linear(x.permute(0, 2, 3, 1), weight.view(weight.shape[0], weight.shape[1])).permute(0, 3, 1, 2)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 conv (stride 1, no groups, no bias) that runs as a matrix product on channels_last CPU input.

    In channels_last memory the input is an (N*H*W, C) matrix already, so ``F.linear`` does the same
    arithmetic with no layout change; MKL's GEMM is 1.3-2x faster than oneDNN's 1x1 conv for the search
    network's 16-128 channels, forward and backward (the pass skips the weight gradient on its own when
    the weight needs none). Same parameters; other layouts and devices use the conv.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None or self.stride != (1, 1) or self.groups != 1 or self.padding != (0, 0):
            return super().forward(x)
        return pointwise(x, self.weight)


def pointwise_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 1x1 conv without bias (:class:`PointwiseConv2d`)."""
    return PointwiseConv2d(c_in, c_out, 1, bias=False)


def _cpu_rewrite(x: torch.Tensor) -> bool:
    """Whether the CPU rewrites of the convs apply: CPU input outside autocast. (Autocast casts inside a
    custom Function's forward but not in its backward, which would then mix bf16 gradients with float32
    weights; under autocast the native convs run, as on other devices.)"""
    return x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


class GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with groups, computed on CPU as a depthwise conv plus a per-group sum.

    Same parameters and the same arithmetic; oneDNN's grouped kernels with a few input channels per group
    (PIBConv's C_inv -> C conv) are several times slower than its depthwise ones, which made this conv
    about 40 % of a search step on CPU. Other devices use the native kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _cpu_rewrite(x) or self.in_channels == self.groups or self.padding_mode != "zeros" \
                or self.bias is not None or isinstance(self.padding, str):
            return super().forward(x)
        return _DepthwiseThenGroupSum.apply(x, self.weight, self.stride, self.padding, self.dilation, self.groups)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in_channels == out_channels``, with two CPU rewrites of the same
    arithmetic:

    - the weight gradient comes from :func:`depthwise_weight_grad` (a forward conv; oneDNN's depthwise
      weight-gradient kernel was the largest single cost of a CPU search step);
    - stride 2 with dilation 2 (DARTS' dil_conv in reduction cells) runs undilated on the even pixels:
      every output pixel only reads even rows and columns, and oneDNN's backward for the strided dilated
      form is about 5x slower at DARTS' sizes.

    Other devices, and configurations these do not cover, use the native kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _cpu_rewrite(x) or self.bias is not None or self.padding_mode != "zeros" \
                or isinstance(self.padding, str) or not self.in_channels == self.out_channels == self.groups:
            return super().forward(x)
        k = self.kernel_size
        stride, padding, dilation = self.stride, self.padding, self.dilation
        if (stride == (2, 2) and dilation == (2, 2) and padding == (k[0] - 1, k[1] - 1)
                and k[0] % 2 == 1 and k[1] % 2 == 1):
            x = every_other_pixel(x, 0)
            stride, padding, dilation = (1, 1), (k[0] // 2, k[1] // 2), (1, 1)
        return _DepthwiseConv.apply(x, self.weight, stride, padding, dilation)


class ReferenceFactorizedReduce(FactorizedReduce):
    """FactorizedReduce as DARTS runs it: the activation and two stride-2 1x1 convs over the whole map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.darts_forward(x)


def reference_modules(model: nn.Module) -> nn.Module:
    """``model`` with every CPU rewrite swapped back, in place, for the module it computes: ``nn.Conv2d``,
    ``nn.BatchNorm2d``, DARTS' FactorizedReduce and ``nn.AdaptiveAvgPool2d`` (same parameters and buffers).
    This is the network as research code runs it (the bench's baseline) and as ptflops must see it (every
    conv a module call)."""
    for module in model.modules():
        if isinstance(module, (DepthwiseConv2d, GroupedConv2d, PointwiseConv2d)):
            module.__class__ = nn.Conv2d
        elif isinstance(module, LeanBatchNorm2d):
            module.__class__ = nn.BatchNorm2d
        elif type(module) is FactorizedReduce:
            module.__class__ = ReferenceFactorizedReduce
        elif type(module) is GlobalAvgPool2d:
            module.__class__ = nn.AdaptiveAvgPool2d
    return model


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

PRIMITIVES: dict[str, OpConstructor] = {
    "none": lambda c, s, a, o: Zero(s),
    "skip_connect": _skip,
    "max_pool_3x3": lambda c, s, a, o: nn.MaxPool2d(3, stride=s, padding=1),
    "avg_pool_3x3": lambda c, s, a, o: nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
    "conv_7x1_1x7": lambda c, s, a, o: conv_7x1_1x7(c, s, a, o),
    "dil_conv_3x3": lambda c, s, a, o: dil_conv(c, 3, s, 2, a, o),
    "dil_conv_5x5": lambda c, s, a, o: dil_conv(c, 5, s, 2, a, o),
    **{f"sep_conv_{k}x{k}": (lambda k: lambda c, s, a, o: sep_conv(c, k, s, a, o))(k) for k in (3, 5, 7)},
    **{f"convnext_{k}x{k}": (lambda k: lambda c, s, a, o: convnext_block(c, k, s, a, o))(k) for k in (3, 5, 7)},
    **{f"pib_conv_{k}x{k}": (lambda k: lambda c, s, a, o: pib_conv(c, k, s, a, o))(k) for k in (3, 5, 7)},
}

POOLING = frozenset({"max_pool_3x3", "avg_pool_3x3"})
PARAMETER_FREE = POOLING | {"none"}
# Ops whose structure depends on the bottleneck ratio F.
USES_BOTTLENECK_RATIO = frozenset(n for n in PRIMITIVES if n.startswith(("convnext_", "pib_conv_")))


def check_primitive(name: str) -> str:
    if name not in PRIMITIVES:
        raise ConfigError(f"unknown primitive {name!r}; known primitives: {', '.join(sorted(PRIMITIVES))}")
    return name


def build_op(name: str, channels: int, stride: int, affine: bool, options: OpOptions) -> nn.Module:
    """Build primitive ``name`` for ``channels`` channels; stride 2 halves the resolution."""
    return PRIMITIVES[check_primitive(name)](channels, stride, affine, options)


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


STEMS = ("conv3x3", "patchify")


def stem(in_channels: int, out_channels: int, kind: str = "conv3x3") -> nn.Sequential:
    """The network's stem. "conv3x3": DARTS' 3x3 conv + BN. "patchify": the released PIBConv search network's
    4x4 stride-4 conv (padding 1) + channels-first LayerNorm, which makes 32x32 inputs 8x8 maps."""
    if kind == "patchify":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 4, stride=4, padding=1),
                             LayerNorm2d(out_channels, eps=1e-6))
    if kind != "conv3x3":
        raise ConfigError(f"stem: must be one of {', '.join(STEMS)}, got {kind!r}")
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
