"""Atomic file writes, and the digest of a file's content.

A crash (or `kill -9`) must never leave a file that looks complete: every artifact is written to a
temporary name in the same folder and renamed into place, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from repblend.stages.errors import DataError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts should get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_checkpoint(path: str | Path, device: torch.device | str) -> dict:
    """A training checkpoint written by `atomic_path` + `torch.save`. One that cannot be read was damaged after it
    was written (a partial copy, a full disk elsewhere): a `DataError` names it and what to do, instead of
    torch's traceback."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        reason = str(exc).split(". ")[0] if str(exc) else type(exc).__name__  # torch's advice follows its first
        raise DataError(f"{path}: unreadable checkpoint ({reason}); move it away to start that stage over") from exc


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors: no pickle, memory-mappable, readable from any language."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def tensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata a safetensors file was written with (keys, iterations), without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_part(path: Path, made_by: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A kept part's tensors and metadata, if `path` holds one whose metadata says it was made as `made_by` says
    (more keys may ride along, e.g. the errors met); None if there is none or it was made otherwise."""
    if not path.is_file():
        return None
    metadata = tensors_metadata(path)
    if any(metadata.get(key) != value for key, value in made_by.items()):
        return None
    from safetensors.torch import load_file

    return load_file(str(path)), metadata


def kept_part(path: Path | None, made_by: dict[str, str],
              make: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """One part of a long computation (an encode), kept on disk as it finishes so a killed run loses only the part it
    was in: read back when `path` holds a part made the same way (`made_by`, its metadata), else made and, with a
    path, written. Returns the tensors and whether they were read back."""
    done = None if path is None else read_part(path, made_by)
    if done is not None:
        return done[0], True
    tensors = make()
    if path is not None:
        write_tensors(path, tensors, metadata=made_by)
    return tensors, False


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content, read in blocks: keys for results derived from large files. Kept per process
    while the file's identity, size and modification time stay the same (every artifact here is replaced by a rename,
    which changes them), so the several keys of one evaluation read a feature cache once."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _DIGESTS[identity] = digest.hexdigest()
    return _DIGESTS[identity]
