"""The invert step: the run's feature-space set turned into images (stages/invert.py), in <run>/invert.

The pixel set has the layout of a pixel-space distillation's `synthetic.safetensors` (its `image_features`
are the encoder's features of its pixels, what evaluation trains on), plus the `target_features` it was
inverted towards. Batches of images are kept as they finish, and adaptation (`invert.adapt_iterations`)
checkpoints like refine, so a killed run continues where it stopped; a changed distilled set or changed invert
settings start over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import torch

from repblend.pipeline.config import Config, to_yaml
from repblend.pipeline.steps import (build_image_encoder, encoder_range, final_path, inverted_path, load_features,
                                     pixels_of, resolve_device)
from repblend.stages.encode import FeatureCache
from repblend.stages.io import tensors_metadata
from repblend.stages.progress import progress_bar

log = logging.getLogger("repblend")


def _key(source: Path, config: Config) -> str:
    """What the inverted pixels depend on: the distilled set's bytes, the inversion settings, the encoder."""
    from repblend.stages.io import file_digest

    invert = {k: v for k, v in dataclasses.asdict(config.invert).items() if k != "adapt_iterations"}
    settings = repr((invert, dataclasses.asdict(config.encoders.image)))
    return hashlib.sha256((file_digest(source) + settings).encode()).hexdigest()[:16]


def _adapt_settings(config: Config) -> tuple:
    """What adapting the texts, S and lrs depends on besides the pixels and how long: refine's settings, the
    protocol, the seed."""
    from repblend.pipeline.evaluation import train_settings
    from repblend.pipeline.refinement import result_settings

    return result_settings(config), dataclasses.asdict(train_settings(config)), config.run.seed


def _adapt_key(pixels_key: str, config: Config) -> str:
    """The adaptation checkpoint's key: not how long, so a longer adaptation continues a shorter one."""
    return hashlib.sha256((pixels_key + repr(_adapt_settings(config))).encode()).hexdigest()[:16]


def _set_key(pixels_key: str, config: Config) -> str:
    """The inverted set's key: its pixels', and with `adapt_iterations` what the adapted texts, S and lrs add."""
    if not config.invert.adapt_iterations:
        return pixels_key
    settings = repr((config.invert.adapt_iterations, *_adapt_settings(config)))
    return hashlib.sha256((pixels_key + settings).encode()).hexdigest()[:16]


def _read_done(parts: Path, key: str) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    done = {}
    for part in sorted(parts.glob("batch-*.safetensors")):
        if tensors_metadata(part).get("key") == key:
            done[int(part.stem.split("-")[1])] = load_file(str(part))["pixels"]
        else:  # inverted from another set or with other settings
            part.unlink()
    return done


def invert(config: Config, run_dir: Path, caches: dict[str, FeatureCache]) -> Path:
    """Invert the run's distilled features into pixels (skipped when the inverted set is current)."""
    from safetensors.torch import load_file

    from repblend.stages.invert import InvertSettings
    from repblend.stages.invert import invert as invert_features
    from repblend.stages.io import write_json, write_tensors

    source, out = final_path(config, run_dir), inverted_path(run_dir)
    key = _key(source, config)
    set_key = _set_key(key, config)
    if out.is_file() and tensors_metadata(out).get("key") == set_key:
        log.info("invert: %s is up to date, skipped", out)
        return out
    device = resolve_device(config.run.device)
    syn = load_file(str(source), device=str(device))
    train = load_features(caches, config.data.train_split, device)  # its range, ids, and adaptation's real pairs
    target = syn["image_features"].float()
    low, high = encoder_range(train)
    outside = ((target < low) | (target > high)).float().mean().item()
    if outside > 0:
        log.warning("invert: %.0f%% of the distilled feature values lie outside the encoder's range [%.3g, %.3g] "
                    "and cannot be reached (distill.clamp_features=true keeps them inside)", 100 * outside, low, high)
    encoder = build_image_encoder(config, device)
    init = pixels_of(config, [train.image_ids[i] for i in syn["init_image_index"].tolist()], encoder).to(device)
    parts = out.parent / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    done = _read_done(parts, key)
    settings = InvertSettings(config.invert.steps, config.invert.lr, config.invert.batch_size)
    n, started = target.shape[0], time.perf_counter()
    if done:
        log.info("invert: %d of %d images already inverted, continuing", sum(p.shape[0] for p in done.values()), n)

    def keep(start: int, pixels: torch.Tensor) -> None:
        write_tensors(parts / f"batch-{start:05d}.safetensors", {"pixels": pixels.cpu().contiguous()},
                      metadata={"key": key})
        log.info("invert: images %d-%d of %d done (%.0f s)", start + 1, min(start + settings.batch_size, n), n,
                 time.perf_counter() - started)

    todo = -(-n // settings.batch_size) - len(done)
    if todo:
        log.info("invert: %d images, %d Adam steps per batch of %d, lr %g", n, settings.steps, settings.batch_size,
                 settings.lr)
    with progress_bar(todo * settings.steps, desc="invert", unit="step", enabled=config.run.progress and bool(todo),
                      every=config.run.progress_every) as bar:
        result = invert_features(encoder, target, init, settings, done=done, on_batch=keep,
                                 on_step=lambda: bar.update())
    summary = result.summary()
    if config.invert.adapt_iterations:
        from repblend.pipeline.refinement import adapt_to_images

        syn = syn | adapt_to_images(config, syn | {"image_features": result.features.to(device)}, train, device,
                                    out.parent / "adapt_checkpoint.pt", _adapt_key(key, config))
    tensors = {"images": result.pixels, "image_features": result.features, "target_features": target,
               "texts": syn["texts"], "similarity": syn["similarity"], "syn_lr_img": syn["syn_lr_img"],
               "syn_lr_txt": syn["syn_lr_txt"], "init_image_index": syn["init_image_index"],
               "init_caption_index": syn["init_caption_index"]}
    meta = {"space": "pixel", "mode": config.distill.mode, "inverted_from": str(source), "key": set_key,
            "seed": str(config.run.seed), "image_encoder": config.encoders.image.name,
            "text_encoder": config.encoders.text.name, "config": to_yaml(config)}
    write_tensors(out, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    write_json(out.parent / "summary.json", summary | {"seconds": round(time.perf_counter() - started, 1),
                                                        "outside_range": outside, "steps": settings.steps,
                                                        "lr": settings.lr,
                                                        "adapt_iterations": config.invert.adapt_iterations})
    log.info("invert: %s; relative feature error mean %.3f (max %.3f), cosine mean %.4f (min %.4f)", out,
             summary["relative_error_mean"], summary["relative_error_max"], summary["cosine_mean"],
             summary["cosine_min"])
    return out
