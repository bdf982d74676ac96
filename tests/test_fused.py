"""The fused (torch.func) form of the exact unroll: same numbers as match_unrolled, eagerly and compiled."""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from repblend.stages.distill import match_unrolled
from repblend.stages.distiller import Distiller
from repblend.stages.fused import FusedMatch, unsupported
from repblend.stages.heads import HeadSpec
from repblend.stages.lors import EncoderSpec
from repblend.stages.losses import FullSimilarity
from tests.test_distill import SPECS, _frozen_encoder_and_pixels, _problem, _tiny_distiller


def _fused(features, syn, specs, start, target, batches, settings):
    """FusedMatch (eager) behind match_unrolled's signature."""
    return FusedMatch(specs, settings, mode=None)(features, syn, start, target, batches)


def _grads(match, syn, start, target, batches, settings):
    """The match's result and the gradient of every parameter of (a copy of) the synthetic set."""
    syn = copy.deepcopy(syn)
    features = syn.images.detach().clone().requires_grad_(True)
    result = match(features, syn, SPECS, start, target, batches, settings)
    return result, {"features": features.grad, **{n: p.grad for n, p in syn.named_parameters() if n != "images"}}


@pytest.mark.parametrize("variant", [{"blend": True}, {"blend": False}, {"loss": "clip"},
                                     {"merge_loss_branches": True}, {"sim": "full"}])
def test_fused_equals_the_unrolled_loop(variant):
    """Every gradient of the synthetic set (features, texts, S, learned lrs) and all three losses agree."""
    variant = dict(variant)
    full_sim = variant.pop("sim", None) == "full"
    syn, start, target, batches, settings = _problem(**variant)
    if full_sim:
        syn.sim = FullSimilarity(syn.num_pairs, dtype=torch.float64)
        with torch.no_grad():
            syn.sim.S.add_(0.1 * torch.randn(syn.sim.S.shape, dtype=torch.float64))
    fused_result, fused = _grads(_fused, syn, start, target, batches, settings)
    loop_result, loop = _grads(match_unrolled, syn, start, target, batches, settings)
    for name in ("loss", "loss_img", "loss_txt"):
        assert getattr(fused_result, name).item() == pytest.approx(getattr(loop_result, name).item(), rel=1e-12)
    assert len(loop) == (5 if full_sim else 7)
    for name, grad in loop.items():
        if settings.loss == "clip" and name.startswith("sim."):  # the CLIP loss does not read the learned S
            assert grad is None and fused[name] is None
        else:
            torch.testing.assert_close(fused[name], grad, rtol=1e-10, atol=1e-13, msg=name)


def test_fused_pixel_gradient_equals_the_eager_distiller():
    """Pixel space: the features' gradient from the fused loss reaches the pixels through the encoder exactly."""
    encoder, pixels = _frozen_encoder_and_pixels()
    grads = []
    for fused in (False, True):
        base = _tiny_distiller()
        syn = copy.deepcopy(base.syn).double()
        syn.images = torch.nn.Parameter(pixels.clone())
        trajectories = [dataclasses.replace(tr, image={e: t.double() for e, t in tr.image.items()},
                                            text={e: t.double() for e, t in tr.text.items()})
                        for tr in base.trajectories]
        distiller = Distiller(syn, trajectories, SPECS, base.settings, base.outer, seed=0, image_encoder=encoder)
        if fused:
            distiller._fused = FusedMatch(SPECS, base.settings, mode=None)
        distiller.gradients(distiller.sample())
        grads.append({n: p.grad.clone() for n, p in distiller.syn.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "images" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("scope", ["step", "unroll"])
def test_compiled_distillation_follows_the_eager_one(scope):
    """Three outer iterations compiled by torch.compile (Inductor on this CPU) land on the eager loop's set."""
    eager, compiled = _tiny_distiller(), _tiny_distiller()
    settings = dataclasses.replace(eager.settings, syn_steps=2)  # the 'unroll' graph grows with the steps: 2 show it
    eager = Distiller(eager.syn, eager.trajectories, SPECS, settings, eager.outer, seed=0)
    compiled = Distiller(compiled.syn, compiled.trajectories, SPECS, settings, compiled.outer, seed=0,
                         compile="default", compile_scope=scope)
    graphs = counters["stats"]["unique_graphs"]
    logs = [(eager.step(), compiled.step()) for _ in range(3)]
    assert compiled._fused is not None and compiled._fused_ran  # compiled, not the eager fallback
    assert counters["stats"]["unique_graphs"] - graphs == 1  # fixed shapes: one graph serves every step and iteration
    for a, b in logs:
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
    for (name, p), q in zip(eager.syn.named_parameters(), compiled.syn.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(compiled.syn.texts, _tiny_distiller().syn.texts)  # it moved


def test_a_failing_compile_falls_back_to_the_eager_loop_with_a_warning():
    distiller = _tiny_distiller()
    reference = copy.deepcopy(distiller)
    distiller._fused = FusedMatch(SPECS, distiller.settings, mode=None)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    distiller._fused._fn = broken
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eager loop"):
        log = distiller.step()
    assert distiller._fused is None
    assert log.loss == pytest.approx(reference.step().loss, rel=1e-6)


def test_what_the_fused_form_does_not_cover_is_named():
    settings = _problem()[-1]
    assert unsupported(SPECS, settings) is None
    assert "tesla" in unsupported(SPECS, dataclasses.replace(settings, grad_mode="tesla"))
    assert "noise" in unsupported(SPECS, dataclasses.replace(settings, noise=0.5))
    encoder, _ = _frozen_encoder_and_pixels()
    lors = (EncoderSpec(encoder), HeadSpec(5, 4, 0.0))
    assert "LoRS" in unsupported(lors, settings)
    with pytest.raises(ValueError, match="compile scope 'all'"):
        FusedMatch(SPECS, settings, mode="default", scope="all")
    with pytest.raises(ValueError, match="does not cover .*tesla"):
        FusedMatch(SPECS, dataclasses.replace(settings, grad_mode="tesla"), mode="default")
