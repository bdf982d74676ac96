"""Exact retrieval metrics: both backends against a brute-force reference, ties included."""

import numpy as np
import pytest
import torch

from repblend.stages import retrieval as R
from repblend.stages.retrieval import recalls_from_counts, retrieval_counts, retrieval_metrics

BACKENDS = ["torch", "faiss"]


# ------------------------------------------------------------------------------------------ brute force
def brute_force_counts(img, txt, c2i):
    """Per query, the number of items scored strictly higher than the best ground-truth item (uncapped).

    Plain loops over queries on float64 scores; IR also cross-checked with a full argsort."""
    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    c2i = np.asarray(c2i)
    scores = img @ txt.T  # [n_img, n_cap]
    ir = []
    for c in range(txt.shape[0]):
        col = scores[:, c]
        own = col[c2i[c]]
        n_higher = int(sum(1 for v in col if v > own))
        # the same through a full sort: first position holding a score equal to the own score
        order = np.argsort(-col, kind="stable")
        first_equal = next(pos for pos, i in enumerate(order) if col[i] == own)
        assert first_equal == n_higher
        ir.append(n_higher)
    tr = []
    for i in range(img.shape[0]):
        row = scores[i]
        best = max(row[c] for c in range(txt.shape[0]) if c2i[c] == i)
        tr.append(int(sum(1 for v in row if v > best)))
    return np.array(ir), np.array(tr)


def brute_force_metrics(img, txt, c2i, ks):
    ir, tr = brute_force_counts(img, txt, c2i)
    out = {f"img_r{k}": 100.0 * np.mean(ir < k) for k in ks}
    out.update({f"txt_r{k}": 100.0 * np.mean(tr < k) for k in ks})
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


# ------------------------------------------------------------------------------------------ data
def sign_data(n_img, caps_per_image, d=16, flips=3, n_dup=4, seed=0):
    """Vectors with entries +-1/sqrt(d) (d a power of 4): unit norm and dot products exact in float32 whatever
    the summation order, so exact ties (many, by construction) are exact in every backend. Captions are noisy
    copies of their image; some images and captions are exact duplicates of others."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(d)
    img = rng.choice([-1.0, 1.0], size=(n_img, d))
    img[-n_dup:] = img[:n_dup]  # duplicate images
    counts = caps_per_image if np.ndim(caps_per_image) else np.full(n_img, caps_per_image)
    c2i = np.repeat(np.arange(n_img), counts)
    c2i = c2i[rng.permutation(len(c2i))]  # captions not grouped by image
    txt = img[c2i].copy()
    for row in txt:
        row[rng.choice(d, size=flips, replace=False)] *= -1
    txt[1::7] = txt[0::7][: len(txt[1::7])]  # duplicate captions
    return (img * scale).astype(np.float32), (txt * scale).astype(np.float32), c2i


def gaussian_data(n_img, caps_per_image, d=32, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, d)).astype(np.float32)
    counts = caps_per_image if np.ndim(caps_per_image) else np.full(n_img, caps_per_image)
    c2i = rng.permutation(np.repeat(np.arange(n_img), counts))
    txt = (img[c2i] + noise * rng.standard_normal((len(c2i), d))).astype(np.float32)
    return img, txt, c2i


def _check_against_brute_force(img, txt, c2i, backend, max_k=10, block_size=None):
    ir_ref, tr_ref = brute_force_counts(img, txt, c2i)
    # torch: both IR strategies (whole score matrix kept / streamed running top-k)
    for max_bytes in ((None, 0) if backend == "torch" else (None,)):
        ir, tr = retrieval_counts(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(c2i), max_k, backend,
                                  block_size=block_size, max_matrix_bytes=max_bytes)
        np.testing.assert_array_equal(ir.numpy(), np.minimum(ir_ref, max_k))
        np.testing.assert_array_equal(tr.numpy(), np.minimum(tr_ref, max_k))
    return ir_ref, tr_ref


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 7])
def test_ties_five_captions_match_brute_force(backend, block_size):
    img, txt, c2i = sign_data(40, 5, d=16, flips=4)
    ir_ref, tr_ref = _check_against_brute_force(img, txt, c2i, backend, block_size=block_size)
    # the data really exercises ties and all outcomes
    assert 0 < np.mean(ir_ref < 1) < 1 and 0 < np.mean(ir_ref < 10) < 1 and 0 < np.mean(tr_ref < 1) < 1
    ref = brute_force_metrics(img, txt, c2i, (1, 5, 10))
    for max_bytes in (None, 0):
        got = retrieval_metrics(img, txt, c2i, backend=backend, block_size=block_size, max_matrix_bytes=max_bytes)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], abs=1e-9), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_heavy_ties_uneven_captions_match_brute_force(backend, monkeypatch):
    # d = 4: dot products take 5 values only, so most ranks are decided by ties (also at the top-k boundary)
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 8, size=30)  # 5-7 captions per image, like COCO
    img, txt, c2i = sign_data(30, counts, d=4, flips=1, n_dup=3, seed=1)
    if backend == "faiss":  # the exact fallback for boundary ties must be exercised
        calls = []
        orig = R._exact_rows_ir
        monkeypatch.setattr(R, "_exact_rows_ir", lambda *a: calls.append(1) or orig(*a))
    for max_k in (1, 3, 10):
        _check_against_brute_force(img, txt, c2i, backend, max_k=max_k, block_size=4)
    if backend == "faiss":
        assert calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_uneven_match_brute_force(backend):
    rng = np.random.default_rng(2)
    img, txt, c2i = gaussian_data(60, rng.integers(5, 8, size=60), seed=2)
    _check_against_brute_force(img, txt, c2i, backend, max_k=10, block_size=16)


def test_backends_identical_metrics():
    rng = np.random.default_rng(3)
    img, txt, c2i = sign_data(50, rng.integers(5, 8, size=50), d=16, flips=5, seed=3)
    a = retrieval_metrics(img, txt, c2i, backend="torch")
    b = retrieval_metrics(img, txt, c2i, backend="faiss")
    c = retrieval_metrics(img, txt, c2i, backend="auto")
    assert a == b == c


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_embeddings_give_100(backend):
    img, _, c2i = gaussian_data(50, 5, d=24, seed=4)
    txt = img[c2i]
    got = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), c2i, backend=backend)
    assert got == {k: 100.0 for k in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_three_images(backend):
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    c2i = torch.tensor([0, 0, 1, 2, 0])
    # IR: c0 -> I0 first (0 higher); c1 (0,1) -> I1 scores 1 > own 0 (1 higher); c2 (-1,0) of I1 -> I2 higher (1);
    #     c3 (0,-1) of I2 -> own 0 ties with I0, nothing strictly higher (0); c4 (-1,0) of I0 -> I1, I2 higher (2)
    # TR: I0 best GT c0 = 1 (0 higher); I1 GT c2 = 0 < c1 = 1 (1 higher); I2 GT c3 = 0 < c2 = c4 = 1 (2 higher)
    ir, tr = retrieval_counts(img, txt, c2i, 10, backend)
    assert ir.tolist() == [0, 1, 1, 0, 2] and tr.tolist() == [0, 1, 2]
    got = retrieval_metrics(img, txt, c2i, ks=(1, 2, 3), backend=backend)
    expected = {"img_r1": 40.0, "img_r2": 80.0, "img_r3": 100.0,
                "txt_r1": 100 / 3, "txt_r2": 200 / 3, "txt_r3": 100.0}
    expected["r_mean"] = sum(expected.values()) / 6
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    # K larger than the database: every query is a hit
    assert retrieval_metrics(img, txt, c2i, ks=(10,), backend=backend)["img_r10"] == 100.0


def test_recalls_from_counts_and_normalisation():
    ir = torch.tensor([0, 3, 10, 1])
    tr = torch.tensor([0, 9])
    out = recalls_from_counts(ir, tr, (1, 5, 10))
    assert out["img_r1"] == 25.0 and out["img_r5"] == 75.0 and out["img_r10"] == 75.0
    assert out["txt_r1"] == 50.0 and out["txt_r10"] == 100.0
    # scaling embeddings does not change cosine retrieval
    img, txt, c2i = gaussian_data(20, 5, seed=5)
    assert retrieval_metrics(img * 3.0, txt * 0.5, c2i) == retrieval_metrics(img, txt, c2i)


def test_input_errors():
    img, txt, c2i = gaussian_data(5, 2, seed=6)
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.concatenate([img, img[:1]]), txt, c2i)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, txt, c2i + 1)
    with pytest.raises(ValueError, match="backend"):
        retrieval_metrics(img, txt, c2i, backend="annoy")
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt[:, :5], c2i)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(img * np.nan, txt, c2i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    img, txt, c2i = sign_data(200, 5, d=64, flips=16, seed=7)
    cpu = retrieval_metrics(img, txt, c2i, backend="torch")
    gpu = retrieval_metrics(torch.from_numpy(img).cuda(), torch.from_numpy(txt).cuda(), c2i, backend="auto")
    assert cpu == gpu


def test_a_diverged_seed_scores_zero_and_is_counted():
    """A model with non-finite embeddings retrieves nothing (scored_retrieval); summarize_seeds averages it in as 0,
    counts it, and takes diagnostics from the seeds that did not diverge only."""
    from repblend.stages.diagnostics import DIAGNOSTICS
    from repblend.stages.evaluate import DIVERGED, METRICS, scored_retrieval, summarize_seeds

    g = torch.Generator().manual_seed(0)
    img, txt, c2i = torch.randn(6, 4, generator=g), torch.randn(12, 4, generator=g), torch.arange(12) // 2

    class Heads:  # the interface retrieval_of uses: image(), text(), eval()
        def __init__(self, scale: float):
            self.image = self.text = lambda x: x * scale

        def eval(self):
            return self

    healthy = scored_retrieval(Heads(1.0), img, txt, c2i, "cpu")
    assert healthy == pytest.approx(retrieval_metrics(img, txt, c2i)) and DIVERGED not in healthy
    diverged = scored_retrieval(Heads(float("nan")), img, txt, c2i, "cpu")
    assert diverged == dict.fromkeys(METRICS, 0.0) | {DIVERGED: 1.0}
    summary = summarize_seeds([healthy, diverged], [dict.fromkeys(DIAGNOSTICS, 0.25), None])
    assert summary["r_mean"]["mean"] == pytest.approx(healthy["r_mean"] / 2) and summary["diverged_seeds"] == 1
    assert summary["diagnostics"] == {key: {"mean": 0.25, "std": 0.0} for key in DIAGNOSTICS}
    assert "diverged_seeds" not in summarize_seeds([healthy, healthy])
