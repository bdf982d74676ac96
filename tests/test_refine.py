"""Refinement through the evaluation protocol: the unroll replays `train_heads` exactly, its gradients are right,
and the refine step of the pipeline writes, skips, resumes and is evaluated."""

import json

import pytest
import torch
from safetensors.torch import load_file

from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import load_config
from repblend.pipeline.refinement import refine as refine_step
from repblend.stages.errors import ConfigError
from repblend.stages.evaluate import PairSet, TrainSettings, train_heads
from repblend.stages.export import load_distilled
from repblend.stages.heads import DualHeads, HeadSpec
from repblend.stages.refine import lr_factor, protocol_unroll, real_pairs_loss
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM


def test_lr_factor_is_the_protocols_schedule():
    step = TrainSettings(embed_dim=4, epochs=100)
    assert [lr_factor(e, step) for e in (0, 50, 51, 99)] == [1.0, 1.0, 0.1, 0.1]  # x0.1 from epoch 51 (1-based 52)
    cosine = TrainSettings(embed_dim=4, epochs=10, schedule="cosine")
    assert lr_factor(0, cosine) == 1.0 and lr_factor(5, cosine) == pytest.approx(0.5)


@pytest.mark.parametrize("loss", ["wbce", "clip"])
def test_the_unroll_replays_train_heads(loss):
    """Same seed, same init, same shuffles: the functional unroll ends where `train_heads` (dropout off) ends, with
    several batches per epoch, a partial last batch, momentum, weight decay, the lr drop and two lrs."""
    torch.manual_seed(1)
    n, d_img, d_txt = 8, 6, 5
    images, texts = torch.randn(n, d_img), torch.randn(n, d_txt)
    similarity = torch.eye(n) + 0.1 * torch.rand(n, n)
    settings = TrainSettings(embed_dim=4, dropout=0.0, epochs=5, batch_size=3, loss=loss)
    heads = train_heads(PairSet(images, texts, similarity, 0.3, 0.2), settings, seed=7, device=torch.device("cpu"))
    torch.manual_seed(7)  # train_heads' initialisation
    fresh = DualHeads(d_img, d_txt, 4, 0.0)
    flat = [torch.cat([p.detach().reshape(-1) for p in head.parameters()]) for head in (fresh.image, fresh.text)]
    specs = (HeadSpec(d_img, 4, 0.0), HeadSpec(d_txt, 4, 0.0))
    trained = protocol_unroll(tuple(flat), specs, images, texts, similarity, torch.tensor([0.3, 0.2]), settings,
                              torch.Generator().manual_seed(7))
    for theta, head, start in zip(trained, (heads.image, heads.text), flat):
        end = torch.cat([p.detach().reshape(-1) for p in head.parameters()])
        assert (end - start).norm() > 0.1  # it trained
        torch.testing.assert_close(theta.detach(), end, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_set_gradient_through_the_unroll_matches_finite_differences(dropout):
    """With dropout the masks are a function of the generator's seed, so the loss is still a function of the set."""
    torch.manual_seed(2)
    n, d_img, d_txt = 5, 4, 3
    images = torch.randn(n, d_img, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(n, d_txt, dtype=torch.float64)
    similarity = torch.eye(n, dtype=torch.float64)
    log_lrs = torch.log(torch.tensor([0.5, 0.4], dtype=torch.float64)).requires_grad_(True)
    real = (torch.randn(12, d_img, dtype=torch.float64), torch.randn(12, d_txt, dtype=torch.float64))
    specs = (HeadSpec(d_img, 4, dropout), HeadSpec(d_txt, 4, dropout))
    settings = TrainSettings(embed_dim=4, dropout=dropout, epochs=3, batch_size=4)
    g = torch.Generator().manual_seed(0)
    theta = tuple(spec.init_flat(g, dtype=torch.float64) for spec in specs)

    def loss(x: torch.Tensor, log_lr: torch.Tensor) -> torch.Tensor:
        trained = protocol_unroll(theta, specs, x, texts, similarity, log_lr.exp(), settings,
                                  torch.Generator().manual_seed(3), dropout=dropout > 0)
        return real_pairs_loss(trained, specs, *real, 0.07)

    grad_x, grad_lr = torch.autograd.grad(loss(images, log_lrs), (images, log_lrs))
    eps = 1e-6
    for (i, j) in [(0, 0), (3, 2)]:
        bump = torch.zeros_like(images)
        bump[i, j] = eps
        numeric = (loss(images.detach() + bump, log_lrs.detach()) - loss(images.detach() - bump, log_lrs.detach()))
        assert float(grad_x[i, j]) == pytest.approx(float(numeric.detach()) / (2 * eps), rel=1e-5, abs=1e-8)
    bump = torch.tensor([eps, 0.0], dtype=torch.float64)
    numeric = loss(images.detach(), log_lrs.detach() + bump) - loss(images.detach(), log_lrs.detach() - bump)
    assert float(grad_lr[0]) == pytest.approx(float(numeric.detach()) / (2 * eps), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize(("segment", "dropout"), [(1, 0.0), (2, 0.0), (2, 0.4)])
def test_the_segmented_unroll_gives_the_whole_unrolls_gradient(segment, dropout):
    """Replaying the unroll in segments on the way back (2 + 2 + 1 epochs, or one at a time) changes only memory:
    the trained heads and the gradients of the set, its S and its lrs are the held-whole unroll's (with dropout: the
    replayed segments draw the masks their forward pass drew)."""
    torch.manual_seed(4)
    n, d_img, d_txt = 7, 5, 4
    tensors = [torch.randn(n, d_img, dtype=torch.float64), torch.randn(n, d_txt, dtype=torch.float64),
               torch.eye(n, dtype=torch.float64) + 0.2 * torch.rand(n, n, dtype=torch.float64),
               torch.log(torch.tensor([0.4, 0.3], dtype=torch.float64))]
    real = (torch.randn(10, d_img, dtype=torch.float64), torch.randn(10, d_txt, dtype=torch.float64))
    specs = (HeadSpec(d_img, 4, dropout), HeadSpec(d_txt, 4, dropout))
    settings = TrainSettings(embed_dim=4, dropout=dropout, epochs=5, batch_size=3)
    theta = tuple(spec.init_flat(torch.Generator().manual_seed(0), dtype=torch.float64) for spec in specs)

    def run(segment_epochs: int):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        images, texts, similarity, log_lrs = leaves
        trained = protocol_unroll(theta, specs, images, texts, similarity, log_lrs.exp(), settings,
                                  torch.Generator().manual_seed(5), segment_epochs, dropout=dropout > 0)
        real_pairs_loss(trained, specs, *real, 0.07).backward()
        return [t.detach() for t in trained], [leaf.grad for leaf in leaves]

    (whole_heads, whole_grads), (heads, grads) = run(0), run(segment)
    for got, want in zip(heads, whole_heads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("images", "texts", "similarity", "log_lrs"), grads, whole_grads):
        assert want.abs().max() > 1e-6, name  # each really gets a gradient
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


def test_the_unroll_with_dropout_drops_what_the_protocol_drops():
    """`dropout=True` trains through the heads' dropout: one step from the same start moves the heads elsewhere than
    without it; the same seed draws the same masks, another seed others; a head without dropout ignores the flag."""
    torch.manual_seed(6)
    n, d = 6, 5
    images, texts, similarity = torch.randn(n, d), torch.randn(n, d), torch.eye(n)
    lrs = torch.tensor([0.5, 0.5])
    settings = TrainSettings(embed_dim=64, dropout=0.25, epochs=1, batch_size=n)

    def one_step(p: float, dropout: bool, seed: int) -> list[torch.Tensor]:
        specs = (HeadSpec(d, 64, p), HeadSpec(d, 64, p))
        theta = tuple(spec.init_flat(torch.Generator().manual_seed(0)) for spec in specs)
        return [t.detach() for t in protocol_unroll(theta, specs, images, texts, similarity, lrs, settings,
                                                    torch.Generator().manual_seed(seed), dropout=dropout)]

    plain, dropped, again, other = one_step(0.25, False, 1), one_step(0.25, True, 1), one_step(0.25, True, 1), \
        one_step(0.25, True, 2)
    for a, b, c, e in zip(plain, dropped, again, other):
        assert (a - b).abs().max() > 1e-4  # the masks bite
        torch.testing.assert_close(b, c, rtol=0, atol=0)  # same seed, same masks
        assert (b - e).abs().max() > 1e-4  # another seed, other masks
    # and a head whose dropout is 0 is unchanged by the flag
    for a, b in zip(one_step(0.0, False, 1), one_step(0.0, True, 1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


def _config(toy, tmp_path, *extra):
    return load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature",
                              *TINY_ENCODERS, *TINY_PROBLEM, *STABLE_LRS, "distill.iterations=2", "eval.num_eval=1",
                              "eval.epochs=4", "eval.methods=[random]", "refine.enabled=true", "refine.iterations=4",
                              "refine.real_batch=16", "refine.ckpt_every=2", "refine.lr=0.01",
                              "refine.segment_epochs=3", *extra])  # 3 + 1 epochs: the segmented unroll


def test_run_refines_the_feature_set_and_evaluates_both(toy, tmp_path):
    config = _config(toy, tmp_path, "refine.eval_every=2")
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    early = evaluation.evaluate(config, tmp_path, caches)  # before refinement: the matched row, and why no other
    assert set(early["methods"]) == {"repblend_matched", "init", "random"}
    assert "not refined yet" in early["notes"]["repblend"]
    path = refine_step(config, tmp_path, caches)
    assert path == steps.refined_path(tmp_path) == steps.final_path(config, tmp_path)
    refined, matched = load_file(str(path)), load_file(str(steps.synthetic_path(tmp_path)))
    assert set(matched) <= set(refined)
    assert not torch.equal(refined["image_features"], matched["image_features"])
    assert torch.equal(refined["init_image_index"], matched["init_image_index"])
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and "eval" in rows[1] and "eval" not in rows[0]
    assert torch.load(path.parent / "checkpoint.pt", weights_only=False)["iteration"] == 4  # kept: runs can go on
    stamp = path.stat().st_mtime_ns
    assert refine_step(config, tmp_path, caches) == path and path.stat().st_mtime_ns == stamp  # up to date
    whole = _config(toy, tmp_path, "refine.eval_every=2", "refine.segment_epochs=0")  # memory only: not a new set
    assert refine_step(whole, tmp_path, caches) == path and path.stat().st_mtime_ns == stamp
    results = evaluation.evaluate(config, tmp_path, caches)
    assert set(results["methods"]) == {"repblend", "repblend_matched", "init", "random"}
    assert "refined through the evaluation protocol" in results["notes"]["repblend"]
    out = steps.export(config, tmp_path, caches)
    assert torch.equal(load_distilled(out / "synthetic.safetensors").images, refined["image_features"])


def _killed_in_the_third_iteration_then_rerun(config, tmp_path, caches, monkeypatch) -> dict[str, torch.Tensor]:
    """Refinement from scratch, killed in its third iteration (after the checkpoint of the second), then the same
    command again: the set it ends with."""
    from repblend.stages.refine import Refiner

    for path in (tmp_path / "refine").iterdir():
        path.unlink()
    original, calls = Refiner.step, []

    def dies_in_the_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Refiner, "step", dies_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        refine_step(config, tmp_path, caches)
    monkeypatch.setattr(Refiner, "step", original)
    assert torch.load(tmp_path / "refine" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    return load_file(str(refine_step(config, tmp_path, caches)))


def test_a_killed_refinement_resumes_to_the_same_set(toy, tmp_path, monkeypatch):
    config = _config(toy, tmp_path)
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    whole = load_file(str(refine_step(config, tmp_path, caches)))
    resumed = _killed_in_the_third_iteration_then_rerun(config, tmp_path, caches, monkeypatch)
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    lines = (tmp_path / "refine" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
    other = _config(toy, tmp_path, "refine.lr=0.02")  # another setting: refined again, not read back
    assert not torch.equal(load_file(str(refine_step(other, tmp_path, caches)))["texts"], whole["texts"])


def test_more_iterations_continue_a_finished_refinement(toy, tmp_path):
    config = _config(toy, tmp_path)
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    straight = load_file(str(refine_step(_config(toy, tmp_path, "refine.iterations=6"), tmp_path, caches)))
    for path in (tmp_path / "refine").iterdir():
        path.unlink()
    refine_step(config, tmp_path, caches)  # 4 iterations, then 2 more
    longer = load_file(str(refine_step(_config(toy, tmp_path, "refine.iterations=6"), tmp_path, caches)))
    for name, tensor in straight.items():
        torch.testing.assert_close(longer[name], tensor, rtol=0, atol=0, msg=name)
    lines = (tmp_path / "refine" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_cosine_refinement_with_dropout_steps_its_lr_down_and_resumes_to_the_same_set(toy, tmp_path, monkeypatch):
    from repblend.stages.refine import Refiner

    config = _config(toy, tmp_path, "refine.lr_schedule=cosine", "refine.dropout=true")
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    plain = load_file(str(refine_step(_config(toy, tmp_path), tmp_path, caches)))
    for path in (tmp_path / "refine").iterdir():
        path.unlink()
    lrs, set_lr = [], Refiner.set_lr
    monkeypatch.setattr(Refiner, "set_lr", lambda self, lr: (lrs.append(lr), set_lr(self, lr)))
    whole = load_file(str(refine_step(config, tmp_path, caches)))
    assert lrs == pytest.approx([0.01, 0.01 * (0.5 + 0.5 ** 1.5), 0.005, 0.01 * (0.5 - 0.5 ** 1.5)])
    assert not torch.equal(whole["texts"], plain["texts"])  # another set than the constant lr without dropout
    resumed = _killed_in_the_third_iteration_then_rerun(config, tmp_path, caches, monkeypatch)
    assert lrs[7:] == pytest.approx(lrs[2:4])  # 4 whole, 3 killed, then the lr and the masks where they were
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("overrides", "message"), [
    (["refine.enabled=true"], "needs distill.space=feature and distill.mode=repblend"),
    (["refine.iterations=0"], "refine.iterations=0 must be > 0"),
    (["refine.lr=-1"], "refine.lr=-1"),
    (["refine.segment_epochs=-2"], "refine.segment_epochs=-2"),
    (["refine.lr_schedule=linear"], "refine.lr_schedule"),
    (["distill.space=feature", "refine.enabled=true", "ebr.enabled=true"], "does not model EBR"),
])
def test_refine_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_refine_dropout_is_part_of_the_refined_sets_key_only_when_on():
    """Sets refined before `refine.dropout` existed keep their keys (nothing to redo); turning it on is another set."""
    from repblend.pipeline.refinement import result_settings

    off, on = load_config(None, []), load_config(None, ["refine.dropout=true"])
    assert "dropout" not in result_settings(off)
    assert result_settings(on) == result_settings(off) | {"dropout": True}


def test_refine_cosine_schedule_falls_to_zero_and_keys_the_length():
    """Cosine starts at refine.lr and falls towards 0 over refine.iterations; since the length shapes every step, it
    is part of the key then (a longer run starts over), and not under the constant lr (a longer run continues)."""
    from repblend.pipeline.refinement import lr_scale, result_settings

    assert [lr_scale("cosine", it, 4) for it in (1, 3)] == [1.0, pytest.approx(0.5)]
    assert 0 < lr_scale("cosine", 4, 4) < 0.15 and lr_scale("constant", 4, 4) == 1.0
    cosine = [load_config(None, ["refine.lr_schedule=cosine", f"refine.iterations={n}"]) for n in (50, 100)]
    assert result_settings(cosine[0]) != result_settings(cosine[1])
    assert result_settings(cosine[0])["lr_schedule"] == "cosine"
    constant = [load_config(None, [f"refine.iterations={n}"]) for n in (50, 100)]
    assert result_settings(constant[0]) == result_settings(constant[1])
    assert "lr_schedule" not in result_settings(constant[0])  # sets refined before the option keep their keys


def test_a_diverging_refinement_stops_with_one_line_and_keeps_its_last_checkpoint(toy, tmp_path):
    """R5 for refine: at an absurd Adam lr the set leaves every finite range within a few iterations; the run stops
    with a DivergenceError naming the setting to lower, and the checkpoint of iteration 2 is still there."""
    from repblend.stages.errors import DivergenceError

    config = _config(toy, tmp_path, "refine.lr=1e30", "refine.iterations=40", "refine.ckpt_every=1")
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    with pytest.raises(DivergenceError, match=r"^refine: a non-finite gradient; lower refine.lr$"):
        refine_step(config, tmp_path, caches)
    kept = torch.load(tmp_path / "refine" / "checkpoint.pt", weights_only=False)
    assert 1 <= kept["iteration"] < 40 and not steps.refined_path(tmp_path).is_file()
