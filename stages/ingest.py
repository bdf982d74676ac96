"""Data ingest: every supported input becomes one `CaptionTable` of image records with their captions.

Readers check what is cheap to check (files exist, caption lines parse, splits are non-empty) so a bad
dataset fails in seconds with one line naming the culprit, not an hour into encoding. Image bytes are not
decoded here; `load_image` decodes lazily (in loader workers) and `verify_image` exists for an up-front check.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from repblend.stages.errors import DataError

ON_ERROR = ("stop", "skip")
DEFAULT_FLICKR8K_SPLITS = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_TAR_MEMBER = re.compile(r"^(.*?\.tar)#(.+)$")
_TOKEN_KEY = re.compile(r"^(.+)#(\d+)$")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its captions; `path` is a local file or "<tar path>#<member name>"."""

    image_id: str
    path: str
    split: str
    captions: tuple[str, ...]


@dataclass
class CaptionTable:
    """The canonical dataset every later stage consumes, whatever the input format was."""

    records: list[ImageRecord]
    source: str

    def __len__(self) -> int:
        return len(self.records)

    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})

    def split(self, name: str) -> CaptionTable:
        """Records of one split; an absent split is the user's mistake (typo in a config), so say which exist."""
        records = [r for r in self.records if r.split == name]
        if not records:
            raise DataError(f"{self.source}: split {name!r} is empty or absent "
                            f"(available: {', '.join(self.splits()) or 'none'})")
        return CaptionTable(records, self.source)

    def subset(self, n: int, seed: int) -> CaptionTable:
        """A seeded sample that keeps the original order, so CPU configs stay reproducible and cacheable."""
        if n <= 0 or n >= len(self.records):
            return CaptionTable(list(self.records), self.source)
        picked = sorted(random.Random(seed).sample(range(len(self.records)), n))
        return CaptionTable([self.records[i] for i in picked], self.source)

    def hold_out(self, source_split: str, n: int, seed: int, name: str) -> CaptionTable:
        """Relabel a seeded sample of `n` images of `source_split` as split `name` (removed from the source),
        for model selection on data that is neither trained on nor reported."""
        if name in self.splits():
            raise DataError(f"{self.source}: cannot hold out split {name!r}: the data already has one")
        candidates = [i for i, r in enumerate(self.records) if r.split == source_split]
        if n >= len(candidates):
            raise DataError(f"{self.source}: cannot hold out {n} images of split {source_split!r}: it has only "
                            f"{len(candidates)}")
        picked = set(random.Random(seed).sample(candidates, n))
        records = [replace(r, split=name) if i in picked else r for i, r in enumerate(self.records)]
        return CaptionTable(records, self.source)

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def captions(self) -> list[str]:
        return [c for r in self.records for c in r.captions]

    def caption_to_image(self) -> list[int]:
        return [i for i, r in enumerate(self.records) for _ in r.captions]

    def fingerprint(self) -> str:
        """Hash of what a feature cache depends on; file sizes catch replaced images without decoding them.

        Paths are left out so moving the dataset does not invalidate a cache.
        """
        digest = hashlib.sha256()
        sizes: dict[str, int] = {}
        for r in self.records:
            item = [r.image_id, r.split, list(r.captions), _stored_size(r.path, sizes)]
            digest.update(json.dumps(item, ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()


def _stored_size(path: str, memo: dict[str, int]) -> int:
    """Size of the file holding the image (the shard for tar members); -1 when it does not exist."""
    m = _TAR_MEMBER.match(path)
    file = m.group(1) if m else path
    if file not in memo:
        try:
            memo[file] = os.stat(file).st_size
        except OSError:
            memo[file] = -1
    return memo[file]


def check_on_error(on_error: str) -> None:
    """Reject a typo early: a misspelled mode silently meaning 'stop' or 'skip' would surprise users."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def report(message: str, on_error: str) -> None:
    """Raise or warn with the same one-line message, so skipped items are as traceable as fatal ones."""
    if on_error == "stop":
        raise DataError(message)
    warnings.warn(message, stacklevel=3)


def nonempty_table(records: list[ImageRecord], source: str) -> CaptionTable:
    if not records:
        raise DataError(f"{source}: no usable images with captions")
    return CaptionTable(records, source)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found or not a directory")


# ---------------------------------------------------------------------------------------------- Flickr8k


def read_flickr8k(root: str | Path, images: str = "images", captions: str = "Flickr8k.token.txt",
                  splits: dict[str, str] | None = None, on_error: str = "stop") -> CaptionTable:
    """Read the official Flickr8k layout; split files that do not exist are simply absent splits."""
    check_on_error(on_error)
    root = Path(os.path.abspath(root))
    _require_dir(root, "Flickr8k root folder")
    image_dir = root / images
    _require_dir(image_dir, "Flickr8k images folder")
    token_file = root / captions
    _require_file(token_file, "Flickr8k caption file")
    split_files = {name: root / fname for name, fname in (splits or DEFAULT_FLICKR8K_SPLITS).items()}
    present = {name: f for name, f in split_files.items() if f.is_file()}
    if not present:
        raise DataError(f"{root}: none of the split files exist ({', '.join(f.name for f in split_files.values())})")

    caps = _read_token_file(token_file, on_error)
    records: list[ImageRecord] = []
    seen: dict[str, Path] = {}
    for split_name, split_file in present.items():
        names = _read_split_file(split_file, on_error)
        for lineno, image_id in names:
            where = f"{split_file}:{lineno}"
            if image_id in seen:
                report(f"{where}: image {image_id} already listed in {seen[image_id]}", on_error)
                continue
            if image_id not in caps:
                report(f"{where}: image {image_id} (split {split_name!r}) has no captions in {token_file.name}",
                       on_error)
                continue
            path = image_dir / image_id
            if not path.is_file():
                report(f"{where}: image {image_id} not found at {path}", on_error)
                continue
            seen[image_id] = split_file
            records.append(ImageRecord(image_id, str(path), split_name, tuple(caps[image_id])))
    return nonempty_table(records, str(root))


def _read_token_file(path: Path, on_error: str) -> dict[str, list[str]]:
    """Parse "<image>#<k>\\t<caption>" lines; read as bytes so an encoding error still has a line number."""
    caps: dict[str, list[str]] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                report(f"{path}:{lineno}: caption line is not valid UTF-8", on_error)
                continue
            if not line.strip():
                continue
            parsed = _parse_token_line(line)
            if isinstance(parsed, str):
                report(f"{path}:{lineno}: {parsed}", on_error)
                continue
            image_id, caption = parsed
            caps.setdefault(image_id, []).append(caption)
    return caps


def _parse_token_line(line: str) -> tuple[str, str] | str:
    """(image id, caption), or a description of what is wrong with the line."""
    key, tab, caption = line.partition("\t")
    if not tab:
        return "malformed caption line (expected '<image>#<k><TAB><caption>', found no tab)"
    m = _TOKEN_KEY.match(key.strip())
    if not m:
        return f"malformed caption line (key {key.strip()!r} lacks '#<k>')"
    caption = caption.strip()
    if not caption:
        return f"empty caption for {m.group(1)}"
    return m.group(1), caption


def _read_split_file(path: Path, on_error: str) -> list[tuple[int, str]]:
    """(line number, image name) pairs; an empty split file is an error because the split would vanish."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        names = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    if not names:
        report(f"{path}: split file lists no images (empty split)", on_error)
    return names


# ------------------------------------------------------------------------------------------ Karpathy JSON


def read_karpathy(json_path: str | Path, images_root: str | Path, on_error: str = "stop",
                  restval_as: str = "train") -> CaptionTable:
    """Read a Karpathy-split JSON (Flickr30k, COCO); `restval` joins `restval_as` unless that is ""."""
    check_on_error(on_error)
    json_path = Path(os.path.abspath(json_path))
    images_root = Path(os.path.abspath(images_root))
    _require_file(json_path, "Karpathy JSON file")
    _require_dir(images_root, "images folder")
    entries = _load_karpathy_entries(json_path)
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        parsed = _parse_karpathy_entry(entry, images_root)
        name = entry.get("filename", "?") if isinstance(entry, dict) else "?"
        where = f"{json_path}: images[{index}] ({name})"
        if isinstance(parsed, str):
            report(f"{where}: {parsed}", on_error)
            continue
        if parsed.image_id in seen:
            report(f"{where}: duplicate filename {parsed.image_id}", on_error)
            continue
        if not os.path.isfile(parsed.path):
            report(f"{where}: image {parsed.image_id} not found at {parsed.path}", on_error)
            continue
        if parsed.split == "restval" and restval_as:
            parsed = ImageRecord(parsed.image_id, parsed.path, restval_as, parsed.captions)
        seen.add(parsed.image_id)
        records.append(parsed)
    return nonempty_table(records, str(json_path))


def _load_karpathy_entries(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (expected an object with an \"images\" list)")
    return data["images"]


def _parse_karpathy_entry(entry: object, images_root: Path) -> ImageRecord | str:
    """The record for one "images" entry, or a description of what is wrong with it."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    filename, split = entry.get("filename"), entry.get("split")
    if not isinstance(filename, str) or not filename:
        return "missing \"filename\""
    if not isinstance(split, str) or not split:
        return "missing \"split\""
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        return "missing \"sentences\" list"
    captions = []
    for k, s in enumerate(sentences):
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            return f"sentences[{k}] has no non-empty \"raw\" caption"
        captions.append(raw.strip())
    if not captions:
        return "image has no captions"
    filepath = entry.get("filepath") or ""
    return ImageRecord(filename, str(images_root / filepath / filename), split, tuple(captions))


# --------------------------------------------------------------------------------------------- images


def split_tar_path(path: str) -> tuple[str, str] | None:
    """("<tar path>", "<member>") for a path into a shard, None for a plain file."""
    m = _TAR_MEMBER.match(path)
    return (m.group(1), m.group(2)) if m else None


@functools.lru_cache(maxsize=64)
def _tar_index(tar_path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size); keyed on mtime and size so a rewritten shard is re-indexed."""
    del mtime_ns, size  # cache key only
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            return {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isreg()}
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{tar_path}: cannot read tar shard ({exc})") from None


def read_image_bytes(path: str) -> bytes:
    """The stored (encoded) bytes of an image; for shards a seek+read, no unpacking."""
    member = split_tar_path(path)
    if member is None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    tar_path, name = member
    try:
        st = os.stat(tar_path)
    except OSError:
        raise DataError(f"{path}: tar shard {tar_path} not found") from None
    entry = _tar_index(tar_path, st.st_mtime_ns, st.st_size).get(name)
    if entry is None:
        raise DataError(f"{path}: no member {name!r} in tar shard {tar_path}")
    offset, size = entry
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise DataError(f"{path}: tar shard {tar_path} is truncated")
    return data


def load_image(path: str) -> Image.Image:
    """Decode fully (not lazily) so a corrupt file fails here, naming the path, not later inside a transform."""
    data = read_image_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {_one_line(exc)})") from None


def verify_image(path: str) -> None:
    """Up-front check for callers that prefer to fail before a long encode."""
    load_image(path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "no details"
