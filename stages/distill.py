"""RepBlend distillation: symmetric projection trajectory matching with representation blending.

Design: the inner loop always runs in feature space. In pixel mode the frozen image encoder runs ONCE
per iteration over the synthetic images, its output `u` is cut from the graph, the matching loss is
differentiated w.r.t. `u`, and a single backward through the encoder carries that gradient to the pixels.
This equals differentiating through the encoder inside every student step (the encoder is frozen and
synthetic images are not augmented during distillation) and costs one encoder pass instead of 2 x syn_steps.

Two gradient modes (ALGORITHMS.md section 4):
- `unroll`: exact MTT, student steps kept in the graph (create_graph=True).
- `tesla`: the references' constant-memory two-pass form; drops the cross-step terms.
Student steps use no dropout, so both passes see the same function and runs are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from repblend.stages.heads import HeadSpec, similarity_logits
from repblend.stages.lors import EncoderSpec
from repblend.stages.losses import FullSimilarity, LowRankSimilarity, clip_loss, wbce_loss


@dataclass(frozen=True)
class DistillSettings:
    syn_steps: int = 8
    expert_epochs: int = 1
    max_start_epoch: int = 2
    mini_batch_size: int = 20
    temperature: float = 0.07
    loss: str = "wbce"  # wbce | clip
    merge_loss_branches: bool = False
    grad_mode: str = "unroll"  # unroll | tesla
    student: str = "flat"  # the unroll's student heads: flat | factored (stages/factored.py)
    blend: bool = True
    beta_a: float = 1.0
    beta_b: float = 1.0
    noise: float = 0.0  # perturbation study: Gaussian noise, this many times the representation's RMS (0 = none)
    # pixel space: 0 = the encoder graph of every image the iteration uses is kept until the match ends (fastest);
    # k > 0 = encode once without a graph, then recompute and back-propagate k images at a time (one more
    # forward, peak memory of k images' graph)
    encode_chunk: int = 0


@dataclass(frozen=True)
class StudentBatch:
    """One student step's sample: indices into the synthetic set and its blending (or noise) draw."""

    idx: torch.Tensor
    lam: float | None  # None: no blending
    perm: torch.Tensor | None
    noise: float = 0.0
    noise_seed: int | None = None  # the noise is regenerated from this seed, so TESLA's pass 2 sees pass 1's


class SyntheticSet(nn.Module):
    """What is distilled: image side (pixels or features), text embeddings, soft similarity S, student lrs."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, *, sim_type: str = "lowrank", sim_rank: int = 10,
                 sim_alpha: float = 1.0, lr_init: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        n = images.shape[0]
        if texts.shape[0] != n:
            raise ValueError(f"{n} synthetic images but {texts.shape[0]} texts")
        dtype = texts.dtype  # float32 in practice; float64 in gradient tests
        self.images = nn.Parameter(images.detach().clone().to(dtype))
        self.texts = nn.Parameter(texts.detach().clone())
        if sim_type == "lowrank":
            self.sim = LowRankSimilarity(n, sim_rank, sim_alpha, generator=generator, dtype=dtype)
        else:
            self.sim = FullSimilarity(n, dtype=dtype)
        self.syn_lr_img = nn.Parameter(torch.tensor(float(lr_init), dtype=dtype))
        self.syn_lr_txt = nn.Parameter(torch.tensor(float(lr_init), dtype=dtype))

    @property
    def num_pairs(self) -> int:
        return self.texts.shape[0]


def sample_batches(n: int, settings: DistillSettings, rng: np.random.Generator) -> list[StudentBatch]:
    """Mini-batches drawn from a permutation of the N pairs (redrawn when exhausted), with one Beta draw
    and one permutation per batch shared by both modalities. numpy's Generator keeps this reproducible
    and checkpointable (torch's Beta sampler takes no generator)."""
    batches, pool = [], []
    for _ in range(settings.syn_steps):
        if len(pool) < settings.mini_batch_size:
            pool = pool + list(rng.permutation(n))
        idx, pool = pool[:settings.mini_batch_size], pool[settings.mini_batch_size:]
        lam = perm = noise_seed = None
        if settings.blend:
            lam = float(rng.beta(settings.beta_a, settings.beta_b))
            perm = torch.from_numpy(rng.permutation(len(idx)))
        if settings.noise > 0:
            noise_seed = int(rng.integers(2 ** 31))
        batches.append(StudentBatch(torch.tensor(idx, dtype=torch.long), lam, perm, settings.noise, noise_seed))
    return batches


def blend(x: torch.Tensor, lam: float | None, perm: torch.Tensor | None) -> torch.Tensor:
    """Representation blending: x~ = lam*x + (1-lam)*x[perm] (before the heads, never on targets)."""
    if lam is None:
        return x
    return lam * x + (1.0 - lam) * x[perm]


def represent(x: torch.Tensor, batch: StudentBatch, side: int) -> torch.Tensor:
    """What a student step sees of one modality's representations (side 0 image, 1 text): blended with the
    batch's draw, and in the perturbation study (ALGORITHMS.md / RepBlend's noise ablation) plus Gaussian
    noise of strength `batch.noise` times their RMS, drawn from the batch's seed (the same in both passes)."""
    if batch.lam is not None:
        x = blend(x, batch.lam, batch.perm.to(x.device))
    if batch.noise_seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(2 * batch.noise_seed + side)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + batch.noise * x.pow(2).mean().sqrt() * eps  # relative strength, part of the function
    return x


def student_loss(theta_img: torch.Tensor, theta_txt: torch.Tensor, x: torch.Tensor, v: torch.Tensor,
                 targets: torch.Tensor, img_spec: HeadSpec | EncoderSpec, txt_spec: HeadSpec,
                 settings: DistillSettings, batch: StudentBatch | None = None) -> torch.Tensor:
    """One student step's loss. The image side blends where its representation is made: a head's input is the
    frozen encoder's output (blended by `_step_inputs`); an encoder student (LoRS, `blend_output`) blends its own
    output here, with the same draw as the text side."""
    img = img_spec.apply_flat(theta_img, x, train=False)
    if img_spec.blend_output and batch is not None:
        img = represent(img, batch, 0)
    return pair_loss(img, txt_spec.apply_flat(theta_txt, v, train=False), targets, settings)


def pair_loss(img: torch.Tensor, txt: torch.Tensor, targets: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    """A student step's loss on its embedded pairs (either student form): wBCE against the soft targets, or CLIP."""
    logits = similarity_logits(img, txt, settings.temperature)
    return wbce_loss(logits, targets) if settings.loss == "wbce" else clip_loss(logits)


@dataclass
class MatchResult:
    """Detached 0-d tensors: read together once per iteration, so the GPU is synchronised once."""

    loss: torch.Tensor
    loss_img: torch.Tensor
    loss_txt: torch.Tensor


def _step_inputs(features: torch.Tensor, texts: torch.Tensor, sim: nn.Module, batch: StudentBatch,
                 img_spec: HeadSpec | EncoderSpec):
    idx = batch.idx.to(features.device)
    x = features[idx] if img_spec.blend_output else represent(features[idx], batch, 0)
    return x, represent(texts[idx], batch, 1), sim.block(idx)


def _matching(theta_img, theta_txt, start, target, settings):
    """Normalised parameter-matching losses per modality and the combined objective."""
    d_img = (start[0] - target[0]).pow(2).sum()
    d_txt = (start[1] - target[1]).pow(2).sum()
    n_img = (theta_img - target[0]).pow(2).sum()
    n_txt = (theta_txt - target[1]).pow(2).sum()
    total = (n_img + n_txt) / (d_img + d_txt) if settings.merge_loss_branches else n_img / d_img + n_txt / d_txt
    return total, n_img / d_img, n_txt / d_txt


def match_unrolled(features: torch.Tensor, syn: SyntheticSet, specs: tuple[HeadSpec | EncoderSpec, HeadSpec],
                   start: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor],
                   batches: list[StudentBatch], settings: DistillSettings) -> MatchResult:
    """Exact gradient: back-propagates through every student step. Gradients accumulate in
    `features.grad` (a leaf) and in the synthetic set's texts, S and learning rates."""
    theta_img = start[0].clone().requires_grad_(True)
    theta_txt = start[1].clone().requires_grad_(True)
    for batch in batches:
        u, v, targets = _step_inputs(features, syn.texts, syn.sim, batch, specs[0])
        loss = student_loss(theta_img, theta_txt, u, v, targets, *specs, settings, batch)
        g_img, g_txt = torch.autograd.grad(loss, (theta_img, theta_txt), create_graph=True)
        theta_img = theta_img - syn.syn_lr_img * g_img
        theta_txt = theta_txt - syn.syn_lr_txt * g_txt
    total, l_img, l_txt = _matching(theta_img, theta_txt, start, target, settings)
    total.backward()
    return MatchResult(total.detach(), l_img.detach(), l_txt.detach())


def match_tesla(features: torch.Tensor, syn: SyntheticSet, specs: tuple[HeadSpec | EncoderSpec, HeadSpec],
                start: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor],
                batches: list[StudentBatch], settings: DistillSettings) -> MatchResult:
    """Constant-memory form: pass 1 runs the student with detached gradients; pass 2 recomputes each
    step's graph and back-propagates 2(v.g_k)/D with v = eta(theta_T - theta_0) + eta^2 sum(g),
    treating each step's parameters as independent of earlier batches (cross-step terms dropped)."""
    lr_img, lr_txt = syn.syn_lr_img.detach(), syn.syn_lr_txt.detach()
    thetas, sum_img, sum_txt = [], torch.zeros_like(start[0]), torch.zeros_like(start[1])
    theta_img, theta_txt = start[0].clone(), start[1].clone()
    for batch in batches:
        thetas.append((theta_img, theta_txt))
        with torch.no_grad():  # pass 1 needs gradients w.r.t. the student only
            u, v, targets = _step_inputs(features, syn.texts, syn.sim, batch, specs[0])
        ti, tt = theta_img.requires_grad_(True), theta_txt.requires_grad_(True)
        loss = student_loss(ti, tt, u, v, targets, *specs, settings, batch)
        g_img, g_txt = torch.autograd.grad(loss, (ti, tt))
        sum_img += g_img
        sum_txt += g_txt
        theta_img, theta_txt = (ti - lr_img * g_img).detach(), (tt - lr_txt * g_txt).detach()
    d_img = (start[0] - target[0]).pow(2).sum()
    d_txt = (start[1] - target[1]).pow(2).sum()
    # learning rates: exact gradient of each modality's normalised loss through theta_K = theta_0 - eta*sum(g)
    final_img = start[0] - syn.syn_lr_img * sum_img
    final_txt = start[1] - syn.syn_lr_txt * sum_txt
    lr_loss = (final_img - target[0]).pow(2).sum() / d_img + (final_txt - target[1]).pow(2).sum() / d_txt
    lr_loss.backward()
    v_img = lr_img * (target[0] - start[0]) + lr_img ** 2 * sum_img
    v_txt = lr_txt * (target[1] - start[1]) + lr_txt ** 2 * sum_txt
    for batch, (theta_img, theta_txt) in zip(batches, thetas):
        ti, tt = theta_img.detach().requires_grad_(True), theta_txt.detach().requires_grad_(True)
        u, v, targets = _step_inputs(features, syn.texts, syn.sim, batch, specs[0])
        loss = student_loss(ti, tt, u, v, targets, *specs, settings, batch)
        g_img, g_txt = torch.autograd.grad(loss, (ti, tt), create_graph=True)
        if settings.merge_loss_branches:
            surrogate = 2 * ((v_img * g_img).sum() + (v_txt * g_txt).sum()) / (d_img + d_txt)
        else:
            surrogate = 2 * (v_img * g_img).sum() / d_img + 2 * (v_txt * g_txt).sum() / d_txt
        surrogate.backward()
    total, l_img, l_txt = _matching(final_img.detach(), final_txt.detach(), start, target, settings)
    return MatchResult(total, l_img, l_txt)
