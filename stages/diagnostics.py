"""Representation-collapse diagnostics (ALGORITHMS.md section 6), on L2-normalised embeddings.

- sim (per modality): mean off-diagonal cosine similarity; near 1 = the set's items look alike (collapse).
- gap: distance between the image and text embedding means (the modality gap).
- effective rank (Roy & Vetterli): exp(entropy of the normalised singular values of the centred matrix);
  numerical rank: singular values above `tol` x the largest. Both are capped by the number of items.
- modality probe: accuracy of a linear classifier telling image from text embeddings (held-out half);
  0.5 = the modalities share one region, 1.0 = they are linearly separable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUMERICAL_RANK_TOL = 1e-2


def mean_offdiagonal_similarity(x: torch.Tensor) -> float:
    x = F.normalize(x.double(), dim=-1)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    gram = x @ x.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def modality_gap(img: torch.Tensor, txt: torch.Tensor) -> float:
    return float((F.normalize(img.double(), dim=-1).mean(0) - F.normalize(txt.double(), dim=-1).mean(0)).norm())


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.double(), dim=-1)
    return torch.linalg.svdvals(x - x.mean(0, keepdim=True))


def effective_rank(x: torch.Tensor) -> float:
    s = _singular_values(x)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def numerical_rank(x: torch.Tensor, tol: float = NUMERICAL_RANK_TOL) -> int:
    s = _singular_values(x)
    return int((s > tol * s.max()).sum()) if s.numel() and s.max() > 0 else 0


def modality_probe_accuracy(img: torch.Tensor, txt: torch.Tensor, seed: int = 0, steps: int = 200) -> float:
    """Logistic regression (L-BFGS) on a random half of the embeddings, accuracy on the other half."""
    with torch.enable_grad():
        return _probe(img, txt, seed, steps)


def _probe(img: torch.Tensor, txt: torch.Tensor, seed: int, steps: int) -> float:
    x = torch.cat([F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)])
    y = torch.cat([torch.ones(img.shape[0]), torch.zeros(txt.shape[0])]).double()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[: x.shape[0] // 2], order[x.shape[0] // 2:]
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x[train] @ w + b
        loss = F.binary_cross_entropy_with_logits(logits, y[train]) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x[test] @ w + b > 0).double() == y[test]).double().mean())


def collapse_diagnostics(img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
    """Every diagnostic for one set of paired embeddings (row i of img pairs with row i of txt)."""
    img, txt = img.detach().cpu(), txt.detach().cpu()
    return {
        "sim_img": mean_offdiagonal_similarity(img),
        "sim_txt": mean_offdiagonal_similarity(txt),
        "gap": modality_gap(img, txt),
        "erank_img": effective_rank(img),
        "erank_txt": effective_rank(txt),
        "nrank_img": float(numerical_rank(img)),
        "nrank_txt": float(numerical_rank(txt)),
        "modality_probe": modality_probe_accuracy(img, txt),
    }


DIAGNOSTICS = ("sim_img", "sim_txt", "gap", "erank_img", "erank_txt", "nrank_img", "nrank_txt", "modality_probe")
