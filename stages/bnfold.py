"""Fold a frozen encoder's BatchNorm layers into the convolutions before them, for a faster forward and backward.

A frozen image encoder runs in eval mode, where BatchNorm is a fixed per-channel affine map, so it can live inside
the preceding convolution's weight and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`). Differentiating to the
pixels (pixel-space distillation, inversion) then no longer reads and writes every activation twice more: for
EfficientNet-Lite0 on a CPU, BatchNorm's forward and backward were 38 % of a forward + backward to the pixels.

Pairs are found by registration order (a Conv2d child followed directly by a BatchNorm2d child of the same module,
which is how timm and torchvision build their blocks); the caller checks the folded copy against the original on an
input before using it, so an architecture where that order is not the order of execution is caught, not trusted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _after_norm(norm: nn.Module) -> nn.Module | None:
    """What stays of a BatchNorm once its affine map is folded away; None where its forward is not known."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    # timm's BatchNormAct2d: batch norm, then its `drop` and `act` modules
    if type(norm).__name__ == "BatchNormAct2d" and isinstance(getattr(norm, "drop", None), nn.Module) \
            and isinstance(getattr(norm, "act", None), nn.Module):
        return nn.Sequential(norm.drop, norm.act)
    return None


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not conv.training
            and not norm.training and norm.running_mean is not None and norm.num_features == conv.out_channels)


def fold_batchnorm(backbone: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of the eval-mode `backbone` with each BatchNorm folded into the Conv2d registered just before it, and
    the (conv, norm) module names folded. The original is not touched (LoRS trains it with its BatchNorm
    parameters); without any BatchNorm it is what comes back (no copy of a large transformer)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()):
        return backbone, []
    folded = copy.deepcopy(backbone).eval()
    pairs = []
    for prefix, parent in list(folded.named_modules()):
        names = list(parent._modules)
        for conv_name, norm_name in zip(names, names[1:]):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            rest = _after_norm(norm)
            if rest is None or not _foldable(conv, norm):
                continue
            parent._modules[conv_name], parent._modules[norm_name] = fuse_conv_bn_eval(conv, norm), rest
            pairs.append((f"{prefix}.{conv_name}" if prefix else conv_name,
                          f"{prefix}.{norm_name}" if prefix else norm_name))
    return folded, pairs


class FoldedPair(NamedTuple):
    """A (conv, norm) pair folded, with the norm's fixed statistics as the fold reads them: -running_mean and
    1 / sqrt(running_var + eps), computed once (`fold_statistics`) rather than in every student step."""

    conv: str
    norm: str
    neg_mean: torch.Tensor
    inv_std: torch.Tensor


def fold_statistics(backbone: nn.Module, pairs: list[tuple[str, str]], device: torch.device,
                    dtype: torch.dtype) -> list[FoldedPair]:
    """`fold_parameters`' constants for `pairs` of `backbone`, on `device` in `dtype`: never inference tensors (a
    first call may come under inference_mode, later ones train through them)."""
    folds = []
    with torch.inference_mode(False), torch.no_grad():
        for conv, norm in pairs:
            bn = backbone.get_submodule(norm)
            mean, var = (s.to(device=device, dtype=dtype) for s in (bn.running_mean, bn.running_var))
            folds.append(FoldedPair(conv, norm, -mean, (var + bn.eps).rsqrt()))
    return folds


def fold_parameters(params: dict[str, torch.Tensor], folds: list[FoldedPair]) -> dict[str, torch.Tensor]:
    """The folded copy's parameters from the original's, differentiably in all of them (a student that trains the
    BatchNorm affine maps too): per output channel, scale = gamma / sqrt(running_var + eps), weight * scale and
    bias beta + (b - running_mean) * scale, with the fixed running statistics of `folds`.

    In float64 the folded function and its first and second derivatives are the unfolded ones to 1e-9
    (tests/test_lors.py); in float32 they differ by rounding, enough to put a ReLU6 pre-activation that sits
    within rounding of 0 or 6 on the other side of the kink (benchmarks/bench_lors.py, `--smooth`)."""
    out = dict(params)
    for conv, norm, neg_mean, inv_std in folds:
        weight = out.pop(f"{conv}.weight")
        bias = out.pop(f"{conv}.bias", None)
        gamma, beta = out.pop(f"{norm}.weight", None), out.pop(f"{norm}.bias", None)
        scale = inv_std if gamma is None else gamma * inv_std
        shift = neg_mean if bias is None else bias + neg_mean
        out[f"{conv}.weight"] = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        out[f"{conv}.bias"] = shift * scale if beta is None else beta + shift * scale
    return out


@torch.no_grad()
def same_function(original: nn.Module, folded: Callable[[torch.Tensor], torch.Tensor], image_size: int,
                  rtol: float = 1e-4) -> bool:
    """Whether the two give the same features on a seeded random batch (relative max error below `rtol`)."""
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    like = next(original.parameters(), torch.empty(0))
    pixels = pixels.to(like.device, like.dtype if like.is_floating_point() else torch.float32)
    want, got = original(pixels).float(), folded(pixels).float()
    return want.shape == got.shape and bool((want - got).abs().max() <= rtol * want.abs().max().clamp_min(1e-12))
