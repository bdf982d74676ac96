"""WebDataset shards in and out: the shipping format for distilled sets and a streaming input format.

Reading indexes the tar headers only; images stay inside the shard and `load_image("<tar>#<member>")`
fetches them later with one seek, so reading a large shard set costs seconds, not a full unpack.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import base_plus_ext

from repblend.stages.errors import DataError
from repblend.stages.ingest import (
    CaptionTable,
    ImageRecord,
    check_on_error,
    load_image,
    nonempty_table,
    read_image_bytes,
    report,
)

IMAGE_EXTS = ("jpg", "jpeg", "png")
_JPEG_MAGIC = b"\xff\xd8\xff"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(image_id: str) -> str:
    """A webdataset key for an image id: webdataset splits key from extension at the first dot, so the
    extension is dropped and any other dot, slash or odd character becomes "_"."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", image_id)
    return _UNSAFE_KEY_CHARS.sub("_", stem) or "_"


def _unique_keys(image_ids: list[str]) -> list[str]:
    """Keys that never collide (e.g. "a.jpg" and "a.png"), since a collision would merge two samples."""
    used: set[str] = set()
    keys = []
    for image_id in image_ids:
        key, n = sample_key(image_id), 1
        while key in used:
            key = f"{sample_key(image_id)}_{n}"
            n += 1
        used.add(key)
        keys.append(key)
    return keys


def jpeg_bytes(path: str) -> bytes:
    """Original bytes when they already are JPEG (no generation loss), otherwise a high-quality re-encode."""
    data = read_image_bytes(path)
    if data.startswith(_JPEG_MAGIC):
        return data
    buf = io.BytesIO()
    load_image(path).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_webdataset(table: CaptionTable, out_dir: str | Path, shard_size: int = 1000,
                     prefix: str = "shard") -> list[Path]:
    """Write `table` as {prefix}-000000.tar, ... (jpg + json captions per image)."""
    if not table.records:
        raise DataError(f"{table.source}: nothing to write (empty table)")
    keys = _unique_keys([r.image_id for r in table.records])
    samples = ({"__key__": key, "jpg": jpeg_bytes(record.path),
                "json": json.dumps({"image_id": record.image_id, "split": record.split,
                                    "captions": list(record.captions)}, ensure_ascii=False)}
               for key, record in zip(keys, table.records))
    return write_samples(samples, out_dir, shard_size=shard_size, prefix=prefix)


def write_samples(samples, out_dir: str | Path, shard_size: int = 1000, prefix: str = "shard") -> list[Path]:
    """Write WebDataset samples (dicts with `__key__`) as {prefix}-000000.tar, ...; stale shards of an earlier,
    larger write are removed so a directory read never mixes two versions."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0,
                         post=lambda fname: written.append(Path(fname))) as sink:
        for sample in samples:
            sink.write(sample)
    _remove_stale_shards(out_dir, prefix, written)
    return written


def _remove_stale_shards(out_dir: Path, prefix: str, keep: list[Path]) -> None:
    ours = re.compile(re.escape(prefix) + r"-\d{6}\.tar$")
    keep_names = {p.name for p in keep}
    for p in out_dir.iterdir():
        if ours.fullmatch(p.name) and p.name not in keep_names:
            p.unlink()


def expand_urls(urls: str | Path | list) -> list[str]:
    """Shard paths from a path, a brace pattern, a directory (its *.tar, sorted) or a list of those."""
    if isinstance(urls, (list, tuple)):
        return [u for item in urls for u in expand_urls(item)]
    text = str(urls)
    if "://" in text:
        raise DataError(f"{text}: only local shards are supported; copy remote shards to a local folder first")
    if os.path.isdir(text):
        found = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
        if not found:
            raise DataError(f"{text}: no *.tar shards in this folder")
        return found
    return list(wds_expand_urls(text))  # brace patterns and "::"-joined lists, as webdataset reads them


def read_webdataset(urls: str | list[str], split: str | None = None, on_error: str = "stop") -> CaptionTable:
    """Index shards into a table without decoding images; `split` applies to samples whose json has none."""
    check_on_error(on_error)
    shards = expand_urls(urls)
    if not shards:
        raise DataError(f"{urls}: no shards given")
    default_split = split or "train"
    records: list[ImageRecord] = []
    seen: dict[str, str] = {}
    for shard in shards:
        shard = os.path.abspath(shard)
        for key, members in _shard_samples(shard):
            parsed = _parse_sample(shard, key, members, default_split)
            if isinstance(parsed, str):
                report(f"{shard}: sample {key!r}: {parsed}", on_error)
                continue
            if parsed.image_id in seen:
                report(f"{shard}: sample {key!r}: duplicate image_id {parsed.image_id!r} "
                       f"(first in {seen[parsed.image_id]})", on_error)
                continue
            seen[parsed.image_id] = shard
            records.append(parsed)
    source = str(urls) if not isinstance(urls, (list, tuple)) else f"{len(shards)} shards ({shards[0]}, ...)"
    return nonempty_table(records, source)


def _shard_samples(shard: str) -> list[tuple[str, dict[str, tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]]]:
    """(key, {ext: member}) in first-appearance order; caption members come with their bytes read."""
    if not os.path.isfile(shard):
        raise DataError(f"{shard}: tar shard not found")
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or re.match(r"__[^/]*__($|/)", member.name):
                    continue
                ext = ext.lower()
                entry = samples.setdefault(key, {})
                if ext in entry:
                    raise DataError(f"{shard}: sample {key!r}: two members with extension {ext!r}")
                fileobj = tf.extractfile(member) if ext in ("json", "txt") else None
                entry[ext] = (member, fileobj.read()) if fileobj is not None else member
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{shard}: cannot read as an uncompressed tar shard ({exc})") from None
    return list(samples.items())


def _parse_sample(shard: str, key: str, members: dict, default_split: str) -> ImageRecord | str:
    """The record for one sample, or a description of what is wrong with it."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    meta: dict = {}
    captions: list[str] = []
    if "json" in members:
        try:
            data = json.loads(members["json"][1].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"json is not valid ({_first_line(exc)})"
        if isinstance(data, list):
            captions = _clean_captions(data)
        elif isinstance(data, dict):
            meta = data
            raw = data.get("captions", data.get("caption", []))
            captions = _clean_captions([raw] if isinstance(raw, str) else raw if isinstance(raw, list) else [])
        else:
            return "json is neither an object nor a list of captions"
    if not captions and "txt" in members:
        text = members["txt"][1].decode("utf-8", errors="replace")
        captions = _clean_captions(text.splitlines())
    if image is None and captions:
        return f"has captions but no image ({'/'.join(IMAGE_EXTS)})"
    if image is None:
        return f"has neither an image nor captions (members: {', '.join(sorted(members))})"
    if not captions:
        return "has an image but no captions (json 'captions' or txt)"
    image_id = meta.get("image_id") if isinstance(meta.get("image_id"), str) and meta.get("image_id") else key
    split = meta.get("split") if isinstance(meta.get("split"), str) and meta.get("split") else default_split
    return ImageRecord(image_id, f"{shard}#{image.name}", split, tuple(captions))


def _clean_captions(items: list) -> list[str]:
    return [s.strip() for s in items if isinstance(s, str) and s.strip()]


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

