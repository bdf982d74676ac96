"""Coreset selectors: random, herding, k-center."""

import numpy as np
import pytest
import torch

from repblend.stages.coresets import herding_coreset, kcenter_coreset, random_coreset
from repblend.stages.errors import ConfigError


def _feats(m=200, d=12, seed=0):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed))


def _herding_by_definition(x, n):
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(0)
    sel = []
    for t in range(1, n + 1):
        best, best_cost = None, np.inf
        for i in range(len(x)):
            if i in sel:
                continue
            cost = np.sum((mu - (x[sel].sum(0) + x[i]) / t) ** 2)
            if cost < best_cost - 1e-12:
                best, best_cost = i, cost
        sel.append(best)
    return sel


def _kcenter_by_definition(x, n, first):
    x = np.asarray(x, dtype=np.float64)
    sel = [first]
    while len(sel) < n:
        d = [min(np.linalg.norm(x[i] - x[j]) for j in sel) if i not in sel else -1 for i in range(len(x))]
        sel.append(int(np.argmax(d)))
    return sel


def _normalised(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("select", ["random", "herding", "kcenter"])
def test_deterministic_distinct_and_sized(select):
    x = _feats()
    run = {
        "random": lambda seed: random_coreset(len(x), 50, seed),
        "herding": lambda seed: herding_coreset(x, 50),
        "kcenter": lambda seed: kcenter_coreset(x, 50, seed),
    }[select]
    a, b = run(7), run(7)
    assert a.dtype == torch.long and a.shape == (50,)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 50 and 0 <= int(a.min()) and int(a.max()) < len(x)
    if select != "herding":
        assert not torch.equal(a, run(8))
    # whole dataset: a permutation
    full = {"random": lambda: random_coreset(len(x), len(x), 1), "herding": lambda: herding_coreset(x, len(x)),
            "kcenter": lambda: kcenter_coreset(x, len(x), 1)}[select]()
    assert sorted(full.tolist()) == list(range(len(x)))


def test_distinct_with_duplicate_rows():
    x = torch.cat([_feats(10, 4), _feats(10, 4)])  # every row twice
    for sel in (herding_coreset(x, 20), kcenter_coreset(x, 20, 0), kcenter_coreset(x, 20, 0, first="mean")):
        assert sorted(sel.tolist()) == list(range(20))


def test_budget_errors():
    x = _feats(10, 3)
    for call in (lambda: random_coreset(10, 11, 0), lambda: herding_coreset(x, 11), lambda: kcenter_coreset(x, 11, 0)):
        with pytest.raises(ValueError, match=r"budget n=11 .*dataset size \(10"):
            call()
        with pytest.raises(ConfigError):
            call()
    assert herding_coreset(x, 0).shape == (0,) and kcenter_coreset(x, 0).shape == (0,)
    with pytest.raises(ValueError):
        kcenter_coreset(x, 2, first="median")


def test_herding_hand_computed():
    # 1-D, unnormalised: values 0, 1, 2, 3, 10 -> mean 3.2.
    # t=1: closest to 3.2 is 3.  t=2: (3 + x)/2 ~ 3.2 -> 2 (2.5) beats 1 (2.0) and 10 (6.5).
    # t=3: (5 + x)/3 -> 1 gives 2.0 (|1.2|), 0 gives 1.67, 10 gives 5.0 (|1.8|) -> 1.
    # t=4: (6 + x)/4 -> 10 gives 4.0 (|0.8|), 0 gives 1.5 (|1.7|) -> 10.  t=5: 0.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert herding_coreset(x, 5, normalize=False).tolist() == [3, 2, 1, 4, 0]
    # not simply "closest to the mean first" (which would put 0 before 10)


def test_herding_matches_definition_on_normalised_features():
    x = _feats(40, 5, seed=3)
    sel = herding_coreset(x, 12)
    assert sel.tolist() == _herding_by_definition(_normalised(x), 12)
    # rows are L2-normalised: rescaling rows changes nothing
    scales = torch.rand(40, 1, generator=torch.Generator().manual_seed(1)) * 5 + 0.1
    assert torch.equal(herding_coreset(x * scales, 12), sel)


def test_kcenter_extremes_1d():
    # points 0..10 in shuffled order; farthest-point traversal from the middle picks both ends next
    perm = np.random.default_rng(0).permutation(11)
    x = torch.tensor(perm, dtype=torch.float32)[:, None]
    pos = {int(v): i for i, v in enumerate(perm)}
    sel = kcenter_coreset(x, 4, first="mean", normalize=False).tolist()
    assert sel[0] == pos[5]
    assert set(sel[1:3]) == {pos[0], pos[10]}
    assert sel[3] in {pos[2], pos[3], pos[7], pos[8]}  # 2.5 from the nearest centre is the best possible
    for seed in range(5):  # from a random first centre, the next pick is an end point
        sel = kcenter_coreset(x, 2, seed, normalize=False).tolist()
        assert sel[1] in {pos[0], pos[10]}
        v = perm[sel[0]]
        assert sel[1] == (pos[0] if v > 5 else pos[10] if v < 5 else min(pos[0], pos[10]))  # ties: lowest index


def test_kcenter_arc_normalised():
    # unit vectors along a quarter arc (given with arbitrary norms): from the middle, the two ends come next
    ang = np.deg2rad(np.linspace(0, 90, 19))
    x = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1) * np.linspace(1, 3, 19)[:, None], dtype=torch.float64)
    sel = kcenter_coreset(x, 3, first="mean").tolist()
    assert sel[0] == 9 and set(sel[1:]) == {0, 18}


def test_kcenter_matches_definition():
    x = _feats(50, 6, seed=4).double()
    sel = kcenter_coreset(x, 15, seed=3)
    assert sel.tolist() == _kcenter_by_definition(_normalised(x), 15, sel[0].item())
    g = torch.Generator().manual_seed(3)
    assert sel[0].item() == int(torch.randint(50, (1,), generator=g))
