"""Collapse diagnostics against closed-form cases."""

import math

import pytest
import torch

from repblend.stages.diagnostics import (collapse_diagnostics, effective_rank, mean_offdiagonal_similarity,
                                         modality_gap, modality_probe_accuracy, numerical_rank)


def test_orthonormal_rows_have_full_rank_after_centring_and_zero_similarity():
    x = torch.eye(6, 10)
    # centring n orthonormal rows leaves n-1 equal singular values: entropy rank exactly n-1
    assert effective_rank(x) == pytest.approx(5.0, rel=1e-9)
    assert numerical_rank(x) == 5
    assert mean_offdiagonal_similarity(x) == pytest.approx(0.0, abs=1e-12)


def test_rank_one_and_identical_rows():
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([1.0, -2.0, 3.0, -0.5, 4.0]).unsqueeze(1) * v  # rows are +-v after normalisation
    assert effective_rank(x) == pytest.approx(1.0, rel=1e-6) and numerical_rank(x) == 1  # float32 input
    same = v.repeat(4, 1)
    assert mean_offdiagonal_similarity(same) == pytest.approx(1.0)
    assert effective_rank(same) == 0.0 and numerical_rank(same) == 0


def test_gap_closed_forms():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    assert modality_gap(x, x) == pytest.approx(0.0, abs=1e-12)
    e1, e2 = torch.eye(4)[0].repeat(3, 1), torch.eye(4)[1].repeat(3, 1)
    assert modality_gap(e1, e2) == pytest.approx(math.sqrt(2))


def test_probe_separates_separated_modalities_and_not_mixed_ones():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(200, 8, generator=g) * 0.3 + torch.eye(8)[0] * 2
    txt = torch.randn(200, 8, generator=g) * 0.3 - torch.eye(8)[0] * 2
    assert modality_probe_accuracy(img, txt) == 1.0
    mixed = torch.randn(400, 8, generator=g)
    assert 0.35 < modality_probe_accuracy(mixed[:200], mixed[200:]) < 0.65


def test_all_diagnostics_are_reported():
    g = torch.Generator().manual_seed(3)
    d = collapse_diagnostics(torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g))
    assert set(d) == {"sim_img", "sim_txt", "gap", "erank_img", "erank_txt", "nrank_img", "nrank_txt",
                      "modality_probe"}
    assert 1 <= d["erank_img"] <= 6 and d["nrank_txt"] <= 6
