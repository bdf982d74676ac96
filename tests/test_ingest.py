"""Ingest: Flickr8k / Karpathy / WebDataset readers, the canonical table, and one test per bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repblend.stages.errors import DataError
from repblend.stages.ingest import (
    CaptionTable,
    ImageRecord,
    load_image,
    read_flickr8k,
    read_image_bytes,
    read_karpathy,
    verify_image,
)
from repblend.stages.wds import read_webdataset, sample_key, write_webdataset

TRAIN = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg",
         "1003163366_44323f5815.jpg"]
DEV = ["2090545563_a4e66ec76b.jpg", "3393035454_2d2370ffd4.jpg"]


def make_image(path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (16, 12)) -> Path:
    """A small noisy image, so each file has distinct bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def caption(image_id: str, k: int) -> str:
    return f"A Photo of {image_id.split('_')[0]} number {k} ."


def write_flickr8k(root: Path, train=TRAIN, dev=DEV, extra_token_lines: tuple[str, ...] = ()) -> Path:
    for i, name in enumerate([*train, *dev]):
        make_image(root / "images" / name, seed=i)
    lines = [f"{name}#{k}\t{caption(name, k)}" for name in [*train, *dev] for k in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join([*lines, *extra_token_lines]) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    return root


@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    return write_flickr8k(tmp_path / "flickr8k")


def table_key(table: CaptionTable) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(r.image_id, r.split, r.captions) for r in table.records]


# ------------------------------------------------------------------------------------------- Flickr8k


def test_read_flickr8k(flickr: Path) -> None:
    table = read_flickr8k(flickr)
    assert len(table) == 6 and table.num_captions == 30
    assert table.splits() == ["dev", "train"]
    assert [r.image_id for r in table.records] == [*TRAIN, *DEV]
    assert [r.split for r in table.records] == ["train"] * 4 + ["dev"] * 2
    first = table.records[0]
    assert first.captions == tuple(caption(TRAIN[0], k) for k in range(5))  # case kept, whitespace stripped
    assert Path(first.path) == flickr / "images" / TRAIN[0] and Path(first.path).is_absolute()
    assert len(table.split("dev")) == 2 and table.split("dev").records == table.records[4:]
    assert load_image(first.path).mode == "RGB"


def test_flickr8k_ignores_images_in_no_split_and_strips_captions(tmp_path: Path) -> None:
    root = write_flickr8k(tmp_path, extra_token_lines=("9999_orphan.jpg#0\tnot in any split",))
    text = (root / "Flickr8k.token.txt").read_text().replace(caption(TRAIN[0], 0), f"  {caption(TRAIN[0], 0)}  ")
    (root / "Flickr8k.token.txt").write_text(text)
    table = read_flickr8k(root)
    assert "9999_orphan.jpg" not in {r.image_id for r in table.records}
    assert table.records[0].captions[0] == caption(TRAIN[0], 0)


def test_flickr8k_custom_split_files(flickr: Path) -> None:
    table = read_flickr8k(flickr, splits={"val": "Flickr_8k.devImages.txt"})
    assert table.splits() == ["val"] and len(table) == 2


def test_flickr8k_no_split_file_at_all(flickr: Path) -> None:
    with pytest.raises(DataError, match="none of the split files exist"):
        read_flickr8k(flickr, splits={"train": "nope.txt"})


# ------------------------------------------------------------------------------------------ WebDataset


def test_webdataset_round_trip(flickr: Path, tmp_path: Path) -> None:
    table = read_flickr8k(flickr)
    shards = write_webdataset(table, tmp_path / "wds", shard_size=4)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    assert f"{sample_key(TRAIN[0])}.jpg" in names and all(n.count(".") == 1 for n in names)

    for urls in (str(tmp_path / "wds"), str(tmp_path / "wds" / "shard-{000000..000001}.tar"),
                 [str(p) for p in shards]):
        back = read_webdataset(urls)
        assert table_key(back) == table_key(table)
    for orig, rec in zip(table.records, back.records):
        assert "#" in rec.path and rec.path.split("#")[0].endswith(".tar")
        assert read_image_bytes(rec.path) == Path(orig.path).read_bytes()  # original JPEG bytes kept
        assert np.array_equal(np.asarray(load_image(rec.path)), np.asarray(load_image(orig.path)))
    assert back.fingerprint() != "" and back.split("dev").captions() == table.split("dev").captions()


def test_write_webdataset_reencodes_png_and_removes_stale_shards(tmp_path: Path) -> None:
    png = make_image(tmp_path / "img.v2.png", seed=1, fmt="PNG")
    records = [ImageRecord(f"img{i}.v2.png", str(png), "train", ("a png",)) for i in range(3)]
    out = tmp_path / "out"
    assert len(write_webdataset(CaptionTable(records, "mem"), out, shard_size=1)) == 3
    shards = write_webdataset(CaptionTable(records[:1], "mem"), out, shard_size=1)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"] == [p.name for p in shards]
    back = read_webdataset(out)
    assert back.records[0].image_id == "img0.v2.png"
    assert read_image_bytes(back.records[0].path)[:3] == b"\xff\xd8\xff"
    assert load_image(back.records[0].path).size == (16, 12)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_read_foreign_webdataset_formats(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "foreign.tar", {
        "a.jpg": jpeg(1), "a.txt": b"first caption\n\n  second caption  \n",
        "b.png": png(2), "b.json": json.dumps(["only one"]).encode(),
        "c.jpeg": jpeg(3),
        "c.json": json.dumps({"captions": ["x", "y"], "split": "test", "image_id": "c.jpg"}).encode(),
    })
    table = read_webdataset(str(shard), split="dev")
    assert table_key(table) == [("a", "dev", ("first caption", "second caption")), ("b", "dev", ("only one",)),
                                ("c.jpg", "test", ("x", "y"))]
    assert table.records[1].path == f"{shard}#b.png"
    assert load_image(table.records[1].path).getpixel((0, 0)) == (2, 2, 2)


# -------------------------------------------------------------------------------------------- Karpathy


def write_karpathy(tmp_path: Path, with_filepath: bool) -> tuple[Path, Path]:
    root = tmp_path / "images"
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        filepath = ("train2014" if split in ("train", "restval") else "val2014") if with_filepath else None
        name = f"COCO_{i:012d}.jpg"
        make_image(root / (filepath or "") / name, seed=i)
        entry = {"filename": name, "split": split, "imgid": i,
                 "sentences": [{"raw": f" Caption {j} of image {i}. ", "tokens": ["caption"]} for j in range(5)]}
        if filepath:
            entry["filepath"] = filepath
        entries.append(entry)
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, root


@pytest.mark.parametrize("with_filepath", [True, False])
def test_read_karpathy(tmp_path: Path, with_filepath: bool) -> None:
    path, root = write_karpathy(tmp_path, with_filepath)
    table = read_karpathy(path, root)
    assert [r.split for r in table.records] == ["train", "train", "val", "test"]
    assert table.records[0].captions[0] == "Caption 0 of image 0."
    expected = root / ("train2014" if with_filepath else "") / "COCO_000000000000.jpg"
    assert table.records[0].path == str(expected) and table.records[0].image_id == "COCO_000000000000.jpg"
    assert read_karpathy(path, root, restval_as="").splits() == ["restval", "test", "train", "val"]
    assert read_karpathy(path, root, restval_as="extra").split("extra").records[0].image_id == "COCO_000000000001.jpg"


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_image_flickr8k(flickr: Path) -> None:
    (flickr / "images" / TRAIN[1]).unlink()
    with pytest.raises(DataError) as err:
        read_flickr8k(flickr)
    msg = str(err.value)
    assert TRAIN[1] in msg and str(flickr / "images" / TRAIN[1]) in msg and "\n" not in msg
    with pytest.warns(UserWarning, match=TRAIN[1]):
        table = read_flickr8k(flickr, on_error="skip")
    assert TRAIN[1] not in [r.image_id for r in table.records] and len(table) == 5


def test_missing_image_karpathy(tmp_path: Path) -> None:
    path, root = write_karpathy(tmp_path, with_filepath=True)
    (root / "val2014" / "COCO_000000000002.jpg").unlink()
    with pytest.raises(DataError, match=r"COCO_000000000002\.jpg.*val2014"):
        read_karpathy(path, root)
    with pytest.warns(UserWarning, match="COCO_000000000002"):
        assert len(read_karpathy(path, root, on_error="skip")) == 3


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpeg(flickr: Path, kind: str) -> None:
    path = flickr / "images" / TRAIN[0]
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if kind == "garbage" else data[: len(data) // 2])
    table = read_flickr8k(flickr)  # reading checks existence only, no decoding
    for check in (load_image, verify_image):
        with pytest.raises(DataError) as err:
            check(table.records[0].path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_tar_member(flickr: Path, tmp_path: Path) -> None:
    shard = write_webdataset(read_flickr8k(flickr), tmp_path / "wds")[0]
    with pytest.raises(DataError, match="no member 'nope.jpg'"):
        load_image(f"{shard}#nope.jpg")
    with pytest.raises(DataError, match="not found"):
        load_image(f"{tmp_path}/absent.tar#x.jpg")


@pytest.mark.parametrize("bad_line, what", [
    (f"{TRAIN[2]}#5 no tab here", "no tab"),
    (f"{TRAIN[2]}\tcaption without index", "lacks '#<k>'"),
    (f"{TRAIN[2]}#5\t   ", "empty caption"),
])
def test_malformed_caption_line(tmp_path: Path, bad_line: str, what: str) -> None:
    root = write_flickr8k(tmp_path)
    token = root / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines.insert(7, bad_line)  # becomes 1-based line 8
    token.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_flickr8k(root)
    assert "Flickr8k.token.txt:8:" in str(err.value) and what in str(err.value)
    with pytest.warns(UserWarning, match="Flickr8k.token.txt:8:"):
        table = read_flickr8k(root, on_error="skip")
    assert len(table) == 6 and all(len(r.captions) == 5 for r in table.records)


def test_image_without_captions(tmp_path: Path) -> None:
    root = write_flickr8k(tmp_path)
    (root / "Flickr_8k.devImages.txt").write_text("\n".join([*DEV, "5555_nocaps.jpg"]) + "\n")
    make_image(root / "images" / "5555_nocaps.jpg", seed=9)
    with pytest.raises(DataError, match=r"Flickr_8k\.devImages\.txt:3: image 5555_nocaps\.jpg .*no captions"):
        read_flickr8k(root)
    with pytest.warns(UserWarning, match="5555_nocaps.jpg"):
        assert len(read_flickr8k(root, on_error="skip").split("dev")) == 2


def test_empty_split_file(flickr: Path) -> None:
    (flickr / "Flickr_8k.devImages.txt").write_text("\n")
    with pytest.raises(DataError, match=r"Flickr_8k\.devImages\.txt: .*empty split"):
        read_flickr8k(flickr)
    with pytest.warns(UserWarning, match="empty split"):
        table = read_flickr8k(flickr, on_error="skip")
    with pytest.raises(DataError) as err:
        table.split("dev")
    assert "'dev'" in str(err.value) and str(flickr) in str(err.value) and "available: train" in str(err.value)


def test_karpathy_split_absent(tmp_path: Path) -> None:
    path, root = write_karpathy(tmp_path, with_filepath=False)
    with pytest.raises(DataError, match=r"dataset\.json: split 'restval' is empty or absent"):
        read_karpathy(path, root).split("restval")


@pytest.mark.parametrize("text, what", [("{\"images\": [", "not valid JSON"), ("{\"annotations\": []}", "images")])
def test_bad_karpathy_json(tmp_path: Path, text: str, what: str) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"dataset_flickr30k\.json.*{what}"):
        read_karpathy(path, tmp_path)


@pytest.mark.parametrize("members, what", [
    ({"bad.jpg": b"x"}, "has an image but no captions"),
    ({"bad.json": b'{"captions": ["lonely"]}'}, "has captions but no image"),
])
def test_bad_webdataset_sample(tmp_path: Path, members: dict[str, bytes], what: str) -> None:
    shard = write_tar(tmp_path / "broken.tar", {"ok.jpg": jpeg(1), "ok.txt": b"fine", **members})
    with pytest.raises(DataError) as err:
        read_webdataset(str(shard))
    assert "broken.tar" in str(err.value) and "'bad'" in str(err.value) and what in str(err.value)
    with pytest.warns(UserWarning, match=what):
        table = read_webdataset(str(shard), on_error="skip")
    assert [r.image_id for r in table.records] == ["ok"]


def test_on_error_value_and_empty_result(flickr: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        read_flickr8k(flickr, on_error="ignore")
    for name in [*TRAIN, *DEV]:
        (flickr / "images" / name).unlink()
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable images"):
        read_flickr8k(flickr, on_error="skip")
    with pytest.raises(DataError, match="no \\*.tar shards"):
        read_webdataset(str(tmp_path / "flickr8k" / "images"))


# --------------------------------------------------------------------------------------------- table


def small_table(n: int = 20) -> CaptionTable:
    records = [ImageRecord(f"img{i}.jpg", f"/nowhere/img{i}.jpg", "train", tuple(f"c{i}.{k}" for k in range(i % 3 + 1)))
               for i in range(n)]
    return CaptionTable(records, "memory")


def test_subset_is_deterministic() -> None:
    table = small_table()
    a, b, c = table.subset(5, seed=0), table.subset(5, seed=0), table.subset(5, seed=1)
    assert len(a) == 5 and table_key(a) == table_key(b) and table_key(a) != table_key(c)
    ids = [int(r.image_id[3:-4]) for r in a.records]
    assert ids == sorted(ids)  # original order kept
    assert len(table.subset(0, seed=0)) == len(table.subset(99, seed=0)) == 20


def test_captions_and_caption_to_image() -> None:
    table = small_table(4)  # 1, 2, 3, 1 captions
    assert table.num_captions == 7 == len(table.captions())
    assert table.caption_to_image() == [0, 1, 1, 2, 2, 2, 3]
    for cap, idx in zip(table.captions(), table.caption_to_image()):
        assert cap in table.records[idx].captions


def test_fingerprint_tracks_inputs(flickr: Path) -> None:
    table = read_flickr8k(flickr)
    assert table.fingerprint() == read_flickr8k(flickr).fingerprint()
    token = flickr / "Flickr8k.token.txt"
    token.write_text(token.read_text().replace(caption(DEV[1], 4), "A changed caption ."))
    before = read_flickr8k(flickr).fingerprint()
    assert before != table.fingerprint()
    make_image(flickr / "images" / TRAIN[0], seed=0, size=(40, 30))  # same name, new bytes
    assert read_flickr8k(flickr).fingerprint() != before  # sizes are read when fingerprint() is called


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_flickr8k(flickr8k_dir: Path) -> None:
    table = read_flickr8k(flickr8k_dir)
    train, dev = table.split("train"), table.split("dev")
    assert (len(train), len(dev)) == (6000, 1000)
    assert (train.num_captions, dev.num_captions) == (30000, 5000)
    assert all(len(r.captions) == 5 for r in table.records)
    image = load_image(dev.records[0].path)
    assert image.mode == "RGB" and image.size == (224, 224)
