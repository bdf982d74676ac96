"""The LoRS baseline's student: the image side is the whole image encoder, the text side a projection head.

LoRS (and MTT-VL) train and match the full image encoder (NFNet-l0 there) on the image side against the text
projection head on the other ("asymmetric" matching); RepBlend matches two projection heads on frozen encoders.
To compare the two under one implementation, the encoder gets the same functional, flat-parameter form as the
heads (`EncoderSpec.apply_flat`), so the distillation and expert code serve both modes unchanged.

The encoder always runs in eval mode: BatchNorm uses its pretrained statistics and only the weights train, so a
student step is a pure function of its parameter vector (NFNet, the references' encoder, has no BatchNorm; here
EfficientNet-Lite0 has, and updating running statistics inside unrolled student steps would make them stateful).

Each student step is differentiated twice through the encoder, and two things make that cheaper without changing
the function: the BatchNorms are folded into the convolutions with parameters made differentiably from the flat
vector (`bnfold.fold_parameters`; BatchNorm's double backward was a fifth of the time), and grouped convolutions
take a double backward without PyTorch's loop over groups (`stages/convgrad.py`; over half the time). One LoRS
iteration, EfficientNet-Lite0 at 128 px, 99 pairs, 8 steps of 20, 2 CPU threads: 14.6 s -> 6.4 s
(benchmarks/bench_lors.py).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from repblend.stages.bnfold import FoldedPair, fold_batchnorm, fold_parameters, fold_statistics, same_function
from repblend.stages.convgrad import grouped_double_backward
from repblend.stages.heads import HeadSpec, ProjectionHead


class EncoderSpec:
    """Flat-parameter form of an image backbone: views of one vector, applied with `functional_call`.

    The backbone module itself is never modified: its parameters are replaced for the call only, and its
    buffers (BatchNorm statistics) are read as they are.
    """

    blend_output = True  # blending acts on what the encoder outputs (RepBlend blends encoder outputs too)

    def __init__(self, backbone: nn.Module, *, fold: bool = True, loop_free_convs: bool = True) -> None:
        """`fold` and `loop_free_convs` are the two speed-ups of `apply_flat` (on by default; off only to measure
        them: benchmarks/bench_lors.py)."""
        self.backbone = backbone.eval()
        self.loop_free_convs = loop_free_convs
        params = list(backbone.named_parameters())
        self.names = [name for name, _ in params]
        self.shapes = [tuple(p.shape) for _, p in params]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.num_params = sum(self.sizes)
        self.fold = TrainableFold(backbone, enabled=fold)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        if flat.dim() != 1 or flat.shape[0] != self.num_params:
            raise ValueError(f"flat encoder parameters must be a 1-D tensor of {self.num_params} values, "
                             f"got shape {tuple(flat.shape)}")
        return {name: part.view(shape)
                for name, part, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def flatten(self, module: nn.Module) -> Tensor:
        """A detached copy of `module`'s parameters (the backbone or a `FineTunedEncoder` of it) in flat order."""
        params = dict(_backbone_of(module).named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name in self.names])

    @torch.no_grad()
    def load_flat(self, module: nn.Module, flat: Tensor) -> nn.Module:
        params = dict(_backbone_of(module).named_parameters())
        for name, view in self.unflatten(flat.detach()).items():
            params[name].copy_(view)
        return module

    def apply_flat(self, flat: Tensor, x: Tensor, *, train: bool = False, generator=None) -> Tensor:
        """Encoder features of pixels `x` with parameters `flat`; differentiable in both (also twice)."""
        del train, generator  # eval mode always (see the module docstring)
        # a student step is differentiated twice: grouped (depthwise) convolutions take the loop-free form
        with grouped_double_backward() if self.loop_free_convs else contextlib.nullcontext():
            return self.fold(self.unflatten(flat), x)


class TrainableFold:
    """Runs a backbone whose BatchNorm parameters train with its BatchNorms folded into the convolutions
    (stages/bnfold.py): `fold_parameters` makes the folded copy's parameters from the backbone's, differentiably, so
    the function and its derivatives are the backbone's (BatchNorm's double backward was a fifth of a LoRS iteration,
    its backward a third of an encoder's). Built and checked against the backbone on first use (again for another
    device or dtype, or once its statistics changed); the backbone itself runs where nothing folds or the check
    fails."""

    def __init__(self, backbone: nn.Module, enabled: bool = True) -> None:
        self.backbone = backbone
        self.enabled = enabled
        self.folded: tuple[nn.Module, list[FoldedPair]] | None = None
        self.built_for: tuple | None = None  # what `folded` was built and checked for (`_key`)
        self.watched: list[dict[str, Tensor | None]] = []  # the folded norms' live buffer dicts

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.enabled and self.built_for != self._key(x):
            self._build(x)
        if self.folded is None:
            return functional_call(self.backbone, params, (x,))
        module, folds = self.folded
        if x.device.type == "cpu":
            # oneDNN: NHWC is the fast path (7.7 -> 6.4 s per LoRS iteration on 2 threads)
            x = x.contiguous(memory_format=torch.channels_last)
        return functional_call(module, fold_parameters(params, folds), (x,))

    def _build(self, x: Tensor) -> None:
        folded, pairs = fold_batchnorm(self.backbone)
        folds = fold_statistics(self.backbone, pairs, x.device, x.dtype)
        self.watched = [self.backbone.get_submodule(norm)._buffers for _, norm in pairs]
        params = dict(self.backbone.named_parameters())
        ok = bool(pairs) and same_function(
            self.backbone, lambda px: functional_call(folded, fold_parameters(params, folds), (px,)), x.shape[-1])
        self.folded, self.built_for = ((folded, folds) if ok else None), self._key(x)

    def _key(self, x: Tensor) -> tuple:
        """The input's device and dtype, and the folded norms' statistics as they are now: the fold's constants are
        computed once, so statistics changed in place (a loaded state dict) or replaced make it rebuild (inference
        tensors keep no version: only their replacement shows). Runs every call: about 30 us for Lite0's 98 statistics
        on a CPU, where walking `backbone.buffers()` took 300 us, two thirds of the 440 us that computing the
        constants per call had cost."""
        return x.device, x.dtype, *((id(t), 0 if t.is_inference() else t._version)
                                    for buffers in self.watched
                                    for t in (buffers["running_mean"], buffers["running_var"]))


class FineTunedEncoder(nn.Module):
    """A trainable copy of a frozen backbone that stays in eval mode (BatchNorm statistics fixed), run with its
    BatchNorms folded (`TrainableFold`)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self.backbone.eval()
        self.fold = TrainableFold(self.backbone)  # a plain attribute: its folded copy is no submodule

    def train(self, mode: bool = True) -> "FineTunedEncoder":  # noqa: D401 - nn.Module API
        """Stays in eval mode: see the module docstring."""
        return super().train(False)

    def forward(self, pixels: Tensor, chunk: int = 256) -> Tensor:
        params = dict(self.backbone.named_parameters())
        if torch.is_grad_enabled() or pixels.shape[0] <= chunk:
            return self.fold(params, pixels)
        return torch.cat([self.fold(params, part) for part in pixels.split(chunk)])  # inference over a whole split


class LorsModel(nn.Module):
    """The LoRS student as a module: image embedding = encoder features, text embedding = head(text features).
    Same interface as `DualHeads` (`.image`, `.text`, forward -> L2-normalised embeddings)."""

    def __init__(self, backbone: nn.Module, txt_dim: int, feature_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.image = FineTunedEncoder(backbone)
        self.text = ProjectionHead(txt_dim, feature_dim, dropout)

    def forward(self, pixels: Tensor, txt_feats: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.image(pixels), dim=-1), F.normalize(self.text(txt_feats), dim=-1)


def _backbone_of(module: nn.Module) -> nn.Module:
    return module.backbone if isinstance(module, FineTunedEncoder) else module


def lors_specs(backbone: nn.Module, txt_dim: int, feature_dim: int, dropout: float) -> tuple[EncoderSpec, HeadSpec]:
    """Image side: the whole encoder; text side: a head into the encoder's feature space (no image head)."""
    return EncoderSpec(backbone), HeadSpec(txt_dim, feature_dim, dropout)
