"""Device-specific kernels behind the op registry (``nas.ops``): CPU rewrites of convs, BN and pooling.

Each class computes exactly what the ``torch.nn`` module it subclasses computes, with the same parameters
and buffers, and picks its faster CPU form itself (``_cpu_rewrite``: CPU, float32/64, no autocast);
on other devices, and under autocast, it runs the native module. Why each form is faster, and by how
much: docs/performance.md. ``nas.reference.reference_modules`` swaps them back for the modules they
compute. This module never imports the registry: the registry chooses kernels, not the other way round.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    if x.device.type != "cpu" or _NATIVE_ONLY.get() or x.dim() != 4 or _memory_format_of(x) != torch.channels_last:
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


_NATIVE_ONLY = contextvars.ContextVar("dartsweep_native_kernels", default=False)


@contextlib.contextmanager
def native_kernels() -> Iterator[None]:
    """The one switch: within it the CPU rewrites step aside and every module runs as the torch.nn module
    it subclasses, as on CUDA, so CPU tensors take the CUDA code path (what ``bench --count-ops --path
    cuda`` counts)."""
    token = _NATIVE_ONLY.set(True)
    try:
        yield
    finally:
        _NATIVE_ONLY.reset(token)


def cuda_code_path(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the CUDA code path: on a non-CPU device, or inside :func:`native_kernels`."""
    return x.device.type != "cpu" or _NATIVE_ONLY.get()


def _cpu_rewrite(x: torch.Tensor) -> bool:
    """Whether the CPU rewrites of the convs apply: CPU input outside autocast and outside
    :func:`native_kernels`. (Autocast casts inside a custom Function's forward but not in its backward,
    which would then mix bf16 gradients with float32 weights; under autocast the native convs run, as on
    other devices.)"""
    return x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and not _NATIVE_ONLY.get()


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
