"""Missing-modality substitution: closed-form cases (an exactly invertible adapter gives back the true features)."""

import pytest
import torch

from repblend.stages.ebr import EBRAdapter, EBRDualHeads, EBRSettings
from repblend.stages.heads import DualHeads
from repblend.stages.missing import (fill_missing, item_split, missing_modality_recall, modality_similarity,
                                     substitution_order, substitution_ranking)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls (see conftest)


def _identity_mlp(mlp: torch.nn.Sequential, d: int) -> None:
    """Linear(d->2d) = [I; -I], ReLU, Linear(2d->d) = [I, -I]: relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(d)
    with torch.no_grad():
        mlp[0].weight.copy_(torch.cat([eye, -eye]))
        mlp[0].bias.zero_()
        mlp[2].weight.copy_(torch.cat([eye, -eye], dim=1))
        mlp[2].bias.zero_()


def _exact_adapter(d: int) -> EBRAdapter:
    adapter = EBRAdapter((d, d), hidden=2 * d, shared_dim=d)
    for mlp in (*adapter.projectors, *adapter.decoders):
        _identity_mlp(mlp, d)
    return adapter


def test_exact_decoder_substitutes_the_true_features():
    d, n = 6, 10
    shared = torch.randn(n, d)  # both modalities carry the same features
    adapter = _exact_adapter(d)
    present = torch.ones(n, 2, dtype=torch.bool)
    present[[1, 4, 7], 0] = False  # images missing
    present[[2, 3], 1] = False  # captions missing
    filled = fill_missing([shared.clone(), shared.clone()], present, "ebr", adapter=adapter,
                          features=[shared, shared], order=[[1], [0]])
    assert torch.equal(filled[0], shared) and torch.equal(filled[1], shared)


def test_zero_and_mean_fill():
    img, txt = torch.arange(12.0).view(4, 3), -torch.arange(12.0).view(4, 3)
    present = torch.tensor([[True, True], [False, True], [True, True], [True, False]])
    zero = fill_missing([img, txt], present, "zero")
    assert torch.equal(zero[0][1], torch.zeros(3)) and torch.equal(zero[1][3], torch.zeros(3))
    assert torch.equal(zero[0][0], img[0]) and torch.equal(zero[1][0], txt[0])
    mean = fill_missing([img, txt], present, "mean")
    assert torch.equal(mean[0][1], img[[0, 2, 3]].mean(0)) and torch.equal(mean[1][3], txt[:3].mean(0))
    with pytest.raises(ValueError, match="needs adapter"):
        fill_missing([img, txt], present, "ebr")


def test_a_row_with_nothing_present_stays_zero_and_order_is_followed():
    d = 3
    feats = [torch.ones(2, d), 2 * torch.ones(2, d), 3 * torch.ones(2, d)]
    adapter = EBRAdapter((d, d, d), hidden=2 * d, shared_dim=d)
    for mlp in (*adapter.projectors, *adapter.decoders):
        _identity_mlp(mlp, d)
    present = torch.tensor([[False, True, True], [False, False, False]])
    out = fill_missing(feats, present, "ebr", adapter=adapter, features=feats, order=[[2, 1], [0, 2], [0, 1]])
    assert torch.equal(out[0][0], feats[2][0])  # modality 2 ranks first for modality 0
    assert torch.equal(out[0][1], torch.zeros(d))


def test_similarity_and_order():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    codes = [a, a.clone(), -a, torch.tensor([[1.0, 1.0], [1.0, -1.0]])]
    sim = modality_similarity(codes)
    assert sim.shape == (4, 4) and torch.allclose(sim.diagonal(), torch.ones(4, dtype=torch.float64))
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(-1.0) and sim[0, 3] == pytest.approx(0.0)
    order = substitution_order(sim)
    assert order[0] == [1, 3, 2] and order[2] == [3, 0, 1]
    present = torch.tensor([[True, False, True, True], [True, True, True, True]])
    assert modality_similarity(codes, present)[0, 1] == pytest.approx(1.0)  # only the second item counts


def test_item_split_never_queries_the_attached_caption():
    c2i = torch.tensor([0, 1, 0, 2, 1, 0, 2, 3])  # image 3 has one caption: no item
    images, attached, queries, query_item = item_split(c2i)
    assert images.tolist() == [0, 1, 2] and attached.tolist() == [0, 1, 3]
    assert sorted(queries.tolist()) == [2, 4, 5, 6]
    assert not set(attached.tolist()) & set(queries.tolist())
    assert [images[i].item() for i in query_item] == c2i[queries].tolist()


def _paired_model_and_data(n_img=12, caps=3, d=8):
    """Identical heads and attached-caption features equal to the image features: a proxy is exact."""
    torch.manual_seed(0)
    heads = DualHeads(d, d, d, dropout=0.0)
    heads.text.load_state_dict(heads.image.state_dict())
    model = EBRDualHeads(heads, EBRSettings(hidden=2 * d, shared_dim=d))
    model.adapter = _exact_adapter(d)
    img = torch.randn(n_img, d)
    c2i = torch.arange(n_img).repeat(caps)  # caption j of image i at row j * n_img + i; the first is attached
    txt = img[c2i] + 0.5 * torch.randn(len(c2i), d)
    txt[:n_img] = img
    return model.eval(), img, txt, c2i


def test_exact_substitution_recovers_complete_recall():
    model, img, txt, c2i = _paired_model_and_data()
    complete = missing_modality_recall(model, img, txt, c2i, missing="image", rate=0.0, fill="zero")
    for missing in ("image", "text"):
        sub = missing_modality_recall(model, img, txt, c2i, missing=missing, rate=1.0, fill="ebr")
        assert sub == complete
    mean = missing_modality_recall(model, img, txt, c2i, missing="image", rate=0.0, fill="mean")
    assert mean == complete  # nothing missing: every fill is the same
    sim, order = substitution_ranking(model, img, txt, c2i)
    assert order == [[1], [0]] and sim[0, 1] == pytest.approx(1.0)


def test_missing_recall_needs_an_ebr_model_for_ebr_fill():
    torch.manual_seed(0)
    heads = DualHeads(8, 8, 8).eval()
    img, c2i = torch.randn(5, 8), torch.arange(5).repeat(2)
    txt = torch.randn(10, 8)
    with pytest.raises(ValueError, match="trained with EBR"):
        missing_modality_recall(heads, img, txt, c2i, missing="image", rate=0.5, fill="ebr")
    out = missing_modality_recall(heads, img, txt, c2i, missing="text", rate=0.5, fill="mean")
    assert set(out) >= {"img_r1", "txt_r10", "r_mean"}
