"""Config-driven wrappers around the stages: each turns a `Config` into a stage call.

Stages take plain arguments and know nothing of the config tree; this module is the only place that
maps config keys onto stage arguments, so the CLI and the Ray glue share one translation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from repblend.pipeline.config import Config
from repblend.stages.encode import EncoderIdentity, FeatureCache, cache_location, check_cache, encode_split
from repblend.stages.errors import ConfigError
from repblend.stages.ingest import CaptionTable, read_flickr8k, read_karpathy
from repblend.stages.wds import read_webdataset

log = logging.getLogger("repblend")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but no CUDA device is visible")
    return device


def load_table(config: Config) -> CaptionTable:
    """The whole dataset (all splits) in canonical form."""
    data = config.data
    if not data.root:
        raise ConfigError("data.root is not set: pass data.root=/path/to/dataset")
    root = Path(data.root).expanduser()
    if data.format == "flickr8k":
        return read_flickr8k(root, images=data.images, captions=data.annotations or "Flickr8k.token.txt",
                             on_error=data.on_error)
    if data.format == "karpathy":
        if not data.annotations:
            raise ConfigError("data.annotations must name the Karpathy JSON (e.g. dataset_flickr30k.json)")
        json_path = Path(data.annotations)
        json_path = json_path if json_path.is_absolute() else root / json_path
        return read_karpathy(json_path, root / data.images, on_error=data.on_error)
    return read_webdataset(str(root), on_error=data.on_error)


def load_split(config: Config, table: CaptionTable, split: str) -> CaptionTable:
    """One split, subset as configured (seeded, so every stage sees the same images)."""
    part = table.split(split)
    limit = config.data.max_train_images if split == config.data.train_split else config.data.max_eval_images
    return part.subset(limit, seed=config.run.seed) if limit else part


def encoder_identity(config: Config) -> EncoderIdentity:
    enc = config.encoders
    return EncoderIdentity(
        image={"name": enc.image.name, "weights": enc.image.weights, "image_size": enc.image.image_size},
        text={"name": enc.text.name, "weights": enc.text.weights, "pooling": enc.text.pooling,
              "max_length": enc.text.max_length},
        dtype=config.cache.dtype,
    )


def build_encoders(config: Config, device: torch.device):
    from repblend.stages.encoders import build_image_encoder, build_text_encoder

    enc = config.encoders
    torch.manual_seed(config.run.seed)  # "random"/"tiny" encoders must be the same in every run
    image = build_image_encoder(enc.image.name, weights=enc.image.weights, image_size=enc.image.image_size)
    text = build_text_encoder(enc.text.name, weights=enc.text.weights, pooling=enc.text.pooling,
                              max_length=enc.text.max_length)
    return image.to(device), text.to(device)


def encode(config: Config, splits: list[str] | None = None) -> dict[str, FeatureCache]:
    """Feature caches for the train and eval splits; splits whose cache exists are skipped."""
    device = resolve_device(config.run.device)
    table = load_table(config)
    identity = encoder_identity(config)
    default_root = Path("runs") / "cache" / config.data.name
    splits = splits or [config.data.train_split, config.data.eval_split]
    caches, todo = {}, []
    for split in splits:
        part = load_split(config, table, split)
        cache = cache_location(config.cache.dir, default_root, split, identity, part.fingerprint())
        if config.cache.overwrite or not check_cache(cache, identity, part.fingerprint()):
            todo.append((split, part, cache))
        else:
            log.info("encode %s: cache is up to date (%s), skipped", split, cache.tensors_path)
        caches[split] = cache
    if todo:
        image_encoder, text_encoder = build_encoders(config, device)
        for split, part, cache in todo:
            start = time.perf_counter()
            encode_split(part, split, cache, identity, image_encoder, text_encoder,
                         image_batch_size=config.encoders.image_batch_size,
                         text_batch_size=config.encoders.text_batch_size,
                         num_workers=config.encoders.num_workers, device=device,
                         on_error=config.data.on_error, progress=config.run.progress)
            log.info("encode %s: %d images, %d captions in %.1f s -> %s", split, len(part), part.num_captions,
                     time.perf_counter() - start, cache.tensors_path)
    return caches
