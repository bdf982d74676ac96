"""Export: the distilled set round-trips through load_distilled and through WebDataset shards any reader opens."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from repblend.pipeline import steps
from repblend.pipeline.config import load_config
from repblend.stages.errors import DataError
from repblend import load_distilled  # the public entry point (repblend/__init__.py)
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

TINY = [*TINY_ENCODERS, *TINY_PROBLEM, "distill.iterations=3", *STABLE_LRS, "distill.lr_teacher=0.01",
        "export.shard_size=3", "export.nearest_captions=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


@pytest.mark.parametrize("space", ["pixel", "feature"])
def test_export_round_trips(toy, tmp_path, space):
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", f"distill.space={space}", *TINY])
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    out = steps.export(config, tmp_path, caches)

    saved = load_file(str(tmp_path / "distill" / "synthetic.safetensors"))
    distilled = load_distilled(out / "synthetic.safetensors")
    assert torch.equal(distilled.images, saved["images"]) and torch.equal(distilled.texts, saved["texts"])
    assert torch.equal(distilled.similarity, saved["similarity"])
    assert "distill:" in distilled.metadata["config"] and distilled.metadata["space"] == space

    train = caches["train"].load()
    denormalize = steps.build_image_encoder(config, torch.device("cpu")).preprocess.denormalize
    shards = sorted((out / "shards").glob("*.tar"))
    assert [p.name for p in shards] == ["distilled-000000.tar", "distilled-000001.tar", "distilled-000002.tar"]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(8)]
    for i, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        np.testing.assert_array_equal(np.load(io.BytesIO(sample["text.npy"])), saved["texts"][i].numpy())
        assert meta["soft_labels"] == pytest.approx(saved["similarity"][i].tolist())
        # the listed captions are the nearest real ones by cosine (brute force)
        cos = F.normalize(train.text_features, dim=-1) @ F.normalize(saved["texts"][i], dim=0)
        best = cos.argsort(descending=True)[:2].tolist()
        assert cos[meta["nearest_caption_ids"]].tolist() == pytest.approx(cos[best].tolist())
        assert meta["nearest_captions"] == [train.captions[j] for j in meta["nearest_caption_ids"]]
        assert meta["init_image_id"] == train.image_ids[saved["init_image_index"][i]]
        if space == "pixel":
            png = np.asarray(Image.open(io.BytesIO(sample["png"])))
            expected = denormalize(saved["images"][i]).clamp(0, 1).permute(1, 2, 0).numpy() * 255
            assert png.shape == (32, 32, 3) and np.abs(png - expected).max() <= 0.5 + 1e-3
            np.testing.assert_array_equal(np.load(io.BytesIO(sample["pixels.npy"])), saved["images"][i].numpy())
        else:
            assert "png" not in sample
            np.testing.assert_array_equal(np.load(io.BytesIO(sample["image.npy"])), saved["images"][i].numpy())


def test_loading_something_else_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.safetensors: no distilled set here"):
        load_distilled(tmp_path / "nowhere.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match=r"other.safetensors: not a repblend distilled set \(missing images"):
        load_distilled(tmp_path / "other.safetensors")
    (tmp_path / "notes.txt").write_text("not tensors at all")
    with pytest.raises(DataError, match=r"notes.txt: not a safetensors file \("):
        load_distilled(tmp_path / "notes.txt")
