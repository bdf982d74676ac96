"""The references' distillation step, kept as a yardstick: the frozen encoder runs inside every student step.

RepBlend's and LoRS's code (ALGORITHMS.md section 4) push each student mini-batch's pixels through the frozen
image encoder in both passes of the TESLA constant-memory form: 2 x syn_steps encoder forwards and syn_steps
backwards per iteration. The fast path (`Distiller` feeding `distill.match_tesla`) encodes each image an
iteration uses once. With a frozen encoder and no augmentation both give the same loss and gradients (a test
checks it); `benchmarks/bench_distill.py` times both in one run (TARGETS.md P1, P2).

This is a separate implementation on purpose, so it neither speeds up when the fast path does nor shares its
mistakes: the weights of pass 2 come from autograd through theta_K = theta_0 - eta * sum(g), not from the
closed form v = eta (theta_T - theta_0) + eta^2 sum(g) that `match_tesla` writes out.
"""

from __future__ import annotations

import torch
from torch import nn

from repblend.stages.distill import (DistillSettings, MatchResult, StudentBatch, SyntheticSet, _matching, represent,
                                     student_loss)
from repblend.stages.heads import HeadSpec

Pair = tuple[torch.Tensor, torch.Tensor]


def encode_pixels(encoder: nn.Module, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Features of `pixels` under the fast path's precision policy (bf16 autocast on CUDA), as `dtype`."""
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=pixels.device.type == "cuda"):
        return encoder(pixels).to(dtype)


def _step_inputs(encoder: nn.Module, syn: SyntheticSet, batch: StudentBatch):
    """One student step's blended features, texts and targets, the batch re-encoded from its pixels."""
    idx = batch.idx.to(syn.texts.device)
    features = encode_pixels(encoder, syn.images[idx], syn.texts.dtype)
    return represent(features, batch, 0), represent(syn.texts[idx], batch, 1), syn.sim.block(idx)


def _student_grads(encoder: nn.Module, syn: SyntheticSet, specs: tuple[HeadSpec, HeadSpec], theta: Pair,
                   batch: StudentBatch, settings: DistillSettings, create_graph: bool) -> Pair:
    """Gradient of one student step's loss w.r.t. the heads at `theta`; with `create_graph` it stays
    differentiable w.r.t. the synthetic set (pixels through the encoder), else the inputs carry no graph."""
    student = (theta[0].detach().requires_grad_(True), theta[1].detach().requires_grad_(True))
    with torch.set_grad_enabled(create_graph):
        u, v, targets = _step_inputs(encoder, syn, batch)
    loss = student_loss(student[0], student[1], u, v, targets, *specs, settings)
    return torch.autograd.grad(loss, student, create_graph=create_graph)


def match_tesla_reencode(encoder: nn.Module, syn: SyntheticSet, specs: tuple[HeadSpec, HeadSpec], start: Pair,
                         target: Pair, batches: list[StudentBatch], settings: DistillSettings, *,
                         pass1_graph: bool = True) -> MatchResult:
    """TESLA matching with `syn.images` as pixels re-encoded in every student step of both passes.

    Gradients accumulate in the synthetic set's parameters (pixels, texts, S, learned lrs), as with
    `Distiller.gradients`. `pass1_graph` (the references' way) builds pass 1's graph through the encoder
    and the student gradient (create_graph) only to detach it: same time, more peak memory.
    """
    with torch.no_grad():
        lrs = (syn.syn_lr_img.detach().clone(), syn.syn_lr_txt.detach().clone())
    theta, thetas = (start[0].clone(), start[1].clone()), []
    sums = (torch.zeros_like(start[0]), torch.zeros_like(start[1]))
    for batch in batches:  # pass 1: walk the student with detached gradients
        thetas.append(theta)
        grads = _student_grads(encoder, syn, specs, theta, batch, settings, create_graph=pass1_graph)
        grads = (grads[0].detach(), grads[1].detach())
        sums = (sums[0] + grads[0], sums[1] + grads[1])
        theta = (theta[0] - lrs[0] * grads[0], theta[1] - lrs[1] * grads[1])
    # theta_K as a function of the summed gradients and the learned lrs; autograd gives both weights
    sums = (sums[0].requires_grad_(True), sums[1].requires_grad_(True))
    final = (start[0] - syn.syn_lr_img * sums[0], start[1] - syn.syn_lr_txt * sums[1])
    total, loss_img, loss_txt = _matching(final[0], final[1], start, target, settings)
    weights = torch.autograd.grad(total, sums, retain_graph=True)
    # learned lrs: each modality normalised on its own, also when the branches are merged (as the references)
    (loss_img + loss_txt).backward(inputs=[syn.syn_lr_img, syn.syn_lr_txt])
    for batch, theta in zip(batches, thetas):  # pass 2: d total / d X = sum_k (d total / d sum g) . d g_k / d X
        grads = _student_grads(encoder, syn, specs, theta, batch, settings, create_graph=True)
        torch.autograd.backward(grads, weights)
    return MatchResult(total.detach(), loss_img.detach(), loss_txt.detach())
