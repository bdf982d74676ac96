"""The exact unroll with each student head's weight matrices kept as W0 + U^T V (`distill.student=factored`).

A student SGD step moves a head's weight matrix by -lr * dL/dW = (-lr * dL/dh)^T x: an outer product of the
batch's B inputs and the B gradients at the layer's output, rank <= B. After k steps the matrix is the expert's
snapshot W0 plus a matrix of rank <= kB, so a student never needs its own copy of W: a forward pass computes
x W0^T + (x V^T) U from the stacked factors U (the scaled output gradients) and V (the inputs). The flat unroll
(`distill.match_unrolled`) instead writes a new parameter-sized vector, and its gradient, at every step, and the
outer backward reads all of them again. Same function, so the same gradients up to float rounding; on a 2-core CPU
(99 pairs, 1280/384-d inputs, 1024-d heads) it takes 2-2.4x less memory and 1.3-1.8x less time per iteration, about
3x less of both with the paper's 2304-d heads (docs/performance.md, benchmarks/bench_student.py).
Biases and LayerNorm parameters stay explicit vectors; the matrices are rebuilt once, for the matching loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repblend.stages.distill import (DistillSettings, MatchResult, StudentBatch, SyntheticSet, _matching,
                                     _step_inputs, pair_loss)
from repblend.stages.heads import LAYER_NORM_EPS, HeadSpec


class FactoredHead:
    """One student head: the snapshot's weight matrices (constants), the factors of the steps taken so far, and
    the small parameters as differentiable vectors. `forward` equals `HeadSpec.apply_flat(..., train=False)`."""

    def __init__(self, spec: HeadSpec, theta0: torch.Tensor) -> None:
        o, i = spec.out_dim, spec.in_dim
        w1, b1, w2, b2, gain, bias = theta0.split((o * i, o, o * o, o, o, o))
        self.out_dim, self.w1, self.w2 = o, w1.view(o, i), w2.view(o, o)
        self.b1, self.b2, self.gain, self.bias = (t.clone().requires_grad_(True) for t in (b1, b2, gain, bias))
        self.u1: list[torch.Tensor] = []  # -lr * dL/dh of each step, [B, out]
        self.v1: list[torch.Tensor] = []  # that step's inputs x, [B, in]
        self.u2: list[torch.Tensor] = []  # -lr * dL/dz, [B, out]
        self.v2: list[torch.Tensor] = []  # GELU(h), [B, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.w1, self.b1)
        if self.v1:
            h = h + (x @ torch.cat(self.v1).T) @ torch.cat(self.u1)
        a = F.gelu(h)
        z = F.linear(a, self.w2, self.b2) + h
        if self.v2:
            z = z + (a @ torch.cat(self.v2).T) @ torch.cat(self.u2)
        self._step = (x, h, a, z)
        return F.layer_norm(z, (self.out_dim,), self.gain, self.bias, LAYER_NORM_EPS)

    def wrt(self) -> list[torch.Tensor]:
        """What the last forward's loss is differentiated by: dL/dW1 = (dL/dh)^T x and dL/dW2 = (dL/dz)^T GELU(h)."""
        _, h, _, z = self._step
        return [h, z, self.gain, self.bias]

    def sgd(self, grads: list[torch.Tensor], lr: torch.Tensor) -> None:
        x, _, a, _ = self._step
        dh, dz, d_gain, d_bias = grads
        self.u1.append(-lr * dh)
        self.v1.append(x)
        self.u2.append(-lr * dz)
        self.v2.append(a)
        self.b1, self.b2 = self.b1 - lr * dh.sum(0), self.b2 - lr * dz.sum(0)
        self.gain, self.bias = self.gain - lr * d_gain, self.bias - lr * d_bias

    def flat(self) -> torch.Tensor:
        """The parameters in `HeadSpec`'s flat layout (the matching loss compares them with the expert's)."""
        w1, w2 = self.w1, self.w2
        if self.v1:
            w1 = w1 + torch.cat(self.u1).T @ torch.cat(self.v1)
            w2 = w2 + torch.cat(self.u2).T @ torch.cat(self.v2)
        return torch.cat([w1.reshape(-1), self.b1, w2.reshape(-1), self.b2, self.gain, self.bias])


def match_factored(features: torch.Tensor, syn: SyntheticSet, specs: tuple[HeadSpec, HeadSpec],
                   start: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor],
                   batches: list[StudentBatch], settings: DistillSettings) -> MatchResult:
    """`match_unrolled` for two projection-head students, with factored weight matrices."""
    image, text = FactoredHead(specs[0], start[0]), FactoredHead(specs[1], start[1])
    for batch in batches:
        u, v, targets = _step_inputs(features, syn.texts, syn.sim, batch, specs[0])
        loss = pair_loss(image.forward(u), text.forward(v), targets, settings)
        grads = torch.autograd.grad(loss, image.wrt() + text.wrt(), create_graph=True)
        image.sgd(list(grads[:4]), syn.syn_lr_img)
        text.sgd(list(grads[4:]), syn.syn_lr_txt)
    total, l_img, l_txt = _matching(image.flat(), text.flat(), start, target, settings)
    total.backward()
    return MatchResult(total.detach(), l_img.detach(), l_txt.detach())
