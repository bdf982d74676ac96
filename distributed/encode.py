"""Image encoding with Ray Data (`ray.data_encode=true`): decoding spreads over the cluster's CPUs, the frozen
encoder runs in an actor pool (one actor per GPU, or `ray.encode_actors` CPU actors), and the features land
in the same cache as the in-process path, kept in parts as they finish so a killed encode continues. Texts are
encoded by the driver (they are cheap next to images).

Runs before any Tune or Train work: Ray Data needs free CPUs, and trials that hold them starve it.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import ray
import torch

from repblend.distributed.cluster import ensure_ray, require_resources
from repblend.distributed.faults import die_once, forwarded
from repblend.pipeline import steps
from repblend.pipeline.config import Config
from repblend.stages import encode as encode_stage
from repblend.stages.errors import DataError
from repblend.stages.ingest import CaptionTable, load_image
from repblend.stages.io import read_part, write_tensors

log = logging.getLogger("repblend")

FAULT_ENV = "REPBLEND_FAULT_DECODE"  # "i:marker": the decode task holding image i dies once (tests)


def _decode(batch: dict[str, np.ndarray], *, transform, size: int) -> dict[str, np.ndarray]:
    """Decode + preprocess; a broken image becomes an error string (named later, in index order)."""
    die_once(FAULT_ENV, int(batch["index"][0]))
    pixels = np.zeros((len(batch["path"]), 3, size, size), dtype=np.float32)
    errors = []
    for row, path in enumerate(batch["path"]):
        try:
            pixels[row] = transform(load_image(str(path))).numpy()
            errors.append("")
        except DataError as exc:
            errors.append(str(exc))
        except Exception as exc:  # PIL raises many types for broken files
            errors.append(f"{path}: cannot decode image ({exc})")
    return {"index": batch["index"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class _ImageEncoderActor:
    """Holds the frozen encoder (built once per actor) and encodes the decodable rows of each batch."""

    def __init__(self, config: Config) -> None:
        self.device = steps.resolve_device(config.run.device)
        self.encoder = steps.build_image_encoder(config, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        features = np.zeros((len(ok), self.encoder.feature_dim), dtype=np.float32)
        if ok.any():
            x = torch.from_numpy(batch["pixels"][ok]).to(self.device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                features[ok] = self.encoder(x).float().cpu().numpy()
        return {"index": batch["index"], "features": features, "error": batch["error"]}


class _Parts:
    """The Ray Data encode's finished features, kept as parts of `CHUNK_IMAGES` consecutive images (`ray-images-*`,
    apart from the in-process encode's parts: other batches) as soon as all of a part's images have arrived, in
    whatever order Ray Data delivers them; a rerun reads back the parts made the same way and encodes the rest."""

    def __init__(self, keep: Path | None, n: int, made_by: dict[str, str]) -> None:
        self.keep, self.n, self.made_by = keep, n, made_by
        self.chunk = encode_stage.CHUNK_IMAGES
        self.starts = list(range(0, n, self.chunk))
        self.have = np.zeros(n, dtype=bool)  # by image: its features are here (a repeated row cannot count twice)
        self.kept: set[int] = set()  # the starts of the parts read back or written

    def _path(self, start: int) -> Path:
        return self.keep / f"ray-images-{start:09d}.safetensors"

    def done(self, i: int) -> bool:
        return bool(self.have[i])

    def read_back(self) -> tuple[np.ndarray | None, list[str]]:
        features, errors = None, [""] * self.n
        for start in self.starts if self.keep is not None else ():
            end = min(start + self.chunk, self.n)
            done = read_part(self._path(start), {**self.made_by, "images": str(end - start)})
            if done is None:
                continue
            part, meta = done[0]["features"].numpy(), done[1]
            if features is None:
                features = np.zeros((self.n, part.shape[1]), dtype=np.float32)
            features[start:end] = part
            for i, error in json.loads(meta["errors"]):
                errors[start + i] = error
            self.have[start:end] = True
            self.kept.add(start)
        return features, errors

    def arrived(self, indices: np.ndarray, features: np.ndarray, errors: list[str]) -> None:
        self.have[indices] = True
        for start in sorted({int(i) - int(i) % self.chunk for i in indices}):
            end = min(start + self.chunk, self.n)
            if self.keep is not None and start not in self.kept and self.have[start:end].all():
                bad = [[j - start, errors[j]] for j in range(start, end) if errors[j]]
                write_tensors(self._path(start), {"features": torch.from_numpy(features[start:end])},
                              metadata={**self.made_by, "images": str(end - start), "errors": json.dumps(bad)})
                self.kept.add(start)


def image_encoder_with_ray_data(config: Config):
    """An `encode_images_with` callable for `steps.encode` (Ray starts only when a split needs encoding)."""

    def encode(table: CaptionTable, split: str, keep: Path | None = None) -> tuple[torch.Tensor, list[int]]:
        ensure_ray(config.ray)
        preprocess = steps.build_image_encoder(config, torch.device("cpu")).preprocess
        gpus = ray.cluster_resources().get("GPU", 0)
        actors = config.ray.encode_actors or max(1, int(gpus))
        # each encoder actor holds a CPU (and a GPU where there are GPUs) for good, and decoding needs one more CPU:
        # short of that, the pool starts, decoding never does, and the dataset waits forever
        require_resources(config.ray, {"CPU": actors + 1, **({"GPU": actors} if gpus else {})},
                          f"Ray Data encoding with {actors} encoder actor{'s' * (actors > 1)} (one CPU"
                          f"{' and one GPU' if gpus else ''} each, and a CPU to decode)", "ray.encode_actors")
        n = len(table.records)
        parts = _Parts(keep, n, {"via": "ray data", "device": "cuda" if gpus else "cpu"})
        features, errors = parts.read_back()
        items = [{"index": i, "path": r.path} for i, r in enumerate(table.records) if not parts.done(i)]
        if items:
            batch_size = config.encoders.image_batch_size
            ds = ray.data.from_items(items)
            # a decode task whose worker dies is rerun (R3); the actor pool restarts dead actors on its own
            retry = {"max_retries": config.ray.max_retries}
            if forwarded(FAULT_ENV):
                retry["runtime_env"] = forwarded(FAULT_ENV)
            ds = ds.map_batches(_decode, fn_kwargs={"transform": preprocess.transform(),
                                                    "size": preprocess.image_size}, batch_size=batch_size, **retry)
            ds = ds.map_batches(_ImageEncoderActor, fn_constructor_kwargs={"config": config}, batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                if features is None:
                    features = np.zeros((n, batch["features"].shape[1]), dtype=np.float32)
                features[batch["index"]] = batch["features"]
                for i, error in zip(batch["index"], batch["error"]):
                    errors[int(i)] = str(error)
                parts.arrived(batch["index"], features, errors)
        bad = [(i, e) for i, e in enumerate(errors) if e]
        if bad and config.data.on_error == "stop":
            raise DataError(bad[0][1])
        for _, error in bad:
            warnings.warn(f"skipping image: {error}", stacklevel=2)
        kept = [i for i, e in enumerate(errors) if not e]
        if not kept:
            raise DataError(f"no image could be decoded ({n} tried)")
        log.info("encode %s: %d images through Ray Data (%d encoder actor(s)), %d of them read back from a killed "
                 "encode's parts", split, len(kept), actors, n - len(items))
        return torch.from_numpy(features[kept]), kept

    return encode


def images_encoder_for(config: Config):
    """What `steps.encode` should use for images: Ray Data when configured, else None (in-process)."""
    return image_encoder_with_ray_data(config) if config.ray.enabled and config.ray.data_encode else None
