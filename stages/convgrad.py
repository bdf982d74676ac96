"""Second-order gradients through grouped convolutions without PyTorch's loop over groups.

LoRS-mode distillation differentiates twice through the image encoder: a student step's gradient, then the
matching loss through it. PyTorch's double backward of a grouped convolution (`_convolution_double_backward`,
torch 2.14) runs one small convolution per group for two of its terms, so a depthwise layer of C channels costs
2C convolutions. In EfficientNet-Lite0 at 128 px that was 73 000 convolutions per LoRS iteration, 53 % of its
time on the CPU (and as many kernel launches on a GPU).

A convolution y = conv(x, w) is linear in x and in w, so every second-order term is one whole convolution or one
first-order convolution backward, with the same kernels the forward and backward already use:
    gx = d<gy, conv(x, w)>/dx,  gw = d<gy, conv(x, w)>/dw
    d<ggx, gx> + <ggw, gw>  =  <gy, conv(ggx, w)> + <gy, conv(x, ggw)>
so  d/dgy = conv(ggx, w) + conv(x, ggw),  d/dx = input gradient of conv(., ggw) at gy,
    d/dw = weight gradient of conv(ggx, .) at gy.
`grouped_double_backward()` routes grouped `conv2d` calls made under it (functional_call of a timm backbone
included) through that form. Third-order gradients are not supported (nothing here needs them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _backward(grad_out, x, weight, conf, mask: Sequence[bool]):
    """First-order gradients of conv(x, weight) at `grad_out` (input, weight), as `mask` asks."""
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False,
                                               [0, 0], groups, [mask[0], mask[1], False])[:2]


class _ConvBackward(torch.autograd.Function):
    """(gy, x, w) -> (gx, gw): the convolution's backward as a function, with its own backward in whole
    convolutions (see the module docstring)."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, conf):
        ctx.save_for_backward(grad_out, x, weight)
        ctx.conf = conf
        return _backward(grad_out, x, weight, conf, (True, True))

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x, gg_w):
        grad_out, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = d_x = d_w = None
        if need_gy:
            terms = [torch.conv2d(a, b, None, stride, padding, dilation, groups)
                     for a, b in ((gg_x, weight), (x, gg_w)) if a is not None and b is not None]
            d_gy = sum(terms[1:], terms[0]) if terms else None
        if need_x and gg_w is not None:
            d_x = _backward(grad_out, x, gg_w, ctx.conf, (True, False))[0]
        if need_w and gg_x is not None:
            d_w = _backward(grad_out, gg_x, weight, ctx.conf, (False, True))[1]
        return d_gy, d_x, d_w, None


class _GroupedConv(torch.autograd.Function):
    """conv2d whose backward is `_ConvBackward` (differentiable once more, group loop free)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        ctx.save_for_backward(x, weight)
        ctx.conf = conf
        ctx.has_bias = bias is not None
        return torch.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = _ConvBackward.apply(grad_out, x, weight, ctx.conf)
        grad_b = grad_out.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                   dilation=1, groups: int = 1) -> torch.Tensor:
    """`torch.conv2d` (numeric padding) with the group-loop-free double backward."""
    conf = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), int(groups))
    return _GroupedConv.apply(x, weight, bias, conf)


class grouped_double_backward(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's modes
    """Under this mode, grouped 2-d convolutions that may be differentiated run `grouped_conv2d`; everything else
    (groups 1, string padding, no grad) runs as called."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and torch.is_grad_enabled():
            call = _CONV_DEFAULTS | dict(zip(_CONV_ARGS, args)) | kwargs
            if int(call["groups"]) > 1 and not isinstance(call["padding"], str) and call["input"].dim() == 4:
                return grouped_conv2d(call["input"], call["weight"], call["bias"], call["stride"], call["padding"],
                                      call["dilation"], call["groups"])
        return func(*args, **kwargs)
