"""Config-driven wrappers around the stages: each turns a `Config` into a stage call.

Stages take plain arguments and know nothing of the config tree; this module is the only place that
maps config keys onto stage arguments, so the CLI and the Ray glue share one translation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from repblend.pipeline.config import FIRST_DEFAULTS, Config, flat_keys, to_dict, to_yaml
from repblend.stages.encode import (EncoderIdentity, FeatureCache, cache_location, check_cache, encode_split,
                                   parts_dir)
from repblend.stages.errors import CacheError, ConfigError, DataError, RepblendError
from repblend.stages.ingest import CaptionTable, read_flickr8k, read_karpathy
from repblend.stages.progress import progress_bar

if TYPE_CHECKING:
    from repblend.pipeline.config import DistillConfig
    from repblend.stages.buffer import ExpertSettings
    from repblend.stages.distill import DistillSettings
    from repblend.stages.distiller import Distiller

log = logging.getLogger("repblend")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but no CUDA device is visible")
    return device


def load_table(config: Config) -> CaptionTable:
    """The whole dataset (all splits) in canonical form, with the validation hold-out applied."""
    table = _read_table(config)
    data = config.data
    if data.val_images:
        table = table.hold_out(data.train_split, data.val_images, seed=config.run.seed + 1, name=data.val_split)
    return table


def _read_table(config: Config) -> CaptionTable:
    data = config.data
    if not data.root:
        raise ConfigError("data.root is not set: pass data.root=/path/to/dataset")
    root = Path(data.root).expanduser()
    if data.format == "generated":
        from repblend.stages.toydata import ensure_toy_dataset

        gen = data.generated
        ensure_toy_dataset(root, n_train=gen.train_images, n_dev=gen.eval_images, size=gen.image_size, seed=gen.seed)
    elif data.format in ("flickr8k", "karpathy") and not root.is_dir():  # webdataset roots may be shard patterns
        raise DataError(f"data.root={data.root}: no such directory (pass data.root=/path/to/{data.name}, the folder "
                        "that holds its captions and images)")
    if data.format in ("flickr8k", "generated"):
        return read_flickr8k(root, images=data.images, captions=data.annotations or "Flickr8k.token.txt",
                             on_error=data.on_error)
    if data.format == "karpathy":
        if not data.annotations:
            raise ConfigError("data.annotations must name the Karpathy JSON (e.g. dataset_flickr30k.json)")
        json_path = Path(data.annotations)
        json_path = json_path if json_path.is_absolute() else root / json_path
        return read_karpathy(json_path, root / data.images, on_error=data.on_error)
    from repblend.stages.wds import read_webdataset  # webdataset is only needed for shards

    return read_webdataset(str(root), on_error=data.on_error)


def load_split(config: Config, table: CaptionTable, split: str) -> CaptionTable:
    """One split, subset as configured (seeded, so every stage sees the same images)."""
    part = table.split(split)
    limit = config.data.max_train_images if split == config.data.train_split else config.data.max_eval_images
    return part.subset(limit, seed=config.run.seed) if limit else part


def encoder_identity(config: Config) -> EncoderIdentity:
    enc = config.encoders
    return EncoderIdentity(
        image={"name": enc.image.name, "weights": enc.image.weights, "image_size": enc.image.image_size},
        text={"name": enc.text.name, "weights": enc.text.weights, "pooling": enc.text.pooling,
              "max_length": enc.text.max_length},
        dtype=config.cache.dtype,
    )


def build_encoders(config: Config, device: torch.device):
    return build_image_encoder(config, device), build_text_encoder(config, device)


def build_text_encoder(config: Config, device: torch.device):
    from repblend.stages.encoders import build_text_encoder as build

    enc = config.encoders.text
    torch.manual_seed(config.run.seed + 1)  # "random"/"tiny" encoders: the same in every run and process
    return build(enc.name, weights=enc.weights, pooling=enc.pooling, max_length=enc.max_length).to(device)


def build_image_encoder(config: Config, device: torch.device):
    """The image encoder alone: pixel-space distillation needs no text encoder once features are cached."""
    from repblend.stages.encoders import build_image_encoder as build

    enc = config.encoders.image
    torch.manual_seed(config.run.seed)
    return build(enc.name, weights=enc.weights, image_size=enc.image_size).to(device)


def encode(config: Config, splits: list[str] | None = None,
           encode_images_with: Callable[[CaptionTable, str, Path], tuple[torch.Tensor, list[int]]] | None = None
           ) -> dict[str, FeatureCache]:
    """Feature caches for the train and eval splits; splits whose cache exists are skipped.

    `encode_images_with(split_table, split, parts)` replaces the in-process image encoding (Ray Data does it there),
    keeping what it finishes under the folder `parts` so a killed encode can continue."""
    device = resolve_device(config.run.device)
    table = load_table(config)
    identity = encoder_identity(config)
    default_root = Path("runs") / "cache" / config.data.name
    splits = splits or [config.data.train_split, config.data.eval_split]
    caches, todo = {}, []
    for split in splits:
        part = load_split(config, table, split)
        fingerprint = part.fingerprint()  # stats every image file: compute once
        cache = cache_location(config.cache.dir, default_root, split, identity, fingerprint)
        if config.cache.overwrite or not check_cache(cache, identity, fingerprint):
            todo.append((split, part, cache, fingerprint))
        else:
            log.info("encode %s: cache is up to date (%s), skipped", split, cache.tensors_path)
        caches[split] = cache
    if todo:
        enc = config.encoders
        image_encoder = None if encode_images_with else build_image_encoder(config, device)
        text_encoder = build_text_encoder(config, device)
        for split, part, cache, fingerprint in todo:
            start = time.perf_counter()
            keep = parts_dir(cache, identity, fingerprint)
            image_features = encode_images_with(part, split, keep) if encode_images_with else None
            encode_split(part, split, cache, identity, image_encoder, text_encoder, fingerprint=fingerprint,
                         image_batch_size=enc.image_batch_size, text_batch_size=enc.text_batch_size,
                         num_workers=enc.num_workers, device=device, on_error=config.data.on_error,
                         progress=config.run.progress, progress_every=config.run.progress_every,
                         image_features=image_features)
            log.info("encode %s: %d images, %d captions in %.1f s -> %s", split, len(part), part.num_captions,
                     time.perf_counter() - start, cache.tensors_path)
    return caches


def check_budget(config: Config, caches: dict[str, FeatureCache]) -> None:
    """Fail before any training if the synthetic set cannot be initialised from the training images."""
    available = caches[config.data.train_split].manifest()["num_images"]
    if config.distill.num_queries > available:
        raise ConfigError(f"distill.num_queries={config.distill.num_queries} exceeds the {available} training "
                          f"images of split '{config.data.train_split}'")


# buffer ---------------------------------------------------------------------------------------------------

_LOADED: dict[tuple, object] = {}


def load_features(caches: dict[str, FeatureCache], split: str, device: torch.device):
    """Cached features as float32 on `device`; kept per process, since every expert of a buffer reads them."""
    cache = caches[split]
    key = (str(cache.tensors_path), cache.tensors_path.stat().st_mtime_ns, str(device))
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = cache.load(dtype=torch.float32, device=device)
    return _LOADED[key]


def expert_settings(config: Config) -> ExpertSettings:
    from repblend.stages.buffer import ExpertSettings

    needed = config.distill.max_start_epoch + config.distill.expert_epochs
    if needed > config.buffer.train_epochs:
        raise ConfigError(f"distill.max_start_epoch + distill.expert_epochs = {needed} exceeds "
                          f"buffer.train_epochs={config.buffer.train_epochs}")
    keep = None if config.buffer.save_all_epochs else tuple(range(needed + 1))
    return ExpertSettings(embed_dim=config.model.embed_dim, dropout=config.model.dropout,
                          temperature=config.model.temperature, epochs=config.buffer.train_epochs,
                          lr_img=config.buffer.lr_teacher_img, lr_txt=config.buffer.lr_teacher_txt,
                          momentum=config.buffer.momentum, weight_decay=config.buffer.weight_decay,
                          batch_size=config.buffer.batch_size, keep_epochs=keep)


def buffer_dir_of(config: Config, run_dir: Path) -> Path:
    return Path(config.buffer.dir).expanduser() if config.buffer.dir else run_dir / "buffer"


def _buffer_identity(config: Config, caches: dict[str, FeatureCache]) -> dict:
    """What the experts depend on; a buffer built under another identity must not be mixed with this one."""
    settings = dataclasses.asdict(expert_settings(config))
    settings.pop("keep_epochs")  # checked per expert: a buffer keeping more epochs serves this run too
    fingerprint = caches[config.data.train_split].manifest()["inputs_fingerprint"]
    identity = {"settings": settings, "seed": config.run.seed, "features": encoder_identity(config).key(fingerprint)}
    if config.distill.mode == "lors":  # encoder experts; head buffers keep the identity they always had
        identity["mode"] = "lors"
    elif config.buffer.batch_experts > 1:  # other dropout masks than one-at-a-time experts, whatever the group size
        identity["dropout_masks"] = "per expert"
    return identity


def _check_buffer_identity(buffer_dir: Path, identity: dict) -> None:
    index_path = buffer_dir / "index.json"
    if not index_path.is_file():
        return
    recorded = json.loads(index_path.read_text()).get("identity")
    keys = [key for key, _, _ in differing_keys(recorded, identity)] if recorded is not None else []
    if keys:
        raise ConfigError(f"{buffer_dir} holds experts built with different {', '.join(keys)}: point buffer.dir "
                          "at another folder, or delete this one to rebuild it")


def missing_experts(config: Config, buffer_dir: Path) -> list[int]:
    """Experts not on disk yet, or on disk without the snapshots this config needs (those are deleted)."""
    from repblend.stages.buffer import expert_path, trajectory_meta

    settings = expert_settings(config)
    needed = set(settings.keep_epochs or range(settings.epochs + 1))
    todo = []
    for k in range(config.buffer.num_experts):
        path = expert_path(buffer_dir, k)
        if path.is_file() and not needed <= set(trajectory_meta(path).get("epochs", [])):
            log.info("expert %d: %s lacks snapshots this config needs; retraining it", k, path)
            path.unlink()
        if not path.is_file():  # experts already on disk are kept: a killed buffer resumes where it stopped
            todo.append(k)
    return todo


def expert_groups(config: Config, todo: list[int]) -> list[list[int]]:
    """The experts trained together: `buffer.batch_experts` at a time (LoRS's encoder experts one by one)."""
    size = 1 if config.distill.mode == "lors" else config.buffer.batch_experts
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def train_expert_files(config: Config, buffer_dir: Path, group: list[int], caches: dict[str, FeatureCache]
                       ) -> list[Path]:
    """Train a group of experts (expert_groups), measure each one's eval recall and save it; one unit of work for a
    process or a Ray task."""
    from repblend.stages.buffer import expert_path, heads_at, save_trajectory, train_expert, train_experts
    from repblend.stages.evaluate import retrieval_of

    device = resolve_device(config.run.device)
    settings = expert_settings(config)
    train = load_features(caches, config.data.train_split, device)
    evalset = load_features(caches, config.data.eval_split, device)
    seeds = [config.run.seed * 10_000 + k for k in group]
    backbone, img_dim = None, train.image_features.shape[1]
    train_images, eval_images = train.image_features, evalset.image_features
    if config.distill.mode == "lors":  # the expert trains the image encoder itself, on pixels
        encoder = build_image_encoder(config, device)
        backbone, img_dim = encoder.backbone, encoder.feature_dim
        train_images = split_pixels(config, caches, config.data.train_split, encoder)
        eval_images = split_pixels(config, caches, config.data.eval_split, encoder)
    if config.distill.mode != "lors" and config.buffer.batch_experts > 1:
        trajs = train_experts(train_images, train.text_features, train.caption_to_image, settings, seeds, device)
    else:
        (seed,) = seeds

        def progress(total_steps: int):  # an encoder expert: minutes an epoch on a CPU (head experts: seconds)
            return progress_bar(total_steps, desc=f"buffer: LoRS expert {group[0]} training", unit="step",
                                enabled=config.run.progress, every=config.run.progress_every)

        trajs = [train_expert(train_images, train.text_features, train.caption_to_image, settings, seed, device,
                              encoder=backbone, feature_dim=img_dim,
                              progress=None if backbone is None else progress)]
    paths = []
    for k, seed, traj in zip(group, seeds, trajs):
        last = max(traj.image)
        heads = heads_at(traj, last, settings, img_dim, train.text_features.shape[1], encoder=backbone).to(device)
        recall = retrieval_of(heads, eval_images, evalset.text_features, evalset.caption_to_image, device)
        paths.append(expert_path(buffer_dir, k))
        save_trajectory(paths[-1], traj, {"seed": seed, "epochs": sorted(traj.image), "eval_recall": recall})
    return paths


def log_experts_done(config: Config, group: list[int], paths: list[Path], done: int, total: int) -> None:
    """One line per finished expert with its eval recall (`done` of `total` counts the group's last), written where
    the experts are collected (the driver, for Ray tasks): a broken buffer shows, in order, and Ray's log dedup
    cannot fold the lines of several experts into one."""
    from repblend.stages.buffer import trajectory_meta

    for offset, (k, path) in enumerate(zip(group, paths)):
        meta = trajectory_meta(path)
        recall = meta["eval_recall"]
        log.info("buffer: expert %d done (%d/%d), seed %d, epoch %d %s r_mean %.2f  img_r10 %.2f  txt_r10 %.2f", k,
                 done - len(group) + 1 + offset, total, meta["seed"], max(meta["epochs"]), config.data.eval_split,
                 recall["r_mean"], recall["img_r10"], recall["txt_r10"])


def buffer(config: Config, run_dir: Path, caches: dict[str, FeatureCache],
           run_experts: Callable[[list[int]], None] | None = None) -> Path:
    """Train the missing experts (in this process, or through `run_experts`, e.g. Ray tasks) and index them."""
    from repblend.stages.buffer import expert_path, trajectory_meta, write_index

    buffer_dir = buffer_dir_of(config, run_dir)
    identity = _buffer_identity(config, caches)
    _check_buffer_identity(buffer_dir, identity)
    todo = missing_experts(config, buffer_dir)
    if run_experts is not None and todo:
        run_experts(todo)
    else:
        for group in expert_groups(config, todo):
            paths = train_expert_files(config, buffer_dir, group, caches)
            log_experts_done(config, group, paths, todo.index(group[-1]) + 1, len(todo))
    experts = [{"path": expert_path(buffer_dir, k).name, **trajectory_meta(expert_path(buffer_dir, k))}
               for k in range(config.buffer.num_experts)]
    write_index(buffer_dir, {"experts": experts, "identity": identity,
                             "settings": dataclasses.asdict(expert_settings(config))})
    return buffer_dir


# distill --------------------------------------------------------------------------------------------------

def initial_pairs(train, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N distinct real training images and one random caption of each (seeded): the synthetic set's start."""
    generator = torch.Generator().manual_seed(seed)
    image_idx = torch.randperm(train.num_images, generator=generator)[:n].sort().values
    c2i = train.caption_to_image.cpu()
    caption_idx = []
    for i in image_idx.tolist():
        options = (c2i == i).nonzero().flatten()
        caption_idx.append(int(options[torch.randint(len(options), (1,), generator=generator)]))
    return image_idx, torch.tensor(caption_idx, dtype=torch.long)


def pixels_of(config: Config, ids: list[str], image_encoder, split: str | None = None) -> torch.Tensor:
    """Pixels of a split's images (default: train) found by image id in the dataset as it is now: the cache
    may have been built on another machine, where the images lived elsewhere."""
    from repblend.stages.errors import DataError
    from repblend.stages.ingest import load_image

    split = split or config.data.train_split
    current = {r.image_id: r.path for r in load_table(config).split(split).records}
    missing = [i for i in ids if i not in current]
    if missing:
        raise DataError(f"{config.data.root}: {len(missing)} image(s) of the feature cache are not in split "
                        f"'{split}' (first: {missing[0]}); the cache was built from other data")
    transform = image_encoder.preprocess.transform()
    pixels = []
    with progress_bar(len(ids), desc=f"pixels {split}", unit="img", enabled=len(ids) >= 500 and config.run.progress,
                      every=config.run.progress_every) as bar:
        for i in ids:
            pixels.append(transform(load_image(current[i])))
            bar.update()
    return torch.stack(pixels)


_PIXELS: dict[tuple, torch.Tensor] = {}


def split_pixels(config: Config, caches: dict[str, FeatureCache], split: str, image_encoder) -> torch.Tensor:
    """Pixels of every image of a split in cache order, kept per process: the LoRS mode trains and evaluates
    the image encoder itself, so its experts and evaluation read pixels, not cached features."""
    cache = caches[split]
    key = (str(cache.tensors_path), cache.tensors_path.stat().st_mtime_ns, config.encoders.image.image_size)
    if key not in _PIXELS:
        if len(_PIXELS) >= 2:
            _PIXELS.pop(next(iter(_PIXELS)))
        _PIXELS[key] = pixels_of(config, load_features(caches, split, torch.device("cpu")).image_ids, image_encoder,
                                 split)
    return _PIXELS[key]


@dataclasses.dataclass
class DistillJob:
    """What one distillation process holds: the distiller, the encoder (pixel space) and the initial pairs."""

    distiller: Distiller
    encoder: torch.nn.Module | None
    image_idx: torch.Tensor
    caption_idx: torch.Tensor


def lors_baseline(config: Config) -> Config | None:
    """The config of the LoRS row of a RepBlend run (distilled in <run>/lors): the same data, encoders and
    hyperparameters, asymmetric matching and no blending. None when the run has no such row."""
    if config.distill.mode != "repblend" or config.distill.space != "pixel" or "lors" not in config.eval.methods:
        return None
    buffer_dir = f"{config.buffer.dir.rstrip('/')}-lors" if config.buffer.dir else ""
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, mode="lors"),
                               blend=dataclasses.replace(config.blend, enabled=False),
                               buffer=dataclasses.replace(config.buffer, dir=buffer_dir))


def synthetic_path(run_dir: Path) -> Path:
    return run_dir / "distill" / "synthetic.safetensors"


def refined_path(run_dir: Path) -> Path:
    """The matched set refined through the evaluation protocol (refine.enabled, pipeline/refinement.py)."""
    return run_dir / "refine" / "synthetic.safetensors"


def final_path(config: Config, run_dir: Path) -> Path:
    """The run's distilled set: the refined one when refine.enabled, else the matched one."""
    return refined_path(run_dir) if config.refine.enabled else synthetic_path(run_dir)


def encoder_range(train) -> tuple[float, float]:
    """The range of the cached real image features: what the frozen encoder produces (distill.clamp_features keeps a
    feature set inside it, so that invert can reach it)."""
    return float(train.image_features.min()), float(train.image_features.max())


def inverted_path(run_dir: Path) -> Path:
    """The feature set's images (invert.enabled, pipeline/inversion.py)."""
    return run_dir / "invert" / "synthetic.safetensors"


# distill settings a run may change and still continue its set: its length, checkpoints and probes, and how the same
# function is computed. Every other distill, blend and model key, the seed, the experts and the training data make
# another set
RESUMABLE_DISTILL_KEYS = ("iterations", "ckpt_every", "eval_every", "compile", "compile_mode", "compile_scope",
                          "student", "encode_chunk")
SET_DATA_KEYS = ("name", "format", "generated", "annotations", "train_split", "max_train_images", "val_images")


def distill_identity(config: Config) -> dict:
    """What a distilled set depends on, from the config alone (so a command can check it before it writes anything),
    as JSON (lists, not tuples): RUN_DIR/distill/identity.json."""
    settings = to_dict(config)
    experts = dataclasses.asdict(expert_settings(config))
    experts.pop("keep_epochs")  # which snapshots are kept, not what they are
    identity = {"distill": {k: v for k, v in settings["distill"].items() if k not in RESUMABLE_DISTILL_KEYS},
                "blend": settings["blend"], "model": settings["model"], "seed": config.run.seed,
                "experts": {"count": config.buffer.num_experts, **experts},
                "data": {k: settings["data"][k] for k in SET_DATA_KEYS},
                "features": dataclasses.asdict(encoder_identity(config))}
    return json.loads(json.dumps(identity))


def tune_identity(config: Config) -> dict:
    """What a `repblend tune` search depends on: its set's settings, the search's and the split it selects on (not
    the resources its trials get)."""
    search = {k: v for k, v in to_dict(config)["tune"].items()
              if k not in ("max_concurrent_trials", "trial_cpus", "trial_gpus")}
    select = {"val_split": config.data.val_split, "max_eval_images": config.data.max_eval_images}
    return {**distill_identity(config), "tune": search, "select": select}


def claim_tune_dir(config: Config, run_dir: Path, *, record: bool = True) -> None:
    """`claim_distill_dir` for a search: Ray Tune would restore the old search, whatever the config says now."""
    claim_dir(run_dir / "tune_identity.json", tune_identity(config), "a search", record=record)


@functools.cache
def _absent_means() -> dict:
    """What a record lacking a config key was made with, dotted, as an identity records it (JSON: lists, not tuples):
    the setting's default, or its first default where that has changed since (config.FIRST_DEFAULTS)."""
    return {**flat_keys(json.loads(json.dumps(to_dict(Config())))), **FIRST_DEFAULTS}


def differing_keys(recorded: dict, now: dict) -> list[tuple[str, object, object]]:
    """(dotted key, recorded value, value now) wherever two identities differ: what a refusal names. A config key the
    record lacks is a setting repblend gained after the record was written, and the record was made with that
    setting's (first) default: no difference while the value now is that default (so a run directory outlives an
    upgrade), and the default is what a refusal names as the recorded value."""
    after = flat_keys(now)
    before = {**{k: v for k, v in _absent_means().items() if k in after}, **flat_keys(recorded)}
    return [(key, before.get(key), after.get(key)) for key in sorted({*before, *after})
            if before.get(key) != after.get(key)]


def claim_distill_dir(config: Config, run_dir: Path, *, record: bool = True) -> None:
    """Refuse to continue, call complete or evaluate a set or checkpoint that other settings made: the run's
    config.yaml would then describe a set it did not make. With `record`, a first distillation writes what it
    depends on; without, this only checks (the CLI, before it writes the run's config.yaml)."""
    path = run_dir / "distill" / "identity.json"
    recorded = None if path.is_file() else _identity_of_saved_set(run_dir)
    claim_dir(path, distill_identity(config), "a set distilled", recorded=recorded, record=record)


def claim_dir(path: Path, identity: dict, made: str, *, recorded: dict | None = None, record: bool = True) -> None:
    """The check behind `claim_distill_dir` (and tune's): `path` (an identity.json) or `recorded` says what the work in
    its folder depends on; other settings now are a `ConfigError` naming the keys that differ."""
    from repblend.stages.io import read_json, write_json

    recorded = read_json(path) if path.is_file() else recorded
    if recorded is not None:
        differ = [f"{key} {there!r} there, {here!r} here" for key, there, here in differing_keys(recorded, identity)]
        if differ:
            shown = "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
            raise ConfigError(f"{path.parent} holds {made} with other settings ({shown}): pass another --run-dir, "
                              "or move that folder away to start again")
    if record and not path.is_file():
        write_json(path, identity)


def _identity_of_saved_set(run_dir: Path) -> dict | None:
    """For a run directory from before identity.json: what its saved set's own config says it depends on."""
    from repblend.pipeline.config import config_from_yaml
    from repblend.stages.io import tensors_metadata

    path = synthetic_path(run_dir)
    made_with = tensors_metadata(path).get("config") if path.is_file() else None
    if made_with is None:
        return None
    try:
        return distill_identity(config_from_yaml(made_with, str(path)))
    except RepblendError:  # a config of an older schema: nothing to compare with
        return None


def distill_is_complete(config: Config, run_dir: Path) -> bool:
    path = synthetic_path(run_dir)
    if path.is_file() and _saved_iterations(path) == config.distill.iterations:
        log.info("distill: %s is complete (%d iterations), skipped", path, config.distill.iterations)
        return True
    return False


def build_distiller(config: Config, run_dir: Path, caches: dict[str, FeatureCache], device: torch.device, *,
                    rank: int = 0, mean_across_workers=None) -> DistillJob:
    """The synthetic set initialised from real pairs, the experts in memory, the outer optimiser."""
    from repblend.stages.buffer import head_specs, load_trajectory
    from repblend.stages.distill import DistillSettings, SyntheticSet
    from repblend.stages.distiller import Distiller, OuterSettings, RewindSettings
    from repblend.stages.lors import lors_specs

    dc = config.distill
    train = load_features(caches, config.data.train_split, device)
    buffer_dir = buffer_dir_of(config, run_dir)
    index = json.loads((buffer_dir / "index.json").read_text())
    trajectories = [load_trajectory(buffer_dir / e["path"]) for e in index["experts"]]
    image_idx, caption_idx = initial_pairs(train, dc.num_queries, config.run.seed)
    encoder = None
    specs = head_specs(train.image_features.shape[1], train.text_features.shape[1], expert_settings(config))
    if dc.space == "pixel":
        encoder = build_image_encoder(config, device)
        cached_dim = train.image_features.shape[1]
        if dc.mode == "lors":  # the student's image side is the encoder itself (stages/lors.py)
            specs = lors_specs(encoder.backbone, train.text_features.shape[1], encoder.feature_dim,
                               config.model.dropout)
        if encoder.feature_dim != cached_dim:
            raise CacheError(f"{caches[config.data.train_split].manifest_path}: cached image features are "
                             f"{cached_dim}-d but encoders.image {config.encoders.image.name!r} gives "
                             f"{encoder.feature_dim}-d (weights changed under the same path?); use "
                             "cache.overwrite=true")
        images = pixels_of(config, [train.image_ids[i] for i in image_idx.tolist()], encoder)
        if dc.pix_init == "noise":
            images = torch.randn(images.shape, generator=torch.Generator().manual_seed(config.run.seed))
    else:
        images = train.image_features[image_idx]
    texts = train.text_features[caption_idx]
    syn = SyntheticSet(images, texts, sim_type=dc.sim_type, sim_rank=dc.sim_rank, sim_alpha=dc.sim_alpha,
                       lr_init=dc.lr_teacher, generator=torch.Generator().manual_seed(config.run.seed))
    for spec, side in zip(specs, ("image", "text")):
        if getattr(trajectories[0], side)[0].numel() != spec.num_params:
            raise ConfigError(f"{buffer_dir}: the experts' {side} side has {getattr(trajectories[0], side)[0].numel()} "
                              f"parameters, distill.mode={dc.mode} needs {spec.num_params}; the buffer was built for "
                              "another mode or model (point buffer.dir elsewhere)")
    settings = DistillSettings(syn_steps=dc.syn_steps, expert_epochs=dc.expert_epochs,
                               max_start_epoch=dc.max_start_epoch, mini_batch_size=dc.mini_batch_size,
                               temperature=config.model.temperature, loss=dc.loss,
                               merge_loss_branches=dc.merge_loss_branches, grad_mode=dc.grad_mode,
                               blend=config.blend.enabled, beta_a=config.blend.beta_a, beta_b=config.blend.beta_b,
                               noise=config.blend.noise,
                               encode_chunk=dc.encode_chunk, student=student_form(dc, device))
    outer = OuterSettings(lr_img=dc.lr_img, lr_txt=dc.lr_txt, lr_lr=dc.lr_lr, lr_sim=dc.lr_sim, momentum=dc.momentum,
                          optimizer=dc.optimizer, lr_floor=dc.lr_floor,
                          syn_lr_max=(dc.syn_lr_img_max, dc.syn_lr_txt_max), grad_clip=dc.grad_clip,
                          image_range=encoder_range(train) if dc.clamp_features else None)
    rewind = RewindSettings(loss=dc.rewind_loss, patience=dc.rewind_patience, every=dc.rewind_every,
                            backoff=dc.rewind_backoff, max_rewinds=dc.rewind_max)
    distiller = Distiller(syn, trajectories, specs, settings, outer, seed=config.run.seed,
                          image_encoder=encoder if dc.mode == "repblend" else None,  # LoRS: pixels go to the student
                          device=device, rank=rank, mean_across_workers=mean_across_workers,
                          compile=compile_mode(dc, specs, settings), compile_scope=dc.compile_scope, rewind=rewind)
    return DistillJob(distiller, encoder, image_idx, caption_idx)


def student_form(dc: DistillConfig, device: torch.device) -> str:
    """distill.student resolved: `auto` factors RepBlend's exact unroll on a CPU, where it was measured faster."""
    if dc.student != "auto":
        return dc.student
    return "factored" if device.type == "cpu" and dc.grad_mode == "unroll" and dc.mode == "repblend" else "flat"


def log_plan(config: Config, distiller: Distiller) -> None:
    """One line on what the distillation runs, `auto` choices resolved: the first line of a long run says it."""
    dc, settings = config.distill, distiller.settings
    gradient = ("TESLA's two passes" if settings.grad_mode == "tesla" else
                "exact unroll, compiled" if distiller.compile is not None else
                f"exact unroll, {settings.student} student heads")
    log.info("distill: %d pairs in %s space (%s mode), %d iterations of %d student steps of %d on %s; %s",
             distiller.syn.num_pairs, dc.space, dc.mode, dc.iterations, settings.syn_steps, settings.mini_batch_size,
             distiller.device, gradient)


def compile_mode(dc: DistillConfig, specs, settings: DistillSettings) -> str | None:
    """The torch.compile mode the distiller gets: None where distill.compile is off or does not apply."""
    from repblend.stages.fused import unsupported

    if not dc.compile:
        return None
    reason = unsupported(specs, settings)
    if reason is not None:
        log.info("distill.compile does not apply here (%s): the eager loop runs", reason)
        return None
    log.info("distill: torch.compile (mode %s, one graph per %s); the first iteration compiles", dc.compile_mode,
             "student step" if dc.compile_scope == "step" else "student unroll")
    return dc.compile_mode


def open_metrics(path: Path, iteration: int):
    """metrics.jsonl for appending, without the rows a killed run wrote after its last checkpoint (they are
    about to be recomputed), so every iteration appears once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
        path.write_text("".join(row + "\n" for row in rows))
    return path.open("a")


def _tensorboard(log_dir: Path) -> Callable[[dict], None]:
    """Mirrors each metrics.jsonl row into TensorBoard scalars (`tensorboard --logdir RUN_DIR`)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))

    def write(record: dict) -> None:
        step = record["iteration"]
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)):
                writer.add_scalar(f"distill/{key}", value, step)
        for key, value in record.get("eval", {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"eval/{key}", value, step)
        for key, value in record.get("eval", {}).get("diagnostics", {}).items():
            writer.add_scalar(f"collapse/{key}", value, step)
        writer.flush()

    return write


def step_logger(config: Config, caches: dict[str, FeatureCache], job: DistillJob, metrics, *,
                probe_split: str | None = None, on_eval: Callable[[int, dict], None] | None = None):
    """The per-iteration callback: metrics.jsonl, progress bar, and the eval probe every distill.eval_every."""
    dc = config.distill
    device = job.distiller.device
    bar = progress_bar(dc.iterations, initial=job.distiller.iteration, desc="distill", unit="it",
                       enabled=config.run.progress, every=config.run.progress_every)
    probe_split = probe_split or config.data.eval_split
    probe = _eval_probe(config, caches, probe_split, job.encoder, device) if dc.eval_every else None
    board = _tensorboard(Path(metrics.name).parent / "tensorboard") if config.run.tensorboard else None

    def on_step(step) -> None:
        record = dict(step.__dict__)
        if step.guard:
            log.warning("distill it %d: matching loss spike (image %.4f, text %.4f > distill.rewind_loss): %s",
                        step.iteration, step.loss_img, step.loss_txt, step.guard)
        if probe is not None and step.iteration % dc.eval_every == 0:
            record["eval"] = {"split": probe_split, **probe(job.distiller.syn)}
            log.info("distill it %d: %s img_r10 %.2f txt_r10 %.2f r_mean %.2f (1 seed)", step.iteration,
                     probe_split, record["eval"]["img_r10"], record["eval"]["txt_r10"], record["eval"]["r_mean"])
            if on_eval is not None:
                on_eval(step.iteration, record["eval"])
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if board is not None:
            board(record)
        bar.set_postfix(loss=f"{step.loss:.4f}", lr_img=f"{step.syn_lr_img:.4f}")
        bar.update(1)
        if step.iteration == dc.iterations:
            bar.close()

    return on_step


def save_synthetic(config: Config, run_dir: Path, job: DistillJob) -> Path:
    from repblend.stages.io import write_tensors

    syn = job.distiller.syn
    features = _image_features(syn, job.encoder)
    tensors = {"images": syn.images, "image_features": features.float(), "texts": syn.texts,
               "similarity": syn.sim.full().detach(), "syn_lr_img": syn.syn_lr_img.detach().reshape(1),
               "syn_lr_txt": syn.syn_lr_txt.detach().reshape(1), "init_image_index": job.image_idx,
               "init_caption_index": job.caption_idx}
    dc = config.distill
    meta = {"space": dc.space, "mode": dc.mode, "iterations": str(job.distiller.iteration),
            "seed": str(config.run.seed), "image_encoder": config.encoders.image.name,
            "text_encoder": config.encoders.text.name, "config": to_yaml(config)}
    path = synthetic_path(run_dir)
    write_tensors(path, tensors, metadata=meta)
    return path


def distill(config: Config, run_dir: Path, caches: dict[str, FeatureCache], *, probe_split: str | None = None,
            on_eval: Callable[[int, dict], None] | None = None) -> Path:
    """Distil the synthetic set in this process (resuming from the run's checkpoint); save it as safetensors.

    With distill.eval_every, the set is evaluated on `probe_split` (default: the eval split) every N
    iterations, logged, and passed to `on_eval(iteration, metrics)` (Tune reports from there)."""
    check_budget(config, caches)
    claim_distill_dir(config, run_dir, record=False)
    if distill_is_complete(config, run_dir):
        return synthetic_path(run_dir)
    job = build_distiller(config, run_dir, caches, resolve_device(config.run.device))
    log_plan(config, job.distiller)
    out_dir = run_dir / "distill"
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_distill_dir(config, run_dir)  # recorded once the settings built a distiller: a bad value is not kept
    checkpoint = out_dir / "checkpoint.pt"
    if job.distiller.resume(checkpoint):
        log.info("distill: resuming from iteration %d (%s)", job.distiller.iteration, checkpoint)
    with open_metrics(out_dir / "metrics.jsonl", job.distiller.iteration) as metrics:
        on_step = step_logger(config, caches, job, metrics, probe_split=probe_split, on_eval=on_eval)
        job.distiller.run(config.distill.iterations, checkpoint=checkpoint, ckpt_every=config.distill.ckpt_every,
                          on_step=on_step)
    return save_synthetic(config, run_dir, job)


def export(config: Config, run_dir: Path, caches: dict[str, FeatureCache]) -> Path:
    """run_dir/export: the distilled set's safetensors (with its config) and WebDataset shards to publish (the refined
    set with refine.enabled); with invert.enabled, its images in run_dir/export/pixels the same way."""
    out = run_dir / "export"
    _export_set(config, caches, final_path(config, run_dir), out)
    if config.invert.enabled and inverted_path(run_dir).is_file():
        _export_set(config, caches, inverted_path(run_dir), out / "pixels")
    return out


def _export_set(config: Config, caches: dict[str, FeatureCache], source: Path, out: Path) -> None:
    import shutil

    from repblend.stages.export import load_distilled, shard_samples
    from repblend.stages.io import atomic_path
    from repblend.stages.wds import write_samples

    distilled = load_distilled(source)
    cpu = torch.device("cpu")
    train = load_features(caches, config.data.train_split, cpu)
    denormalize = build_image_encoder(config, cpu).preprocess.denormalize if distilled.pixel_space else None
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "synthetic.safetensors") as tmp:
        shutil.copyfile(source, tmp)
    init_ids = [train.image_ids[i] for i in distilled.init_image_index.tolist()]
    shards = write_samples(shard_samples(distilled, train.captions, train.text_features, denormalize,
                                         k=config.export.nearest_captions, init_image_ids=init_ids),
                           out / "shards", shard_size=config.export.shard_size, prefix="distilled")
    log.info("export: %d pairs -> %s and %d shard(s) in %s", distilled.num_pairs, out / "synthetic.safetensors",
             len(shards), out / "shards")


def _image_features(syn, encoder) -> torch.Tensor:
    """The synthetic image side in feature space, as evaluation will see it."""
    with torch.inference_mode():
        return (syn.images.clone() if encoder is None else encoder(syn.images)).float()


def _eval_probe(config: Config, caches: dict[str, FeatureCache], split: str, encoder, device: torch.device):
    """Recall of the set as it stands (one seed) on `split`: a learning curve, or Tune's score on val."""
    from repblend.pipeline.evaluation import eval_seeds, protocol, train_settings
    from repblend.stages.evaluate import METRICS, evaluate_pairs

    measure = protocol(config, caches, split, device)
    settings, seed = train_settings(config), eval_seeds(config)[:1]

    def probe(syn) -> dict:
        images = syn.images.detach() if measure.model is not None else _image_features(syn, encoder)
        pairs = measure.synthetic_pairs(images, syn.texts.detach(), syn.sim.full().detach(), syn.syn_lr_img.detach(),
                                        syn.syn_lr_txt.detach())
        result = evaluate_pairs(pairs, settings, measure.eval_features, seed, device, diagnose=True,
                                model=measure.model)
        if result.get("diverged_seeds"):  # heads trained on this set diverged: it scores nothing (Tune stops it)
            log.warning("distill: heads trained on the current set diverged; its %s recall counts as 0", split)
            return {k: 0.0 for k in METRICS} | {"diverged": True}
        diagnostics = result.pop("diagnostics")  # collapse over iterations (issue: RepBlend's concentration curve)
        return ({k: round(v["mean"], 2) for k, v in result.items()}
                | {"diagnostics": {k: round(v["mean"], 4) for k, v in diagnostics.items()}})

    return probe


def _saved_iterations(path: Path) -> int:
    from repblend.stages.io import tensors_metadata

    return int(tensors_metadata(path).get("iterations", -1))
