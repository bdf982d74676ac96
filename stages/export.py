"""The distilled set as something to publish: a loader for `synthetic.safetensors`, and WebDataset shards any
reader opens (PNG image, the real captions nearest to each synthetic text embedding, the soft-label row).

The synthetic texts are embeddings, not strings; the nearest real captions (cosine, in the text encoder's
space) are what a reader can look at. The exact tensors stay in the shard too (`pixels.npy`, `text.npy`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open

from repblend.stages.errors import DataError


@dataclass
class DistilledSet:
    """A distilled set as saved by `repblend distill`: tensors plus how they were made."""

    images: torch.Tensor  # [N,3,H,W] pixels in the encoder's normalised space, or [N,d] features (feature space)
    image_features: torch.Tensor  # [N, d_img] what evaluation trains on
    texts: torch.Tensor  # [N, d_txt] text-encoder embeddings
    similarity: torch.Tensor  # [N, N] learned soft targets
    syn_lr_img: float
    syn_lr_txt: float
    init_image_index: torch.Tensor  # [N] the training images the pairs started from (cache order)
    metadata: dict[str, str]

    @property
    def num_pairs(self) -> int:
        return self.texts.shape[0]

    @property
    def pixel_space(self) -> bool:
        return self.images.dim() == 4


def load_distilled(path: str | Path) -> DistilledSet:
    """Read `synthetic.safetensors`; a missing or foreign file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no distilled set here")
    needed = ("images", "image_features", "texts", "similarity", "syn_lr_img", "syn_lr_txt", "init_image_index")
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [k for k in needed if k not in f.keys()]
            if missing:
                raise DataError(f"{path}: not a repblend distilled set (missing {', '.join(missing)})")
            t = {k: f.get_tensor(k) for k in needed}
            metadata = dict(f.metadata() or {})
    except SafetensorError as exc:
        raise DataError(f"{path}: not a safetensors file ({exc})") from exc
    return DistilledSet(t["images"], t["image_features"], t["texts"], t["similarity"], float(t["syn_lr_img"]),
                        float(t["syn_lr_txt"]), t["init_image_index"], metadata)


def nearest_captions(texts: torch.Tensor, caption_features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of the real captions closest (cosine) to each synthetic text embedding."""
    scores = F.normalize(texts.float(), dim=-1) @ F.normalize(caption_features.float(), dim=-1).T
    return scores.topk(min(k, caption_features.shape[0]), dim=1).indices


def png_bytes(pixels01: torch.Tensor) -> bytes:
    """[3,H,W] in [0,1] -> PNG (8 bits per channel)."""
    array = (pixels01.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def shard_samples(distilled: DistilledSet, captions: list[str], caption_features: torch.Tensor,
                  denormalize, k: int = 5, init_image_ids: list[str] | None = None):
    """One WebDataset sample per synthetic pair: `png` (pixel space), `json`, `pixels.npy` or `image.npy`,
    `text.npy`. `init_image_ids` names the real image each pair started from."""
    nearest = nearest_captions(distilled.texts, caption_features, k)
    for i in range(distilled.num_pairs):
        meta = {"index": i, "init_image_id": init_image_ids[i] if init_image_ids else None,
                "nearest_captions": [captions[j] for j in nearest[i].tolist()],
                "nearest_caption_ids": nearest[i].tolist(),
                "soft_labels": distilled.similarity[i].float().tolist()}
        sample = {"__key__": f"{i:06d}", "json": json.dumps(meta, ensure_ascii=False),
                  "text.npy": npy_bytes(distilled.texts[i].float().numpy())}
        if distilled.pixel_space:
            sample["png"] = png_bytes(denormalize(distilled.images[i].float()))
            sample["pixels.npy"] = npy_bytes(distilled.images[i].float().numpy())
        else:
            sample["image.npy"] = npy_bytes(distilled.images[i].float().numpy())
        yield sample
