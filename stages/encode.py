"""Feature cache: run the frozen encoders over a split once and keep the result.

The references re-encode augmented JPEGs on every expert and distillation step; with frozen encoders
the features never change, so we compute them once per (inputs, encoders) and every later stage reads
two small matrices. A cache is a pair of files per split: `<stem>.safetensors` (image features,
caption features, caption-to-image index) and `<stem>.json` (the manifest: what built it, from what).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from repblend.stages.encoders import ImageEncoder, TextEncoder, encode_texts
from repblend.stages.errors import CacheError, DataError
from repblend.stages.ingest import CaptionTable, load_image
from repblend.stages.io import kept_part, write_json, write_tensors
from repblend.stages.progress import DEFAULT_EVERY, progress_bar

CACHE_VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EncoderIdentity:
    """What decides the features: enough to refuse a cache built by something else."""

    image: dict[str, Any]
    text: dict[str, Any]
    dtype: str

    def key(self, fingerprint: str) -> str:
        blob = json.dumps({"image": self.image, "text": self.text, "dtype": self.dtype, "inputs": fingerprint},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class CachedFeatures:
    """One split's features in memory."""

    image_features: torch.Tensor  # [n_images, d_img]
    text_features: torch.Tensor  # [n_captions, d_txt]
    caption_to_image: torch.Tensor  # [n_captions] int64
    image_ids: list[str]
    captions: list[str]
    manifest: dict[str, Any]

    @property
    def num_images(self) -> int:
        return self.image_features.shape[0]


@dataclass(frozen=True)
class FeatureCache:
    """A record pointing at one split's cache files; cheap to pass around (and through Ray)."""

    tensors_path: Path
    manifest_path: Path

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def exists(self) -> bool:
        return self.tensors_path.is_file() and self.manifest_path.is_file()

    def load(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CachedFeatures:
        manifest = self.manifest()
        with safe_open(str(self.tensors_path), framework="pt") as f:
            img = f.get_tensor("image_features").to(device=device, dtype=dtype)
            txt = f.get_tensor("text_features").to(device=device, dtype=dtype)
            c2i = f.get_tensor("caption_to_image").to(device=device)
        for side, feats in (("image", img), ("text", txt)):
            want = manifest.get(f"{side}_encoder", {}).get("feature_dim")
            if want is not None and feats.shape[1] != want:
                raise CacheError(f"{self.tensors_path}: {side} features are {feats.shape[1]}-d but its manifest "
                                 f"{self.manifest_path.name} says {want}-d; rebuild with cache.overwrite=true")
        return CachedFeatures(img, txt, c2i, manifest["image_ids"], manifest["captions"], manifest)


def cache_location(cache_dir: str, default_root: Path, split: str, identity: EncoderIdentity,
                   fingerprint: str) -> FeatureCache:
    """Explicit dir: `<dir>/<split>.*` (verified on use). Default: content-addressed under default_root."""
    if cache_dir:
        stem = Path(cache_dir) / split
    else:
        stem = default_root / f"{split}-{identity.key(fingerprint)}"
    return FeatureCache(stem.with_suffix(".safetensors"), stem.with_suffix(".json"))


def check_cache(cache: FeatureCache, identity: EncoderIdentity, fingerprint: str) -> bool:
    """True if `cache` holds exactly what is asked for, False if absent; CacheError if it holds something else."""
    if not cache.exists():
        return False
    try:
        manifest = cache.manifest()
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{cache.manifest_path}: unreadable cache manifest ({exc})") from exc
    where = cache.manifest_path
    for side, want in (("image", identity.image), ("text", identity.text)):
        have = manifest.get(f"{side}_encoder", {})
        diffs = [f"{k}={have.get(k)!r} (config: {v!r})" for k, v in want.items() if have.get(k) != v]
        if diffs:
            raise CacheError(f"{where}: cache was built with another {side} encoder: {', '.join(diffs)}; "
                             "use another cache.dir or cache.overwrite=true")
    if manifest.get("dtype") != identity.dtype:
        raise CacheError(f"{where}: cache dtype {manifest.get('dtype')} but config asks cache.dtype={identity.dtype}")
    if manifest.get("inputs_fingerprint") != fingerprint:
        raise CacheError(f"{where}: cache was built from different inputs (images or captions changed); "
                         "use another cache.dir or cache.overwrite=true")
    return True


class _ImageDataset(Dataset):
    """Decodes and preprocesses images in loader workers; returns errors instead of raising them,
    so the main process can name the file in one line (worker exceptions arrive as tracebacks)."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(load_image(self.paths[i])), ""
        except DataError as exc:
            return i, None, str(exc)
        except Exception as exc:  # PIL raises many types for broken files
            return i, None, f"{self.paths[i]}: cannot decode image ({exc})"


def _autocast(device: torch.device):
    """bf16 on GPU (features are stored as fp16/fp32 anyway); full precision on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _collate(batch):
    return batch


CHUNK_IMAGES = 4096  # about this many images between two kept parts of an encode (rounded up to whole batches)


def encode_images(encoder: ImageEncoder, paths: list[str], *, batch_size: int, num_workers: int,
                  device: torch.device, on_error: str, progress: bool, desc: str,
                  progress_every: float = DEFAULT_EVERY, keep: Path | None = None) -> tuple[torch.Tensor, list[int]]:
    """Features of every decodable image, and the indices of the images that were kept. With `keep`, they are kept
    there in parts of whole batches as they are made, and the parts a killed encode made (on the same device, in the
    same batches) are read back: the same features as one pass, without decoding those images again."""
    chunk = batch_size * max(1, math.ceil(CHUNK_IMAGES / batch_size)) if keep is not None else max(1, len(paths))
    features, kept = [], []
    bar = progress_bar(len(paths), desc=desc, unit="img", enabled=progress, every=progress_every)
    for start in range(0, len(paths), chunk):
        some = paths[start:start + chunk]
        part = None if keep is None else keep / f"images-{start:09d}.safetensors"
        made_by = {"device": device.type, "batch_size": str(batch_size), "images": str(len(some))}

        def make(some: list[str] = some) -> dict[str, torch.Tensor]:
            made, made_kept = _encode_part(encoder, some, batch_size, num_workers, device, on_error, bar)
            return {"features": made, "kept": torch.tensor(made_kept, dtype=torch.long)}

        done, read_back = kept_part(part, made_by, make)
        if read_back:
            bar.update(len(some))
        part_features, part_kept = done["features"], done["kept"].tolist()
        features.append(part_features)
        kept.extend(start + i for i in part_kept)
    bar.close()
    if not kept:
        raise DataError(f"no image could be decoded ({len(paths)} tried)")
    return torch.cat(features), kept


def _encode_part(encoder: ImageEncoder, paths: list[str], batch_size: int, num_workers: int, device: torch.device,
                 on_error: str, bar) -> tuple[torch.Tensor, list[int]]:
    loader = DataLoader(_ImageDataset(paths, encoder.preprocess.transform()), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, persistent_workers=False)
    features, kept = [torch.empty(0, encoder.feature_dim)], []
    with torch.inference_mode(), _autocast(device):
        for batch in loader:
            good = []
            for i, pixels, error in batch:
                if pixels is None:
                    if on_error == "stop":
                        raise DataError(error)
                    warnings.warn(f"skipping image: {error}", stacklevel=2)
                else:
                    good.append((i, pixels))
            if good:
                x = torch.stack([p for _, p in good]).to(device).contiguous(memory_format=torch.channels_last)
                features.append(encoder(x).float().cpu())
                kept.extend(i for i, _ in good)
            bar.update(len(batch))
    return torch.cat(features), kept


def parts_dir(cache: FeatureCache, identity: EncoderIdentity, fingerprint: str) -> Path:
    """Where a split's encode keeps its finished parts (images, captions) until the cache is written: named by the
    encoders and inputs, since an explicit cache.dir keeps one stem for any of them."""
    return cache.tensors_path.with_name(f"{cache.tensors_path.stem}.parts-{identity.key(fingerprint)}")


def encode_split(table: CaptionTable, split: str, cache: FeatureCache, identity: EncoderIdentity,
                 image_encoder: ImageEncoder | None, text_encoder: TextEncoder, *, fingerprint: str | None = None,
                 image_batch_size: int = 64,
                 text_batch_size: int = 256, num_workers: int = 2, device: str | torch.device = "cpu",
                 on_error: str = "stop", progress: bool = True, progress_every: float = DEFAULT_EVERY,
                 image_features: tuple[torch.Tensor, list[int]] | None = None) -> FeatureCache:
    """Encode one split into `cache` (atomically: manifest written last, so a crash leaves no cache).

    `image_features` (features, indices of the decodable images) may come from elsewhere, e.g. Ray Data;
    then `image_encoder` is not used and may be None."""
    device = torch.device(device)
    start = time.perf_counter()
    records = table.records
    fingerprint = fingerprint or table.fingerprint()
    parts = parts_dir(cache, identity, fingerprint)
    if image_features is None:
        image_features = encode_images(image_encoder, [r.path for r in records], batch_size=image_batch_size,
                                       num_workers=num_workers, device=device, on_error=on_error,
                                       progress=progress, desc=f"encode {split} images", progress_every=progress_every,
                                       keep=parts)
    img_feats, kept = image_features
    kept_records = [records[i] for i in kept]
    captions = [c for r in kept_records for c in r.captions]
    caption_to_image = torch.tensor([i for i, r in enumerate(kept_records) for _ in r.captions], dtype=torch.long)
    image_seconds = time.perf_counter() - start
    with _autocast(device):
        txt_feats = encode_texts(text_encoder, captions, batch_size=text_batch_size, progress=progress,
                                 progress_every=progress_every, keep=parts)
    dtype = _DTYPES[identity.dtype]
    write_tensors(cache.tensors_path, {
        "image_features": img_feats.to(dtype),
        "text_features": txt_feats.float().cpu().to(dtype),
        "caption_to_image": caption_to_image,
    })
    seconds = time.perf_counter() - start
    manifest = {
        "version": CACHE_VERSION,
        "split": split,
        "num_images": len(kept_records),
        "num_captions": len(captions),
        "image_encoder": {**identity.image, "feature_dim": int(img_feats.shape[1])},
        "text_encoder": {**identity.text, "feature_dim": text_encoder.feature_dim},
        "dtype": identity.dtype,
        "inputs_fingerprint": fingerprint,
        "skipped_images": len(records) - len(kept_records),
        "seconds": {"images": round(image_seconds, 2), "total": round(seconds, 2)},
        "image_ids": [r.image_id for r in kept_records],
        "image_paths": [r.path for r in kept_records],
        "captions": captions,
    }
    write_json(cache.manifest_path, manifest)
    # with the parts of killed encodes under other encoders or inputs into this same file (an explicit cache.dir),
    # which nothing would read again
    for done in parts.parent.glob(f"{cache.tensors_path.stem}.parts-*"):
        shutil.rmtree(done, ignore_errors=True)
    return cache
