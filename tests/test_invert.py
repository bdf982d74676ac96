"""Feature-to-pixel inversion: the stage on a tiny encoder, and the invert step of the pipeline."""

import json

import pytest
import torch
from safetensors.torch import load_file

from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import load_config
from repblend.pipeline.inversion import invert as invert_step
from repblend.pipeline.refinement import refine as refine_step
from repblend.pipeline.report import write_report
from repblend.stages.encoders import ImagePreprocess, build_image_encoder
from repblend.stages.errors import ConfigError
from repblend.stages.export import load_distilled
from repblend.stages.invert import InvertSettings, invert, pixel_bounds, relative_error
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_image_encoder("tiny", "random", 16)


def test_pixel_bounds_are_the_normalised_images_of_black_and_white():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    low, high = pixel_bounds(ImagePreprocess(224, mean, std), torch.zeros(1))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert low.shape == (1, 3, 1, 1)
    assert torch.allclose(low * s + m, torch.zeros(1, 3, 1, 1), atol=1e-6)
    assert torch.allclose(high * s + m, torch.ones(1, 3, 1, 1), atol=1e-6)


def test_inversion_reaches_encodable_targets_and_keeps_pixels_valid(encoder):
    generator = torch.Generator().manual_seed(1)
    goal = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1  # images in the tiny encoder's [-1, 1] space
    start = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        target, before = encoder(goal), encoder(start)
    result = invert(encoder, target, start, InvertSettings(steps=150, lr=0.02, batch_size=4))
    assert relative_error(before, target).mean() > 0.3
    assert result.relative_error.max() < 0.1 * relative_error(before, target).min()
    assert result.pixels.min() >= -1 and result.pixels.max() <= 1  # HALF normalisation: [0, 1] -> [-1, 1]
    with torch.no_grad():
        assert torch.allclose(result.features, encoder(result.pixels))
    assert torch.allclose(result.cosine, torch.nn.functional.cosine_similarity(result.features, target))


def test_finished_batches_are_not_redone_and_the_result_is_the_same(encoder):
    generator = torch.Generator().manual_seed(2)
    start = torch.rand(5, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        target = encoder(torch.rand(5, 3, 16, 16, generator=generator) * 2 - 1)
    settings = InvertSettings(steps=20, lr=0.02, batch_size=2)
    kept = {}
    whole = invert(encoder, target, start, settings, on_batch=lambda i, p: kept.__setitem__(i, p))
    assert sorted(kept) == [0, 2, 4]
    redone = []
    resumed = invert(encoder, target, start, settings, done={0: kept[0], 2: kept[2]},
                     on_batch=lambda i, p: redone.append(i))
    assert redone == [4]
    assert torch.equal(resumed.pixels, whole.pixels)
    with pytest.raises(ValueError, match="5 target features but 4 initial images"):
        invert(encoder, target, start[:4], settings)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


def test_run_inverts_the_feature_set_and_evaluates_it_as_pixels(toy, tmp_path, caplog):
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature",
                                *TINY_ENCODERS, *TINY_PROBLEM, *STABLE_LRS, "distill.iterations=3",
                                "distill.clamp_features=true", "eval.num_eval=1", "eval.epochs=3",
                                "eval.methods=[random]", "invert.enabled=true", "invert.steps=30",
                                "invert.batch_size=3"])
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    train_features = caches["train"].load().image_features
    features = load_file(str(steps.synthetic_path(tmp_path)))["image_features"]
    assert features.min() >= train_features.min() and features.max() <= train_features.max()  # clamp_features
    path = invert_step(config, tmp_path, caches)
    inverted = load_distilled(path)
    assert inverted.pixel_space and tuple(inverted.images.shape) == (8, 3, 32, 32)
    assert inverted.metadata["inverted_from"] == str(steps.synthetic_path(tmp_path))
    summary = json.loads((path.parent / "summary.json").read_text())
    assert 0 <= summary["relative_error_mean"] < 1 and summary["cosine_mean"] > 0.5
    encoder = steps.build_image_encoder(config, torch.device("cpu"))
    with torch.no_grad():  # the stored features are the encoder's features of the stored pixels
        assert torch.allclose(encoder(inverted.images), inverted.image_features, atol=1e-5)
    assert len(list((path.parent / "parts").glob("batch-*.safetensors"))) == 3
    stamp = path.stat().st_mtime_ns
    assert invert_step(config, tmp_path, caches) == path and path.stat().st_mtime_ns == stamp  # up to date
    results = evaluation.evaluate(config, tmp_path, caches)
    assert set(results["methods"]) == {"repblend", "init", "repblend_pixels", "random"}
    assert "relative error" in results["notes"]["repblend_pixels"]
    assert "| repblend_pixels | " in (tmp_path / "results.md").read_text()
    out = steps.export(config, tmp_path, caches)
    assert torch.equal(load_distilled(out / "pixels" / "synthetic.safetensors").images, inverted.images)
    assert len(list((out / "pixels" / "shards").glob("*.tar"))) == 1
    report = write_report(tmp_path, None, encoder.preprocess.denormalize).read_text()
    assert "inverted to images" in report and (tmp_path / "report" / "images.png").is_file()


def test_a_killed_inversion_continues_from_its_finished_batches(toy, tmp_path):
    overrides = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature", *TINY_ENCODERS,
                 *TINY_PROBLEM, *STABLE_LRS, "distill.iterations=2", "invert.enabled=true", "invert.steps=10",
                 "invert.batch_size=3"]
    config = load_config(None, overrides)
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    whole = load_file(str(invert_step(config, tmp_path, caches)))["images"]
    parts = steps.inverted_path(tmp_path).parent / "parts"
    steps.inverted_path(tmp_path).unlink()
    (parts / "batch-00003.safetensors").unlink()  # killed while inverting the second batch
    first = (parts / "batch-00000.safetensors").stat().st_mtime_ns
    assert torch.equal(load_file(str(invert_step(config, tmp_path, caches)))["images"], whole)
    assert (parts / "batch-00000.safetensors").stat().st_mtime_ns == first
    other = load_config(None, [*overrides, "invert.steps=11", "invert.batch_size=4"])  # every batch again
    invert_step(other, tmp_path, caches)
    assert sorted(p.name for p in parts.iterdir()) == ["batch-00000.safetensors", "batch-00004.safetensors"]
    assert (parts / "batch-00000.safetensors").stat().st_mtime_ns != first


def _refined(toy, run_dir, *extra: str):
    """A tiny feature set, matched and refined in `run_dir`, ready to invert: (its overrides, config, caches)."""
    overrides = [f"data.root={toy}", f"cache.dir={run_dir / 'cache'}", "distill.space=feature", *TINY_ENCODERS,
                 *TINY_PROBLEM, *STABLE_LRS, "distill.iterations=2", "eval.num_eval=1", "eval.epochs=4",
                 "eval.methods=[]", "refine.enabled=true", "refine.iterations=2", "refine.real_batch=16",
                 "refine.lr=0.01", "invert.enabled=true", "invert.steps=10", "invert.batch_size=3", *extra]
    config = load_config(None, overrides)
    caches = steps.encode(config)
    steps.buffer(config, run_dir, caches)
    steps.distill(config, run_dir, caches)
    refine_step(config, run_dir, caches)
    return overrides, config, caches


def test_adapting_keeps_the_pixels_and_refines_texts_s_and_lrs_to_their_encodings(toy, tmp_path):
    overrides, config, caches = _refined(toy, tmp_path)
    plain = load_file(str(invert_step(config, tmp_path, caches)))
    parts = sorted((steps.inverted_path(tmp_path).parent / "parts").iterdir())
    stamps = [part.stat().st_mtime_ns for part in parts]
    adapting = load_config(None, [*overrides, "invert.adapt_iterations=3"])
    path = invert_step(adapting, tmp_path, caches)
    adapted = load_file(str(path))
    assert [part.stat().st_mtime_ns for part in parts] == stamps  # the pixels were not inverted again
    for name in ("images", "image_features", "target_features", "init_image_index"):
        assert torch.equal(adapted[name], plain[name]), name
    for name in ("texts", "similarity", "syn_lr_img"):
        assert not torch.equal(adapted[name], plain[name]), name
    assert json.loads((path.parent / "summary.json").read_text())["adapt_iterations"] == 3
    stamp = path.stat().st_mtime_ns
    assert invert_step(adapting, tmp_path, caches) == path and path.stat().st_mtime_ns == stamp  # up to date
    assert invert_step(config, tmp_path, caches) == path and path.stat().st_mtime_ns != stamp  # back to plain
    results = evaluation.evaluate(adapting, tmp_path, caches)
    assert "adapted to those encodings" not in results["notes"]["repblend_pixels"]  # the plain set is there now
    invert_step(adapting, tmp_path, caches)
    results = evaluation.evaluate(adapting, tmp_path, caches)
    assert "adapted to those encodings (3 refine iterations)" in results["notes"]["repblend_pixels"]


def test_a_killed_or_longer_adaptation_continues_from_its_checkpoint(toy, tmp_path, caplog):
    overrides, _, caches = _refined(toy, tmp_path, "refine.ckpt_every=2")
    four = load_config(None, [*overrides, "invert.adapt_iterations=4"])
    whole = load_file(str(invert_step(four, tmp_path, caches)))
    checkpoint = steps.inverted_path(tmp_path).parent / "adapt_checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["iteration"] == 4
    checkpoint.unlink()
    invert_step(load_config(None, [*overrides, "invert.adapt_iterations=2"]), tmp_path, caches)  # killed after 2
    assert torch.load(checkpoint, weights_only=False)["iteration"] == 2
    with caplog.at_level("INFO", logger="repblend"):
        resumed = load_file(str(invert_step(four, tmp_path, caches)))
    assert "adaptation resumes at iteration 2 of 4" in caplog.text
    for name in ("texts", "similarity", "syn_lr_img", "syn_lr_txt", "images"):
        assert torch.equal(resumed[name], whole[name]), name
    other = load_config(None, [*overrides, "invert.adapt_iterations=4", "refine.lr=0.02"])  # another adaptation
    caplog.clear()
    with caplog.at_level("INFO", logger="repblend"):
        invert_step(other, tmp_path, caches)
    assert "adaptation resumes" not in caplog.text


@pytest.mark.parametrize(("overrides", "message"), [
    (["invert.enabled=true"], "needs distill.space=feature and distill.mode=repblend"),
    (["distill.clamp_features=true"], "needs distill.space=feature"),
    (["invert.steps=0"], "invert.steps=0 must be > 0"),
    (["distill.space=feature", "invert.enabled=true", "invert.adapt_iterations=5"], "needs invert.enabled=true and "
     "refine.enabled=true"),
])
def test_invert_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
