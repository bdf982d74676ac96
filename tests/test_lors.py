"""LoRS mode: the image side of the student is the whole encoder (functional form, gradients, experts, pipeline)."""

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repblend.pipeline.cli import main
from repblend.pipeline.config import load_config
from repblend.stages.buffer import ExpertSettings, heads_at, train_expert
from repblend.stages.distill import (DistillSettings, SyntheticSet, match_tesla, match_unrolled, sample_batches,
                                     student_loss)
from repblend.stages.errors import ConfigError
from repblend.stages.heads import HeadSpec
from repblend.stages.lors import EncoderSpec, FineTunedEncoder, LorsModel, lors_specs
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

ROOT = Path(__file__).resolve().parents[1]
N, D_TXT, SIZE = 6, 5, 8


class TinyEncoder(torch.nn.Module):
    """Conv + BatchNorm (eval statistics, non-trivial) + pooling: the parts a real backbone has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 6)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _encoder(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyEncoder().to(dtype).eval()


def test_flat_encoder_equals_the_module_and_round_trips():
    encoder = _encoder()
    spec = EncoderSpec(encoder)
    assert spec.num_params == sum(p.numel() for p in encoder.parameters())
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    flat = spec.flatten(encoder)
    torch.testing.assert_close(spec.apply_flat(flat, x), encoder(x), rtol=1e-12, atol=1e-14)  # BatchNorm folded
    assert [(f.conv, f.norm) for f in spec.fold.folded[1]] == [("conv", "bn")]
    other = torch.randn_like(flat)
    copy_ = spec.load_flat(copy.deepcopy(encoder), other)
    torch.testing.assert_close(spec.flatten(copy_), other, rtol=0, atol=0)
    torch.testing.assert_close(spec.apply_flat(other, x), copy_(x), rtol=1e-12, atol=1e-14)
    unfolded = EncoderSpec(encoder, fold=False)
    torch.testing.assert_close(unfolded.apply_flat(other, x), copy_(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"1-D tensor of {spec.num_params} values"):
        spec.apply_flat(flat[:-1], x)


def test_the_encoder_speedups_keep_first_and_second_order_gradients():
    """Folded BatchNorms and the loop-free grouped double backward against plain functional_call, on a real
    architecture (timm's EfficientNet-Lite0: 49 BatchNorms, 16 depthwise convolutions) with trained-looking
    statistics, at parameters away from the module's (so that gamma and beta are the flat vector's, not its)."""
    timm = pytest.importorskip("timm")
    from test_bnfold import _randomise_norms

    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)).double()
    fast, plain = EncoderSpec(model), EncoderSpec(model, fold=False, loop_free_convs=False)
    g = torch.Generator().manual_seed(1)
    flat = plain.flatten(model) * (1 + 0.1 * torch.randn(plain.num_params, generator=g, dtype=torch.float64))
    u = torch.randn(plain.num_params, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)

    def derivatives(spec):
        theta, x = flat.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        y = spec.apply_flat(theta, x)
        (grad,) = torch.autograd.grad(y.square().sum(), theta, create_graph=True)
        return (y, grad, *torch.autograd.grad((grad * u).sum(), (theta, x)))

    got, want = derivatives(fast), derivatives(plain)
    assert len(fast.fold.folded[1]) == 49 and plain.fold.folded is None
    for name, a, b in zip(("features", "gradient", "hvp theta", "hvp pixels"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item(), msg=name)


def test_an_encoder_whose_fold_changes_its_function_runs_unfolded():
    from test_bnfold import _NormFirst, _randomise_norms

    torch.manual_seed(0)
    model = _randomise_norms(_NormFirst()).double()
    spec = EncoderSpec(model)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    torch.testing.assert_close(spec.apply_flat(spec.flatten(model), x), model(x), rtol=0, atol=0)
    assert spec.fold.built_for[:2] == (x.device, x.dtype) and spec.fold.folded is None


def test_fine_tuned_encoder_trains_through_the_fold_as_through_its_batchnorms():
    encoder = _encoder()
    tuned = FineTunedEncoder(encoder)
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    out = tuned(x)
    out.square().sum().backward()
    want = encoder(x)
    grads = torch.autograd.grad(want.square().sum(), list(encoder.parameters()))
    assert tuned.fold.folded is not None  # the folded copy ran...
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
    for (name, p), grad in zip(tuned.backbone.named_parameters(), grads):  # ...and BatchNorm's gamma, beta train
        torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-14, msg=name)
    assert tuned.state_dict().keys() == {f"backbone.{k}" for k in encoder.state_dict()}  # no copy registered


def test_the_fold_follows_batchnorm_statistics_changed_after_it_was_built():
    """The fold computes the statistics' constants once: a state dict loaded afterwards (statistics copied in
    place) must rebuild it, or the encoder would run the old statistics."""
    encoder = _encoder()
    tuned = FineTunedEncoder(encoder)
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    tuned(x)
    state = copy.deepcopy(tuned.state_dict())
    state["backbone.bn.running_mean"] += 0.3
    state["backbone.bn.running_var"] *= 2
    tuned.load_state_dict(state)
    torch.testing.assert_close(tuned(x), tuned.backbone(x), rtol=1e-12, atol=1e-14)
    assert tuned.fold.folded is not None


def test_a_fold_first_built_under_inference_mode_still_trains():
    """Evaluation may embed with a fine-tuned encoder before it trains: constants made under inference_mode
    could not be saved for backward."""
    tuned = FineTunedEncoder(_encoder())
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.inference_mode():
        before = tuned(x)
    out = tuned(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    assert all(p.grad is not None for p in tuned.parameters())


def test_an_encoder_made_under_inference_mode_runs_folded():
    """Inference tensors keep no version counter: the fold's rebuild check must not ask them for one."""
    with torch.inference_mode():
        tuned = FineTunedEncoder(_encoder())
        x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
        torch.testing.assert_close(tuned(x), tuned.backbone(x), rtol=1e-12, atol=1e-14)
    assert tuned.fold.folded is not None


def test_fine_tuned_encoder_keeps_batchnorm_statistics():
    encoder = _encoder(torch.float32)
    model = LorsModel(encoder, D_TXT, 6, dropout=0.0).train()
    before = model.image.backbone.bn.running_mean.clone()
    original = encoder.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    img, txt = model(torch.randn(4, 3, SIZE, SIZE), torch.randn(4, D_TXT))
    (img @ txt.T).sum().backward()
    optimizer.step()
    assert not model.image.training and torch.equal(model.image.backbone.bn.running_mean, before)
    assert not torch.equal(model.image.backbone.conv.weight, original)  # the copy trains...
    assert torch.equal(encoder.conv.weight, original)  # ...the frozen backbone it came from does not


def _lors_problem(syn_steps=3, blend=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    encoder = _encoder()
    specs = lors_specs(encoder, D_TXT, 6, dropout=0.0)
    pixels = torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    texts = torch.randn(N, D_TXT, generator=g, dtype=torch.float64)
    syn = SyntheticSet(pixels, texts, sim_rank=2, sim_alpha=1.0, lr_init=0.3, generator=g)
    with torch.no_grad():
        syn.sim.R.normal_(generator=g)
    start = (specs[0].flatten(encoder), specs[1].init_flat(g, dtype=torch.float64))
    target = tuple(s + 0.05 * torch.randn(s.shape, generator=g, dtype=torch.float64) for s in start)
    settings = DistillSettings(syn_steps=syn_steps, mini_batch_size=4, blend=blend)
    batches = sample_batches(N, settings, np.random.default_rng(seed))
    return syn, specs, start, target, batches, settings


def _grads(match, syn, specs, start, target, batches, settings):
    syn = copy.deepcopy(syn)
    result = match(syn.images, syn, specs, start, target, batches, settings)  # pixels are the student's input
    return result, {"pixels": syn.images.grad, "texts": syn.texts.grad, "R": syn.sim.R.grad,
                    "lr_img": syn.syn_lr_img.grad, "lr_txt": syn.syn_lr_txt.grad}


def test_lors_unrolled_gradient_matches_finite_differences():
    syn, specs, start, target, batches, settings = _lors_problem()
    _, grads = _grads(match_unrolled, syn, specs, start, target, batches, settings)
    eps, rng = 1e-6, np.random.default_rng(2)
    for name, grad in grads.items():
        for index in rng.choice(grad.numel(), size=min(3, grad.numel()), replace=False):
            losses = []
            for delta in (eps, -eps):
                moved = copy.deepcopy(syn)
                tensor = {"pixels": moved.images, "texts": moved.texts, "R": moved.sim.R,
                          "lr_img": moved.syn_lr_img, "lr_txt": moved.syn_lr_txt}[name]
                with torch.no_grad():
                    tensor.view(-1)[index] += delta
                losses.append(match_unrolled(moved.images, moved, specs, start, target, batches, settings).loss.item())
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert grad.reshape(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_lors_tesla_equals_unrolled_for_one_student_step():
    syn, specs, start, target, batches, settings = _lors_problem(syn_steps=1)
    exact_result, exact = _grads(match_unrolled, syn, specs, start, target, batches, settings)
    tesla_result, tesla = _grads(match_tesla, syn, specs, start, target, batches, settings)
    assert tesla_result.loss.item() == pytest.approx(exact_result.loss.item(), rel=1e-12)
    for name in ("pixels", "texts", "R", "lr_img", "lr_txt"):
        torch.testing.assert_close(tesla[name], exact[name], rtol=1e-9, atol=1e-12)


def test_encoder_student_blends_its_output_with_the_texts_draw():
    syn, specs, start, _, batches, settings = _lors_problem(syn_steps=1, blend=True)
    batch = batches[0]
    lam, perm = batch.lam, batch.perm
    x, v, targets = syn.images[batch.idx], syn.texts[batch.idx], syn.sim.block(batch.idx)
    loss = student_loss(*start, x, lam * v + (1 - lam) * v[perm], targets, *specs, settings, batch)
    features = specs[0].apply_flat(start[0], x)
    img = F.normalize(lam * features + (1 - lam) * features[perm], dim=-1)
    txt = F.normalize(specs[1].apply_flat(start[1], lam * v + (1 - lam) * v[perm], train=False), dim=-1)
    from repblend.stages.losses import wbce_loss

    assert loss.item() == pytest.approx(wbce_loss(img @ txt.T / settings.temperature, targets).item(), rel=1e-12)
    assert EncoderSpec.blend_output and not HeadSpec.blend_output


def test_encoder_expert_starts_at_the_pretrained_encoder_and_moves():
    encoder = _encoder(torch.float32)
    g = torch.Generator().manual_seed(0)
    pixels, texts = torch.randn(10, 3, SIZE, SIZE, generator=g), torch.randn(20, D_TXT, generator=g)
    c2i = torch.arange(20) // 2
    settings = ExpertSettings(embed_dim=99, dropout=0.0, epochs=2, batch_size=8)  # embed_dim unused: text -> 6
    traj = train_expert(pixels, texts, c2i, settings, seed=3, encoder=encoder, feature_dim=6)
    again = train_expert(pixels, texts, c2i, settings, seed=3, encoder=encoder, feature_dim=6)
    spec = EncoderSpec(encoder)
    torch.testing.assert_close(traj.image[0], spec.flatten(encoder), rtol=0, atol=0)
    assert not torch.allclose(traj.image[2], traj.image[0]) and traj.text[0].numel() == HeadSpec(D_TXT, 6).num_params
    assert all(torch.equal(traj.image[e], again.image[e]) for e in traj.image)  # seeded
    model = heads_at(traj, 2, settings, 6, D_TXT, encoder=encoder)
    img, _ = model(pixels, texts[:10])
    torch.testing.assert_close(img, F.normalize(spec.apply_flat(traj.image[2], pixels), dim=-1))


def test_lors_needs_pixel_space():
    with pytest.raises(ConfigError, match="distill.mode=lors .* needs distill.space=pixel"):
        load_config(None, ["distill.mode=lors", "distill.space=feature"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


def test_run_tables_the_lors_baseline_beside_repblend(toy, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    overrides = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY_ENCODERS, *TINY_PROBLEM, *STABLE_LRS,
                 "distill.space=pixel", "distill.iterations=3", "eval.num_eval=1", "eval.epochs=3",
                 "eval.methods=[lors,random]", "ray.enabled=false"]
    with caplog.at_level(logging.INFO, logger="repblend"):
        assert main(["run", "--config", str(ROOT / "configs/flickr8k_100.yaml"), "--run-dir", str(run_dir),
                     *overrides, "eval.full_epochs=1", "run.progress=true", "run.progress_every=0"]) == 0
    # an encoder expert (minutes an epoch on a CPU) shows its steps; the head experts (seconds) only their recall
    trained = [r.getMessage() for r in caplog.records if "training: " in r.getMessage()]
    assert trained and all(line.startswith("buffer: LoRS expert ") for line in trained), trained
    assert any(" step (100%), " in line and "; epoch=" in line for line in trained), trained
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["methods"]) == {"repblend", "init", "lors", "random"}
    assert "asymmetric" in results["notes"]["lors"] and "lors" in results["diagnostics"]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert {"buffer", "distill", "lors_buffer", "lors_distill", "eval"} <= set(stages)
    lors_index = json.loads((run_dir / "lors" / "buffer" / "index.json").read_text())
    assert lors_index["identity"]["mode"] == "lors" and "mode" not in json.loads(
        (run_dir / "buffer" / "index.json").read_text())["identity"]
    encoder_params = sum(p.numel() for p in _tiny_backbone().parameters())
    from safetensors import safe_open

    with safe_open(str(run_dir / "lors" / "buffer" / "expert_000.safetensors"), "pt") as f:
        assert f.get_slice("image.0").get_shape() == [encoder_params]  # the whole encoder, not a head
    assert "| lors |" in capsys.readouterr().out
    _check_lors_initial_pairs_train_with_wbce(run_dir, overrides)


def _check_lors_initial_pairs_train_with_wbce(run_dir: Path, overrides: list[str]) -> None:
    """eval.real_loss=auto: where the evaluation fine-tunes the encoder, real pairs train with wBCE (CLIP at the
    coreset lr collapsed the image tower on Flickr8k); recomputed here with the stage functions."""
    from safetensors.torch import load_file

    from repblend.pipeline import evaluation, steps
    from repblend.stages.evaluate import PairSet, evaluate_pairs

    lors = steps.lors_baseline(load_config(ROOT / "configs/flickr8k_100.yaml", overrides))
    caches = steps.encode(lors)
    results = evaluation.evaluate(lors, run_dir / "lors", caches)
    assert results["protocol"]["init_loss"] == "wbce" and results["protocol"]["real_loss"] == "clip"
    table = (run_dir / "lors" / "results.md").read_text()
    assert "its initial pairs with wbce, coresets (fresh heads) with clip" in table
    measure = evaluation.protocol(lors, caches, lors.data.eval_split, torch.device("cpu"))
    syn = load_file(str(run_dir / "lors" / "distill" / "synthetic.safetensors"))
    lr0 = lors.distill.lr_teacher
    init = PairSet(measure.train_images(syn["init_image_index"]),
                   caches["train"].load().text_features[syn["init_caption_index"]], None, lr0, lr0)
    expected = evaluate_pairs(init, evaluation.train_settings(lors, loss="wbce"), measure.eval_features,
                              evaluation.eval_seeds(lors), torch.device("cpu"), model=measure.model)
    assert results["methods"]["init"]["r_mean"]["mean"] == pytest.approx(expected["r_mean"]["mean"])


def _tiny_backbone():
    from repblend.stages.encoders import build_image_encoder

    return build_image_encoder("tiny", weights="random", image_size=32).backbone


def test_feature_space_run_notes_why_lors_is_skipped(toy, tmp_path):
    from repblend.pipeline import evaluation, steps

    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY_ENCODERS,
                                *TINY_PROBLEM, "distill.space=feature", "eval.num_eval=1", "eval.epochs=2",
                                "eval.methods=[lors,random]"])
    assert steps.lors_baseline(config) is None
    results = evaluation.evaluate(config, tmp_path, steps.encode(config))
    assert "lors" not in results["methods"] and "distill.space=feature" in results["notes"]["lors"]
