"""Feature cache: shapes, skip on rerun, refusal of a foreign cache, bad images, nothing half-written."""

import os

import pytest
import torch

from repblend.pipeline import steps
from repblend.pipeline.config import load_config
from repblend.stages.errors import CacheError, DataError
from repblend.stages.toydata import make_toy_dataset
from tiny import TINY_ENCODERS

TINY = TINY_ENCODERS


@pytest.fixture()
def toy(tmp_path):
    return make_toy_dataset(tmp_path / "toy", n_train=12, n_dev=6, size=40)


def _config(toy, tmp_path, *extra):
    return load_config(None, [f"data.root={toy}", "data.name=toy", f"cache.dir={tmp_path / 'cache'}", *TINY, *extra])


def test_encode_writes_the_right_shapes_and_manifest(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    caches = steps.encode(_config(toy, tmp_path))
    train = caches["train"].load()
    assert train.image_features.shape == (12, 32)
    assert train.text_features.shape == (60, 32)
    assert train.caption_to_image.tolist() == [i for i in range(12) for _ in range(5)]
    manifest = caches["train"].manifest()
    assert manifest["image_encoder"]["name"] == "tiny" and manifest["image_encoder"]["feature_dim"] == 32
    assert manifest["dtype"] == "float16"
    assert len(manifest["captions"]) == 60 and manifest["image_ids"][0] == "toy_00000.jpg"
    assert caches["dev"].load().image_features.shape == (6, 32)


def test_features_equal_a_direct_encoder_call(toy, tmp_path):
    config = _config(toy, tmp_path, "cache.dtype=float32")
    cache = steps.encode(config)["dev"].load()
    image_encoder, text_encoder = steps.build_encoders(config, torch.device("cpu"))
    from repblend.stages.ingest import load_image

    pixels = image_encoder.preprocess.transform()(load_image(str(toy / "images" / cache.image_ids[0])))
    with torch.inference_mode():
        direct = image_encoder(pixels[None])[0]
        text = text_encoder([cache.captions[3]])[0]
    torch.testing.assert_close(cache.image_features[0], direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.text_features[3], text, rtol=1e-4, atol=1e-5)


def test_second_run_is_skipped(toy, tmp_path):
    config = _config(toy, tmp_path)
    cache = steps.encode(config)["train"]
    stamp = os.stat(cache.tensors_path).st_mtime_ns
    steps.encode(config)
    assert os.stat(cache.tensors_path).st_mtime_ns == stamp


def test_cache_from_another_encoder_is_refused(toy, tmp_path):
    steps.encode(_config(toy, tmp_path))
    other = _config(toy, tmp_path, "encoders.text.pooling=cls")
    with pytest.raises(CacheError, match=r"train.json: cache was built with another text encoder: pooling='mean'"):
        steps.encode(other)
    rebuilt = steps.encode(_config(toy, tmp_path, "encoders.text.pooling=cls", "cache.overwrite=true"))
    assert rebuilt["train"].manifest()["text_encoder"]["pooling"] == "cls"


def test_changed_inputs_are_refused(toy, tmp_path):
    steps.encode(_config(toy, tmp_path))
    token_file = toy / "Flickr8k.token.txt"
    token_file.write_text(token_file.read_text().replace("a red", "a crimson", 1))
    with pytest.raises(CacheError, match="built from different inputs"):
        steps.encode(_config(toy, tmp_path))


def test_default_cache_is_content_addressed(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [f"data.root={toy}", "data.name=toy", *TINY])
    first = steps.encode(config)["train"]
    other = steps.encode(load_config(None, [f"data.root={toy}", "data.name=toy", *TINY, "encoders.text.pooling=cls"]))
    assert first.tensors_path.parent.resolve() == other["train"].tensors_path.parent.resolve()
    assert first.tensors_path.parent.resolve() == (tmp_path / "runs/cache/toy").resolve()
    assert first.tensors_path != other["train"].tensors_path  # both live side by side, neither refused


def _corrupt(toy):
    bad = toy / "images" / "toy_00003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    return bad


def test_corrupt_jpeg_stops_with_its_name_and_leaves_no_cache(toy, tmp_path):
    _corrupt(toy)
    with pytest.raises(DataError, match=r"toy_00003.jpg") as info:
        steps.encode(_config(toy, tmp_path))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("train.*"))


def test_corrupt_jpeg_skipped_when_asked(toy, tmp_path):
    _corrupt(toy)
    with pytest.warns(UserWarning, match="toy_00003.jpg"):
        caches = steps.encode(_config(toy, tmp_path, "data.on_error=skip"))
    train = caches["train"].load()
    assert train.image_features.shape[0] == 11 and train.text_features.shape[0] == 55
    assert "toy_00003.jpg" not in train.image_ids
    assert caches["train"].manifest()["skipped_images"] == 1


def test_file_digest_is_the_content_hash_and_follows_rewrites(tmp_path):
    """Kept per process, but never stale: a file replaced by a rename, or appended to, is hashed again."""
    import hashlib

    from repblend.stages.io import file_digest, write_tensors

    path = tmp_path / "set.safetensors"
    write_tensors(path, {"a": torch.arange(10.0)})
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest() == file_digest(str(path))
    write_tensors(path, {"a": torch.arange(10.0) + 1})  # same size, new file renamed into place
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with path.open("ab") as f:
        f.write(b"x")
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_encode_continues_from_its_kept_parts_to_the_same_cache(toy, tmp_path, monkeypatch):
    """Images are encoded in parts of whole batches, each kept as it finishes; killed in its second part, an encode
    rerun decodes only the images after the first part and writes the cache a straight run writes, bit for bit. The
    parts go once the cache is whole; parts from another device, batch size or encoder are encoded again, and go
    too when that cache file is written."""
    from safetensors.torch import load_file

    from repblend.stages import encode as encode_module

    extra = ("cache.dtype=float32", "encoders.image_batch_size=2")
    straight = steps.encode(load_config(None, [f"data.root={toy}", "data.name=toy", f"cache.dir={tmp_path / 'a'}",
                                               *TINY, *extra]))  # one part per split
    monkeypatch.setattr(encode_module, "CHUNK_IMAGES", 3)  # parts of 4 images: two batches of 2
    config = _config(toy, tmp_path, *extra)
    real, encoded = encode_module._encode_part, []

    def part(encoder, paths, *args):
        encoded.append(len(paths))
        if len(encoded) == 2 and kill:
            raise KeyboardInterrupt
        return real(encoder, paths, *args)

    monkeypatch.setattr(encode_module, "_encode_part", part)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        steps.encode(config)
    kept = list((tmp_path / "cache").glob("*.parts-*/images-*.safetensors"))
    assert [p.name for p in kept] == ["images-000000000.safetensors"]
    kill, encoded[:] = False, []
    caches = steps.encode(config)
    assert sum(encoded) == 12 + 6 - 4  # every image but the kept part's four
    for split in ("train", "dev"):
        ours, theirs = load_file(str(caches[split].tensors_path)), load_file(str(straight[split].tensors_path))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not list((tmp_path / "cache").glob("*.parts-*"))

    # killed with batches of 2, rerun with batches of 4, or with another encoder into the same cache.dir: nothing is
    # read back
    for changed in (["encoders.image_batch_size=4"], ["encoders.image.image_size=48", "cache.overwrite=true"]):
        other = tmp_path / changed[0]
        kill, encoded[:] = True, []
        with pytest.raises(KeyboardInterrupt):
            steps.encode(_config(toy, other, *extra))
        kill, encoded[:] = False, []
        steps.encode(_config(toy, other, *extra, *changed))
        assert sum(encoded) == 12 + 6, changed
        assert not list((other / "cache").glob("*.parts-*")), changed  # nor kept: that cache file is written anew


def test_a_killed_caption_encode_continues_from_its_kept_parts_to_the_same_cache(toy, tmp_path, monkeypatch):
    """Captions are encoded in parts of whole length-sorted batches, each kept as it finishes: killed in the third
    part, a rerun encodes only the captions after the first two parts (and no image again) and writes the cache a
    straight run writes, bit for bit; parts from another batch size are encoded again."""
    from safetensors.torch import load_file

    from repblend.stages import encode as encode_module
    from repblend.stages import encoders as encoders_module

    extra = ("cache.dtype=float32", "encoders.text_batch_size=4")
    straight = steps.encode(load_config(None, [f"data.root={toy}", "data.name=toy", f"cache.dir={tmp_path / 'a'}",
                                               *TINY, *extra]))  # one part per split
    monkeypatch.setattr(encoders_module, "CHUNK_CAPTIONS", 5)  # parts of 8 captions: two batches of 4
    real, batches = encoders_module.TextEncoder.forward, []

    def forward(self, captions):
        batches.append(len(captions))
        if len(batches) == 5 and kill:
            raise KeyboardInterrupt
        return real(self, captions)

    monkeypatch.setattr(encoders_module.TextEncoder, "forward", forward)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        steps.encode(_config(toy, tmp_path, *extra))
    kept = sorted(p.name for p in (tmp_path / "cache").glob("*.parts-*/captions-*.safetensors"))
    assert kept == ["captions-000000000.safetensors", "captions-000000008.safetensors"]
    kill, batches[:] = False, []
    real_part, encoded_images = encode_module._encode_part, []
    monkeypatch.setattr(encode_module, "_encode_part",
                        lambda *args: encoded_images.append(len(args[1])) or real_part(*args))
    caches = steps.encode(_config(toy, tmp_path, *extra))
    assert sum(batches) == 60 + 30 - 16 and encoded_images == [6]  # the train images came back from their part
    for split in ("train", "dev"):
        ours, theirs = load_file(str(caches[split].tensors_path)), load_file(str(straight[split].tensors_path))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not list((tmp_path / "cache").glob("*.parts-*"))

    kill, batches[:] = True, []  # killed with batches of 4, rerun with batches of 8: no caption part is read back
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        steps.encode(_config(toy, other, *extra))
    kill, batches[:] = False, []
    steps.encode(_config(toy, other, *extra[:1], "encoders.text_batch_size=8"))
    assert sum(batches) == 60 + 30
