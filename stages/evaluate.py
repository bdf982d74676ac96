"""Evaluation protocol (ALGORITHMS.md section 5): fresh heads trained on a set, retrieval on held-out data.

The same function trains on a distilled set (wBCE against its learned S, at its learned lrs), on a
coreset of real pairs (identity targets) or on all real pairs (the upper bound), so every row of the
results table comes from one protocol.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repblend.stages.diagnostics import DIAGNOSTICS, collapse_diagnostics
from repblend.stages.ebr import EBRDualHeads, EBRSettings, ebr_param_groups, ebr_step
from repblend.stages.heads import DualHeads, heads_sgd
from repblend.stages.losses import clip_loss, wbce_loss
from repblend.stages.retrieval import NonFiniteEmbeddings, retrieval_metrics

METRICS = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")


@dataclass(frozen=True)
class TrainSettings:
    embed_dim: int
    dropout: float = 0.1
    temperature: float = 0.07
    epochs: int = 100
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    loss: str = "wbce"  # wbce | clip
    schedule: str = "step"  # step: lr x0.1 at epoch epochs//2+1 (reference) | cosine
    ebr: EBRSettings | None = None  # explicit basis reallocation on top of the heads; None = plain heads


@dataclass(frozen=True)
class PairSet:
    """Training pairs in feature space: row i of `images` goes with row i of `texts`."""

    images: torch.Tensor  # [M, d_img]
    texts: torch.Tensor  # [M, d_txt]
    targets: torch.Tensor | None = None  # [M, M] soft similarity; None = identity
    lr_img: float = 0.1
    lr_txt: float = 0.1


def _batch_loss(heads: DualHeads, pairs: PairSet, idx: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    img_emb, txt_emb = heads(pairs.images[idx], pairs.texts[idx])
    return _embedding_loss(img_emb, txt_emb, pairs, idx, settings)


def _embedding_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, pairs: PairSet, idx: torch.Tensor,
                    settings: TrainSettings) -> torch.Tensor:
    logits = img_emb @ txt_emb.T / settings.temperature
    if settings.loss == "clip":
        return clip_loss(logits)
    if pairs.targets is None:
        targets = torch.eye(len(idx), device=logits.device)
    else:
        targets = pairs.targets[idx][:, idx]
    return wbce_loss(logits, targets)


def train_heads(pairs: PairSet, settings: TrainSettings, seed: int, device: torch.device,
                on_epoch: Callable[[int, DualHeads], None] | None = None,
                stop_after: int | None = None, model: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Fresh heads trained on `pairs`; each epoch is a fresh shuffle in ceil(M / batch) batches.
    `stop_after` ends training early while keeping the lr schedule of `settings.epochs`.
    With `settings.ebr` the heads carry an EBR adapter (built after the heads, so they start identical).
    `model` builds another student with the heads' interface (LoRS: the encoder itself on pixels)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    heads = (model() if model is not None else
             DualHeads(pairs.images.shape[1], pairs.texts.shape[1], settings.embed_dim, settings.dropout)).to(device)
    pairs = PairSet(pairs.images.to(device).float(), pairs.texts.to(device).float(),
                    None if pairs.targets is None else pairs.targets.to(device).float(), pairs.lr_img, pairs.lr_txt)
    optimizer = heads_sgd(heads, pairs.lr_img, pairs.lr_txt, settings.momentum, settings.weight_decay)
    if settings.ebr is not None:
        heads = EBRDualHeads(heads, settings.ebr).to(device)
        for group in ebr_param_groups(heads.adapter, (pairs.lr_img, pairs.lr_txt), settings.ebr.lr_scale):
            optimizer.add_param_group(group)
    if settings.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [settings.epochs // 2 + 1], gamma=0.1)
    m = pairs.images.shape[0]
    for epoch in range(stop_after or settings.epochs):
        heads.train()
        order = torch.randperm(m, generator=generator).to(device)
        for b in range(math.ceil(m / settings.batch_size)):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            if settings.ebr is not None:
                ebr_step(heads, optimizer, lambda i, t: _embedding_loss(i, t, pairs, idx, settings),
                         pairs.images[idx], pairs.texts[idx])
            else:
                loss = _batch_loss(heads, pairs, idx, settings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        scheduler.step()
        if on_epoch is not None:
            heads.eval()
            on_epoch(epoch + 1, heads)
    heads.eval()
    return heads


@torch.inference_mode()
def retrieval_of(heads: DualHeads, image_features: torch.Tensor, text_features: torch.Tensor,
                 caption_to_image: torch.Tensor, device: torch.device) -> dict[str, float]:
    heads.eval()
    img = F.normalize(heads.image(image_features.to(device).float()), dim=-1)
    txt = F.normalize(heads.text(text_features.to(device).float()), dim=-1)
    return retrieval_metrics(img, txt, caption_to_image.to(device))


def summarize(runs: list[dict[str, float]], keys: tuple[str, ...] = METRICS) -> dict[str, dict[str, float]]:
    """mean and (sample) std over evaluation seeds, per metric."""
    out = {}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


DIVERGED = "diverged"  # marks a run whose model diverged in training (scored_retrieval)


def scored_retrieval(heads: DualHeads, image_features: torch.Tensor, text_features: torch.Tensor,
                     caption_to_image: torch.Tensor, device: torch.device) -> dict[str, float]:
    """`retrieval_of`, except that a model whose embeddings are not finite (it diverged in training) retrieves
    nothing: it scores 0 on every metric and is marked, so that one unstable seed, lr or set is reported in its
    row instead of stopping an evaluation of many."""
    try:
        return retrieval_of(heads, image_features, text_features, caption_to_image, device)
    except NonFiniteEmbeddings:
        return dict.fromkeys(METRICS, 0.0) | {DIVERGED: 1.0}


def summarize_seeds(runs: list[dict[str, float]], diagnostics: list[dict[str, float] | None] | None = None) -> dict:
    """mean ± std over seeds (a diverged seed counts 0, and `diverged_seeds` says how many did); with
    `diagnostics`, theirs over the seeds that did not diverge under "diagnostics"."""
    result: dict = summarize(runs)
    diverged = sum(1 for run in runs if run.get(DIVERGED))
    if diverged:
        result["diverged_seeds"] = diverged
    kept = [d for d in diagnostics or [] if d is not None]
    if kept:
        result["diagnostics"] = summarize(kept, DIAGNOSTICS)
    return result


def set_diagnostics(heads: DualHeads, pairs: PairSet, device: torch.device) -> dict[str, float]:
    """Collapse diagnostics of a training set, in the shared space of the heads trained on it."""
    heads.eval()
    with torch.no_grad():  # not inference_mode: the modality probe trains a classifier on these embeddings
        img = heads.image(pairs.images.to(device).float())
        txt = heads.text(pairs.texts.to(device).float())
    return collapse_diagnostics(img, txt)


def evaluate_pairs(pairs: PairSet, settings: TrainSettings,
                   eval_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   seeds: list[int], device: torch.device, diagnose: bool = False,
                   model: Callable[[], nn.Module] | None = None) -> dict[str, dict]:
    """Train once per seed on `pairs`, report retrieval on the eval split as mean +- std; with `diagnose`,
    also the set's collapse diagnostics under the "diagnostics" key (see `summarize_seeds` for diverged seeds)."""
    return evaluate_seeds(((seed, pairs) for seed in seeds), settings, eval_features, device, diagnose, model)


def evaluate_seeds(per_seed: Iterable[tuple[int, PairSet]], settings: TrainSettings,
                   eval_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device,
                   diagnose: bool = False, model: Callable[[], nn.Module] | None = None) -> dict[str, dict]:
    """`evaluate_pairs` where each seed trains on a set of its own (coresets: one draw per seed)."""
    runs, diagnostics = [], []
    for seed, pairs in per_seed:
        heads = train_heads(pairs, settings, seed, device, model=model)
        runs.append(scored_retrieval(heads, *eval_features, device))
        diverged = runs[-1].get(DIVERGED)
        diagnostics.append(set_diagnostics(heads, pairs, device) if diagnose and not diverged else None)
    return summarize_seeds(runs, diagnostics)
