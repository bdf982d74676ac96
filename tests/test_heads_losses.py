"""Projection heads (module and flat functional form), CLIP loss, wBCE, learned similarity matrices."""

import math

import pytest
import torch
import torch.nn.functional as F

from repblend.stages.errors import ConfigError
from repblend.stages.heads import DualHeads, HeadSpec, ProjectionHead, dropout_with_generator, similarity_logits
from repblend.stages.losses import FullSimilarity, LowRankSimilarity, clip_loss, wbce_loss


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ------------------------------------------------------------------------------------------------ heads
def test_head_matches_definition():
    torch.manual_seed(0)
    m = _randomise(ProjectionHead(7, 5, dropout=0.3)).eval()
    x = torch.randn(4, 7)
    h = x @ m.fc1.weight.t() + m.fc1.bias
    y = F.gelu(h) @ m.fc2.weight.t() + m.fc2.bias + h
    ref = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ref = ref * m.norm.weight + m.norm.bias
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_num_params_and_layout():
    m = ProjectionHead(13, 6)
    spec = HeadSpec.of(m)
    assert spec == m.spec == HeadSpec(13, 6, 0.1)
    assert spec.num_params == sum(p.numel() for p in m.parameters()) == 6 * 13 + 6 * 6 + 4 * 6
    # the documented layout is the order of .parameters()
    assert [name for name, _, _ in spec.layout()] == [name for name, _ in m.named_parameters()]
    offs = [off for _, off, _ in spec.layout()]
    assert offs == [0, 78, 84, 120, 126, 132]


def test_apply_flat_equals_module_eval():
    m = _randomise(ProjectionHead(9, 6, dropout=0.1), seed=3)
    spec = HeadSpec.of(m)
    x = torch.randn(5, 9)
    flat = spec.flatten(m)
    out = spec.apply_flat(flat, x, train=False)
    assert torch.equal(out, m.eval()(x))
    # batched leading dims work too
    x3 = torch.randn(2, 3, 9)
    assert torch.equal(spec.apply_flat(flat, x3, train=False), m(x3))


def test_flatten_load_flat_round_trip():
    m = _randomise(ProjectionHead(4, 3), seed=1)
    spec = HeadSpec.of(m)
    flat = spec.flatten(m)
    m2 = ProjectionHead(4, 3)
    spec.load_flat(m2, flat)
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(spec.flatten(m2), flat)
    views = spec.unflatten(flat)
    assert torch.equal(views["fc2.weight"], m.fc2.weight.detach())
    assert views["fc2.weight"].data_ptr() == flat.data_ptr() + 4 * (3 * 4 + 3)  # a view, not a copy
    with pytest.raises(ValueError):
        spec.load_flat(ProjectionHead(5, 3), flat)
    with pytest.raises(ValueError):
        spec.apply_flat(flat[:-1], torch.randn(2, 4), train=False)


def test_init_flat_distribution_and_determinism():
    spec = HeadSpec(64, 32)
    a = spec.init_flat(torch.Generator().manual_seed(5))
    b = spec.init_flat(torch.Generator().manual_seed(5))
    c = spec.init_flat(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    v = spec.unflatten(a)
    m = ProjectionHead(64, 32)
    for name, p in m.named_parameters():
        assert v[name].shape == p.shape
    for name, fan_in in (("fc1.weight", 64), ("fc1.bias", 64), ("fc2.weight", 32), ("fc2.bias", 32)):
        bound = 1 / math.sqrt(fan_in)
        assert v[name].abs().max() <= bound
        # same bound as nn.Linear's default init
        assert m.get_parameter(name).abs().max() <= bound
    w = v["fc1.weight"]
    assert abs(w.mean().item()) < 0.01 and abs(w.var().item() - (1 / 64) / 3) < 0.002  # U(-b, b) variance b^2/3
    assert torch.equal(v["norm.weight"], torch.ones(32)) and torch.equal(v["norm.bias"], torch.zeros(32))


def test_dropout_train_mode_reproducible():
    spec = HeadSpec(6, 8, dropout=0.5)
    flat = spec.init_flat(torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    o1 = spec.apply_flat(flat, x, train=True, generator=torch.Generator().manual_seed(9))
    o2 = spec.apply_flat(flat, x, train=True, generator=torch.Generator().manual_seed(9))
    o3 = spec.apply_flat(flat, x, train=True, generator=torch.Generator().manual_seed(10))
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    assert not torch.equal(o1, spec.apply_flat(flat, x, train=False))
    # p = 0 head: train mode equals eval mode
    spec0 = HeadSpec(6, 8, dropout=0.0)
    assert torch.equal(spec0.apply_flat(flat, x, train=True), spec0.apply_flat(flat, x, train=False))
    # the mask is inverted dropout: kept entries scaled by 1/(1-p)
    y = torch.ones(1000, 10)
    d = dropout_with_generator(y, 0.25, torch.Generator().manual_seed(1))
    vals = d.unique()
    assert len(vals) == 2 and vals[0] == 0 and vals[1] == pytest.approx(1 / 0.75)
    assert abs((d == 0).float().mean().item() - 0.25) < 0.02


def test_apply_flat_gradients_match_module():
    torch.manual_seed(0)
    m = _randomise(ProjectionHead(5, 4), seed=2).double().eval()
    spec = HeadSpec.of(m)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    (m(x) * w).sum().backward()
    g_mod_x = x.grad.clone()
    g_mod_p = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    flat = spec.flatten(m).requires_grad_(True)
    x.grad = None
    gf, gx = torch.autograd.grad((spec.apply_flat(flat, x, train=False) * w).sum(), (flat, x))
    torch.testing.assert_close(gf, g_mod_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, g_mod_x, rtol=1e-12, atol=1e-12)
    # numerical check of the functional form itself (float64, tiny head)
    flat0 = flat.detach().clone().requires_grad_(True)
    x0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, xx: spec.apply_flat(f, xx, train=False), (flat0, x0))
    # second order (unrolled student steps use create_graph=True)
    assert torch.autograd.gradgradcheck(lambda f, xx: spec.apply_flat(f, xx, train=False), (flat0, x0))


def test_stacked_heads_round_trip_and_equal_each_head_on_its_own():
    spec = HeadSpec(6, 5, dropout=0.25)
    g = torch.Generator().manual_seed(3)
    flats = torch.stack([spec.init_flat(g) + 0.1 * torch.randn(spec.num_params, generator=g) for _ in range(3)])
    params = spec.stack(flats)
    assert params[0].shape == (3, 6, 5) and params[0].is_contiguous()  # weights transposed
    assert torch.equal(spec.unstack(params), flats)
    x = torch.randn(3, 4, 6, generator=g)
    keep = (torch.rand(3, 4, 5, generator=g) >= 0.25).float() / 0.75
    out = spec.apply_stacked(params, x, keep)
    for e in range(3):
        torch.testing.assert_close(out[e], _with_keep(spec, flats[e], x[e], keep[e]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spec.apply_stacked(params, x)[1], spec.apply_flat(flats[1], x[1], train=False),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \[E, 75\]"):
        spec.stack(flats[0])


def _with_keep(spec, flat, x, keep):
    """apply_flat's train path with a given inverted-dropout multiplier instead of a drawn mask."""
    p = spec.unflatten(flat)
    h = F.linear(x, p["fc1.weight"], p["fc1.bias"])
    y = F.linear(F.gelu(h), p["fc2.weight"], p["fc2.bias"]) * keep
    return F.layer_norm(y + h, (spec.out_dim,), p["norm.weight"], p["norm.bias"], 1e-5)


def test_dual_heads_and_logits():
    torch.manual_seed(0)
    heads = DualHeads(6, 4, 5).eval()
    u, v = heads(torch.randn(3, 6), torch.randn(3, 4))
    assert u.shape == v.shape == (3, 5)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    a, b = torch.randn(3, 5), torch.randn(4, 5)
    z = similarity_logits(a, b, 0.07)
    ref = torch.tensor([[(a[i] @ b[j]) / (a[i].norm() * b[j].norm()) / 0.07 for j in range(4)] for i in range(3)])
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ losses
def test_clip_loss_brute_force():
    torch.manual_seed(0)
    z = torch.randn(5, 5, dtype=torch.float64)
    rows = [-(z[i, i] - torch.logsumexp(z[i, :], 0)) for i in range(5)]
    cols = [-(z[j, j] - torch.logsumexp(z[:, j], 0)) for j in range(5)]
    ref = 0.5 * (sum(rows) / 5 + sum(cols) / 5)
    torch.testing.assert_close(clip_loss(z), ref)
    with pytest.raises(ValueError):
        clip_loss(torch.randn(2, 3))


def _wbce_loop(z, s, eps=1e-6):
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            p = 1.0 / (1.0 + math.exp(-float(z[i, j])))
            t = float(s[i, j])
            ell = -t * math.log(p + eps) - (1 - t) * math.log(1 - p + eps)
            if t > 0.5:
                pos_sum += ell
                n_pos += 1
            else:
                neg_sum += ell
                n_neg += 1
    return 0.5 * (pos_sum / (n_pos + eps) + neg_sum / (n_neg + eps))


def test_wbce_hand_computed():
    # z = 0 everywhere: p = 1/2, every term is -log(1/2 + eps) whatever S is -> L = 1/2 * (ln2 * |P|/(|P|+eps)
    # + ln2 * |Q|/(|Q|+eps)) ~ ln 2.
    z = torch.zeros(2, 2, dtype=torch.float64)
    s = torch.eye(2, dtype=torch.float64)
    l_half = -math.log(0.5 + 1e-6)
    expected = 0.5 * (2 * l_half / (2 + 1e-6) + 2 * l_half / (2 + 1e-6))
    assert wbce_loss(z, s).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(math.log(2), rel=1e-5)
    # z = [[ln3, 0], [0, -ln3]], S = [[1, 0.2], [0.6, 0]]:
    # p = [[3/4, 1/2], [1/2, 1/4]]; P = {(0,0), (1,0)}, Q = {(0,1), (1,1)}
    # l00 = -ln(3/4); l10 = -0.6 ln(1/2) - 0.4 ln(1/2) = ln 2; l01 = ln 2; l11 = -ln(3/4)
    # L = 1/2 ((ln(4/3) + ln 2)/2 + (ln 2 + ln(4/3))/2) = (ln(4/3) + ln 2) / 2 = ln(8/3) / 2  (eps -> 0)
    z = torch.tensor([[math.log(3), 0.0], [0.0, -math.log(3)]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.2], [0.6, 0.0]], dtype=torch.float64)
    assert wbce_loss(z, s).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-5)
    assert wbce_loss(z, s, eps=0.0).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)
    assert wbce_loss(z, s).item() == pytest.approx(_wbce_loop(z, s), rel=1e-12)


def test_wbce_matches_loop_and_stable_form_is_close():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 6, generator=g, dtype=torch.float64) * 3
    s = torch.rand(6, 6, generator=g, dtype=torch.float64)
    s.fill_diagonal_(1.0)
    ref = _wbce_loop(z, s)
    assert wbce_loss(z, s).item() == pytest.approx(ref, rel=1e-12)
    # all-negative targets: |P| = 0, the P term vanishes (0 / eps)
    s0 = torch.zeros(3, 3, dtype=torch.float64)
    assert wbce_loss(z[:3, :3], s0).item() == pytest.approx(_wbce_loop(z[:3, :3], s0), rel=1e-12)
    # the log-sigmoid form differs only by the eps terms
    stable = wbce_loss(z, s, stable=True).item()
    assert stable == pytest.approx(ref, rel=1e-4)
    assert wbce_loss(z, s, eps=0.0, stable=True).item() == pytest.approx(wbce_loss(z, s, eps=0.0).item(), rel=1e-10)
    # float32 vs float64 over the logit range of temperature 0.07 (cosine / 0.07 in [-14.3, 14.3]):
    # the reference form loses ~1e-5 relative to cancellation in 1 - p; log-sigmoid does not.
    zz = (torch.rand(64, 64, generator=g) * 2 - 1) * 14
    eye = torch.eye(64)
    ref64 = wbce_loss(zz.double(), eye.double()).item()
    assert wbce_loss(zz, eye).item() == pytest.approx(ref64, rel=1e-4)
    st64 = wbce_loss(zz.double(), eye.double(), stable=True).item()
    assert wbce_loss(zz, eye, stable=True).item() == pytest.approx(st64, rel=1e-6)
    # ... but there the eps cap of the reference form is reached: the two forms differ by ~1%
    assert st64 == pytest.approx(ref64, rel=0.05) and abs(st64 / ref64 - 1) > 1e-3


def test_wbce_gradcheck_logits_and_targets():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(4, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    # keep targets away from 0.5 so finite differences do not cross the P/Q split
    s = torch.rand(4, 4, generator=g, dtype=torch.float64) * 0.4
    s = torch.where(torch.rand(4, 4, generator=g, dtype=torch.float64) > 0.5, s + 0.55, s).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: wbce_loss(a, b), (z, s))
    assert torch.autograd.gradcheck(lambda a, b: wbce_loss(a, b, stable=True), (z, s))
    with pytest.raises(ValueError):
        wbce_loss(torch.zeros(2, 2), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------ similarity
def test_low_rank_similarity_starts_at_identity_and_blocks():
    sim = LowRankSimilarity(12, 3, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sim.full(), torch.eye(12))
    idx = torch.tensor([3, 0, 7, 11])
    assert torch.equal(sim.block(idx), torch.eye(4))
    # after random updates, block(idx) == full()[idx][:, idx] (also with duplicate indices)
    _randomise(sim, seed=4)
    full = sim.full()
    torch.testing.assert_close(full, torch.diag(sim.a) + (2.0 / 3) * sim.L @ sim.R.t())
    for idx in (torch.tensor([3, 0, 7, 11]), torch.tensor([5, 5, 2]), torch.arange(12)):
        torch.testing.assert_close(sim.block(idx), full[idx][:, idx], rtol=1e-6, atol=1e-6)
    assert sim(idx).shape == (12, 12)
    # gradients reach a, L, R through a block
    sim.block(torch.tensor([1, 4])).sum().backward()
    assert sim.a.grad[1] == 1 and sim.a.grad[0] == 0 and sim.L.grad.abs().sum() > 0 and sim.R.grad.abs().sum() > 0


def test_low_rank_similarity_seeded_and_rank_checked():
    a = LowRankSimilarity(8, 2, 1.0, generator=torch.Generator().manual_seed(3))
    b = LowRankSimilarity(8, 2, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.L, b.L) and torch.equal(a.R, torch.zeros(8, 2))
    for bad in (0, 9):
        with pytest.raises(ValueError, match="sim_rank"):
            LowRankSimilarity(8, bad, 1.0)
        with pytest.raises(ConfigError):
            LowRankSimilarity(8, bad, 1.0)


def test_full_similarity():
    sim = FullSimilarity(5)
    assert torch.equal(sim.full(), torch.eye(5))
    _randomise(sim)
    idx = torch.tensor([4, 1, 1])
    assert torch.equal(sim.block(idx), sim.full()[idx][:, idx])
    with pytest.raises(IndexError):
        sim.block(torch.tensor([5]))
