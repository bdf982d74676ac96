"""Frozen-encoder registry: offline package weights, real-image sanity, error messages, tiny encoders.

Nothing here touches a model hub: HF_HUB_OFFLINE is set for the whole module and every load is local.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repblend.stages.encoders import (
    ImageEncoder,
    ImagePreprocess,
    TextEncoder,
    build_image_encoder,
    build_text_encoder,
    efficientnet_lite0_package_file,
    encode_texts,
    image_encoder_names,
    map_lukemelas_state_dict,
    minilm_package_dir,
    text_encoder_names,
)
from repblend.stages.errors import EncoderError

DOG_CLASSES = range(151, 269)  # ImageNet-1k indices 151..268 are dog breeds


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def effnet() -> ImageEncoder:
    return build_image_encoder("efficientnet_lite0", weights="package")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder("all-MiniLM-L6-v2", weights="package", pooling="mean")


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------------------ efficientnet_lite0 (package)

def test_effnet_package_weights_load_strictly(effnet):
    report = effnet.load_report
    assert report["tensors"] == 296
    assert report["missing"] == [] and report["unexpected"] == []
    assert Path(report["file"]) == efficientnet_lite0_package_file()
    assert effnet.feature_dim == 1280 and _frozen(effnet)
    with torch.inference_mode():
        feats = effnet(torch.randn(2, 3, 224, 224))
        logits = effnet.classify(torch.randn(2, 3, 224, 224))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()
    assert logits.shape == (2, 1000)
    assert effnet.preprocess == ImagePreprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)


def test_lukemelas_mapping_refuses_mismatches():
    source = torch.load(efficientnet_lite0_package_file(), map_location="cpu", weights_only=True)
    target = OrderedDict((f"t{i}", v) for i, v in enumerate(source.values()))
    assert list(map_lukemelas_state_dict(source, target)) == list(target)
    short = OrderedDict(list(source.items())[:-1])
    with pytest.raises(EncoderError, match="295 tensors"):
        map_lukemelas_state_dict(short, target, origin="x.pth")
    bad = OrderedDict(source)
    bad["_fc.bias"] = torch.zeros(10)
    with pytest.raises(EncoderError, match=r"_fc\.bias .*\(10,\)"):
        map_lukemelas_state_dict(bad, target, origin="x.pth")


def test_effnet_lukemelas_file_path_equals_package(effnet):
    """weights=<path to a lukemelas-named file> uses the same mapping as weights='package'."""
    from_file = build_image_encoder("efficientnet_lite0", weights=str(efficientnet_lite0_package_file()))
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(from_file(x), effnet(x))
    assert from_file.load_report["tensors"] == 296


def _flickr_images(root: Path, names: list[str], preprocess: ImagePreprocess) -> torch.Tensor:
    from PIL import Image

    transform = preprocess.transform()
    return torch.stack([transform(Image.open(root / "images" / n)) for n in names])


# Picked by running the classifier over the first 60 Flickr8k images whose 5 captions all mention a dog
# and keeping clear cases whose predicted breed also fits the captions (ImageNet labels, top-1 prob):
#   1176580356_9810d877bf  "a big dog catches a ball on his nose"          -> Airedale (0.92)
#   1072153132_53d2bb1b60  "a black and white dog catches a toy in midair" -> Border collie (0.70)
#   1287920676_d21a0b289b  "a snow dog in a red harness"                   -> Eskimo dog, husky (0.60)
# and two controls without animals: hot-air balloons at night -> balloon (417, 0.71); a child riding a bike
# -> mountain bike (671, 0.72). With ImageNet mean/std instead of 0.5/0.5 the same set gets less confident
# and less often right (see the comment at _LITE_PREPROCESS in stages/encoders.py).
DOGS = ["1176580356_9810d877bf.jpg", "1072153132_53d2bb1b60.jpg", "1287920676_d21a0b289b.jpg"]
CONTROLS = {"107318069_e9f2ef32de.jpg": 417, "1075716537_62105738b4.jpg": 671}


@pytest.mark.realdata
def test_effnet_gives_real_images_sensible_imagenet_labels(effnet, flickr8k_dir):
    names = DOGS + list(CONTROLS)
    captions = (flickr8k_dir / "Flickr8k.token.txt").read_text().splitlines()
    for name in DOGS:  # the captions really talk about a dog
        assert any(re.search(r"\bdog\b", line) for line in captions if line.startswith(name + "#"))
    with torch.inference_mode():
        probs = effnet.classify(_flickr_images(flickr8k_dir, names, effnet.preprocess)).softmax(-1)
    top5 = probs.topk(5).indices
    for i, name in enumerate(DOGS):
        assert any(int(c) in DOG_CLASSES for c in top5[i]), (name, top5[i].tolist())
        assert int(top5[i, 0]) in DOG_CLASSES and probs[i].max() > 0.4, (name, top5[i].tolist())
    for i, (name, label) in enumerate(CONTROLS.items(), start=len(DOGS)):
        assert int(top5[i, 0]) == label, (name, top5[i].tolist())
        assert not any(int(c) in DOG_CLASSES for c in top5[i]), (name, top5[i].tolist())


@pytest.mark.realdata
def test_effnet_normalisation_matches_its_batchnorm_statistics(effnet, flickr8k_dir):
    """The first BatchNorm's running_var says which input scale the weights were trained on."""
    names = sorted(p.name for p in (flickr8k_dir / "images").glob("*.jpg"))[:32]
    x01 = _flickr_images(flickr8k_dir, names, ImagePreprocess(224, (0.0,) * 3, (1.0,) * 3, "bicubic", 1.0))
    stem, bn = effnet.backbone.conv_stem, effnet.backbone.bn1
    alive = bn.running_var > 1e-3

    def var_ratio(preprocess: ImagePreprocess) -> float:
        with torch.inference_mode():
            out = stem(preprocess.normalize(x01))
        return float((out.var(dim=(0, 2, 3))[alive] / bn.running_var[alive]).median())

    ours = var_ratio(effnet.preprocess)
    imagenet = var_ratio(ImagePreprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert 0.6 < ours < 1.6, ours
    assert imagenet > 3.0, imagenet


def test_effnet_gradient_reaches_pixels_not_params(effnet):
    x = torch.randn(2, 3, 96, 96, requires_grad=True)
    effnet(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in effnet.parameters())


def test_effnet_accepts_channels_last(effnet):
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        a = effnet(x)
        b = effnet(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_frozen_encoders_stay_in_eval_mode(effnet):
    effnet.train()
    assert not effnet.training and not effnet.backbone.training
    parent = torch.nn.Sequential(effnet)
    parent.train()
    assert parent.training and not effnet.backbone.training


# ------------------------------------------------------------------------------ MiniLM (package)

def test_minilm_package(minilm):
    assert minilm.feature_dim == 384 and _frozen(minilm)
    assert Path(minilm_package_dir()).name == "model"
    feats = encode_texts(minilm, ["A dog runs across the grass.", "A puppy is running on a lawn.",
                                  "The central bank raised interest rates again."])
    assert feats.shape == (3, 384) and not feats.requires_grad
    same = F.cosine_similarity(feats[0], feats[1], dim=0)
    other = F.cosine_similarity(feats[0], feats[2], dim=0)
    assert same > other + 0.3, (float(same), float(other))


def test_loading_minilm_off_a_terminal_draws_no_bar_and_leaves_transformers_bars_on(capfd):
    from transformers.utils import logging as hf_logging

    build_text_encoder("all-MiniLM-L6-v2", weights="package", pooling="mean")  # stderr is pytest's capture here
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched off for the load only


def test_minilm_cls_and_mean_pooling_differ(minilm):
    cls = build_text_encoder("minilm", weights="package", pooling="cls")
    assert cls.name == "all-MiniLM-L6-v2" and cls.pooling == "cls"
    caption = ["Two children play football on a beach at sunset."]
    with torch.inference_mode():
        a, b = minilm(caption), cls(caption)
    assert a.shape == b.shape == (1, 384)
    assert not torch.allclose(a, b, atol=1e-3)


CAPTIONS = [
    "A dog .",
    "A black dog and a spotted dog are fighting",
    "A little girl covered in paint sits in front of a painted rainbow with her hands in a bowl .",
    "Two men",
    "A man in an orange hat starring at something .",
    "",
    "A child in a pink dress is climbing up a set of stairs in an entry way .",
    "Biker",
]


def test_encode_texts_restores_order(minilm):
    batched = encode_texts(minilm, CAPTIONS, batch_size=3)
    with torch.inference_mode():
        single = torch.cat([minilm([c]) for c in CAPTIONS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    assert encode_texts(minilm, [], batch_size=4).shape == (0, 384)


def test_truncation_at_max_length():
    torch.manual_seed(0)
    enc = build_text_encoder("tiny", weights="random", max_length=8)
    batch = enc.tokenize(["a very long caption that is much longer than eight tokens", "short"])
    assert batch["input_ids"].shape[1] == 8
    assert enc.token_lengths(["abcdefghijklmnop", "ab"]) == [8, 4]  # [CLS] + chars + [SEP], truncated


# ------------------------------------------------------------------------------ errors

def test_missing_weights_path_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(EncoderError, match=re.escape(f"weights file not found: {missing}")):
        build_image_encoder("nf_resnet50", weights=str(missing))
    with pytest.raises(EncoderError, match=re.escape(f"weights file not found: {missing}")):
        build_image_encoder("open_clip:ViT-B-32", weights=str(missing))
    with pytest.raises(EncoderError, match=re.escape(f"weights folder not found: {tmp_path / 'bert'}")):
        build_text_encoder("bert-base-uncased", weights=str(tmp_path / "bert"))


def test_package_weights_only_where_shipped():
    with pytest.raises(EncoderError, match="package weights exist for: efficientnet_lite0"):
        build_image_encoder("nf_resnet50", weights="package")
    with pytest.raises(EncoderError, match="package weights exist for: all-MiniLM-L6-v2"):
        build_text_encoder("bert-base-uncased", weights="package")
    with pytest.raises(EncoderError, match="weights='random'"):
        build_image_encoder("tiny")
    with pytest.raises(EncoderError, match="weights='random'"):
        build_text_encoder("tiny")


def test_unknown_names_get_hints():
    hint = r"unknown image encoder 'efficientnet_lite9'.*did you mean.*efficientnet_lite0"
    with pytest.raises(EncoderError, match=hint):
        build_image_encoder("efficientnet_lite9", weights="random")
    with pytest.raises(EncoderError, match="unknown open_clip architecture 'ViT-B-33'"):
        build_image_encoder("open_clip:ViT-B-33", weights="random")
    with pytest.raises(EncoderError, match="random init needs a local model folder"):
        build_text_encoder("bert-base-uncased", weights="random")
    with pytest.raises(EncoderError, match="pooling"):
        build_text_encoder("tiny", weights="random", pooling="max")


def test_error_messages_are_one_line(tmp_path):
    for build in (lambda: build_image_encoder("nope_net_x", weights="random"),
                  lambda: build_image_encoder("efficientnet_lite0", weights=str(tmp_path / "missing.pth")),
                  lambda: build_text_encoder("bert-base-uncased", weights="package")):
        with pytest.raises(EncoderError) as info:
            build()
        assert "\n" not in str(info.value)


def test_corrupt_weights_file_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match=re.escape(str(bad))):
        build_image_encoder("efficientnet_lite0", weights=str(bad))


def test_registered_names():
    assert {"efficientnet_lite0", "tiny", "nfnet_l0"} <= set(image_encoder_names())
    assert {"all-MiniLM-L6-v2", "minilm", "bert-base-uncased", "tiny"} <= set(text_encoder_names())


# ------------------------------------------------------------------------------ tiny encoders

def test_tiny_image_encoder_is_seeded_and_differentiable():
    torch.manual_seed(0)
    a = build_image_encoder("tiny", weights="random", image_size=32)
    torch.manual_seed(0)
    b = build_image_encoder("tiny", weights="random", image_size=32)
    torch.manual_seed(1)
    c = build_image_encoder("tiny", weights="random", image_size=32)
    assert a.feature_dim == 32 and a.preprocess.image_size == 32 and _frozen(a)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = a(x)
    assert out.shape == (4, 32)
    assert torch.equal(out, b(x)) and not torch.allclose(out, c(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in a.parameters())
    assert a(torch.randn(2, 3, 48, 40)).shape == (2, 32)  # any size
    cl = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(cl), a(cl.contiguous(memory_format=torch.channels_last)))


def test_tiny_text_encoder_is_seeded():
    torch.manual_seed(0)
    a = build_text_encoder("tiny", weights="random")
    torch.manual_seed(0)
    b = build_text_encoder("tiny", weights="random", pooling="cls")
    assert a.feature_dim == 32 and _frozen(a)
    with torch.inference_mode():
        fa, fb = a(CAPTIONS), b(CAPTIONS)
    assert fa.shape == fb.shape == (len(CAPTIONS), 32)
    assert torch.equal(a.model.embeddings.word_embeddings.weight, b.model.embeddings.word_embeddings.weight)
    assert not torch.allclose(fa, fb)
    torch.testing.assert_close(encode_texts(a, CAPTIONS, batch_size=3), fa, atol=1e-5, rtol=0)
    ids = a.tokenize(["Dog!"])["input_ids"][0].tolist()
    assert a.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "d", "##o", "##g", "!", "[SEP]"]


# ------------------------------------------------------------------------------ preprocessing

def test_normalize_denormalize_round_trip():
    pp = ImagePreprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
    x01 = torch.rand(2, 3, 32, 32)
    x = pp.normalize(x01)
    torch.testing.assert_close(pp.denormalize(x), x01)
    torch.testing.assert_close(x[:, 1], (x01[:, 1] - 0.456) / 0.224)
    half = ImagePreprocess(32, (0.5,) * 3, (0.5,) * 3)
    assert half.normalize(torch.ones(1, 3, 2, 2)).eq(1).all() and half.normalize(torch.zeros(1, 3, 2, 2)).eq(-1).all()


def test_transform_resizes_crops_and_normalises():
    from PIL import Image
    import pickle

    pp = ImagePreprocess(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    transform = pickle.loads(pickle.dumps(pp.transform()))  # DataLoader workers pickle it
    out = transform(Image.new("L", (80, 50), color=255))  # grayscale, not square
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, torch.ones(3, 32, 32))
    with pytest.raises(EncoderError, match="crop_pct"):
        ImagePreprocess(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.5)


# ------------------------------------------------------------------------------ generic timm / open_clip

def test_timm_random_and_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    enc = build_image_encoder("nf_resnet50", weights="random", image_size=64)
    assert enc.feature_dim == 2048 and _frozen(enc)
    assert enc.preprocess.image_size == 64 and enc.preprocess.mean == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = enc(x)
    assert out.shape == (2, 2048)
    ckpt = tmp_path / "nf_resnet50.pth"
    torch.save(enc.backbone.state_dict(), ckpt)
    loaded = build_image_encoder("nf_resnet50", weights=str(ckpt), image_size=64)
    assert loaded.weights == str(ckpt)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), out)


def test_open_clip_image_tower_from_local_file(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32")
    ckpt = tmp_path / "vit_s_32.pt"
    torch.save(model.state_dict(), ckpt)
    enc = build_image_encoder("open_clip:ViT-S-32", weights=str(ckpt))
    assert enc.feature_dim == 384 and _frozen(enc)
    assert enc.preprocess.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), model.eval().encode_image(x))
