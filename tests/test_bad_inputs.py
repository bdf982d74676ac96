"""R2 of TARGETS.md through the command line: every bad input gets one line naming the culprit, a non-zero
exit code, no traceback (without --debug), and leaves nothing behind that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from repblend.pipeline.cli import main
from repblend.stages.toydata import make_toy_dataset
from tiny import TINY_ENCODERS, TINY_PROBLEM


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    return make_toy_dataset(tmp_path / "toy", n_train=12, n_dev=4, size=32)


def _run(command: str, toy: Path, tmp_path: Path, *extra: str) -> list[str]:
    config = tmp_path / "bad_inputs.yaml"
    config.write_text("data: {format: flickr8k}\n")
    return [command, "--config", str(config), "--run-dir", str(tmp_path / "run"), f"data.root={toy}", "data.name=toy",
            f"cache.dir={tmp_path / 'cache'}", "ray.enabled=false", *TINY_ENCODERS, *TINY_PROBLEM, *extra]


def _fails(argv: list[str], capsys, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith(f"repblend {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _stages_done(tmp_path: Path) -> set[str]:
    path = tmp_path / "run" / "stages.json"
    return set(json.loads(path.read_text())) if path.is_file() else set()


def _assert_no_cache(tmp_path: Path) -> None:
    assert not list((tmp_path / "cache").glob("*.safetensors")) if (tmp_path / "cache").exists() else True
    assert "encode" not in _stages_done(tmp_path)


def test_missing_image(toy, tmp_path, capsys):
    (toy / "images" / "toy_00003.jpg").unlink()
    _fails(_run("encode", toy, tmp_path), capsys, "toy_00003.jpg")
    _assert_no_cache(tmp_path)


def test_corrupt_jpeg(toy, tmp_path, capsys):
    (toy / "images" / "toy_00005.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _fails(_run("encode", toy, tmp_path), capsys, "toy_00005.jpg")
    _assert_no_cache(tmp_path)


def test_caption_file_with_a_bad_line(toy, tmp_path, capsys):
    token = toy / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines.insert(6, "toy_00001.jpg a caption with no tab and no index")
    token.write_text("\n".join(lines) + "\n")
    _fails(_run("encode", toy, tmp_path), capsys, "Flickr8k.token.txt:7")
    _assert_no_cache(tmp_path)


def test_image_with_no_captions(toy, tmp_path, capsys):
    token = toy / "Flickr8k.token.txt"
    token.write_text("".join(line + "\n" for line in token.read_text().splitlines()
                             if not line.startswith("toy_00002.jpg#")))
    _fails(_run("encode", toy, tmp_path), capsys, "toy_00002.jpg")
    _assert_no_cache(tmp_path)


def test_unknown_config_key(toy, tmp_path, capsys):
    _fails(_run("run", toy, tmp_path, "distill.iteratons=5"), capsys, "distill.iteratons", "distill.iterations")
    assert not (tmp_path / "run").exists()


def test_wrong_value_type(toy, tmp_path, capsys):
    _fails(_run("run", toy, tmp_path, "distill.iterations=many"), capsys, "distill.iterations", "many")
    assert not (tmp_path / "run").exists()


def test_encoder_cache_dimension_mismatch(toy, tmp_path, capsys):
    assert main(_run("encode", toy, tmp_path)) == 0
    tensors = tmp_path / "cache" / "train.safetensors"
    content = load_file(tensors)
    content["image_features"] = content["image_features"][:, :-1].contiguous()  # a foreign file, same manifest
    save_file(content, tensors)
    _fails(_run("distill", toy, tmp_path), capsys, "train.safetensors", "image features")
    assert _stages_done(tmp_path) == {"encode"}
    assert not (tmp_path / "run" / "distill" / "synthetic.safetensors").exists()


def test_missing_weights_file(toy, tmp_path, capsys):
    weights = tmp_path / "nowhere" / "effnet.pth"
    argv = _run("encode", toy, tmp_path, "encoders.image.name=efficientnet_lite0", f"encoders.image.weights={weights}")
    _fails(argv, capsys, str(weights))
    _assert_no_cache(tmp_path)


def test_budget_larger_than_the_dataset(toy, tmp_path, capsys):
    _fails(_run("run", toy, tmp_path, "distill.num_queries=40"), capsys, "distill.num_queries=40", "12 training")
    assert _stages_done(tmp_path) == {"encode"}  # the cache is complete and valid; nothing was trained
    assert not (tmp_path / "run" / "buffer").exists()


def test_empty_split(toy, tmp_path, capsys):
    (toy / "Flickr_8k.devImages.txt").write_text("")
    _fails(_run("encode", toy, tmp_path), capsys, "Flickr_8k.devImages.txt")
    _assert_no_cache(tmp_path)
