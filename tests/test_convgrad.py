"""stages/convgrad.py: grouped convolutions differentiated twice without PyTorch's loop over groups."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from repblend.stages.convgrad import grouped_conv2d, grouped_double_backward

SHAPES = [  # (channels in, channels out, groups, kernel, stride, padding, dilation, bias)
    (4, 4, 4, 3, 1, 1, 1, False),  # depthwise, as in EfficientNet
    (4, 4, 4, 5, 2, 0, 1, True),  # depthwise, strided, unpadded, with bias
    (4, 6, 2, 3, 2, 2, 2, True),  # grouped (2 groups of 2 -> 3), dilated
]


def _inputs(c_in, c_out, groups, kernel, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_conv_first_and_second_derivatives_match_finite_differences(shape):
    c_in, c_out, groups, kernel, stride, padding, dilation, bias = shape
    x, w, b = _inputs(c_in, c_out, groups, kernel, bias)

    def conv(*args):
        return grouped_conv2d(args[0], args[1], args[2] if bias else None, stride, padding, dilation, groups)

    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


def _backward_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("shape", SHAPES)
def test_second_order_gradients_equal_pytorchs_own(shape):
    """What LoRS distillation needs, d/d(x, params) of <u, d loss/d params>, against PyTorch's own double backward,
    through two grouped layers (so that the first layer's input gradient is used downstream too)."""
    c_in, c_out, groups, kernel, stride, padding, dilation, bias = shape

    def second(mode):
        x, w, b = _inputs(c_in, c_out, groups, kernel, bias)
        w2 = torch.randn(c_out, c_out // groups, 3, 3, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64, requires_grad=True)
        with mode:
            y = F.conv2d(torch.tanh(F.conv2d(x, w, b, stride, padding, dilation, groups)), w2, None, 1, 1, 1, groups)
        r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        params = [w, w2, b] if bias else [w, w2]
        grads = torch.autograd.grad((y * r).square().sum(), params, create_graph=True)
        u = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype) for p in params]
        hvp = sum((g * v).sum() for g, v in zip(grads, u))
        return y, torch.autograd.grad(hvp, [x, *params])

    y_fast, fast = second(grouped_double_backward())
    y_native, native = second(contextlib.nullcontext())
    assert "_GroupedConvBackward" in _backward_names(y_fast)  # the mode routed the grouped convolutions
    assert "_GroupedConvBackward" not in _backward_names(y_native)
    torch.testing.assert_close(y_fast, y_native, rtol=1e-12, atol=1e-12)
    for got, want in zip(fast, native):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_mode_leaves_ungrouped_string_padded_and_gradient_free_convolutions_alone():
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    dense, depthwise = torch.randn(4, 4, 3, 3), torch.randn(4, 1, 3, 3)
    with grouped_double_backward():
        plain = F.conv2d(x, dense, padding=1)
        same = F.conv2d(x, depthwise, padding="same", groups=4)
        with torch.no_grad():
            frozen = F.conv2d(x, depthwise, padding=1, groups=4)
        routed = F.conv2d(x, depthwise, padding=1, groups=4)
    assert "_GroupedConvBackward" not in _backward_names(plain) | _backward_names(same)
    assert frozen.grad_fn is None and "_GroupedConvBackward" in _backward_names(routed)
    torch.testing.assert_close(routed, F.conv2d(x, depthwise, padding=1, groups=4), rtol=0, atol=0)
