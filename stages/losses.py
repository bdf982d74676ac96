"""Contrastive losses and learned similarity targets (ALGORITHMS.md sections 2-4).

* ``clip_loss``: symmetric cross-entropy with identity targets (expert training / buffering).
* ``wbce_loss``: balanced ("weighted") binary cross-entropy against soft targets S (distillation, evaluation).
* ``LowRankSimilarity`` / ``FullSimilarity``: the learned target matrix S of the synthetic set (LoRS).

wBCE form
---------
The default (``stable=False``) is the reference form, literally
``l_ij = -S_ij log(sigmoid(z_ij) + eps) - (1 - S_ij) log(1 - sigmoid(z_ij) + eps)``, so loss values (and the
learning dynamics they drive) match the reference implementations. The ``+eps`` caps each term at
``-log(eps)`` (13.8 for eps=1e-6) and flattens the gradient of saturated logits; with temperature 0.07 the
logits lie in [-14.3, 14.3] where sigmoid reaches ~6e-7, i.e. the cap is reachable in practice, so the form
is kept as is rather than silently "fixed". ``stable=True`` computes ``log p = logsigmoid(z)`` and
``log(1-p) = logsigmoid(-z)`` (no eps in the logs, no cancellation in ``1 - p``; the eps in the
denominators stays). The two forms agree to ~1e-6 relative for |z| <~ 3 but differ by ~1% for logits
spread over the full temperature-0.07 range [-14.3, 14.3] (the eps cap is reached), and in float32 the
reference form carries ~1e-5 relative rounding error from ``1 - p`` there (the stable form ~1e-8); both
facts are tested. Use ``stable=True`` where matching the reference values does not matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["clip_loss", "wbce_loss", "LowRankSimilarity", "FullSimilarity", "SimRankError"]


class SimRankError(ConfigError, ValueError):
    """Invalid rank for the learned similarity matrix (config key ``sim_rank``)."""


def clip_loss(logits: Tensor) -> Tensor:
    """Symmetric CLIP loss: mean of row-wise and column-wise cross-entropy with targets ``arange(B)``.

    ``logits`` [B, B] with rows = images and columns = texts of the same B pairs.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"clip_loss needs square [B, B] logits, got shape {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def wbce_loss(logits: Tensor, targets: Tensor, eps: float = 1e-6, *, stable: bool = False) -> Tensor:
    """Balanced binary cross-entropy of ``logits`` against soft targets ``targets`` (same shape).

    p = sigmoid(z); l_ij = -S_ij log(p_ij + eps) - (1 - S_ij) log(1 - p_ij + eps);
    P = {S_ij > 0.5}, Q = the rest; L = 1/2 (sum_P l / (|P| + eps) + sum_Q l / (|Q| + eps)).

    Differentiable w.r.t. both ``logits`` and ``targets`` (the split into P/Q is piecewise constant).
    ``stable=True`` uses log-sigmoid instead of ``log(p + eps)``; see the module docstring.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"wbce_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    targets = targets.to(logits.dtype)
    if stable:
        log_p = F.logsigmoid(logits)
        log_1mp = F.logsigmoid(-logits)
    else:
        p = torch.sigmoid(logits)
        log_p = torch.log(p + eps)
        log_1mp = torch.log(1.0 - p + eps)
    ell = -(targets * log_p + (1.0 - targets) * log_1mp)
    pos = (targets > 0.5).to(logits.dtype)
    neg = 1.0 - pos
    n_pos = pos.sum()
    n_neg = neg.sum()
    return 0.5 * ((ell * pos).sum() / (n_pos + eps) + (ell * neg).sum() / (n_neg + eps))


def _check_index(idx: Tensor, n: int) -> Tensor:
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"similarity block index must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"similarity block index out of range [0, {n})")
    return idx.long()


class LowRankSimilarity(nn.Module):
    """Learned targets ``S = diag(a) + (alpha / r) L R^T`` over ``n`` synthetic pairs (LoRS).

    a = ones(n), L ~ N(0, 1) (from ``generator``), R = zeros: S starts exactly at the identity.
    ``block(idx)`` = ``S[idx][:, idx]`` from ``a[idx], L[idx], R[idx]`` without building S
    (duplicates in ``idx`` are handled: the diagonal term appears wherever ``idx_i == idx_j``).
    """

    def __init__(
        self,
        n: int,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        n, rank = int(n), int(rank)
        if n < 1:
            raise ValueError(f"similarity matrix needs n >= 1 pairs, got {n}")
        if not 1 <= rank <= n:
            raise SimRankError(f"sim_rank must be between 1 and the number of synthetic pairs ({n}), got {rank}")
        self.n = n
        self.rank = rank
        self.alpha = float(alpha)
        gen_device = generator.device if generator is not None else device
        self.a = nn.Parameter(torch.ones(n, dtype=dtype, device=device))
        self.L = nn.Parameter(
            torch.randn(n, rank, generator=generator, dtype=dtype, device=gen_device).to(device)
        )
        self.R = nn.Parameter(torch.zeros(n, rank, dtype=dtype, device=device))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def full(self) -> Tensor:
        return torch.diag(self.a) + self.scale * (self.L @ self.R.t())

    def block(self, idx: Tensor) -> Tensor:
        return self.block_unchecked(_check_index(idx, self.n).to(self.a.device))

    def block_unchecked(self, idx: Tensor) -> Tensor:
        """`block` for indices known to be valid (no host sync, so it compiles into one graph)."""
        same = (idx[:, None] == idx[None, :]).to(self.a.dtype)
        return same * self.a[idx][:, None] + self.scale * (self.L[idx] @ self.R[idx].t())

    def forward(self, idx: Tensor | None = None) -> Tensor:
        return self.full() if idx is None else self.block(idx)


class FullSimilarity(nn.Module):
    """Dense learned targets: an ``n x n`` parameter initialised to the identity. Same interface."""

    def __init__(
        self, n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        n = int(n)
        if n < 1:
            raise ValueError(f"similarity matrix needs n >= 1 pairs, got {n}")
        self.n = n
        self.S = nn.Parameter(torch.eye(n, dtype=dtype, device=device))

    def full(self) -> Tensor:
        return self.S

    def block(self, idx: Tensor) -> Tensor:
        return self.block_unchecked(_check_index(idx, self.n).to(self.S.device))

    def block_unchecked(self, idx: Tensor) -> Tensor:
        return self.S[idx[:, None], idx[None, :]]

    def forward(self, idx: Tensor | None = None) -> Tensor:
        return self.full() if idx is None else self.block(idx)
