"""Exactness of the CPU kernels (``nas.kernels``): each equals the torch.nn module it rewrites, in values,
gradients, double backward and memory layout."""

import pytest
import torch
import torch.nn.functional as F


def _cl_grad(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()



@pytest.mark.parametrize("c_in,c_out,groups", [(32, 16, 16), (40, 16, 8), (16, 32, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_grouped_conv_cpu_path_equals_native_conv(c_in, c_out, groups, channels_last, stride, dilation, kernel_size):
    """GroupedConv2d's depthwise-then-sum path computes nn.Conv2d's function and gradients, incl. double backward.

    (40, 16, 8) is PIBConv at F = 2.5: two outputs per group, so the depthwise conv has a channel multiplier
    (its 5x5 weight gradient used to fail with a shape error)."""
    from nas.kernels import GroupedConv2d

    torch.manual_seed(0)
    padding = dilation * (kernel_size // 2)
    conv = GroupedConv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias=False).double()
    native = torch.nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                             groups=groups, bias=False).double()
    native.load_state_dict(conv.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c_in, 7, 7, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    y, y_ref = conv(x), native(x)
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, (x, conv.weight), g), torch.autograd.grad(y_ref, (x, native.weight), g)):
        torch.testing.assert_close(a, b)
    # second order: the exact-hypergradient reference differentiates through weight gradients
    gx = torch.autograd.grad(conv(x).pow(2).sum(), conv.weight, create_graph=True)[0]
    gx_ref = torch.autograd.grad(native(x).pow(2).sum(), native.weight, create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(gx_ref.sum(), x)[0])


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_conv_cpu_path_equals_native_conv(kernel_size, stride, dilation, size, channels_last):
    """DepthwiseConv2d's CPU path (weight gradient as a forward conv; stride 2 + dilation 2 on the even
    pixels) computes nn.Conv2d's function and gradients, incl. double backward."""
    from nas.kernels import DepthwiseConv2d

    torch.manual_seed(0)
    padding = dilation * (kernel_size - 1) // 2
    conv = DepthwiseConv2d(6, 6, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=6,
                           bias=False).double()
    native = torch.nn.Conv2d(6, 6, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=6,
                             bias=False).double()
    native.load_state_dict(conv.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, size, size, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    y, y_ref = conv(x), native(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, (x, conv.weight), g), torch.autograd.grad(y_ref, (x, native.weight), g)):
        torch.testing.assert_close(a, b)
    gw = torch.autograd.grad(conv(x).pow(2).sum(), conv.weight, create_graph=True)[0]
    gw_ref = torch.autograd.grad(native(x).pow(2).sum(), native.weight, create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(gw.pow(2).sum(), x)[0],
                               torch.autograd.grad(gw_ref.pow(2).sum(), x)[0])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_lean_batch_norm_equals_native_and_keeps_only_its_output(channels_last, momentum):
    from nas.kernels import LeanBatchNorm2d
    from nas.ops import make_norm

    assert type(make_norm("bn", 5, affine=False)) is LeanBatchNorm2d
    assert type(make_norm("bn", 5, affine=True)) is torch.nn.BatchNorm2d
    torch.manual_seed(0)
    lean = LeanBatchNorm2d(5, affine=False, momentum=momentum).double()
    native = torch.nn.BatchNorm2d(5, affine=False, momentum=momentum).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _ in range(2):  # two steps: running statistics (and the cumulative average) move
        x = (3 * torch.randn(4, 5, 6, 7, dtype=torch.float64) + 1).to(memory_format=fmt).requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = lean(x)
        y_ref = native(x)
        torch.testing.assert_close(y, y_ref)
        assert all(t.data_ptr() != x.data_ptr() for t in saved)  # the input is not kept
        assert any(t.data_ptr() == y.data_ptr() for t in saved)  # the output is
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
        for name, buffer in native.state_dict().items():
            torch.testing.assert_close(lean.state_dict()[name], buffer)
    lean.eval()
    native.eval()
    torch.testing.assert_close(lean(x), native(x))
    # double backward (the exact-hypergradient reference differentiates through BN's backward)
    lean.train()
    native.train()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    gx = torch.autograd.grad(lean(x).pow(3).sum(), x, create_graph=True)[0]
    gx_ref = torch.autograd.grad(native(x).pow(3).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(gx.pow(2).sum(), x)[0], torch.autograd.grad(gx_ref.pow(2).sum(), x)[0])
    torch.autograd.gradgradcheck(lambda t: lean(t).pow(3), (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_native_conv(channels_last):
    """PointwiseConv2d (a matrix product on channels_last CPU input) computes nn.Conv2d's function, gradients
    and double backward, and keeps the channels_last layout."""
    from nas.kernels import PointwiseConv2d

    torch.manual_seed(0)
    conv = PointwiseConv2d(6, 10, 1, bias=False).double()
    native = torch.nn.Conv2d(6, 10, 1, bias=False).double()
    native.load_state_dict(conv.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    y = conv(x)
    torch.testing.assert_close(y, native(x))
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, conv.weight), g)
    for a, b in zip(grads, torch.autograd.grad(native(x), (x, native.weight), g)):
        torch.testing.assert_close(a, b)
    assert grads[0].is_contiguous(memory_format=fmt)
    gw = torch.autograd.grad(conv(x).pow(2).sum(), conv.weight, create_graph=True)[0]
    gw_ref = torch.autograd.grad(native(x).pow(2).sum(), native.weight, create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(gw.pow(2).sum(), x)[0],
                               torch.autograd.grad(gw_ref.pow(2).sum(), x)[0])


def test_pixel_subsampling_and_global_pooling_keep_channels_last_gradients():
    """On channels_last input these return gradients in channels_last (autograd's own slicing and
    adaptive_avg_pool2d backward return NCHW ones, which slow every op behind them), with the same values."""
    from nas.kernels import GlobalAvgPool2d, every_other_pixel
    from nas.reference import reference_modules

    x = torch.randn(2, 5, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    for first in (0, 1):
        y = every_other_pixel(x, first)
        torch.testing.assert_close(y, x[:, :, first::2, first::2])
        g = torch.randn_like(y)
        grad = torch.autograd.grad(y, x, g)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(x[:, :, first::2, first::2], x, g)[0])
        assert _cl_grad(grad)
    pool = GlobalAvgPool2d()
    pooled = pool(x)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, 1))
    g = torch.randn_like(pooled)
    grad = torch.autograd.grad(pooled, x, g)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(F.adaptive_avg_pool2d(x, 1), x, g)[0])
    assert _cl_grad(grad)
    torch.autograd.gradgradcheck(lambda t: pool(t).pow(2), (x,))
    torch.autograd.gradgradcheck(lambda t: every_other_pixel(t, 1).pow(2), (x,))
    assert type(reference_modules(torch.nn.Sequential(pool))[0]) is torch.nn.AdaptiveAvgPool2d
