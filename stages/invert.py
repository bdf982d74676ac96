"""Feature-to-pixel inversion: turn a feature-space distilled set into images the frozen encoder maps onto it.

RepBlend matches trajectories of heads that sit on top of a frozen encoder, so a pixel-space set is a
feature-space set parameterised through the encoder. Distilling features directly is much cheaper (no
encoder in the loop) and, at equal student steps, at least as good; inverting them afterwards gives a set of
images, which is what the paper's setting publishes and evaluates. Each image starts from the real image its
pair was initialised from and descends the relative squared error between its encoding and its target
(squared error, not cosine: the heads are linear, so the feature's scale matters). Pixels stay inside the
valid image range, so the published PNG is the evaluated set up to 8-bit rounding. Images are independent:
they are inverted in batches, and finished batches survive a crash (`done` / `on_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repblend.stages.encoders import ImageEncoder, ImagePreprocess


@dataclass(frozen=True)
class InvertSettings:
    steps: int = 300
    lr: float = 0.05  # Adam, on pixels in the encoder's normalised space
    batch_size: int = 33


@dataclass
class Inversion:
    """Pixels, their encodings, and how far each encoding is from its target."""

    pixels: torch.Tensor  # [N,3,S,S], normalised space
    features: torch.Tensor  # encoder(pixels), [N,d]
    relative_error: torch.Tensor  # |f - target| / |target| per image
    cosine: torch.Tensor  # cos(f, target) per image

    def summary(self) -> dict[str, float]:
        return {"relative_error_mean": float(self.relative_error.mean()),
                "relative_error_max": float(self.relative_error.max()),
                "cosine_mean": float(self.cosine.mean()), "cosine_min": float(self.cosine.min())}


def pixel_bounds(preprocess: ImagePreprocess, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised values of pixel intensities 0 and 1, per channel, shaped to clamp [B,3,S,S]."""
    black = torch.zeros(1, 3, 1, 1, dtype=like.dtype, device=like.device)
    return preprocess.normalize(black), preprocess.normalize(black + 1)


def relative_error(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (features - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)


def invert_batch(encoder: nn.Module, target: torch.Tensor, init: torch.Tensor, settings: InvertSettings,
                 bounds: tuple[torch.Tensor, torch.Tensor], on_step: Callable[[], None] | None = None
                 ) -> torch.Tensor:
    """Pixels whose encodings approach `target`, starting from `init` (both on the encoder's device)."""
    pixels = init.clone().clamp_(*bounds).requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=settings.lr)
    scale = target.pow(2).sum(1).clamp_min(1e-12)
    for _ in range(settings.steps):
        loss = ((encoder(pixels) - target).pow(2).sum(1) / scale).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pixels.clamp_(*bounds)
        if on_step is not None:
            on_step()
    return pixels.detach()


def invert(encoder: ImageEncoder, target: torch.Tensor, init: torch.Tensor, settings: InvertSettings, *,
           done: dict[int, torch.Tensor] | None = None, on_batch: Callable[[int, torch.Tensor], None] | None = None,
           on_step: Callable[[], None] | None = None) -> Inversion:
    """Invert every target row, batch by batch.

    `done` maps a batch's first row to pixels already inverted (a resumed run skips them); `on_batch(start,
    pixels)` is called after each new batch, so a caller can keep it on disk; `on_step()` after each Adam step.
    """
    if target.shape[0] != init.shape[0]:
        raise ValueError(f"{target.shape[0]} target features but {init.shape[0]} initial images")
    encoder.eval()
    done = done or {}
    bounds = pixel_bounds(encoder.preprocess, init)
    parts = []
    for start in range(0, target.shape[0], settings.batch_size):
        stop = min(start + settings.batch_size, target.shape[0])
        pixels = done.get(start)
        if pixels is None or pixels.shape[0] != stop - start:
            pixels = invert_batch(encoder, target[start:stop], init[start:stop], settings, bounds, on_step)
            if on_batch is not None:
                on_batch(start, pixels)
        parts.append(pixels.to(init.device))
    pixels = torch.cat(parts)
    with torch.no_grad():
        features = torch.cat([encoder(part) for part in pixels.split(settings.batch_size)]).float()
    return Inversion(pixels, features, relative_error(features, target.float()),
                     F.cosine_similarity(features, target.float(), dim=1))
