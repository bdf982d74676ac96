"""Ray workers may run in another working directory (Tune trial folders, other nodes): hand them absolute paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from repblend.pipeline.config import Config
from repblend.stages.encode import FeatureCache


def absolute(config: Config, caches: dict[str, FeatureCache], run_dir: Path, buffer_dir: Path | None = None):
    """The config (data root, buffer folder) and cache records with every path made absolute."""
    data = dataclasses.replace(config.data, root=str(Path(config.data.root).expanduser().resolve()))
    buffer_dir = buffer_dir or (Path(config.buffer.dir).expanduser() if config.buffer.dir else run_dir / "buffer")
    buffer = dataclasses.replace(config.buffer, dir=str(buffer_dir.resolve()))
    cache_records = {split: FeatureCache(c.tensors_path.resolve(), c.manifest_path.resolve())
                     for split, c in caches.items()}
    return dataclasses.replace(config, data=data, buffer=buffer), cache_records
