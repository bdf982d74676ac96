"""Evaluation step: every row of the results table (distilled set, its initialisation, coresets, full data)
trained and measured under one protocol, written as results.json and results.md."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from repblend.pipeline.config import Config
from repblend.pipeline.evalrows import KeptRows, log_row
from repblend.pipeline.steps import (build_image_encoder, buffer_dir_of, final_path, inverted_path, load_features,
                                     lors_baseline, resolve_device, split_pixels, synthetic_path)
from repblend.stages.coresets import herding_coreset, kcenter_coreset, random_coreset
from repblend.stages.encode import FeatureCache
from repblend.stages.export import DistilledSet, load_distilled
from repblend.stages.ebr import EBRSettings
from repblend.stages.errors import DataError
from repblend.stages.diagnostics import DIAGNOSTICS
from repblend.stages.evaluate import (METRICS, PairSet, TrainSettings, evaluate_pairs, evaluate_seeds,
                                      scored_retrieval, summarize_seeds, train_heads)
from repblend.stages.io import file_digest, read_json, write_json, write_text
from repblend.stages.progress import progress_bar

INVERTED = "repblend_pixels"  # the results row of the feature set inverted to images (invert.enabled)
MATCHED = "repblend_matched"  # with refine.enabled: the row of the set as trajectory matching left it

log = logging.getLogger("repblend")


def train_settings(config: Config, **changes) -> TrainSettings:
    ec = config.eval
    base = TrainSettings(embed_dim=config.model.embed_dim, dropout=config.model.dropout,
                         temperature=config.model.temperature, epochs=ec.epochs, momentum=ec.momentum,
                         weight_decay=ec.weight_decay, batch_size=ec.batch_size, loss=ec.loss,
                         ebr=ebr_settings(config, "eval"))
    return dataclasses.replace(base, **changes)


def fine_tunes_encoder(config: Config) -> bool:
    """LoRS sets are evaluated by fine-tuning the image encoder (the references' protocol), all others on heads."""
    return config.distill.mode == "lors"


def real_pairs_loss(config: Config, fine_tunes: bool) -> str:
    """The loss sets of real pairs train with: they have no learned similarity to match (eval.real_loss)."""
    if config.eval.real_loss != "auto":
        return config.eval.real_loss
    return "wbce" if fine_tunes else "clip"


def ebr_settings(config: Config, training: str) -> EBRSettings | None:
    """EBR for one kind of training (config ebr.apply_to), or None: then that training is exactly the plain one."""
    ebr = config.ebr
    if not ebr.enabled or training not in ebr.apply_to:
        return None
    return EBRSettings(alpha=ebr.alpha, hidden=ebr.hidden, shared_dim=ebr.shared_dim, interleave=ebr.interleave,
                       lr_scale=ebr.lr_scale, residual=ebr.residual)


def _real_pairs(train, caption_idx: torch.Tensor, lr: float) -> PairSet:
    return PairSet(train.image_features[train.caption_to_image[caption_idx]], train.text_features[caption_idx],
                   None, lr, lr)


def _coresets(method: str, train, n: int, seeds: list[int]) -> list[torch.Tensor]:
    """Caption indices of an n-pair coreset per evaluation seed; pairs are (caption, its image) as in training.
    Random draws a new set per seed, k-center a new first centre; herding is deterministic, so computed once."""
    if method == "random":
        return [random_coreset(train.text_features.shape[0], n, seed) for seed in seeds]
    pair_features = torch.cat([F.normalize(train.image_features[train.caption_to_image], dim=-1),
                               F.normalize(train.text_features, dim=-1)], dim=1)
    if method == "herding":
        return [herding_coreset(pair_features, n)] * len(seeds)
    return [kcenter_coreset(pair_features, n, seed) for seed in seeds]


def full_settings(config: Config) -> TrainSettings:
    """How the full-data bound trains: `full_bound` trains with it and `full_bound_key` keys the kept bound on it."""
    return train_settings(config, loss="clip", schedule="cosine", epochs=config.eval.full_epochs)


def full_bound(config: Config, train, evalset, device: torch.device,
               model: Callable[[], nn.Module] | None = None, keep: Path | None = None) -> tuple[dict, dict]:
    """All real pairs, CLIP loss, cosine schedule; (lr, epoch) swept on the eval split, so the bound is strong
    (a weak bound would inflate the share of the gap that distillation closes). `model` trains another student
    with the heads' interface the same way (benchmarks/rank_limit.py: heads whose first layers are rank-limited).
    With `keep`, each lr's curve and each further seed's run is kept there as it finishes and read back, so a killed
    bound (hours on COCO) continues from its last finished lr or seed."""
    settings = full_settings(config)
    everything = torch.arange(train.text_features.shape[0], device=device)
    eval_features = (evalset.image_features, evalset.text_features, evalset.caption_to_image)
    curve: list[tuple[float, int, dict]] = []
    lrs = list(config.eval.full_lrs)
    with progress_bar(len(lrs) * settings.epochs, desc="eval full", unit="epoch",
                      enabled=config.run.progress, every=config.run.progress_every) as bar:
        for lr in lrs:
            part = None if keep is None else keep / f"lr-{lr:g}.json"
            if part is not None and part.is_file():
                curve += [(lr, point["epoch"], point["metrics"]) for point in read_json(part)]
                log.info("eval full: lr %g read back from %s", lr, part)
                bar.update(settings.epochs)
                continue
            started, points = time.perf_counter(), []

            def on_epoch(epoch: int, heads: nn.Module) -> None:
                points.append({"epoch": epoch, "metrics": scored_retrieval(heads, *eval_features, device)})
                bar.set_postfix(lr=f"{lr:g}", r_mean=f"{points[-1]['metrics']['r_mean']:.2f}")
                bar.update(1)

            train_heads(_real_pairs(train, everything, lr), settings, config.run.seed, device, model=model,
                        on_epoch=on_epoch)
            if part is not None:
                write_json(part, points)
            curve += [(lr, point["epoch"], point["metrics"]) for point in points]
            log.info("eval full: lr %g, best r_mean %.2f over %d epochs (%.0f s)", lr,
                     max(point["metrics"]["r_mean"] for point in points), settings.epochs,
                     time.perf_counter() - started)
    best_lr, best_epoch, best = max(curve, key=lambda item: item[2]["r_mean"])
    runs = [best]
    for seed in eval_seeds(config)[1:]:  # same schedule, stopped at the selected epoch
        part = None if keep is None else keep / f"seed-{seed}-lr-{best_lr:g}-epoch-{best_epoch}.json"
        if part is not None and part.is_file():
            runs.append(read_json(part))
            continue
        heads = train_heads(_real_pairs(train, everything, best_lr), settings, seed, device, stop_after=best_epoch,
                            model=model)
        runs.append(scored_retrieval(heads, *eval_features, device))
        if part is not None:
            write_json(part, runs[-1])
    info = {"lrs": lrs, "epochs": config.eval.full_epochs, "best_lr": best_lr,
            "best_epoch": best_epoch, "selected_on": config.data.eval_split,
            "curve": [{"lr": lr, "epoch": epoch, "r_mean": round(m["r_mean"], 2)} for lr, epoch, m in curve]}
    return summarize_seeds(runs), info


def full_bound_key(config: Config, caches: dict[str, FeatureCache], device: torch.device) -> dict:
    """Everything the full-data bound depends on: the cached features (by content), the protocol, lrs and seeds."""
    return {"train": file_digest(caches[config.data.train_split].tensors_path),
            "eval": file_digest(caches[config.data.eval_split].tensors_path),
            "settings": dataclasses.asdict(full_settings(config)), "lrs": list(config.eval.full_lrs),
            "run_seed": config.run.seed, "seeds": eval_seeds(config), "device": device.type, "torch": torch.__version__}


def reused_full_bound(config: Config, caches: dict[str, FeatureCache], train, evalset,
                      device: torch.device) -> tuple[dict, dict]:
    """`full_bound`, kept beside the feature cache. It does not depend on the distilled set, so later runs on the same
    features, protocol and seeds (other N, blend settings, sweeps) read it back instead of training it again (Flickr8k
    on 2 CPU cores: 97 s per lr alone, 17 min in all beside two other jobs). eval.reuse_full=false trains it anew."""
    key = full_bound_key(config, caches, device)
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = caches[config.data.train_split].tensors_path.parent / "bounds" / f"full-{name}.json"
    if config.eval.reuse_full and path.is_file():
        saved = read_json(path)
        log.info("eval full: read back from %s (same features, protocol and seeds; eval.reuse_full=false trains "
                 "it again)", path)
        return saved["metrics"], {**saved["info"], "reused": str(path)}
    parts = path.with_suffix(".parts")  # what a killed bound finished: its lrs' curves, its further seeds
    metrics, info = full_bound(config, train, evalset, device, keep=parts)
    write_json(path, {"metrics": metrics, "info": info, "key": key})
    shutil.rmtree(parts, ignore_errors=True)
    return metrics, info


def _best_expert(buffer_dir: Path) -> dict | None:
    index = buffer_dir / "index.json"
    if not index.is_file():
        return None
    experts = [e for e in json.loads(index.read_text())["experts"] if "eval_recall" in e]
    return max((e["eval_recall"] for e in experts), key=lambda r: r["r_mean"], default=None)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a set of one distillation mode is trained and measured on a split."""

    eval_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image inputs, text features, caption_to_image
    model: Callable[[], nn.Module] | None  # None: fresh heads on cached features; LoRS: encoder + text head
    train_images: Callable[[torch.Tensor], torch.Tensor]  # image inputs of training images, by index
    syn_lr_img_scale: float = 1.0  # eval.syn_lr_img_scale

    def synthetic_pairs(self, images: torch.Tensor, texts: torch.Tensor, similarity: torch.Tensor,
                        syn_lr_img: torch.Tensor, syn_lr_txt: torch.Tensor) -> PairSet:
        return synthetic_pairs(images, texts, similarity, syn_lr_img, syn_lr_txt, self.syn_lr_img_scale)


def synthetic_pairs(images: torch.Tensor, texts: torch.Tensor, similarity: torch.Tensor,
                    syn_lr_img: torch.Tensor | float, syn_lr_txt: torch.Tensor | float,
                    syn_lr_img_scale: float) -> PairSet:
    """A distilled set as it trains: against its learned S at its learned lrs (the image lr x eval.syn_lr_img_scale)."""
    return PairSet(images, texts, similarity, float(syn_lr_img) * syn_lr_img_scale, float(syn_lr_txt))


def protocol(config: Config, caches: dict[str, FeatureCache], split: str, device: torch.device) -> Protocol:
    """RepBlend sets train heads on frozen features; LoRS sets fine-tune the image encoder with a text head
    into its feature space (the references' LoRS evaluation), so they need the split's pixels."""
    evalset = load_features(caches, split, device)
    train = load_features(caches, config.data.train_split, device)
    scale = config.eval.syn_lr_img_scale
    if not fine_tunes_encoder(config):
        return Protocol((evalset.image_features, evalset.text_features, evalset.caption_to_image), None,
                        lambda idx: train.image_features[idx], scale)
    from repblend.stages.lors import LorsModel

    encoder = build_image_encoder(config, device)
    eval_pixels = split_pixels(config, caches, split, encoder)
    txt_dim = evalset.text_features.shape[1]
    return Protocol((eval_pixels, evalset.text_features, evalset.caption_to_image),
                    lambda: LorsModel(encoder.backbone, txt_dim, encoder.feature_dim, config.model.dropout),
                    # decoded on first use (the eval probe never needs training pixels), then kept per process
                    lambda idx: split_pixels(config, caches, config.data.train_split, encoder)[idx.cpu()], scale)


def eval_seeds(config: Config) -> list[int]:
    return [config.run.seed * 1000 + 17 * j + 1 for j in range(config.eval.num_eval)]


def _protocol_key(config: Config, fine_tunes: bool | None = None) -> dict:
    """What a `protocol` depends on besides the training settings and the feature caches (kept rows' keys)."""
    fine_tunes = fine_tunes_encoder(config) if fine_tunes is None else fine_tunes
    return {"fine_tunes_encoder": fine_tunes, "syn_lr_img_scale": config.eval.syn_lr_img_scale,
            "encoder": config.encoders.image if fine_tunes else None, "model": config.model}


def evaluate(config: Config, run_dir: Path, caches: dict[str, FeatureCache]) -> dict:
    """Every method of the results table under one protocol; writes results.json and results.md. Each row is kept
    in RUN_DIR/eval/rows as it finishes (pipeline/evalrows.py) and read back while its inputs are unchanged."""
    device = resolve_device(config.run.device)
    train = load_features(caches, config.data.train_split, device)
    evalset = load_features(caches, config.data.eval_split, device)
    extra_sets = {name: (Path(path), load_extra_set(config, name, Path(path), train))
                  for name, path in config.eval.sets.items()}  # all checked before any row trains
    eval_features = (evalset.image_features, evalset.text_features, evalset.caption_to_image)
    seeds = eval_seeds(config)
    settings = train_settings(config)
    real_settings = train_settings(config, loss=real_pairs_loss(config, fine_tunes=False))  # coresets: heads
    fine_tunes = fine_tunes_encoder(config)  # the run's own set and its initial pairs
    init_loss = real_pairs_loss(config, fine_tunes)
    n = config.distill.num_queries
    lr0 = config.distill.lr_teacher
    rows = KeptRows(run_dir / "eval" / "rows", {"train": file_digest(caches[config.data.train_split].tensors_path),
                                                 "eval": file_digest(caches[config.data.eval_split].tensors_path),
                                                 "seeds": seeds}, config.eval.reuse_rows, device)
    methods, notes = {}, {}
    own = config.distill.mode
    matched_path, own_path = synthetic_path(run_dir), final_path(config, run_dir)
    measure = functools.cache(lambda: protocol(config, caches, config.data.eval_split, device))  # LoRS: decodes
    set_key = {"settings": settings, "protocol": _protocol_key(config)}
    if not matched_path.is_file():
        log.warning("eval: no distilled set at %s yet; evaluating the baselines%s only", matched_path,
                    " and eval.sets" if extra_sets else "")
    else:
        syn = load_file(str(matched_path), device=str(device))  # the refined set keeps its initial pairs
        if own_path.is_file():
            own_syn = syn if own_path == matched_path else load_file(str(own_path), device=str(device))
            methods[own] = rows.row(own, {"set": file_digest(own_path), **set_key},
                                    lambda: evaluate_synthetic(own_syn, measure(), settings, seeds, device))
        if config.refine.enabled:
            methods[MATCHED] = rows.row(MATCHED, {"set": file_digest(matched_path), **set_key},
                                        lambda: evaluate_synthetic(syn, measure(), settings, seeds, device))
            notes[own] = (f"refined through the evaluation protocol ({config.refine.iterations} iterations, "
                          f"refine/); {MATCHED} is the set as trajectory matching left it (distill/)"
                          if own_path.is_file() else
                          f"not refined yet ({own_path}; `repblend run` or `repblend refine` makes it)")
        init_settings = train_settings(config, loss=init_loss)

        def initial_pairs() -> dict:
            init = PairSet(measure().train_images(syn["init_image_index"]),
                           train.text_features[syn["init_caption_index"]], None, lr0, lr0)
            return evaluate_pairs(init, init_settings, measure().eval_features, seeds, device, diagnose=True,
                                  model=measure().model)

        methods["init"] = rows.row("init", {"set": file_digest(matched_path), "settings": init_settings, "lr": lr0,
                                            "protocol": _protocol_key(config)}, initial_pairs)
        if config.invert.enabled:
            _inverted_row(config, run_dir, rows, measure, set_key, seeds, device, methods, notes)
    heads_key = {"settings": settings, "protocol": _protocol_key(config, fine_tunes=False)}  # fresh heads, always
    for name, (path, extra) in extra_sets.items():
        methods[name] = rows.row(name, {"set": file_digest(path), **heads_key}, lambda extra=extra: evaluate_pairs(
            distilled_pairs(extra, config), settings, eval_features, seeds, device, diagnose=True))
        notes[name] = extra_set_note(path, extra, n)
    for method in config.eval.methods:
        if method in ("random", "herding", "kcenter"):
            def coreset(method: str = method) -> dict:
                draws = zip(seeds, _coresets(method, train, n, seeds))
                return evaluate_seeds(((seed, _real_pairs(train, idx.to(device), lr0)) for seed, idx in draws),
                                      real_settings, eval_features, device, diagnose=True)

            methods[method] = rows.row(method, {"pairs": n, "settings": real_settings, "lr": lr0}, coreset)
        elif method == "full":
            started = time.perf_counter()
            methods["full"], notes["full"] = reused_full_bound(config, caches, train, evalset, device)
            log_row("full", methods["full"], f"{time.perf_counter() - started:.0f} s")
            expert = _best_expert(buffer_dir_of(config, run_dir))
            if expert is not None:
                notes["full"]["best_expert_r_mean"] = round(expert["r_mean"], 2)
                if methods["full"]["r_mean"]["mean"] < expert["r_mean"]:
                    log.warning("eval: the full-data bound (r_mean %.2f) is below the best expert (%.2f); "
                                "widen eval.full_lrs or eval.full_epochs", methods["full"]["r_mean"]["mean"],
                                expert["r_mean"])
        elif method == "lors" and own != "lors":
            lors = lors_baseline(config)
            lors_path = run_dir / "lors" / "distill" / "synthetic.safetensors"
            if lors is None:
                notes["lors"] = ("skipped: LoRS matches the image encoder itself, which distill.space=feature does "
                                 "not have")
            elif not lors_path.is_file():
                notes["lors"] = f"not distilled yet ({lors_path}; `repblend run` or `repblend distill` makes it)"
            else:
                methods["lors"] = rows.row(
                    "lors", {"set": file_digest(lors_path), "settings": settings, "protocol": _protocol_key(lors)},
                    lambda: evaluate_synthetic(load_file(str(lors_path), device=str(device)),
                                               protocol(lors, caches, config.data.eval_split, device), settings,
                                               seeds, device))
                notes["lors"] = ("asymmetric matching (whole image encoder vs text head), no blending; evaluated "
                                 "by fine-tuning the encoder with a text head, as the references evaluate LoRS")
    diagnostics = {name: metrics.pop("diagnostics") for name, metrics in methods.items() if "diagnostics" in metrics}
    results = {"methods": methods, "diagnostics": diagnostics, "gap_closed": gap_closed(methods),
               "eval_split": config.data.eval_split, "pairs": n, "seeds": seeds,
               "space": config.distill.space, "notes": notes,
               "protocol": {"epochs": settings.epochs, "loss": settings.loss, "momentum": settings.momentum,
                            "weight_decay": settings.weight_decay, "coreset_lr": lr0,
                            "real_loss": real_settings.loss, "init_loss": init_loss,
                            "fine_tunes_encoder": fine_tunes, "syn_lr_img_scale": config.eval.syn_lr_img_scale,
                            "ebr": dataclasses.asdict(settings.ebr) if settings.ebr else None}}
    write_json(run_dir / "results.json", results)
    write_text(run_dir / "results.md", results_table(results))
    return results


def _inverted_row(config: Config, run_dir: Path, rows: KeptRows, measure: Callable[[], Protocol], set_key: dict,
                  seeds: list[int], device: torch.device, methods: dict, notes: dict) -> None:
    """The row of the set inverted to pixels: trained on its encoded pixels, as a pixel-space set would be."""
    path = inverted_path(run_dir)
    if not path.is_file():
        notes[INVERTED] = f"not inverted yet ({path}; `repblend run` or `repblend invert` makes it)"
        return
    methods[INVERTED] = rows.row(INVERTED, {"set": file_digest(path), **set_key}, lambda: evaluate_synthetic(
        load_file(str(path), device=str(device)), measure(), set_key["settings"], seeds, device))
    summary = read_json(path.parent / "summary.json")
    size = config.encoders.image.image_size
    notes[INVERTED] = (f"the {config.distill.mode} feature set inverted to {size} px images "
                       f"({summary['steps']} Adam steps from its real initial images): their encodings are at "
                       f"relative error {summary['relative_error_mean']:.3f} (cosine {summary['cosine_mean']:.4f}) "
                       "from the distilled features")
    if summary.get("adapt_iterations"):
        notes[INVERTED] += (f"; its texts, S and lrs then adapted to those encodings ({summary['adapt_iterations']} "
                            "refine iterations)")


# what must agree between the encoders a set was distilled with and this config's, for its features to mean the same
ENCODER_KEYS = {"image": ("name", "image_size"), "text": ("name", "pooling", "max_length")}


def load_extra_set(config: Config, name: str, path: Path, train) -> DistilledSet:
    """An `eval.sets` entry, refused in one line naming it where its features cannot train heads on this config's
    caches: another encoder, other feature widths, or a LoRS set (whose protocol fine-tunes its encoder)."""
    where = f"eval.sets.{name}"
    try:
        extra = load_distilled(path)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    made_with = yaml.safe_load(extra.metadata["config"]) if "config" in extra.metadata else {}
    if extra.metadata.get("mode") == "lors":
        raise DataError(f"{where}: {path} is a LoRS set (distill.mode=lors), whose evaluation fine-tunes the image "
                        "encoder it was distilled with; evaluate it in a run of its own config")
    ours = dataclasses.asdict(config.encoders)
    for side, keys in ENCODER_KEYS.items():
        theirs = made_with.get("encoders", {}).get(side, {})
        differ = [f"{key} {theirs[key]!r} (this config: {ours[side][key]!r})" for key in keys
                  if key in theirs and theirs[key] != ours[side][key]]
        if differ:
            raise DataError(f"{where}: {path} was distilled with another {side} encoder: {', '.join(differ)}")
        if "weights" in theirs and theirs["weights"] != ours[side]["weights"]:
            log.warning("%s: %s was distilled with %s encoder weights %r, this config loads %r: the same weights "
                        "under another path, or features that do not match", where, path, side, theirs["weights"],
                        ours[side]["weights"])
    for what, got, want in (("image feature", extra.image_features, train.image_features),
                            ("text embedding", extra.texts, train.text_features)):
        if got.shape[1] != want.shape[1]:
            raise DataError(f"{where}: {path} has {got.shape[1]}-d {what}s, this config's encoder gives "
                            f"{want.shape[1]}-d")
    return extra


def extra_set_note(path: Path, extra: DistilledSet, pairs: int) -> str:
    """Where an `eval.sets` row came from, in the results' notes."""
    meta = extra.metadata
    made = ", ".join(part for part in (
        f"{meta['mode']} mode" if "mode" in meta else "", f"{meta['space']} space" if "space" in meta else "",
        f"{meta['iterations']} iterations" if "iterations" in meta else "",
        f"seed {meta['seed']}" if "seed" in meta else "") if part)
    note = f"eval.sets: {path} ({extra.num_pairs} pairs{', ' + made if made else ''}; sha256 {file_digest(path)[:12]})"
    if extra.num_pairs != pairs:
        note += f"; its G is against random coresets of {pairs} pairs"
    return note


def train_on(distilled: DistilledSet | str | Path, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Fresh heads trained on a distilled set exactly as its run's evaluation trains them: the protocol, heads and
    temperature of the config recorded in the set, its learned S and lrs. What a reader of a published set needs
    to use it; `heads(image_features, text_features)` then gives L2-normalised embeddings in the shared space."""
    from repblend.pipeline.config import config_from_yaml

    if isinstance(distilled, DistilledSet):
        where = "the distilled set"
    else:
        where, distilled = str(distilled), load_distilled(distilled)
    if "config" not in distilled.metadata:
        raise DataError(f"{where}: its metadata has no config to take the evaluation protocol from")
    config = config_from_yaml(distilled.metadata["config"], f"{where} (its recorded config)")
    if fine_tunes_encoder(config):
        raise DataError(f"{where}: a LoRS set trains its image encoder, not heads on features; evaluate it with "
                        "`repblend eval` and its config")
    return train_heads(distilled_pairs(distilled, config), train_settings(config), seed, torch.device(device))


def distilled_pairs(distilled: DistilledSet, config: Config) -> PairSet:
    """A loaded set as fresh heads train on its image features under `config`'s protocol."""
    return synthetic_pairs(distilled.image_features, distilled.texts, distilled.similarity, distilled.syn_lr_img,
                           distilled.syn_lr_txt, config.eval.syn_lr_img_scale)


def evaluate_synthetic(syn: dict[str, torch.Tensor], measure: Protocol, settings: TrainSettings, seeds: list[int],
                       device: torch.device) -> dict:
    """A distilled set (its safetensors) under its mode's protocol: trained at its learned lrs against its S."""
    images = syn["images"] if measure.model is not None else syn["image_features"]
    pairs = measure.synthetic_pairs(images, syn["texts"], syn["similarity"], syn["syn_lr_img"], syn["syn_lr_txt"])
    return evaluate_pairs(pairs, settings, measure.eval_features, seeds, device, diagnose=True, model=measure.model)


GAP_METRICS = ("img_r10", "txt_r10", "r_mean")


def gap_closed(methods: dict) -> dict[str, dict[str, float | None]]:
    """G = (set - random) / (full - random) per recall, for every row but those two: the share of the random-to-full
    gap a set closes at equal N. Raw recall flatters where random pairs are already strong (Flickr8k: 0.30 of the
    full data's IR@10, Flickr30k: 0.10), so sets and datasets are compared on G. None where full <= random."""
    if "random" not in methods or "full" not in methods:
        return {}
    low, high = methods["random"], methods["full"]

    def share(metrics: dict, key: str) -> float | None:
        span = high[key]["mean"] - low[key]["mean"]
        return round((metrics[key]["mean"] - low[key]["mean"]) / span, 3) if span > 0 else None

    return {name: {key: share(metrics, key) for key in GAP_METRICS} for name, metrics in methods.items()
            if name not in ("random", "full")}


def share_cell(share: float | None) -> str:
    """A G value in a table: two decimals, '-' where it is undefined (full <= random, or no such rows)."""
    return "-" if share is None else f"{share:.2f}"


def results_table(results: dict) -> str:
    header = "| method | " + " | ".join(METRICS) + " |"
    lines = [f"Retrieval on {results['eval_split']}, {results['pairs']} pairs, mean ± std over "
             f"{len(results['seeds'])} evaluation seeds (IR = img_r*, TR = txt_r*)", "", header,
             "|---" * (len(METRICS) + 1) + "|"]
    for name, metrics in results["methods"].items():
        cells = [f"{metrics[k]['mean']:.1f} ± {metrics[k]['std']:.1f}" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("gap_closed"):
        lines += ["", f"Share of the random-to-full gap closed at {results['pairs']} pairs, G = (set - random) / "
                  "(full - random), of the means (1 = as good as the full data, 0 = no better than random pairs):",
                  "", "| set | " + " | ".join(f"G {key}" for key in GAP_METRICS) + " |",
                  "|---" * (len(GAP_METRICS) + 1) + "|"]
        for name, shares in results["gap_closed"].items():
            lines.append(f"| {name} | " + " | ".join(share_cell(shares[key]) for key in GAP_METRICS) + " |")
    diverged = [f"{name} in {m['diverged_seeds']} of {len(results['seeds'])} seeds"
                for name, m in results["methods"].items() if m.get("diverged_seeds")]
    if diverged:
        lines += ["", "Diverged in training (non-finite embeddings; such a seed scores 0): " + ", ".join(diverged)]
    if results.get("diagnostics"):
        lines += ["", f"Collapse diagnostics of each {results['pairs']}-pair training set, embedded by the heads "
                  "trained on it (mean over seeds; sim = mean off-diagonal cosine, gap = distance of the modality "
                  "means, erank = effective rank, probe = image-vs-text linear probe accuracy):", "",
                  "| set | " + " | ".join(DIAGNOSTICS) + " |", "|---" * (len(DIAGNOSTICS) + 1) + "|"]
        for name, diag in results["diagnostics"].items():
            lines.append(f"| {name} | " + " | ".join(f"{diag[k]['mean']:.3g}" for k in DIAGNOSTICS) + " |")
    protocol = results.get("protocol", {})
    if "real_loss" in protocol:
        init_loss = protocol.get("init_loss", protocol["real_loss"])
        real = (f"real pairs (init, coresets) with {init_loss}" if init_loss == protocol["real_loss"] else
                f"its initial pairs with {init_loss}, coresets (fresh heads) with {protocol['real_loss']}")
        model = ("the image encoder fine-tuned with a text head" if protocol.get("fine_tunes_encoder") else
                 "fresh heads")
        scale = protocol.get("syn_lr_img_scale", 1.0)
        lrs = "their learned lrs" + (f" (the image lr x{scale:g}, eval.syn_lr_img_scale)" if scale != 1 else "")
        lines.append(f"\nProtocol: {model}, {protocol['epochs']} epochs; "
                     f"distilled sets train with {protocol['loss']} (against their learned S) at {lrs}, "
                     f"{real} at lr {protocol['coreset_lr']}")
    ebr = protocol.get("ebr")
    if ebr:
        lines.append(f"\nEvery row trained with EBR (alpha {ebr['alpha']}, H {ebr['hidden']}, S {ebr['shared_dim']}, "
                     f"{'interleaved' if ebr['interleave'] else 'gradient reversal'}"
                     f"{', residual' if ebr.get('residual') else ''}); recall uses decoded embeddings")
    notes = results.get("notes", {})
    if "full" in notes:
        full = notes["full"]
        expert = f"; best expert r_mean {full['best_expert_r_mean']}" if "best_expert_r_mean" in full else ""
        lines.append(f"\nfull: all real pairs, lr {full['best_lr']} at epoch {full['best_epoch']} of {full['epochs']} "
                     f"(swept lrs {full['lrs']} on {full['selected_on']}){expert}"
                     + (f"; read back from {full['reused']}" if "reused" in full else ""))
    for name, note in notes.items():
        if name != "full":
            lines.append(f"\n{name}: {note}")
    return "\n".join(lines) + "\n"
