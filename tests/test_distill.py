"""Distillation math: exact gradients, the TESLA form, the pixel-space shortcut, resume and divergence."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from repblend.stages.buffer import ExpertSettings, Trajectory, train_expert
from repblend.stages.distill import (DistillSettings, StudentBatch, SyntheticSet, match_tesla, match_unrolled,
                                     represent, sample_batches, student_loss)
from repblend.stages.distiller import DivergenceError, Distiller, OuterSettings, RewindSettings
from repblend.stages.heads import HeadSpec
from repblend.stages.errors import DataError

D_IMG, D_TXT, EMBED, N = 6, 5, 4, 7
SPECS = (HeadSpec(D_IMG, EMBED, 0.0), HeadSpec(D_TXT, EMBED, 0.0))


def _problem(dtype=torch.float64, seed=0, **settings):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(N, D_IMG, generator=g, dtype=dtype)
    texts = torch.randn(N, D_TXT, generator=g, dtype=dtype)
    syn = SyntheticSet(features, texts, sim_rank=2, sim_alpha=1.0, lr_init=0.3, generator=g)
    with torch.no_grad():  # move S and the lrs off their special starting points so every gradient is generic
        syn.sim.R.normal_(generator=g)
    start = (SPECS[0].init_flat(g, dtype=dtype), SPECS[1].init_flat(g, dtype=dtype))
    target = tuple(s + 0.1 * torch.randn(s.shape, generator=g, dtype=dtype) for s in start)
    batch_settings = DistillSettings(**{"syn_steps": 3, "mini_batch_size": 4, **settings})
    batches = sample_batches(N, batch_settings, np.random.default_rng(seed))
    return syn, start, target, batches, batch_settings


def _grads(match, syn, start, target, batches, settings):
    syn = copy.deepcopy(syn)
    features = syn.images.detach().clone().requires_grad_(True)
    result = match(features, syn, SPECS, start, target, batches, settings)
    grads = {"features": features.grad, "texts": syn.texts.grad, "R": syn.sim.R.grad, "a": syn.sim.a.grad,
             "lr_img": syn.syn_lr_img.grad, "lr_txt": syn.syn_lr_txt.grad}
    return result, grads


def _loss_at(syn, start, target, batches, settings, name, index, delta):
    syn = copy.deepcopy(syn)
    tensor = {"features": syn.images, "texts": syn.texts, "R": syn.sim.R, "a": syn.sim.a,
              "lr_img": syn.syn_lr_img, "lr_txt": syn.syn_lr_txt}[name]
    with torch.no_grad():
        tensor.view(-1)[index] += delta
    features = syn.images.detach().clone().requires_grad_(True)
    return match_unrolled(features, syn, SPECS, start, target, batches, settings).loss.item()


@pytest.mark.parametrize("variant", [{"blend": True}, {"blend": False}, {"blend": False, "noise": 0.5}])
def test_unrolled_gradient_matches_finite_differences(variant):
    syn, start, target, batches, settings = _problem(**variant)
    _, grads = _grads(match_unrolled, syn, start, target, batches, settings)
    rng = np.random.default_rng(1)
    eps = 1e-6
    for name, grad in grads.items():
        for index in rng.choice(grad.numel(), size=min(3, grad.numel()), replace=False):
            numeric = (_loss_at(syn, start, target, batches, settings, name, index, eps)
                       - _loss_at(syn, start, target, batches, settings, name, index, -eps)) / (2 * eps)
            assert grad.reshape(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("merge,noise", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_tesla_equals_unrolled_for_one_student_step(merge, noise):
    """With one step there are no cross-step terms to drop, so the two-pass form is exact (with noise too:
    pass 2 regenerates pass 1's noise from the batch's seed)."""
    syn, start, target, batches, settings = _problem(syn_steps=1, merge_loss_branches=merge, noise=noise)
    exact_result, exact = _grads(match_unrolled, syn, start, target, batches, settings)
    tesla_result, tesla = _grads(match_tesla, syn, start, target, batches, settings)
    assert tesla_result.loss.item() == pytest.approx(exact_result.loss.item(), rel=1e-12)
    for name in ("features", "texts", "R", "a"):
        torch.testing.assert_close(tesla[name], exact[name], rtol=1e-9, atol=1e-12)
    if not merge:  # learned-lr gradients: each modality normalised separately in both forms
        torch.testing.assert_close(tesla["lr_img"], exact["lr_img"], rtol=1e-9, atol=1e-12)


def test_tesla_differs_from_unrolled_with_several_steps():
    """The dropped cross-step terms are real: with 3 steps the two forms disagree (but point the same way)."""
    syn, start, target, batches, settings = _problem(syn_steps=3)
    _, exact = _grads(match_unrolled, syn, start, target, batches, settings)
    _, tesla = _grads(match_tesla, syn, start, target, batches, settings)
    assert not torch.allclose(tesla["texts"], exact["texts"])
    cosine = torch.nn.functional.cosine_similarity(tesla["texts"].flatten(), exact["texts"].flatten(), dim=0)
    assert cosine > 0.5


def test_noise_perturbation_is_seeded_and_scaled_by_the_representations_rms():
    settings = DistillSettings(syn_steps=4, mini_batch_size=4, blend=False, noise=0.3)
    batches = sample_batches(N, settings, np.random.default_rng(5))
    again = sample_batches(N, settings, np.random.default_rng(5))
    assert [b.noise_seed for b in batches] == [b.noise_seed for b in again]
    assert len({b.noise_seed for b in batches}) == 4
    assert all(b.noise_seed is None for b in sample_batches(N, DistillSettings(syn_steps=2, mini_batch_size=4),
                                                            np.random.default_rng(5)))
    x = 3.0 * torch.randn(2000, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    image, text = represent(x, batches[0], 0), represent(x, batches[0], 1)
    torch.testing.assert_close(represent(x, batches[0], 0), image)  # regenerated, not redrawn
    assert not torch.allclose(image, text)  # each modality its own noise
    ratio = (image - x).std() / x.pow(2).mean().sqrt()
    assert ratio.item() == pytest.approx(0.3, rel=0.02)


def test_blending_shares_lambda_and_permutation_across_modalities():
    settings = DistillSettings(syn_steps=5, mini_batch_size=4, blend=True, beta_a=2.0, beta_b=5.0)
    batches = sample_batches(N, settings, np.random.default_rng(3))
    again = sample_batches(N, settings, np.random.default_rng(3))
    assert [b.lam for b in batches] == [b.lam for b in again]
    assert all(0 < b.lam < 1 and sorted(b.perm.tolist()) == list(range(4)) for b in batches)
    # batches walk a permutation: the first ceil(N/4) batches cover distinct indices until the pool is exhausted
    first = torch.cat([batches[0].idx, batches[1].idx[:N - 4]])
    assert len(set(first.tolist())) == N
    no_blend = sample_batches(N, dataclasses.replace(settings, blend=False), np.random.default_rng(3))
    assert all(b.lam is None and b.perm is None for b in no_blend)


def test_blending_changes_the_student_loss_consistently():
    syn, start, *_ = _problem()
    idx = torch.tensor([0, 1, 2, 3])
    perm = torch.tensor([2, 3, 0, 1])
    settings = DistillSettings()
    targets = syn.sim.block(idx)
    plain = student_loss(*start, syn.images[idx], syn.texts[idx], targets, *SPECS, settings)
    lam1 = student_loss(*start, 1.0 * syn.images[idx] + 0.0 * syn.images[idx][perm],
                        syn.texts[idx], targets, *SPECS, settings)
    assert plain.item() == pytest.approx(lam1.item())


def _frozen_encoder_and_pixels() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small frozen conv encoder (float64) and N images for it: the pixel-space tests' encoder."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, D_IMG)).double()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, torch.randn(N, 3, 8, 8, dtype=torch.float64)


def test_pixel_shortcut_equals_differentiating_through_the_encoder_every_step():
    """Encoding once, cutting the graph and pushing the feature gradient back equals the reference form
    in which each student step runs the frozen encoder on its own mini-batch."""
    encoder, pixels = _frozen_encoder_and_pixels()
    syn, start, target, batches, settings = _problem()
    syn.images = torch.nn.Parameter(pixels.clone())

    # the shortcut (what Distiller does)
    fast = copy.deepcopy(syn)
    encoded = encoder(fast.images)
    leaf = encoded.detach().requires_grad_(True)
    match_unrolled(leaf, fast, SPECS, start, target, batches, settings)
    encoded.backward(leaf.grad)

    # reference: encoder inside every step
    slow = copy.deepcopy(syn)
    theta = [start[0].clone().requires_grad_(True), start[1].clone().requires_grad_(True)]
    for batch in batches:
        u = encoder(slow.images[batch.idx])
        u = batch.lam * u + (1 - batch.lam) * u[batch.perm]
        v = slow.texts[batch.idx]
        v = batch.lam * v + (1 - batch.lam) * v[batch.perm]
        loss = student_loss(theta[0], theta[1], u, v, slow.sim.block(batch.idx), *SPECS, settings)
        g = torch.autograd.grad(loss, theta, create_graph=True)
        theta = [theta[0] - slow.syn_lr_img * g[0], theta[1] - slow.syn_lr_txt * g[1]]
    total = sum((t - tt).pow(2).sum() / (s - tt).pow(2).sum() for t, s, tt in zip(theta, start, target))
    total.backward()
    torch.testing.assert_close(fast.images.grad, slow.images.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.texts.grad, slow.texts.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_encoder_backward_equals_keeping_the_whole_graph(chunk):
    """distill.encode_chunk trades one more encoder forward for memory; the pixel gradient must not change."""
    encoder, pixels = _frozen_encoder_and_pixels()
    grads = []
    for encode_chunk in (0, chunk):
        base = _tiny_distiller()
        syn = copy.deepcopy(base.syn).double()
        syn.images = torch.nn.Parameter(pixels.clone())
        settings = dataclasses.replace(base.settings, encode_chunk=encode_chunk)
        trajectories = [Trajectory({e: t.double() for e, t in tr.image.items()},
                                   {e: t.double() for e, t in tr.text.items()}) for tr in base.trajectories]
        distiller = Distiller(syn, trajectories, SPECS, settings, base.outer, seed=0, image_encoder=encoder)
        distiller.gradients(distiller.sample())
        grads.append([p.grad.clone() for p in distiller.syn.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) >= 3
    for whole, chunked in zip(*grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-13)


def _tiny_distiller(seed=0, **outer):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(40, D_IMG, generator=g)
    txt = img[:, :D_TXT] + 0.1 * torch.randn(40, D_TXT, generator=g)
    c2i = torch.arange(40)
    expert = ExpertSettings(embed_dim=EMBED, dropout=0.0, epochs=3, batch_size=8)
    trajectories = [train_expert(img, txt, c2i, expert, seed=k) for k in range(2)]
    syn = SyntheticSet(img[:N], txt[:N], sim_rank=2, sim_alpha=1.0, lr_init=0.1, generator=g)
    settings = DistillSettings(syn_steps=3, mini_batch_size=4, max_start_epoch=2)
    outer = OuterSettings(**{"lr_img": 0.1, "lr_txt": 0.1, "lr_lr": 1e-6, "lr_sim": 0.01, **outer})
    return Distiller(syn, trajectories, SPECS, settings, outer, seed=seed)


def test_distiller_reduces_the_matching_loss_and_moves_the_set():
    distiller = _tiny_distiller()
    before = distiller.syn.texts.detach().clone()
    losses = []
    distiller.run(40, on_step=lambda log: losses.append(log.loss))
    assert not torch.equal(before, distiller.syn.texts)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_resume_gives_the_same_set_as_an_uninterrupted_run(tmp_path):
    straight = _tiny_distiller()
    straight.run(8)
    ckpt = tmp_path / "ckpt.pt"
    first = _tiny_distiller()
    first.run(5, checkpoint=ckpt, ckpt_every=5)
    resumed = _tiny_distiller()  # a fresh process would build exactly this, then find the checkpoint
    assert resumed.resume(ckpt) and resumed.iteration == 5
    resumed.run(8, checkpoint=ckpt, ckpt_every=5)
    assert resumed.iteration == 8
    for name, tensor in straight.syn.state_dict().items():
        torch.testing.assert_close(resumed.syn.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, damage):
    ckpt = tmp_path / "ckpt.pt"
    _tiny_distiller().run(2, checkpoint=ckpt, ckpt_every=2)
    whole = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": whole[:len(whole) // 2], "empty": b"", "text": b"not a checkpoint"}[damage])
    with pytest.raises(DataError, match=rf"^{ckpt}: unreadable checkpoint \(.+\); move it away to start that stage "
                                        "over$"):
        _tiny_distiller().resume(ckpt)


def test_learned_lr_ceilings_hold_from_the_start_and_bind_each_side_alone():
    distiller = _tiny_distiller(lr_lr=1e-2, syn_lr_max=(0.13, 0.0))
    below = _tiny_distiller(syn_lr_max=(0.05, 0.0))  # a ceiling under the initial 0.1 applies before any update
    assert float(below.syn.syn_lr_img.detach()) == pytest.approx(0.05)
    assert float(below.syn.syn_lr_txt.detach()) == pytest.approx(0.1)
    real = distiller.gradients

    def rising(sample):  # both learned lrs pushed up every iteration
        result = real(sample)
        distiller.syn.syn_lr_img.grad = torch.full_like(distiller.syn.syn_lr_img, -1.0)
        distiller.syn.syn_lr_txt.grad = torch.full_like(distiller.syn.syn_lr_txt, -1.0)
        return result

    distiller.gradients = rising
    logs = []
    distiller.run(10, on_step=logs.append)
    assert all(log.syn_lr_img <= 0.13 for log in logs) and logs[-1].syn_lr_img == pytest.approx(0.13)
    assert logs[-1].syn_lr_txt > 0.2  # the text side has no ceiling here


def test_divergence_stops_with_a_clear_message(tmp_path):
    distiller = _tiny_distiller(lr_lr=1e6)  # the learned lr overshoots below zero at once
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(DivergenceError, match="learned syn_lr_(img|txt)=.* <= 0"):
        distiller.run(20, checkpoint=ckpt, ckpt_every=1)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    distiller = _tiny_distiller()
    ckpt = tmp_path / "ckpt.pt"
    distiller.run(4, checkpoint=ckpt, ckpt_every=2)
    good = {k: v.clone() for k, v in distiller.syn.state_dict().items()}
    with torch.no_grad():
        distiller.syn.texts[0, 0] = float("nan")  # what an exploding outer step leaves behind
    with pytest.raises(DivergenceError, match="diverged at iteration 5: matching loss nan"):
        distiller.run(10, checkpoint=ckpt, ckpt_every=1)
    restored = _tiny_distiller()
    assert restored.resume(ckpt) and restored.iteration == 4
    for name, tensor in good.items():
        torch.testing.assert_close(restored.syn.state_dict()[name], tensor, rtol=0, atol=0)


def test_same_seed_gives_the_same_set_another_seed_does_not():
    """R4: determinism on one machine (CPU); the seed is what varies a run."""
    runs = [_tiny_distiller(seed=s) for s in (0, 0, 1)]
    for distiller in runs:
        distiller.run(6)
    same, other = runs[1].syn.state_dict(), runs[2].syn.state_dict()
    for name, tensor in runs[0].syn.state_dict().items():
        torch.testing.assert_close(same[name], tensor, rtol=0, atol=0)
    assert not torch.equal(other["texts"], runs[0].syn.state_dict()["texts"])


def test_missing_snapshots_are_refused():
    distiller = _tiny_distiller()
    short = Trajectory({0: distiller.trajectories[0].image[0]}, {0: distiller.trajectories[0].text[0]})
    with pytest.raises(Exception, match=r"expert 0 lacks snapshots \[1, 2\]"):
        Distiller(distiller.syn, [short], SPECS, distiller.settings, distiller.outer, seed=0)


def test_student_batch_is_a_plain_record():
    batch = StudentBatch(torch.tensor([0, 1]), None, None)
    assert batch.lam is None


# the spike guard (distill.rewind_*) ---------------------------------------------------------------------------

def _guarded(spikes: set[int], seed=0, **rewind) -> Distiller:
    """A tiny distiller whose image-side loss reads 500 (a spike) at the 1-based iterations in `spikes`; the
    gradients stay the real ones, so only the guard's decisions differ from an unguarded run. (This noisy problem's
    own losses run to 7, so the threshold sits at 100.)"""
    distiller = _tiny_distiller(seed=seed)
    distiller = dataclasses.replace(distiller, rewind=RewindSettings(**{"loss": 100.0, "patience": 2, "every": 3,
                                                                         **rewind}))
    real = distiller.gradients

    def gradients(sample):
        result = real(sample)
        if distiller.iteration + 1 in spikes:
            return dataclasses.replace(result, loss_img=torch.tensor(500.0), loss=result.loss + 500.0)
        return result

    distiller.gradients = gradients
    return distiller


def _state(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in distiller.syn.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_a_guard_that_sees_no_spike_leaves_the_run_as_it_was():
    plain, guarded = _tiny_distiller(), _guarded(set())
    plain.run(8)
    guarded.run(8)
    _assert_same(_state(guarded), _state(plain))
    assert guarded.rewinds == 0 and guarded._point["iteration"] == 6  # healthy points at 3 and 6


def test_a_spike_skips_its_update_and_spikes_in_a_row_rewind_to_the_last_healthy_point():
    distiller = _guarded({5, 7, 8})
    logs = []
    distiller.run(4, on_step=logs.append)
    outer_lrs = [g["lr"] for g in distiller.optimizer.param_groups]
    before = _state(distiller)  # iteration 4's set (the healthy point is iteration 3's)
    distiller.run(5, on_step=logs.append)  # iteration 5 spikes alone: nothing moves
    assert logs[-1].guard == "skipped"
    _assert_same(_state(distiller), before)
    distiller.run(6, on_step=logs.append)  # a clean update
    assert logs[-1].guard == "" and not torch.equal(_state(distiller)["texts"], before["texts"])
    distiller.run(8, on_step=logs.append)  # 7 skipped, 8 the second in a row: back to iteration 3's set
    assert [log.guard for log in logs[-2:]] == ["skipped", "rewound to 3"]
    assert distiller.iteration == 8 and distiller.rewinds == 1 and distiller.lr_scale == 0.5
    at_three = distiller._point["syn"]
    for name, tensor in _state(distiller).items():
        expected = at_three[name] * 0.5 if name.startswith("syn_lr") else at_three[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    assert [g["lr"] for g in distiller.optimizer.param_groups] == [lr * 0.5 for lr in outer_lrs]


def test_a_non_finite_loss_is_a_spike_under_the_guard():
    distiller = _guarded(set())
    real = distiller.gradients
    distiller.gradients = lambda sample: dataclasses.replace(real(sample), loss_txt=torch.tensor(float("nan")))
    logs = []
    distiller.run(2, on_step=logs.append)
    assert [log.guard for log in logs] == ["skipped", "rewound to 0"]
    assert all(torch.isfinite(t).all() for t in _state(distiller).values())


def test_more_rewinds_than_allowed_stop_with_a_message_naming_the_limit():
    distiller = _guarded(set(range(1, 100)), max_rewinds=2)
    logs = []
    with pytest.raises(DivergenceError, match=r"after 2 rewinds \(distill.rewind_max\)"):
        distiller.run(20, on_step=logs.append)
    assert [log.guard for log in logs] == ["skipped", "rewound to 0"] * 2 + ["skipped"]
    # each rewind to the same point scales its learned lrs once more: 0.1 * 0.5 ** 2
    assert float(distiller.syn.syn_lr_img.detach()) == pytest.approx(0.1 * 0.25)


def test_a_resumed_guarded_run_rewinds_as_an_uninterrupted_one(tmp_path):
    spikes = {4, 5, 11, 12}  # rewinds at 5 (to 3) and at 12 (to 8, the point kept after 6, 7, 8 ran clean)
    straight = _guarded(spikes)
    logs = []
    straight.run(16, on_step=logs.append)
    assert [(log.iteration, log.guard) for log in logs if log.guard] == [
        (4, "skipped"), (5, "rewound to 3"), (11, "skipped"), (12, "rewound to 8")]
    ckpt = tmp_path / "ckpt.pt"
    first = _guarded(spikes)
    first.run(11, checkpoint=ckpt, ckpt_every=11)  # killed with one rewind done and one spike pending
    assert first.spikes == 1 and first.rewinds == 1
    resumed = _guarded(spikes)
    assert resumed.resume(ckpt) and resumed.iteration == 11
    resumed.run(16)
    _assert_same(_state(resumed), _state(straight))
    assert resumed.lr_scale == straight.lr_scale == 0.25


# outer-gradient clipping (distill.grad_clip) -----------------------------------------------------------------

def _with_gradients(distiller: Distiller, norms: list[float]) -> None:
    """Each group's gradient set to a fixed direction with the given norm (images, texts, lrs, similarity)."""
    for group, norm in zip(distiller.optimizer.param_groups, norms):
        flat = torch.cat([torch.ones(p.numel()) for p in group["params"]])
        for p, piece in zip(group["params"], flat.split([q.numel() for q in group["params"]])):
            p.grad = (piece * norm / flat.norm()).reshape(p.shape).to(p.dtype)


def _grad_norms(distiller: Distiller) -> list[float]:
    return [float(torch.cat([p.grad.reshape(-1) for p in g["params"]]).norm()) for g in
            distiller.optimizer.param_groups]


def test_grad_clip_caps_each_group_at_a_multiple_of_its_running_mean():
    distiller = _tiny_distiller(grad_clip=4.0)
    _with_gradients(distiller, [1.0, 2.0, 0.0, 3.0])  # the first update: each group's own norm starts its mean
    distiller._clip_gradients()
    assert _grad_norms(distiller) == pytest.approx([1.0, 2.0, 0.0, 3.0])
    torch.testing.assert_close(distiller._grad_mean, torch.tensor([1.0, 2.0, 0.0, 3.0]))
    # a 100x jump in the images' gradient is cut to 4x their mean; texts under the cap pass; the lrs' group, whose
    # first gradient was zero, starts its mean now instead of being clipped to nothing; the similarity goes non-finite
    _with_gradients(distiller, [100.0, 7.0, 5.0, float("inf")])
    distiller._clip_gradients()
    assert _grad_norms(distiller)[:3] == pytest.approx([4.0, 7.0, 5.0])
    # the mean follows the clipped norms with weight 0.1 (a non-finite norm leaves it as it was)
    torch.testing.assert_close(distiller._grad_mean, torch.tensor([0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 7, 5.0, 3.0]))


def test_grad_clip_keeps_a_run_that_never_exceeds_it_as_it_was_and_resumes_exactly(tmp_path):
    plain, loose = _tiny_distiller(), _tiny_distiller(grad_clip=1e9)
    plain.run(6)
    loose.run(6)
    _assert_same(_state(loose), _state(plain))
    straight, logs = _tiny_distiller(grad_clip=1.5), []
    straight.run(8, on_step=logs.append)
    assert not torch.equal(_state(straight)["texts"], _state(plain)["texts"])  # it clipped here
    assert logs[0].clipped == 0 and sum(log.clipped for log in logs) > 0  # the log counts the groups clipped
    ckpt = tmp_path / "ckpt.pt"
    _tiny_distiller(grad_clip=1.5).run(5, checkpoint=ckpt, ckpt_every=5)
    resumed = _tiny_distiller(grad_clip=1.5)
    assert resumed.resume(ckpt)
    resumed.run(8)
    _assert_same(_state(resumed), _state(straight))  # the running means came back with the checkpoint
