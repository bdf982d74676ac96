"""Typed config schema, YAML loading and `key=value` overrides.

The schema is a tree of dataclasses merged with OmegaConf: YAML on top of the defaults, then the CLI
dotlist. OmegaConf rejects unknown keys and wrong types; we turn its exceptions into one-line
`ConfigError`s that name the key (with a close-match suggestion) so a typo never runs silently.
Names follow the reference code (`syn_steps`, `expert_epochs`, `lr_img`...) so numbers compare.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from repblend.stages.errors import ConfigError


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


# the rows a run's results table makes itself (eval.sets may not take these names)
BUILTIN_ROWS = ("repblend", "lors", "init", "random", "herding", "kcenter", "full", "repblend_matched",
                "repblend_pixels")


@dataclass
class GeneratedDataConfig:
    """data.format=generated: captioned shapes drawn on the fly (seeded), so the demo needs no download."""

    train_images: int = 800
    eval_images: int = 200
    image_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("train_images", "eval_images", "image_size"):
            _positive(f"data.generated.{key}", getattr(self, key))


@dataclass
class DataConfig:
    """Where the image-caption pairs come from."""

    name: str = "flickr8k"  # label for caches and reports
    format: str = "flickr8k"  # flickr8k | karpathy | webdataset | generated
    root: str = ""  # dataset folder (flickr8k, karpathy), shard pattern/folder (webdataset), or where to write
    # the generated set (default runs/data/<name>)
    generated: GeneratedDataConfig = field(default_factory=GeneratedDataConfig)
    images: str = "images"  # images folder, relative to root (flickr8k, karpathy)
    annotations: str = ""  # flickr8k: caption file (default Flickr8k.token.txt); karpathy: the JSON file
    train_split: str = "train"
    eval_split: str = "dev"  # the split results are reported on
    max_train_images: int = 0  # 0 = all; otherwise a seeded subset (CPU configs)
    max_eval_images: int = 0  # also caps the validation split
    val_split: str = "val"  # split that selects models (Tune); never the reported eval_split
    val_images: int = 0  # > 0: hold out this many seeded training images as val_split (data without a val split)
    on_error: str = "stop"  # stop | skip (skip bad items with a warning)

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("flickr8k", "karpathy", "webdataset", "generated"))
        if self.format == "generated" and not self.root:
            self.root = str(Path("runs") / "data" / self.name)
        _choice("data.on_error", self.on_error, ("stop", "skip"))
        _positive("data.max_train_images", self.max_train_images, allow_zero=True)
        _positive("data.max_eval_images", self.max_eval_images, allow_zero=True)
        _positive("data.val_images", self.val_images, allow_zero=True)
        if self.val_split in (self.train_split, self.eval_split):
            raise ConfigError(f"data.val_split={self.val_split!r} must differ from the train and eval splits: "
                              "selecting on the reported split inflates results")


@dataclass
class ImageEncoderConfig:
    name: str = "efficientnet_lite0"  # timm name, "open_clip:<arch>" or "tiny"
    weights: str = "package"  # package | random | hub | <path to a weights file>
    image_size: int = 224

    def __post_init__(self) -> None:
        _positive("encoders.image.image_size", self.image_size)


@dataclass
class TextEncoderConfig:
    name: str = "all-MiniLM-L6-v2"  # transformers name/folder or "tiny"
    weights: str = "package"  # package | random | hub | <path to a model folder>
    pooling: str = "mean"  # mean | cls (the paper's BERT uses cls)
    max_length: int = 64

    def __post_init__(self) -> None:
        _choice("encoders.text.pooling", self.pooling, ("mean", "cls"))
        _positive("encoders.text.max_length", self.max_length)


@dataclass
class EncodersConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_batch_size: int = 64
    text_batch_size: int = 256
    num_workers: int = 2  # image decoding workers

    def __post_init__(self) -> None:
        _positive("encoders.image_batch_size", self.image_batch_size)
        _positive("encoders.text_batch_size", self.text_batch_size)
        _positive("encoders.num_workers", self.num_workers, allow_zero=True)


@dataclass
class CacheConfig:
    """Frozen-encoder features, computed once per (data, encoders) and shared by runs."""

    dir: str = ""  # "" = runs/cache/<key> (content-addressed); a path = exactly that folder
    dtype: str = "float16"  # float16 halves the cache (and what travels to a GPU machine)
    overwrite: bool = False  # rebuild a cache whose manifest does not match instead of refusing

    def __post_init__(self) -> None:
        _choice("cache.dtype", self.dtype, ("float16", "float32"))


@dataclass
class ModelConfig:
    """Projection heads on the frozen encoders (ALGORITHMS.md section 1)."""

    embed_dim: int = 1024  # paper: 2304
    dropout: float = 0.1
    temperature: float = 0.07

    def __post_init__(self) -> None:
        _positive("model.embed_dim", self.embed_dim)
        _positive("model.temperature", self.temperature)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class BufferConfig:
    """Expert trajectories (ALGORITHMS.md section 2)."""

    num_experts: int = 20
    train_epochs: int = 10
    lr_teacher_img: float = 0.1
    lr_teacher_txt: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    save_all_epochs: bool = False  # False: only epochs 0..max_start_epoch+expert_epochs are kept
    dir: str = ""  # "" = <run dir>/buffer; a path = a buffer shared by several runs (built there if missing)
    # head experts trained together, one batched step for all (one process or Ray task per group; fast on a GPU,
    # TARGETS.md P3). Above 1 each expert's dropout masks come from a generator of its own, the same whatever the
    # group. LoRS's encoder experts always train one at a time.
    batch_experts: int = 1

    def __post_init__(self) -> None:
        for key in ("num_experts", "train_epochs", "batch_size", "batch_experts"):
            _positive(f"buffer.{key}", getattr(self, key))
        _positive("buffer.lr_teacher_img", self.lr_teacher_img)
        _positive("buffer.lr_teacher_txt", self.lr_teacher_txt)


@dataclass
class BlendConfig:
    """Representation blending: lambda ~ Beta(beta_a, beta_b), shared by both modalities."""

    enabled: bool = True
    beta_a: float = 1.0
    beta_b: float = 1.0
    # RepBlend's perturbation study: Gaussian noise of this strength (times the representations' RMS) added to
    # both modalities' student inputs; with enabled=false it replaces blending. 0 = none (the method itself)
    noise: float = 0.0

    def __post_init__(self) -> None:
        _positive("blend.beta_a", self.beta_a)
        _positive("blend.beta_b", self.beta_b)
        _positive("blend.noise", self.noise, allow_zero=True)


@dataclass
class DistillConfig:
    """The synthetic set and its optimisation (ALGORITHMS.md sections 3-4)."""

    # repblend: symmetric matching of two projection heads | lors: asymmetric, the image side is the whole image
    # encoder (pixel space only). lors keeps blend.enabled as set: the LoRS baseline itself (the "lors" row of a
    # repblend run, distilled in <run>/lors) turns blending off; lors + blending is an ablation arm
    mode: str = "repblend"
    space: str = "pixel"  # pixel (paper) | feature (synthetic image FEATURES, no encoder in the loop)
    num_queries: int = 99  # N synthetic pairs ("100 pairs" is 99 in the references)
    iterations: int = 3000
    syn_steps: int = 8
    expert_epochs: int = 1
    max_start_epoch: int = 2
    mini_batch_size: int = 20
    lr_img: float = 100.0
    lr_txt: float = 100.0
    lr_lr: float = 1e-2
    lr_sim: float = 10.0
    lr_teacher: float = 0.1  # initial learnable student lr
    momentum: float = 0.5
    optimizer: str = "sgd"  # sgd (reference: momentum 0.5) | adam (scale-free, suits distill.space=feature)
    lr_floor: float = 0.001  # clamp learned student lrs here (the MTT code's clamp_lr); 0 = none, stop if <= 0
    # ceilings on the learned student lrs, image and text side (0 = none; the references have none). The set is
    # evaluated at its learned lrs for 100 epochs with momentum, far longer than the syn_steps that learned them:
    # LoRS-mode sets whose image lr drifts past about 0.06 collapse the image encoder there (docs/collapse.md)
    syn_lr_img_max: float = 0.0
    syn_lr_txt_max: float = 0.0
    # spike guard (stages/distiller.RewindSettings; the references have none): an iteration where a side's matching
    # loss exceeds rewind_loss (over 1: the student ended farther from its expert than it started; 1.1 measured,
    # early losses sit at 1.00-1.04) skips its update; rewind_patience in a row put the set back to its last healthy
    # point (kept after every rewind_every spike-free iterations) with the learned and the outer lrs scaled by
    # rewind_backoff; more than rewind_max rewinds stop the run
    rewind_loss: float = 0.0  # 0 = no guard
    rewind_patience: int = 3
    rewind_every: int = 10
    rewind_backoff: float = 0.5
    rewind_max: int = 4
    # cap each outer-gradient group's norm (images, texts, learned lrs, similarities) at this multiple of its running
    # mean (0 = none, as in the references): the gradient through the unrolled student can jump 50-100x in one
    # iteration where a learned lr nears the student's stability edge, and that one update ends the run
    grad_clip: float = 5.0
    sim_type: str = "lowrank"  # lowrank | full
    sim_rank: int = 10
    sim_alpha: float = 3.0
    loss: str = "wbce"  # wbce | clip
    merge_loss_branches: bool = False  # COCO scripts: (img + txt) / (D_img + D_txt)
    grad_mode: str = "unroll"  # unroll (exact; faster here) | tesla (the references' constant-memory two passes)
    # how the exact unroll holds a student head: flat (a parameter vector per step) | factored (each weight matrix as
    # the snapshot plus the steps' low-rank moves, stages/factored.py: same gradients, less memory and time on a CPU)
    # | auto (factored on a CPU for RepBlend's heads, flat elsewhere: not yet measured on a GPU)
    student: str = "auto"
    pix_init: str = "real"  # real | noise
    # feature space: keep the synthetic image features inside the range of the cached real ones (for an encoder
    # ending in ReLU6 + pooling, [0, 6]), which is what the encoder can produce: a set that can be inverted to pixels
    clamp_features: bool = False
    encode_chunk: int = 0  # pixel space: 0 = keep the encoder graph of all images used; k = recompute k at a time
    # torch.compile the exact unroll (stages/fused.py): the first iteration compiles, later ones run faster. Covers
    # RepBlend mode with grad_mode=unroll and no blend.noise; elsewhere the eager loop runs (the log says so)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune...
    compile_scope: str = "step"  # one graph per student step (compiles fast) | unroll (the whole unroll, slower)
    ckpt_every: int = 100
    eval_every: int = 0  # log eval-split recall of the current set every N iterations (1 seed; never selects)

    def __post_init__(self) -> None:
        _choice("distill.mode", self.mode, ("repblend", "lors"))
        if self.mode == "lors" and self.space == "feature":
            raise ConfigError("distill.mode=lors trains and matches the image encoder itself, so it needs "
                              "distill.space=pixel (feature space has no encoder)")
        _choice("distill.space", self.space, ("pixel", "feature"))
        _choice("distill.sim_type", self.sim_type, ("lowrank", "full"))
        _choice("distill.loss", self.loss, ("wbce", "clip"))
        _choice("distill.grad_mode", self.grad_mode, ("tesla", "unroll"))
        _choice("distill.student", self.student, ("auto", "flat", "factored"))
        if self.student == "factored" and (self.grad_mode != "unroll" or self.mode != "repblend"):
            raise ConfigError(f"distill.student=factored factors the exact unroll of two projection heads: it needs "
                              f"distill.grad_mode=unroll and distill.mode=repblend (got {self.grad_mode}, {self.mode})")
        _choice("distill.pix_init", self.pix_init, ("real", "noise"))
        _choice("distill.optimizer", self.optimizer, ("sgd", "adam"))
        _choice("distill.compile_mode", self.compile_mode,
                ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
        _choice("distill.compile_scope", self.compile_scope, ("step", "unroll"))
        _positive("distill.lr_floor", self.lr_floor, allow_zero=True)
        for key in ("syn_lr_img_max", "syn_lr_txt_max"):
            ceiling = getattr(self, key)
            _positive(f"distill.{key}", ceiling, allow_zero=True)
            if 0 < ceiling <= self.lr_floor:
                raise ConfigError(f"distill.{key}={ceiling} must be above distill.lr_floor={self.lr_floor} "
                                  "(or 0 for no ceiling)")
        _positive("distill.rewind_loss", self.rewind_loss, allow_zero=True)
        if self.grad_clip and self.grad_clip <= 1:
            raise ConfigError(f"distill.grad_clip={self.grad_clip} must be above 1 (a multiple of the gradient's "
                              "running mean norm; 1 or less clips every ordinary step) or 0 for none")
        _positive("distill.rewind_max", self.rewind_max, allow_zero=True)
        if not 0 < self.rewind_backoff <= 1:
            raise ConfigError(f"distill.rewind_backoff={self.rewind_backoff} must be in (0, 1]: each rewind scales "
                              "the lrs by it")
        if self.clamp_features and self.space != "feature":
            raise ConfigError("distill.clamp_features=true keeps synthetic image features in the encoder's range; "
                              "it needs distill.space=feature (pixel sets are in range by construction)")
        for key in ("num_queries", "iterations", "syn_steps", "expert_epochs", "max_start_epoch",
                    "mini_batch_size", "sim_rank", "ckpt_every", "rewind_patience", "rewind_every"):
            _positive(f"distill.{key}", getattr(self, key))
        for key in ("lr_img", "lr_txt", "lr_lr", "lr_sim", "lr_teacher", "eval_every", "encode_chunk"):
            _positive(f"distill.{key}", getattr(self, key), allow_zero=True)
        if self.sim_rank > self.num_queries:
            raise ConfigError(f"distill.sim_rank={self.sim_rank} exceeds distill.num_queries={self.num_queries}")


@dataclass
class EvalConfig:
    """Evaluation protocol (ALGORITHMS.md section 5)."""

    epochs: int = 100
    num_eval: int = 3  # evaluation seeds: results are mean +- std
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    loss: str = "wbce"  # wbce against the learned S | clip
    # sets of real pairs (coresets, the distilled set's initialisation) have no learned S. auto: clip for fresh heads
    # (as experts and the full bound train; wbce against the identity is a weaker baseline there), wbce where the
    # image encoder is fine-tuned (LoRS protocol: clip at the coreset lr collapses the image tower, measured)
    real_loss: str = "auto"
    # a distilled set trains at its learned lrs (the references); this multiplies its learned IMAGE lr. LoRS sets
    # learn the lr over a few plain-SGD student steps and are evaluated over 100 epochs with momentum 0.9, where
    # their lr can sit at the edge of stability: 0.5 rescues the sets whose fine-tuned image tower collapsed
    # (measured: benchmarks/lors_eval_stability.py, docs/collapse.md); 1 = the references' protocol
    syn_lr_img_scale: float = 1.0
    methods: list[str] = field(
        default_factory=lambda: ["repblend", "lors", "random", "herding", "kcenter", "full"]
    )
    full_lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1])  # full-data bound: SGD lrs swept
    full_epochs: int = 20  # cosine schedule length; the best (lr, epoch) on the eval split is the bound
    # the bound is kept beside the feature cache and read back by runs with the same features, protocol and seeds
    reuse_full: bool = True
    # every other row is kept in RUN_DIR/eval/rows as it finishes and read back while its set, features, protocol,
    # seeds and code are unchanged (a run killed during evaluation keeps its finished rows); false trains them again
    reuse_rows: bool = True
    # more distilled sets to evaluate in this run's table, under the same protocol: row name -> path of a
    # synthetic.safetensors (a published set, another run's). Fresh heads on cached features, so each must come
    # from the same frozen encoders as this config (checked before any row trains)
    sets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, path in self.sets.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or name in BUILTIN_ROWS:
                raise ConfigError(f"eval.sets.{name}: a row name is a letter then letters, digits, _ or -, and not "
                                  f"one of the table's own rows ({', '.join(BUILTIN_ROWS)})")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"eval.sets.{name}={path!r} must be the path of a synthetic.safetensors")
        _choice("eval.loss", self.loss, ("wbce", "clip"))
        _choice("eval.real_loss", self.real_loss, ("auto", "wbce", "clip"))
        for method in self.methods:
            _choice("eval.methods[]", method, ("repblend", "lors", "random", "herding", "kcenter", "full"))
        for key in ("epochs", "num_eval", "batch_size", "full_epochs", "syn_lr_img_scale"):
            _positive(f"eval.{key}", getattr(self, key))
        if not self.full_lrs or min(self.full_lrs) <= 0:
            raise ConfigError(f"eval.full_lrs={self.full_lrs} must be a non-empty list of positive lrs")


@dataclass
class EBRConfig:
    """Explicit basis reallocation (ALGORITHMS.md section 7) on the heads: L_sem + alpha * L_md through a GRL."""

    enabled: bool = False
    alpha: float = 0.01  # weight of the modality-discrimination loss (third-party default)
    hidden: int = 1024  # H of the projector, decoder and discriminator MLPs
    shared_dim: int = 512  # S, width of the shared codes g
    apply_to: list[str] = field(default_factory=lambda: ["eval"])  # trainings that use it; only eval (see below)
    interleave: bool = False  # alternate discriminator and encoder updates instead of the gradient-reversal layer
    lr_scale: float = 0.1  # adapter lr relative to the heads' (the un-normalised MLPs diverge at the heads' lr)
    residual: bool = False  # decoded = f + h^-1(g), starting as the plain heads (not the paper's form; stages/ebr.py)

    def __post_init__(self) -> None:
        _positive("ebr.alpha", self.alpha, allow_zero=True)
        _positive("ebr.lr_scale", self.lr_scale)
        _positive("ebr.hidden", self.hidden)
        _positive("ebr.shared_dim", self.shared_dim)
        for name in self.apply_to:
            if name == "experts":
                raise ConfigError("ebr.apply_to=experts is not supported: distillation replays head-only "
                                  "trajectories with the plain loss, which experts trained through an EBR adapter "
                                  "do not follow; use ebr.apply_to=[eval]")
            _choice("ebr.apply_to[]", name, ("eval",))


@dataclass
class RayConfig:
    enabled: bool = True  # False: every stage runs in this process, no Ray started
    address: str = ""  # "" = embedded local Ray; "auto" or "ray://host:port" attaches to a cluster
    num_cpus: int = 0  # 0 = let Ray decide (embedded only)
    num_gpus: int = 0
    data_encode: bool = False  # encode images with Ray Data (decoding over the cluster, encoder actors)
    encode_actors: int = 0  # encoder actors for Ray Data; 0 = one per GPU (one on a CPU-only cluster)
    workers: int = 0  # Ray Train workers for distillation (data parallel); 0 = in the driver process
    worker_cpus: float = 1.0  # CPUs of one Train worker (each also gets a whole GPU when the cluster has GPUs)
    expert_cpus: float = 1.0  # resources of one expert task (heads on cached features: small)
    expert_gpus: float = 0.25  # used when the cluster has GPUs: several experts share one
    max_retries: int = 3  # an expert task whose worker dies is rerun this many times

    def __post_init__(self) -> None:
        _positive("ray.expert_cpus", self.expert_cpus)
        _positive("ray.worker_cpus", self.worker_cpus)
        _positive("ray.expert_gpus", self.expert_gpus, allow_zero=True)
        for key in ("num_cpus", "num_gpus", "workers", "max_retries", "encode_actors"):
            _positive(f"ray.{key}", getattr(self, key), allow_zero=True)
        if self.workers and not self.enabled:
            raise ConfigError(f"ray.workers={self.workers} needs Ray: drop ray.enabled=false or set ray.workers=0")


@dataclass
class TuneConfig:
    """Ray Tune over the blend Beta(a, b) (and optionally the outer lrs): OptunaSearch + ASHA on short runs
    scored on data.val_split, then the best and the default Beta(1, 1) rerun at full length on eval_split."""

    num_samples: int = 8
    max_concurrent_trials: int = 0  # 0 = fit to resources
    short_iterations: int = 300  # distillation length of a trial
    report_every: int = 100  # a trial reports val recall every this many iterations (ASHA's time unit)
    grace_period: int = 1  # reports before ASHA may stop a trial
    reduction_factor: int = 2
    beta_range: list[float] = field(default_factory=lambda: [0.1, 10.0])  # log-uniform for beta_a and beta_b
    search_lrs: bool = False  # also search lr_img / lr_txt / lr_sim (log-uniform, a decade around the config's)
    trial_cpus: float = 1.0
    trial_gpus: float = 0.5  # used when the cluster has GPUs: trials share them

    def __post_init__(self) -> None:
        for key in ("num_samples", "short_iterations", "report_every", "grace_period", "reduction_factor"):
            _positive(f"tune.{key}", getattr(self, key))
        _positive("tune.max_concurrent_trials", self.max_concurrent_trials, allow_zero=True)
        _positive("tune.trial_cpus", self.trial_cpus)
        _positive("tune.trial_gpus", self.trial_gpus, allow_zero=True)
        if len(self.beta_range) != 2 or not 0 < self.beta_range[0] < self.beta_range[1]:
            raise ConfigError(f"tune.beta_range={self.beta_range} must be [low, high] with 0 < low < high")
        if self.report_every > self.short_iterations:
            raise ConfigError(f"tune.report_every={self.report_every} exceeds tune.short_iterations="
                              f"{self.short_iterations}: a trial would never report")


@dataclass
class ExportConfig:
    """What `repblend export` writes next to the distilled safetensors."""

    shard_size: int = 1000  # samples per WebDataset shard
    nearest_captions: int = 5  # real captions listed for each synthetic text embedding

    def __post_init__(self) -> None:
        _positive("export.shard_size", self.shard_size)
        _positive("export.nearest_captions", self.nearest_captions)


@dataclass
class InvertConfig:
    """Feature-to-pixel inversion of a feature-space set (stages/invert.py): the set published as images."""

    # after distilling in feature space, find images whose encodings are the distilled features (each starts from
    # the real image its pair started from); evaluated as its own row, kept in <run>/invert
    enabled: bool = False
    steps: int = 300  # Adam steps per batch of images
    lr: float = 0.05  # on pixels in the encoder's normalised space
    batch_size: int = 33
    # then refine iterations (refine's settings) of the set's free parts, its texts, S and lrs, against the images'
    # actual encodings, so they absorb the inversion's error; the pixels stay as inverted (needs refine.enabled)
    adapt_iterations: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            _positive(f"invert.{key}", getattr(self, key))
        _positive("invert.lr", self.lr)
        _positive("invert.adapt_iterations", self.adapt_iterations, allow_zero=True)


@dataclass
class RefineConfig:
    """Back-propagation through the evaluation protocol's training (stages/refine.py), after trajectory matching."""

    # a feature-space RepBlend set is refined in <run>/refine, and that refined set is the run's set (evaluated as
    # the repblend row, inverted, exported); the matched set keeps its own row, repblend_matched
    enabled: bool = False
    iterations: int = 100  # outer iterations, each one whole protocol training (eval.epochs) of fresh heads
    lr: float = 3e-3  # Adam on the features, texts, S and the log student lrs
    # constant | cosine: the Adam lr falls to 0 over refine.iterations (then the length is part of the set's key, so
    # a longer run starts over instead of continuing a shorter one)
    lr_schedule: str = "constant"
    real_batch: int = 1024  # real training captions in each outer loss
    learn_lrs: bool = True
    dropout: bool = False  # the unrolled heads train with the protocol's dropout (model.dropout), as evaluation's do
    # memory, not the result: replay the unroll in segments of this many epochs on the way back (99 pairs: 2.7 GiB
    # instead of 10.8, and faster on a CPU; 499 pairs: 7.5 GiB at 10, 4.9 at 5; benchmarks/bench_refine.py);
    # 0 = hold its whole graph
    segment_epochs: int = 10
    ckpt_every: int = 10
    eval_every: int = 0  # log eval-split recall of the current set every N iterations (1 seed; never selects)

    def __post_init__(self) -> None:
        for key in ("iterations", "real_batch", "ckpt_every"):
            _positive(f"refine.{key}", getattr(self, key))
        _positive("refine.lr", self.lr)
        _positive("refine.eval_every", self.eval_every, allow_zero=True)
        _positive("refine.segment_epochs", self.segment_epochs, allow_zero=True)
        _choice("refine.lr_schedule", self.lr_schedule, ("constant", "cosine"))


@dataclass
class RunConfig:
    name: str = ""  # "" = the config file's stem
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # progress of long loops: a bar on a terminal; elsewhere (a log file, a Ray worker) a log line with the count,
    # rate and time left every progress_every seconds, and one when the loop ends
    progress: bool = True
    progress_every: float = 30.0
    tensorboard: bool = False  # also write distillation metrics to <run dir>/distill/tensorboard

    def __post_init__(self) -> None:
        _positive("run.progress_every", self.progress_every, allow_zero=True)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ebr: EBRConfig = field(default_factory=EBRConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.refine.enabled and (self.distill.space != "feature" or self.distill.mode != "repblend"):
            raise ConfigError("refine.enabled=true refines a feature-space RepBlend set; it needs "
                              f"distill.space=feature and distill.mode=repblend (got {self.distill.space}, "
                              f"{self.distill.mode}); for pixels, refine in feature space and set invert.enabled=true")
        if self.refine.enabled and self.ebr.enabled and "eval" in self.ebr.apply_to:
            raise ConfigError("refine.enabled=true replays the plain heads' evaluation training; it does not model EBR "
                              "in evaluation (ebr.apply_to contains eval)")
        if self.invert.adapt_iterations and not (self.invert.enabled and self.refine.enabled):
            raise ConfigError(f"invert.adapt_iterations={self.invert.adapt_iterations} refines the inverted set's "
                              "texts, S and lrs with refine's settings; it needs invert.enabled=true and "
                              "refine.enabled=true")
        if self.invert.enabled and (self.distill.space != "feature" or self.distill.mode != "repblend"):
            raise ConfigError("invert.enabled=true turns a feature-space RepBlend set into pixels; it needs "
                              f"distill.space=feature and distill.mode=repblend (got {self.distill.space}, "
                              f"{self.distill.mode})")


def _known_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        keys.append(path)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(_known_keys(type(default), path + "."))
    return keys


def _friendly(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) and key:
        close = difflib.get_close_matches(key, _known_keys(Config), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"{origin}: unknown config key '{key}'{hint}")
    if isinstance(exc, ValidationError) and key:
        message = str(exc).splitlines()[0]
        if "is not a ListConfig" in message:  # OmegaConf's words for "a list was expected"
            message = "a list is expected, such as [a,b] or []"
        return ConfigError(f"{origin}: bad value for '{key}': {message}")
    return ConfigError(f"{origin}: {str(exc).splitlines()[0]}")


def _container_clash(base: Any, other: Any, prefix: str = "") -> str | None:
    """The first key where `other` puts a list over a mapping of `base`, or a mapping over a list."""
    if not isinstance(base, DictConfig) or not isinstance(other, (dict, DictConfig)):
        return None
    for key, value in other.items():
        if key not in base:
            continue
        old = base._get_node(key)
        new_list, new_map = isinstance(value, (list, ListConfig)), isinstance(value, (dict, DictConfig))
        if (isinstance(old, ListConfig) and new_map) or (isinstance(old, DictConfig) and new_list):
            return f"{prefix}{key}"
        clash = _container_clash(old, value, f"{prefix}{key}.")
        if clash is not None:
            return clash
    return None


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, origin) from exc
    except TypeError as exc:  # OmegaConf's "Cannot merge incompatible container types"
        key = _container_clash(base, other)
        if key is None:
            raise
        kind = ("a list is expected, such as [a,b] or []" if isinstance(OmegaConf.select(base, key), ListConfig)
                else "a mapping is expected, such as {name: value} or {}")
        raise ConfigError(f"{origin}: bad value for '{key}': {kind}") from exc


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(content).__name__}")
    return content


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides: {str(exc).splitlines()[0]}") from exc


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, validated into a `Config`."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        cfg = _merge(cfg, _read_yaml(path), str(path))
    config = _validated(_merge(cfg, _parse_overrides(list(overrides)), "override"), str(path or "config"))
    if not config.run.name and path is not None:
        config.run.name = Path(path).stem
    return config


def config_from_yaml(text: str, origin: str) -> Config:
    """A resolved config as a run recorded it (a set's metadata), validated as `load_config` would."""
    return _validated(_merge(OmegaConf.structured(Config), yaml.safe_load(text), origin), origin)


def _validated(cfg: DictConfig, origin: str) -> Config:
    try:
        return OmegaConf.to_object(cfg)  # runs each section's __post_init__ (ConfigError passes through)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, origin) from exc


# a setting's default from when it was added, where the default has changed since: a run record (an identity) that
# lacks the key predates the setting and was made with this value, not today's default. Changing a default? Add the
# old one here, or run directories made before will be continued under the new behaviour.
FIRST_DEFAULTS: dict[str, Any] = {"distill.grad_clip": 0.0}


def flat_keys(tree: dict, prefix: str = "", leaves: tuple[str, ...] = ()) -> dict[str, Any]:
    """A nested mapping (a config as a dict, an identity) as {"a.b.c": value}; keys in `leaves` stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in leaves:
            out.update(flat_keys(value, f"{name}.", leaves))
        else:
            out[name] = value
    return out


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
