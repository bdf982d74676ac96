"""Refine a distilled feature set by differentiating through the evaluation protocol's own training.

Trajectory matching (stages/distill.py) makes a few student steps move the heads like one expert epoch, but the set
is judged by something else: fresh heads trained on it for 100 epochs (ALGORITHMS.md section 5) and then used on
real data. Here that whole training is replayed as a differentiable function of the set (the protocol's shuffled
batches, SGD with momentum and weight decay, its lr schedule, from a fresh random initialisation each outer
iteration) and the set descends the CLIP loss of the trained heads on a batch of REAL training pairs
(back-propagation through time, as in the original dataset distillation). Matching gets the set close; this
aligns it with what it is measured by.

The unroll is exact. Held whole, it keeps every step's graph (100 full-batch steps at 99 pairs and 1024-d heads:
3.75 GiB on a CPU; 499 pairs take 4 batches an epoch, 12.9 GiB). With `segment_epochs` it keeps only the heads and
momentum at segment boundaries and replays one segment at a time on the way back (gradient checkpointing by hand:
torch.utils.checkpoint does not free the graph of the autograd.grad calls inside a step), the same gradient for one
more forward pass (on a CPU still faster: 6.4 s and 1.7 GiB against 7.5 s at 99 pairs; benchmarks/bench_refine.py).
Dropout is off inside the unroll by default (a fixed network is a cleaner meta-gradient; evaluation keeps the
protocol's); with `dropout` the unroll draws the protocol's dropout masks too, from a seed per step, so a segment
replays with the masks it ran with. The student lrs are learned in log space, so they stay positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from repblend.stages.errors import DivergenceError
from repblend.stages.evaluate import TrainSettings
from repblend.stages.heads import HeadSpec, similarity_logits
from repblend.stages.losses import clip_loss, wbce_loss


@dataclass(frozen=True)
class RefineSettings:
    lr: float = 3e-3  # Adam, for the features, texts, S and log student lrs alike
    real_batch: int = 1024  # real training captions (with their images) in each outer loss
    learn_lrs: bool = True
    image_range: tuple[float, float] | None = None  # keep the features inside the encoder's range (clamp_features)
    segment_epochs: int = 0  # replay the unroll in segments of this many epochs (memory); 0 = hold it whole
    learn_images: bool = True  # False: the image side stays (pixels already made from it), the rest adapts to it
    dropout: bool = False  # train the unrolled heads with the protocol's dropout, as evaluation does


def lr_factor(epoch: int, settings: TrainSettings) -> float:
    """The protocol's lr multiplier in `epoch` (0-based), as `evaluate.train_heads`'s scheduler sets it."""
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    return 0.1 if epoch >= settings.epochs // 2 + 1 else 1.0


def _logits(theta: tuple[torch.Tensor, torch.Tensor], specs: tuple[HeadSpec, HeadSpec], images: torch.Tensor,
            texts: torch.Tensor, temperature: float, masks: torch.Generator | None = None) -> torch.Tensor:
    """Without `masks` the heads run without dropout; with it, each head's dropout mask comes from it in turn."""
    train = masks is not None
    return similarity_logits(specs[0].apply_flat(theta[0], images, train=train, generator=masks),
                             specs[1].apply_flat(theta[1], texts, train=train, generator=masks), temperature)


def _step_masks(dropout_seed: int | None, step: int, device: torch.device) -> torch.Generator | None:
    """The generator of global step `step`'s dropout masks: a function of the seed and the step alone, so a replayed
    segment draws the masks its forward pass drew."""
    if dropout_seed is None:
        return None
    return torch.Generator(device=device).manual_seed(dropout_seed + step)


State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # image head, text head, their momenta


def _train_epochs(state: State, first_epoch: int, orders: list[torch.Tensor], specs: tuple[HeadSpec, HeadSpec],
                  images: torch.Tensor, texts: torch.Tensor, similarity: torch.Tensor, lrs: torch.Tensor,
                  settings: TrainSettings, create_graph: bool, dropout_seed: int | None = None) -> State:
    """`len(orders)` epochs of the protocol from `state`, one permutation each, in batches of `batch_size`, torch
    SGD's momentum and weight decay (buf = m * buf + g + wd * p; p -= lr * buf). Without `create_graph` nothing is
    kept between steps (the heads are detached after each). With `dropout_seed` the heads train with dropout."""
    theta, buffers = state[:2], state[2:]
    steps_per_epoch = math.ceil(images.shape[0] / settings.batch_size)
    for epoch, order in enumerate(orders, start=first_epoch):
        factor = lr_factor(epoch, settings)
        for b, start in enumerate(range(0, images.shape[0], settings.batch_size)):
            if not create_graph:
                theta = tuple(t.detach().requires_grad_(True) for t in theta)
            idx = order[start:start + settings.batch_size]
            masks = _step_masks(dropout_seed, epoch * steps_per_epoch + b, images.device)
            logits = _logits(theta, specs, images[idx], texts[idx], settings.temperature, masks)
            loss = clip_loss(logits) if settings.loss == "clip" else wbce_loss(logits, similarity[idx][:, idx])
            grads = torch.autograd.grad(loss, theta, create_graph=create_graph)
            # fused: 3 flat-sized kernels a parameter a step instead of 6 (they are most of a CPU iteration's
            # elementwise work); in-place on a fresh sum is safe, since add saves nothing for its backward
            buffers = tuple(g.add(b, alpha=settings.momentum).add_(t, alpha=settings.weight_decay)
                            for b, g, t in zip(buffers, grads, theta))
            theta = tuple(torch.addcmul(t, b, lr * -factor) for t, lr, b in zip(theta, lrs, buffers))
    if not create_graph:
        return tuple(t.detach() for t in (*theta, *buffers))
    return (*theta, *buffers)


class _SegmentedUnroll(torch.autograd.Function):
    """The unroll as one autograd node: forward keeps the state at each segment's start, backward replays the
    segments last to first with their graphs and chains the vector-Jacobian products."""

    @staticmethod
    def forward(ctx, images, texts, similarity, lrs, theta_img, theta_txt, specs, settings, orders, segment,
                dropout_seed):
        set_tensors = tuple(t.detach() for t in (images, texts, similarity, lrs))
        state = (theta_img.detach(), theta_txt.detach(), torch.zeros_like(theta_img), torch.zeros_like(theta_txt))
        starts = []
        with torch.enable_grad():
            for first in range(0, len(orders), segment):
                starts.append((first, state))
                state = _train_epochs(state, first, orders[first:first + segment], specs, *set_tensors, settings,
                                      create_graph=False, dropout_seed=dropout_seed)
        ctx.starts, ctx.specs, ctx.settings, ctx.orders, ctx.segment = starts, specs, settings, orders, segment
        ctx.dropout_seed = dropout_seed
        ctx.save_for_backward(*set_tensors)
        return state[0], state[1]

    @staticmethod
    def backward(ctx, grad_img, grad_txt):
        set_tensors = tuple(t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        totals = [torch.zeros_like(t) for t in set_tensors]
        upstream = [grad_img, grad_txt, None, None]  # the last momenta do not reach the loss
        for first, start in reversed(ctx.starts):
            with torch.enable_grad():
                state = tuple(t.detach().requires_grad_(True) for t in start)
                end = _train_epochs(state, first, ctx.orders[first:first + ctx.segment], ctx.specs, *set_tensors,
                                    ctx.settings, create_graph=True, dropout_seed=ctx.dropout_seed)
                pairs = [(e, g) for e, g in zip(end, upstream) if g is not None]
                grads = torch.autograd.grad([e for e, _ in pairs], state + set_tensors, [g for _, g in pairs],
                                            allow_unused=True)
            upstream = list(grads[:4])
            for total, grad in zip(totals, grads[4:]):
                if grad is not None:
                    total += grad
        ctx.starts = None
        return (*totals, None, None, None, None, None, None, None)


def protocol_unroll(theta: tuple[torch.Tensor, torch.Tensor], specs: tuple[HeadSpec, HeadSpec], images: torch.Tensor,
                    texts: torch.Tensor, similarity: torch.Tensor, lrs: torch.Tensor, settings: TrainSettings,
                    generator: torch.Generator, segment_epochs: int = 0, dropout: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads after `settings.epochs` of the protocol's training on the set from `theta`, differentiable w.r.t.
    the set, its S and its lrs. The permutations are drawn from `generator` first, one per epoch, then (with
    `dropout`) the seed of the dropout masks; with `segment_epochs` the graph is replayed in segments (same gradient
    up to float rounding, a fraction of the memory)."""
    orders = [torch.randperm(images.shape[0], generator=generator).to(images.device) for _ in range(settings.epochs)]
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if dropout else None
    if segment_epochs <= 0 or segment_epochs >= settings.epochs:
        state = tuple(t.detach().requires_grad_(True) for t in theta) + tuple(torch.zeros_like(t) for t in theta)
        trained = _train_epochs(state, 0, orders, specs, images, texts, similarity, lrs, settings, create_graph=True,
                                dropout_seed=dropout_seed)
        return trained[0], trained[1]
    return _SegmentedUnroll.apply(images, texts, similarity, lrs, theta[0], theta[1], specs, settings, orders,
                                  segment_epochs, dropout_seed)


def real_pairs_loss(theta: tuple[torch.Tensor, torch.Tensor], specs: tuple[HeadSpec, HeadSpec],
                    images: torch.Tensor, texts: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP loss of the trained heads on real pairs: what the refined set is judged by."""
    return clip_loss(_logits(theta, specs, images, texts, temperature))


class Refiner:
    """The set being refined (features, texts, S, log lrs) with its Adam state; `step` is one outer iteration."""

    def __init__(self, syn: dict[str, torch.Tensor], specs: tuple[HeadSpec, HeadSpec], train: TrainSettings,
                 settings: RefineSettings) -> None:
        self.specs, self.train, self.settings = specs, train, settings
        self.images = syn["image_features"].detach().clone().float().requires_grad_(settings.learn_images)
        self.texts = syn["texts"].detach().clone().float().requires_grad_(True)
        self.similarity = syn["similarity"].detach().clone().float().requires_grad_(True)
        lrs = torch.cat([syn["syn_lr_img"].reshape(1), syn["syn_lr_txt"].reshape(1)]).float()
        self.log_lrs = lrs.log().detach().requires_grad_(settings.learn_lrs)
        params = ([self.images] if settings.learn_images else []) + [self.texts, self.similarity]
        params += [self.log_lrs] if settings.learn_lrs else []
        self.optimizer = torch.optim.Adam(params, lr=settings.lr)

    def step(self, real_images: torch.Tensor, real_texts: torch.Tensor, generator: torch.Generator) -> float:
        """Train fresh heads (drawn from `generator`) on the set through the whole protocol, then one Adam step on
        the set against the real pairs' loss; returns that loss."""
        theta = tuple(spec.init_flat(generator).to(self.images.device) for spec in self.specs)
        trained = protocol_unroll(theta, self.specs, self.images, self.texts, self.similarity, self.log_lrs.exp(),
                                  self.train, generator, self.settings.segment_epochs, self.settings.dropout)
        loss = real_pairs_loss(trained, self.specs, real_images, real_texts, self.train.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in self.optimizer.param_groups[0]["params"]):
            raise DivergenceError("refine: a non-finite gradient; lower refine.lr")
        self.optimizer.step()
        if self.settings.image_range is not None:
            with torch.no_grad():
                self.images.clamp_(*self.settings.image_range)
        return loss.item()

    def set_lr(self, lr: float) -> None:
        """The outer Adam's lr from the next step on (the pipeline's schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def student_lrs(self) -> tuple[float, float]:
        img, txt = self.log_lrs.detach().exp().tolist()
        return img, txt

    def tensors(self) -> dict[str, torch.Tensor]:
        """The refined set in the distilled set's layout (feature space: `images` are the features)."""
        lrs = self.log_lrs.detach().exp()
        return {"image_features": self.images.detach(), "images": self.images.detach().clone(),
                "texts": self.texts.detach(), "similarity": self.similarity.detach(), "syn_lr_img": lrs[:1],
                "syn_lr_txt": lrs[1:]}

    def state_dict(self) -> dict:
        return {"images": self.images.detach(), "texts": self.texts.detach(), "similarity": self.similarity.detach(),
                "log_lrs": self.log_lrs.detach(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in ("images", "texts", "similarity", "log_lrs"):
                getattr(self, name).copy_(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
