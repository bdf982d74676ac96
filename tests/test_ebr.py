"""EBR: gradient-reversal signs, shapes, the disabled path is the baseline bit for bit, config validation."""

import dataclasses
import math

import pytest
import torch

from repblend.pipeline.config import load_config
from repblend.pipeline.evaluation import train_settings
from repblend.stages.ebr import EBRAdapter, EBRDualHeads, EBRSettings, ebr_step
from repblend.stages.errors import ConfigError
from repblend.stages.evaluate import PairSet, TrainSettings, retrieval_of, train_heads
from repblend.stages.heads import DualHeads, heads_sgd
from repblend.stages.losses import wbce_loss

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls (see conftest)


def _adapter(seed=0):
    torch.manual_seed(seed)
    return EBRAdapter((6, 5), hidden=8, shared_dim=4)


def _codes(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    return adapter.encode(0, torch.randn(7, 6, generator=g)), adapter.encode(1, torch.randn(9, 5, generator=g))


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


def test_grl_gives_psi_plus_and_projectors_minus_alpha_grad():
    adapter, alpha = _adapter(), 0.3
    psi = list(adapter.discriminator.parameters())
    proj = [*adapter.projectors[0].parameters(), *adapter.projectors[1].parameters()]
    codes = _codes(adapter)
    plain = _grads(adapter.discrimination_loss(codes, reverse=False), psi + proj)
    reversed_ = _grads(alpha * adapter.discrimination_loss(codes, reverse=True), psi + proj)
    for k, (want, got) in enumerate(zip(plain, reversed_)):
        sign = 1.0 if k < len(psi) else -1.0
        torch.testing.assert_close(got, sign * alpha * want, rtol=1e-6, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in plain[len(psi):])  # the projectors do get a signal


def _md_after_one_step(interleave: bool, residual: bool):
    """L_md before; after the step with the new psi on the old codes; with the old psi on the new codes."""
    torch.manual_seed(0)
    model = EBRDualHeads(DualHeads(6, 5, 8, dropout=0.0), EBRSettings(alpha=1.0, hidden=16, shared_dim=4,
                                                                       interleave=interleave, residual=residual))
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(16, 6, generator=g), torch.randn(16, 5, generator=g)
    old_psi = {k: v.clone() for k, v in model.adapter.discriminator.state_dict().items()}
    with torch.no_grad():
        old_codes = model.codes(img, txt)
        before = model.adapter.discrimination_loss(old_codes).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ebr_step(model, optimizer, lambda i, t: 0.0 * (i.sum() + t.sum()), img, txt)  # L_md only
    with torch.no_grad():
        psi_moved = model.adapter.discrimination_loss(old_codes).item()
        new_psi = {k: v.clone() for k, v in model.adapter.discriminator.state_dict().items()}
        model.adapter.discriminator.load_state_dict(old_psi)
        codes_moved = model.adapter.discrimination_loss(model.codes(img, txt)).item()
    return before, psi_moved, codes_moved, new_psi, old_psi


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("interleave", [False, True])
def test_one_step_psi_descends_and_encoders_ascend(interleave, residual):
    before, psi_moved, codes_moved, new_psi, old_psi = _md_after_one_step(interleave, residual)
    assert psi_moved < before, "the discriminator must move to decrease L_md"
    assert codes_moved > before, "projectors and heads must move to increase L_md"
    assert any(not torch.equal(new_psi[k], old_psi[k]) for k in old_psi)


def test_shapes():
    adapter = EBRAdapter((12, 7), hidden=10, shared_dim=3)
    x0, x1 = torch.randn(4, 12), torch.randn(5, 7)
    g0, g1 = adapter.encode(0, x0), adapter.encode(1, x1)
    assert g0.shape == (4, 3) and g1.shape == (5, 3)
    assert adapter.decode(0, g0).shape == (4, 12) and adapter.decode(1, g1).shape == (5, 7)
    assert adapter.translate(0, 1, x1).shape == (5, 12)  # a text code decoded as an image feature
    assert adapter.discriminator(g0).shape == (4, 2)
    model = EBRDualHeads(DualHeads(12, 7, 16), EBRSettings(hidden=10, shared_dim=3))
    assert model.image(x0).shape == (4, 16) and model.text(x1).shape == (5, 16)
    img, txt = model(x0, x1)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError):
        EBRAdapter((12,), hidden=4, shared_dim=2)


def test_residual_adapter_starts_as_the_plain_heads_and_then_learns():
    """residual=True: decoded = f + h^-1(g) with zeroed last decoder layers, so before any step the model's
    embeddings are the heads' own, exactly; a substitute is the source embedding plus a decoded correction (zero at
    the start); a step moves the decoders off zero (the adapter is trained, not idle)."""
    torch.manual_seed(0)
    heads = DualHeads(6, 5, 8, dropout=0.0)
    model = EBRDualHeads(heads, EBRSettings(alpha=1.0, hidden=16, shared_dim=4, residual=True))
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(16, 6, generator=g), torch.randn(16, 5, generator=g)
    with torch.no_grad():
        for got, want in zip(model(img, txt), heads(img, txt)):
            assert torch.equal(got, want)
        torch.testing.assert_close(model.adapter.translate(1, 0, heads.image(img)), heads.image(img))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ebr_step(model, optimizer, lambda i, t: -(i * t).sum(), img, txt)
    assert all(decoder[-1].weight.abs().sum() > 0 for decoder in model.adapter.decoders)
    with torch.no_grad():
        assert not torch.allclose(model.image(img), heads.image(img))


def test_residual_adapter_needs_one_width():
    with pytest.raises(ValueError, match=r"one feature width .*\[12, 7\]"):
        EBRAdapter((12, 7), hidden=10, shared_dim=3, residual=True)


def _pairs(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 12, generator=g)
    txt = img @ torch.randn(12, 10, generator=g) + 0.3 * torch.randn(n, 10, generator=g)
    return PairSet(img, txt, None, 0.1, 0.1)


SETTINGS = TrainSettings(embed_dim=16, epochs=4, batch_size=16)


def _reference_training(pairs: PairSet, settings: TrainSettings, seed: int) -> DualHeads:
    """The evaluation protocol written out without EBR (ALGORITHMS.md section 5)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    heads = DualHeads(12, 10, settings.embed_dim, settings.dropout)
    optimizer = heads_sgd(heads, pairs.lr_img, pairs.lr_txt, settings.momentum, settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [settings.epochs // 2 + 1], gamma=0.1)
    m = pairs.images.shape[0]
    for _ in range(settings.epochs):
        heads.train()
        order = torch.randperm(m, generator=generator)
        for b in range(math.ceil(m / settings.batch_size)):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            img, txt = heads(pairs.images[idx], pairs.texts[idx])
            loss = wbce_loss(img @ txt.T / settings.temperature, torch.eye(len(idx)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return heads


def test_disabled_is_the_baseline_bit_for_bit():
    pairs = _pairs()
    for overrides in ([], ["ebr.enabled=false", "ebr.alpha=0.5"], ["ebr.enabled=true", "ebr.apply_to=[]"]):
        settings = train_settings(load_config(None, overrides))
        assert settings.ebr is None
    trained = train_heads(pairs, SETTINGS, seed=3, device=CPU)
    reference = _reference_training(pairs, SETTINGS, seed=3)
    assert type(trained) is DualHeads
    for (name, a), (_, b) in zip(trained.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("interleave", [False, True])
def test_ebr_training_learns_and_is_deterministic(interleave):
    pairs = _pairs(n=60)
    c2i = torch.arange(60)
    settings = dataclasses.replace(SETTINGS, epochs=20, loss="clip",
                                   ebr=EBRSettings(alpha=0.01, hidden=64, shared_dim=16, interleave=interleave))
    a = train_heads(pairs, settings, seed=1, device=CPU)
    b = train_heads(pairs, settings, seed=1, device=CPU)
    assert isinstance(a, EBRDualHeads)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    untrained = EBRDualHeads(DualHeads(12, 10, 16), settings.ebr).eval()
    before = retrieval_of(untrained, pairs.images, pairs.texts, c2i, CPU)["r_mean"]
    after = retrieval_of(a, pairs.images, pairs.texts, c2i, CPU)["r_mean"]
    assert after > before + 20


def test_config_section():
    config = load_config(None, [])
    assert (config.ebr.enabled, config.ebr.alpha, config.ebr.hidden, config.ebr.shared_dim) == (False, 0.01, 1024, 512)
    assert config.ebr.apply_to == ["eval"] and config.ebr.interleave is False
    on = train_settings(load_config(None, ["ebr.enabled=true", "ebr.alpha=0.1", "ebr.interleave=true"]))
    assert on.ebr == EBRSettings(alpha=0.1, hidden=1024, shared_dim=512, interleave=True, lr_scale=0.1)
    assert train_settings(load_config(None, ["ebr.enabled=true", "ebr.residual=true"])).ebr.residual is True


@pytest.mark.parametrize("overrides, needle", [
    (["ebr.alpah=1"], "unknown config key 'ebr.alpah' (did you mean 'ebr.alpha'?)"),
    (["ebr.alpha=-1"], "ebr.alpha=-1"),
    (["ebr.hidden=0"], "ebr.hidden=0"),
    (["ebr.shared_dim=0"], "ebr.shared_dim=0"),
    (["ebr.lr_scale=0"], "ebr.lr_scale=0"),
    (["ebr.apply_to=[experts]"], "ebr.apply_to=experts is not supported"),
    (["ebr.apply_to=[buffer]"], "ebr.apply_to[]='buffer'"),
    (["ebr.enabled=maybe"], "'ebr.enabled'"),
])
def test_config_rejects_bad_values(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value)


def test_evaluation_protocol_runs_with_ebr_and_diagnostics():
    """evaluate_pairs (every results row) works on an EBR model: recall and diagnostics use decoded embeddings."""
    from repblend.stages.evaluate import evaluate_pairs

    pairs = _pairs(n=30)
    settings = dataclasses.replace(SETTINGS, epochs=2, ebr=EBRSettings(hidden=16, shared_dim=4))
    result = evaluate_pairs(pairs, settings, (pairs.images, pairs.texts, torch.arange(30)), [0, 1], CPU, diagnose=True)
    assert 0 <= result["r_mean"]["mean"] <= 100 and "erank_img" in result["diagnostics"]
