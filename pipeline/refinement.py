"""The refine step: the run's matched feature set refined through the evaluation protocol (stages/refine.py), in
<run>/refine.

Writes `refine/synthetic.safetensors` in the layout of `distill/synthetic.safetensors`, `refine/metrics.jsonl` (one
line per iteration: the real-pairs loss, the student lrs, and the probe's recall where taken) and a checkpoint
every `refine.ckpt_every` iterations and at the end, so a killed run continues where it stopped and a larger
`refine.iterations` continues a finished one. Keyed by the matched set's bytes and every setting the result depends
on: a current result is skipped, a changed set or setting starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from repblend.pipeline.config import Config, to_yaml
from repblend.pipeline.steps import encoder_range, load_features, refined_path, resolve_device, synthetic_path
from repblend.stages.encode import FeatureCache
from repblend.stages.io import read_checkpoint, tensors_metadata
from repblend.stages.progress import progress_bar

log = logging.getLogger("repblend")


def result_settings(config: Config) -> dict:
    """The refine settings a refined (or adapted) set depends on: not how long (unless a cosine lr spans the run),
    how often it probes or checkpoints, nor the unroll's segments, which change only rounding."""
    settings = {k: v for k, v in dataclasses.asdict(config.refine).items()
                if k not in ("enabled", "iterations", "ckpt_every", "eval_every", "segment_epochs")}
    for key, before in (("dropout", False), ("lr_schedule", "constant")):  # added later: sets made before keep keys
        if settings[key] == before:
            del settings[key]
    if config.refine.lr_schedule != "constant":  # the schedule spans the run: its length shapes every step
        settings["iterations"] = config.refine.iterations
    return settings


def lr_scale(schedule: str, iteration: int, iterations: int) -> float:
    """The refine lr's multiplier in 1-based `iteration` of `iterations`: 1, or cosine from 1 down towards 0."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (iteration - 1) / iterations))


def _key(source: Path, config: Config, train_settings) -> str:
    """What the refined set depends on: the matched set's bytes, the refine settings (not how long, how often it
    probes or checkpoints: a longer run continues a shorter one; not the unroll's segments, which change only
    rounding), the protocol, the seed."""
    from repblend.stages.io import file_digest

    settings = json.dumps([result_settings(config), dataclasses.asdict(train_settings), config.run.seed,
                           config.distill.clamp_features], sort_keys=True, default=str)
    return hashlib.sha256((file_digest(source) + settings).encode()).hexdigest()[:16]


def _specs(config: Config, syn: dict[str, torch.Tensor]):
    from repblend.stages.heads import HeadSpec

    dims = (syn["image_features"].shape[1], syn["texts"].shape[1])
    return tuple(HeadSpec(d, config.model.embed_dim, config.model.dropout) for d in dims)


def _real_batch(train, size: int, generator: torch.Generator, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` random real training captions with their images: the pairs one outer loss is taken on."""
    n_real = train.text_features.shape[0]
    idx = torch.randint(0, n_real, (min(size, n_real),), generator=generator).to(device)
    return train.image_features[train.caption_to_image[idx]], train.text_features[idx]


def _resume(checkpoint: Path, key: str, last: int, refiner, generator: torch.Generator, device: torch.device) -> int:
    """The iteration a checkpoint made under `key`, at or before `last`, reached (its state loaded); else 0."""
    if not checkpoint.is_file():
        return 0
    state = read_checkpoint(checkpoint, device)
    if state["key"] != key or state["iteration"] > last:
        return 0
    refiner.load_state_dict(state["refiner"])
    generator.set_state(state["generator"])
    return state["iteration"]


def _save(checkpoint: Path, key: str, iteration: int, refiner, generator: torch.Generator) -> None:
    from repblend.stages.io import atomic_path

    with atomic_path(checkpoint) as tmp:
        torch.save({"key": key, "iteration": iteration, "refiner": refiner.state_dict(),
                    "generator": generator.get_state()}, tmp)


def adapt_to_images(config: Config, syn: dict[str, torch.Tensor], train, device: torch.device, checkpoint: Path,
                    key: str) -> dict[str, torch.Tensor]:
    """The inverted set's texts, S and lrs after `invert.adapt_iterations` refine iterations (refine's settings)
    against its images' actual encodings, which stay fixed: the pixels cannot reach the refined features exactly,
    the free parts can follow them. Checkpointed like refine, under `key` (what the adaptation depends on, not how
    long it runs): a killed run continues, and a larger `adapt_iterations` continues a finished one. Its Adam lr is
    refine.lr throughout (refine.lr_schedule shapes refinement only)."""
    from repblend.pipeline.evaluation import train_settings
    from repblend.stages.refine import Refiner, RefineSettings

    rc, iterations = config.refine, config.invert.adapt_iterations
    settings = RefineSettings(rc.lr, rc.real_batch, rc.learn_lrs, None, rc.segment_epochs, learn_images=False,
                              dropout=rc.dropout)
    refiner = Refiner(syn, _specs(config, syn), train_settings(config), settings)
    generator = torch.Generator().manual_seed(config.run.seed * 7919 + 13)
    done = _resume(checkpoint, key, iterations, refiner, generator, device)
    if done:
        log.info("invert: adaptation resumes at iteration %d of %d from %s", done, iterations, checkpoint)
    with progress_bar(iterations, initial=done, desc="invert: adapting texts, S, lrs", unit="it",
                      enabled=config.run.progress, every=config.run.progress_every) as bar:
        for it in range(done + 1, iterations + 1):
            loss = refiner.step(*_real_batch(train, rc.real_batch, generator, device), generator)
            bar.set_postfix(real_loss=f"{loss:.4f}")
            bar.update()
            if it % rc.ckpt_every == 0 or it == iterations:
                _save(checkpoint, key, it, refiner, generator)
    adapted = refiner.tensors()
    return {name: adapted[name] for name in ("texts", "similarity", "syn_lr_img", "syn_lr_txt")}


def refine(config: Config, run_dir: Path, caches: dict[str, FeatureCache]) -> Path:
    """Refine the run's matched set (skipped when the refined set is current)."""
    from safetensors.torch import load_file

    from repblend.pipeline.evaluation import eval_seeds, evaluate_synthetic, protocol, train_settings
    from repblend.stages.io import write_tensors
    from repblend.stages.refine import Refiner, RefineSettings

    source, out = synthetic_path(run_dir), refined_path(run_dir)
    protocol_settings = train_settings(config)
    key = _key(source, config, protocol_settings)
    saved = tensors_metadata(out) if out.is_file() else {}
    if (saved.get("key"), saved.get("iterations")) == (key, str(config.refine.iterations)):
        log.info("refine: %s is up to date, skipped", out)
        return out
    device = resolve_device(config.run.device)
    syn = load_file(str(source), device=str(device))
    train = load_features(caches, config.data.train_split, device)
    rc = config.refine
    settings = RefineSettings(rc.lr, rc.real_batch, rc.learn_lrs,
                              encoder_range(train) if config.distill.clamp_features else None, rc.segment_epochs,
                              dropout=rc.dropout)
    refiner = Refiner(syn, _specs(config, syn), protocol_settings, settings)
    generator = torch.Generator().manual_seed(config.run.seed * 7919 + 11)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint, metrics_path = out.parent / "checkpoint.pt", out.parent / "metrics.jsonl"
    done = _resume(checkpoint, key, rc.iterations, refiner, generator, device)
    if done:  # lines past the checkpoint are redone
        log.info("refine: resuming at iteration %d of %d from %s", done, rc.iterations, checkpoint)
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        metrics_path.write_text("".join(line + "\n" for line in lines[:done]))
    else:
        metrics_path.unlink(missing_ok=True)
    measure = protocol(config, caches, config.data.eval_split, device) if rc.eval_every else None
    log.info("refine: %d iterations, each %d epochs of fresh heads on the %d pairs, Adam lr %g, %d real captions "
             "per loss", rc.iterations, protocol_settings.epochs, syn["texts"].shape[0], rc.lr, rc.real_batch)
    started = time.perf_counter()
    with open(metrics_path, "a") as metrics, progress_bar(rc.iterations, initial=done, desc="refine", unit="it",
                                                          enabled=config.run.progress,
                                                          every=config.run.progress_every) as bar:
        for it in range(done + 1, rc.iterations + 1):
            refiner.set_lr(rc.lr * lr_scale(rc.lr_schedule, it, rc.iterations))
            loss = refiner.step(*_real_batch(train, rc.real_batch, generator, device), generator)
            lr_img, lr_txt = refiner.student_lrs()
            row = {"iteration": it, "real_loss": round(loss, 5), "lr_img": lr_img, "lr_txt": lr_txt}
            if measure is not None and it % rc.eval_every == 0:
                probe = evaluate_synthetic(refiner.tensors(), measure, protocol_settings, eval_seeds(config)[:1],
                                           device)
                row["eval"] = {k: round(probe[k]["mean"], 2) for k in ("img_r10", "txt_r10", "r_mean")}
                log.info("refine it %d: %s r_mean %.2f (1 seed)", it, config.data.eval_split, row["eval"]["r_mean"])
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(real_loss=f"{loss:.4f}", lr_img=f"{lr_img:.4f}", lr_txt=f"{lr_txt:.4f}")
            bar.update()
            if it % rc.ckpt_every == 0 or it == rc.iterations:
                _save(checkpoint, key, it, refiner, generator)
    tensors = refiner.tensors() | {name: syn[name] for name in ("init_image_index", "init_caption_index")}
    meta = {"space": "feature", "mode": config.distill.mode, "refined_from": str(source), "key": key,
            "iterations": str(rc.iterations), "seed": str(config.run.seed),
            "image_encoder": config.encoders.image.name, "text_encoder": config.encoders.text.name,
            "config": to_yaml(config)}
    write_tensors(out, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    log.info("refine: %s (%.0f s)", out, time.perf_counter() - started)
    return out
