"""The outer distillation loop: sample a trajectory, match it, update the synthetic set, checkpoint.

Everything that decides the result (synthetic set, optimizer momentum, RNG state, iteration) is in the
checkpoint, so a run killed at any point and restarted gives the same set as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import get_total_norm

from repblend.stages.buffer import Trajectory
from repblend.stages.distill import (DistillSettings, MatchResult, StudentBatch, SyntheticSet, match_tesla,
                                     match_unrolled, sample_batches)
from repblend.stages.factored import match_factored
from repblend.stages.errors import DivergenceError, RepblendError
from repblend.stages.fused import FusedMatch
from repblend.stages.heads import HeadSpec
from repblend.stages.io import atomic_path, read_checkpoint


@dataclass(frozen=True)
class OuterSettings:
    lr_img: float
    lr_txt: float
    lr_lr: float
    lr_sim: float
    momentum: float = 0.5
    optimizer: str = "sgd"  # sgd (reference, momentum) | adam (scale-free; suits feature space)
    lr_floor: float = 0.0  # clamp learned student lrs at this floor after each update (0 = no clamp)
    # ceilings on the learned student lrs (image, text), from the start and after each update; 0 = none. Why: the
    # config's distill.syn_lr_img_max
    syn_lr_max: tuple[float, float] = (0.0, 0.0)
    # feature space: clamp the synthetic image features into [low, high] after each update (None = free)
    image_range: tuple[float, float] | None = None
    # cap each parameter group's outer-gradient norm at this multiple of its running mean (0 = none). Why: the
    # gradient back through the unrolled student explodes where a learned lr nears the student's stability edge
    # (measured: 50-100x in one iteration at an ordinary loss), and that one update sends the set off for good
    grad_clip: float = 0.0


@dataclass(frozen=True)
class RewindSettings:
    """A guard against the spikes that end MTT-style runs: a learned lr grows, one student overshoots its expert,
    and the spike's own gradient drives both lrs to the floor, where the student stops moving for good (measured:
    LoRS-mode runs at 300 iterations). A spike's update is skipped; `patience` spikes in a row put the set back
    to its last healthy point with its learned student lrs and every outer lr scaled by `backoff`."""

    loss: float = 0.0  # a side's normalised matching loss above this (or non-finite) is a spike; 0 = no guard
    patience: int = 3  # consecutive spikes that rewind the set
    every: int = 10  # a healthy point is kept after each `every` iterations in a row without a spike
    backoff: float = 0.5  # each rewind multiplies the outer lrs (lr_img, lr_txt, lr_lr, lr_sim) by this
    max_rewinds: int = 4  # one more rewind than this stops the run (DivergenceError)

    @property
    def enabled(self) -> bool:
        return self.loss > 0


@dataclass(frozen=True)
class Sample:
    expert: int
    start_epoch: int
    batches: list[StudentBatch]


@dataclass
class StepLog:
    iteration: int
    loss: float
    loss_img: float
    loss_txt: float
    syn_lr_img: float
    syn_lr_txt: float
    seconds: float
    expert: int
    start_epoch: int
    guard: str = ""  # the spike guard's action this iteration: "", "skipped" or "rewound to <iteration>"
    clipped: int = 0  # parameter groups whose outer gradient distill.grad_clip scaled down this iteration


@dataclass
class Distiller:
    syn: SyntheticSet
    trajectories: list[Trajectory]
    specs: tuple[HeadSpec, HeadSpec]
    settings: DistillSettings
    outer: OuterSettings
    seed: int
    image_encoder: nn.Module | None = None  # pixel mode: frozen encoder applied to syn.images
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    iteration: int = 0
    rank: int = 0  # data-parallel rank: each rank draws its own experts, start epochs and batches
    # data-parallel runs average in place across workers (gradients, then the logged numbers); None = one process
    mean_across_workers: Callable[[list[torch.Tensor]], None] | None = None
    # a torch.compile mode for the exact unroll (stages/fused.py), compiling a student step or the whole unroll
    # (compile_scope); None = the eager loop
    compile: str | None = None
    compile_scope: str = "step"
    rewind: RewindSettings = field(default_factory=RewindSettings)

    def __post_init__(self) -> None:
        self.syn.to(self.device)
        self._fused = None if self.compile is None else FusedMatch(self.specs, self.settings, self.compile,
                                                                  self.compile_scope)
        self._fused_ran = False
        self.rng = np.random.default_rng(self.seed if self.rank == 0 else [self.seed, self.rank])
        groups = [
            {"params": [self.syn.images], "lr": self.outer.lr_img},
            {"params": [self.syn.texts], "lr": self.outer.lr_txt},
            {"params": [self.syn.syn_lr_img, self.syn.syn_lr_txt], "lr": self.outer.lr_lr},
            {"params": list(self.syn.sim.parameters()), "lr": self.outer.lr_sim},
        ]
        if self.outer.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=self.outer.lr_img)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.outer.lr_img, momentum=self.outer.momentum)
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._clamp_lrs()
        self._grad_mean: torch.Tensor | None = None  # per group: the running mean of clipped gradient norms
        # the spike guard's state (all of it checkpointed, so a resumed run rewinds as an uninterrupted one would)
        self.spikes = 0  # consecutive spikes up to now
        self.clean = 0  # iterations since the last spike
        self.rewinds = 0
        self._point = self._healthy_point() if self.rewind.enabled else None
        # trajectories stay resident on the device: they are small, and reloading them is what the references do
        self._traj = [
            Trajectory({e: t.to(self.device) for e, t in tr.image.items()},
                       {e: t.to(self.device) for e, t in tr.text.items()})
            for tr in self.trajectories
        ]
        needed = self.settings.max_start_epoch - 1 + self.settings.expert_epochs
        for k, tr in enumerate(self._traj):
            missing = [e for e in range(needed + 1) if e not in tr.image]
            if missing:
                raise RepblendError(f"expert {k} lacks snapshots {missing} needed by max_start_epoch="
                                    f"{self.settings.max_start_epoch} and expert_epochs={self.settings.expert_epochs}")

    def _features(self, batches: list[StudentBatch]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The image side as a leaf in feature space, plus what carries its gradient back to the pixels.

        In pixel mode only the images this iteration's batches touch go through the encoder (at 499 pairs,
        8 batches of 20 use at most 160): rows left at zero are never read, so they get no gradient either.
        """
        if self.image_encoder is None:
            return self.syn.images, None, None
        used = torch.unique(torch.cat([b.idx for b in batches])).to(self.device)
        chunk = self.settings.encode_chunk
        if chunk:
            with torch.no_grad():
                encoded = torch.cat([self._encode(part) for part in used.split(chunk)])
        else:
            encoded = self._encode(used)
        features = encoded.new_zeros((self.syn.num_pairs, encoded.shape[1]), dtype=self.syn.texts.dtype)
        features[used] = encoded.detach().to(features.dtype)
        return features.requires_grad_(True), encoded, used

    def _encode(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.image_encoder(self.syn.images[idx])

    def _backward_to_pixels(self, features: torch.Tensor, encoded: torch.Tensor, used: torch.Tensor) -> None:
        """Carry the features' gradient through the frozen encoder to the pixels (whole, or chunk by chunk)."""
        chunk = self.settings.encode_chunk
        if not chunk:
            encoded.backward(features.grad[used].to(encoded.dtype))
            return
        for part in used.split(chunk):  # the frozen encoder is per-image (eval mode), so chunks add up exactly
            recomputed = self._encode(part)
            recomputed.backward(features.grad[part].to(recomputed.dtype))

    def sample(self) -> Sample:
        """This rank's draw for one iteration: expert, start epoch and the student mini-batches."""
        expert = int(self.rng.integers(len(self._traj)))
        start_epoch = int(self.rng.integers(self.settings.max_start_epoch))
        return Sample(expert, start_epoch, sample_batches(self.syn.num_pairs, self.settings, self.rng))

    def gradients(self, sample: Sample) -> MatchResult:
        """Matching loss of `sample`; its gradient w.r.t. the synthetic set is left in the parameters' .grad."""
        traj = self._traj[sample.expert]
        start = (traj.image[sample.start_epoch], traj.text[sample.start_epoch])
        end = sample.start_epoch + self.settings.expert_epochs
        target = (traj.image[end], traj.text[end])
        self.optimizer.zero_grad(set_to_none=True)
        features, encoded, used = self._features(sample.batches)
        if self._fused is not None:
            try:
                result = self._fused(features, self.syn, start, target, sample.batches)
            except Exception as error:  # noqa: BLE001 - only the first call, where torch.compile builds the graph
                if self._fused_ran:
                    raise
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); distilling with the eager "
                              "loop instead", stacklevel=2)
                self._fused = None
                return self.gradients(sample)
            self._fused_ran = True
        else:
            match = (match_tesla if self.settings.grad_mode == "tesla" else
                     match_factored if self.settings.student == "factored" else match_unrolled)
            result = match(features, self.syn, self.specs, start, target, sample.batches, self.settings)
        if encoded is not None:
            self._backward_to_pixels(features, encoded, used)
        return result

    def step(self) -> StepLog:
        start_time = time.perf_counter()
        sample = self.sample()
        result = self.gradients(sample)
        stats = torch.stack([result.loss, result.loss_img, result.loss_txt])
        if self.mean_across_workers is not None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.syn.parameters()]
            self.mean_across_workers([*grads, stats])
            for p, g in zip(self.syn.parameters(), grads):
                p.grad = g
        # every rank sees the same averaged losses, so every rank takes the same action
        action = self._guard(stats) if self.rewind.enabled else ""
        clipped = None if action else self._update()
        self.iteration += 1
        if self.rewind.enabled and not action:
            self.clean += 1
            if self.clean % self.rewind.every == 0:
                self._point = self._healthy_point()
        # the iteration's only host synchronisation (the guard adds one): every logged number in one transfer
        numbers = [stats, self.syn.syn_lr_img.detach().reshape(1), self.syn.syn_lr_txt.detach().reshape(1)]
        if clipped is not None:
            numbers.append(clipped.reshape(1).to(stats))
        loss, loss_img, loss_txt, lr_img, lr_txt, *clips = torch.cat(numbers).tolist()
        log = StepLog(self.iteration, loss, loss_img, loss_txt, lr_img, lr_txt, time.perf_counter() - start_time,
                      sample.expert, sample.start_epoch, action, int(clips[0]) if clips else 0)
        if not action:
            self._check(log)  # before any checkpoint of this state is written
        return log

    def _update(self) -> torch.Tensor | None:
        """The outer step; with distill.grad_clip, returns how many groups' gradients it clipped (a device scalar)."""
        clipped = self._clip_gradients() if self.outer.grad_clip else None
        self.optimizer.step()
        self._clamp_lrs()
        if self.outer.image_range is not None:
            with torch.no_grad():
                self.syn.images.clamp_(*self.outer.image_range)
        return clipped

    def _clip_gradients(self) -> torch.Tensor:
        """Scale down a group's gradient whose norm exceeds grad_clip x the running mean of its (clipped) norms; the
        mean starts at a group's first non-zero norm and follows with weight 0.1. On the device, no host sync."""
        groups = [[p.grad for p in group["params"] if p.grad is not None] for group in self.optimizer.param_groups]
        norms = torch.stack([get_total_norm(grads).float() if grads else torch.zeros((), device=self.device)
                             for grads in groups])
        mean = norms if self._grad_mean is None else torch.where(self._grad_mean > 0, self._grad_mean, norms)
        cap = self.outer.grad_clip * mean
        scale = torch.where(torch.isfinite(norms) & (norms > cap), cap / norms, torch.ones_like(norms))
        for grads, factor in zip(groups, scale):
            for g in grads:
                g.mul_(factor.to(g.dtype))
        self._grad_mean = 0.9 * mean + 0.1 * torch.where(torch.isfinite(norms), torch.minimum(norms, cap), mean)
        return (scale < 1).sum()

    def _clamp_lrs(self) -> None:
        """Keep the learned student lrs inside [lr_floor, syn_lr_max] (each bound where it is set)."""
        floor = self.outer.lr_floor or None  # 0 = unbounded: a negative lr must reach _check, not become 0
        with torch.no_grad():
            for lr, ceiling in zip((self.syn.syn_lr_img, self.syn.syn_lr_txt), self.outer.syn_lr_max):
                if floor or ceiling:
                    lr.clamp_(min=floor, max=ceiling or None)

    # the spike guard ----------------------------------------------------------------------------------------

    def _guard(self, stats: torch.Tensor) -> str:
        """Skip a spike's update; rewind after `patience` in a row. Costs one host sync an iteration."""
        worst = float(stats[1:].max())  # NaN compares false, so a non-finite loss is a spike too
        if worst <= self.rewind.loss:
            self.spikes = 0
            return ""
        self.spikes += 1
        self.clean = 0
        if self.spikes < self.rewind.patience:
            return "skipped"
        if self.rewinds >= self.rewind.max_rewinds:
            raise DivergenceError(
                f"distillation diverged at iteration {self.iteration + 1}: {self.spikes} matching-loss spikes in a "
                f"row (a side's loss {worst:.4g} > distill.rewind_loss={self.rewind.loss}) after "
                f"{self.rewinds} rewinds (distill.rewind_max); the last good checkpoint is kept (try lower "
                "distill.lr_*)")
        self.rewinds += 1
        self.spikes = 0
        self._point["rewinds"] += 1
        self._restore(self._point)
        return f"rewound to {self._point['iteration']}"

    @property
    def lr_scale(self) -> float:
        """What the rewinds so far have scaled every outer lr by."""
        return self.rewind.backoff ** self.rewinds

    def _healthy_point(self) -> dict:
        return {"iteration": self.iteration, "rewinds": 0,
                **copy.deepcopy({"syn": self.syn.state_dict(), "optimizer": self.optimizer.state_dict()})}

    def _restore(self, point: dict) -> None:
        """The point's set and momentum, with its learned student lrs scaled once per rewind to it (an overshooting
        student is what a spike is) and every outer lr scaled by all the run's rewinds."""
        self.syn.load_state_dict(point["syn"])  # copies into the parameters: the point stays as it was
        with torch.no_grad():
            for lr in (self.syn.syn_lr_img, self.syn.syn_lr_txt):
                lr.mul_(self.rewind.backoff ** point["rewinds"])
        self._clamp_lrs()
        self.optimizer.load_state_dict(copy.deepcopy(point["optimizer"]))
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * self.lr_scale

    def _check(self, log: StepLog) -> None:
        if not math.isfinite(log.loss):
            raise DivergenceError(f"distillation diverged at iteration {self.iteration}: matching loss "
                                  f"{log.loss}; the last good checkpoint is kept (try lower distill.lr_*)")
        for name in ("syn_lr_img", "syn_lr_txt"):
            value = getattr(log, name)
            if not value > 0:
                raise DivergenceError(f"distillation diverged at iteration {self.iteration}: learned {name}={value}"
                                      " <= 0; the last good checkpoint is kept (try a lower distill.lr_lr)")

    # checkpoints -----------------------------------------------------------------------------------------

    def state(self) -> dict:
        state = {
            "iteration": self.iteration,
            "syn": self.syn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }
        if self._grad_mean is not None:
            state["grad_mean"] = self._grad_mean
        if self.rewind.enabled:
            state["guard"] = {"spikes": self.spikes, "clean": self.clean, "rewinds": self.rewinds,
                              "point": self._point}
        return state

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    def load(self, path: Path) -> None:
        state = read_checkpoint(path, self.device)
        self.syn.load_state_dict(state["syn"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration = state["iteration"]
        self._grad_mean = state.get("grad_mean")
        if self.rewind.enabled and "guard" in state:
            guard = state["guard"]
            self.spikes, self.clean, self.rewinds = guard["spikes"], guard["clean"], guard["rewinds"]
            self._point = guard["point"]
        elif self.rewind.enabled:  # a checkpoint from a run without the guard: its state is the healthy point
            self._point = self._healthy_point()

    def resume(self, checkpoint: Path) -> bool:
        """Continue from `checkpoint` if it exists (a killed run restarts exactly where it saved)."""
        if not checkpoint.is_file():
            return False
        self.load(checkpoint)
        return True

    def run(self, iterations: int, checkpoint: Path | None = None, ckpt_every: int = 100,
            on_step: Callable[[StepLog], None] | None = None) -> None:
        """Run until `iterations`, saving `checkpoint` every `ckpt_every` and at the end."""
        while self.iteration < iterations:
            log = self.step()
            if on_step is not None:
                on_step(log)
            if checkpoint is not None and (self.iteration % ckpt_every == 0 or self.iteration == iterations):
                self.save(checkpoint)
