"""Coreset baselines: pick ``n`` real training pairs (ALGORITHMS.md section 5).

Every selector returns a LongTensor of ``n`` DISTINCT item indices in selection order (not sorted) and is
deterministic (given the seed, where it takes one). ``features`` is an [M, d] matrix, one row per candidate
pair; the caller decides what it holds (e.g. the concatenation of the L2-normalised image and caption features
of each pair). Rows are L2-normalised here unless ``normalize=False``.

* ``random_coreset``: a seeded random permutation prefix.
* ``herding_coreset``: greedy herding (Welling 2009; iCaRL's exemplar selection): step t picks the unselected
  item x minimising ||mu - (x + sum of the t-1 selected) / t||, mu = mean of all (normalised) features, i.e.
  the running mean of the selection tracks the data mean. Ties go to the lowest index.
* ``kcenter_coreset``: greedy k-center / farthest-point traversal (Gonzalez 1985; Sener & Savarese 2018): the
  first centre is a seeded uniformly random item (``first="random"``, default) or the item closest to the
  mean (``first="mean"``, seed unused); then repeatedly the item farthest (Euclidean) from its nearest chosen
  centre. Ties go to the lowest index. Memory O(M) beyond the features; time O(M * d * n).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

__all__ = ["random_coreset", "herding_coreset", "kcenter_coreset", "CoresetBudgetError"]


class CoresetBudgetError(ConfigError, ValueError):
    """The requested coreset budget exceeds the dataset size."""


def _check_budget(n: int, num_items: int) -> int:
    n = int(n)
    if n < 0:
        raise ValueError(f"coreset budget must be >= 0, got {n}")
    if n > num_items:
        raise CoresetBudgetError(f"coreset budget n={n} is larger than the dataset size ({num_items} pairs)")
    return n


def _features(features: Tensor | np.ndarray, normalize: bool) -> Tensor:
    x = torch.as_tensor(features).detach()
    if x.dim() != 2:
        raise ValueError(f"coreset features must be a 2-D [items, dim] matrix, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        x = x.float()
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if normalize:
        x = F.normalize(x, dim=1)
    return x


def random_coreset(num_items: int, n: int, seed: int) -> Tensor:
    """``n`` distinct indices from ``range(num_items)``, uniformly at random (seeded)."""
    num_items = int(num_items)
    n = _check_budget(n, num_items)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_items, generator=g)[:n].clone()


def herding_coreset(features: Tensor | np.ndarray, n: int, *, normalize: bool = True) -> Tensor:
    """Greedy herding: the running mean of the selected rows approximates the mean of all rows."""
    x = _features(features, normalize)
    m = x.shape[0]
    n = _check_budget(n, m)
    selected = torch.empty(n, dtype=torch.long)
    if n == 0:
        return selected
    mu = x.mean(0)
    sq = (x * x).sum(1)
    x_mu = x @ mu  # [M]
    x_sum = torch.zeros(m, dtype=x.dtype, device=x.device)  # x . (sum of selected rows)
    taken = torch.zeros(m, dtype=torch.bool, device=x.device)
    for t in range(1, n + 1):
        # || t*mu - s - x ||^2 = ||x||^2 - 2 x.(t*mu - s) + const
        cost = sq - 2.0 * (t * x_mu - x_sum)
        cost = cost.masked_fill(taken, float("inf"))
        i = int(torch.argmin(cost))  # first minimum: ties -> lowest index
        selected[t - 1] = i
        taken[i] = True
        x_sum += x @ x[i]
    return selected


def kcenter_coreset(
    features: Tensor | np.ndarray, n: int, seed: int = 0, *, first: str = "random", normalize: bool = True
) -> Tensor:
    """Greedy k-center (farthest-point traversal); see the module docstring for the first centre."""
    if first not in ("random", "mean"):
        raise ValueError(f"kcenter first centre must be 'random' or 'mean', got {first!r}")
    x = _features(features, normalize)
    m = x.shape[0]
    n = _check_budget(n, m)
    selected = torch.empty(n, dtype=torch.long)
    if n == 0:
        return selected
    sq = (x * x).sum(1)
    if first == "random":
        g = torch.Generator().manual_seed(int(seed))
        c = int(torch.randint(m, (1,), generator=g))
    else:
        mu = x.mean(0)
        c = int(torch.argmin(((x - mu) ** 2).sum(1)))
    min_d2 = torch.full((m,), float("inf"), dtype=x.dtype, device=x.device)
    for t in range(n):
        selected[t] = c
        d2 = (sq - 2.0 * (x @ x[c]) + sq[c]).clamp_(min=0.0)
        torch.minimum(min_d2, d2, out=min_d2)
        min_d2[c] = -1.0  # never re-pick a centre (duplicates of it have distance 0 > -1)
        if t + 1 < n:
            c = int(torch.argmax(min_d2))  # first maximum: ties -> lowest index
    # chosen centres were marked -1; other rows have distance >= 0, so picks are distinct
    return selected
