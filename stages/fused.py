"""The exact (unrolled) matching loss as pure functions, so that `torch.compile` can take them.

`distill.match_unrolled` differentiates each student step with `torch.autograd.grad(create_graph=True)`: a double
backward, which `torch.compile` cannot trace, and on a GPU hundreds of small kernel launches per iteration (the
heads are tiny; TARGETS.md P7). Here each student step's gradient comes from `torch.func.grad`, which Dynamo
traces into ordinary operations: a student step, or the whole unroll (K steps and the matching loss), becomes one
forward graph, and the gradient w.r.t. the synthetic set a first-order backward through it, both compiled and fused
by Inductor (`mode="reduce-overhead"` asks it for CUDA graphs as well: not yet measured, no GPU so far).
The mathematics is `match_unrolled`'s exactly: uncompiled it gives the same numbers (tested); compiled, the same up
to float rounding.

Covered: heads students (RepBlend mode, pixel or feature space), blending on or off, wBCE or CLIP, both ways of
merging the two matching losses. Not covered (`unsupported` says why): the LoRS encoder student, TESLA's two
passes, and the perturbation study's noise (drawn from a seeded generator per step).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial

import torch
from torch.func import grad

from repblend.stages.distill import (DistillSettings, MatchResult, StudentBatch, SyntheticSet, _matching, blend,
                                     student_loss)
from repblend.stages.heads import HeadSpec
from repblend.stages.lors import EncoderSpec

SCOPES = ("step", "unroll")


def unsupported(specs: tuple[HeadSpec | EncoderSpec, HeadSpec], settings: DistillSettings) -> str | None:
    """Why the fused form cannot run this distillation, or None when it can."""
    if specs[0].blend_output:
        return "the LoRS encoder student is matched by the eager loop"
    if settings.grad_mode != "unroll":
        return f"distill.grad_mode={settings.grad_mode} (the fused form is the exact unroll)"
    if settings.noise > 0:
        return "blend.noise > 0 (the perturbation study draws its noise step by step)"
    return None


def student_step(theta_img: torch.Tensor, theta_txt: torch.Tensor, features: torch.Tensor, texts: torch.Tensor,
                 sim: torch.nn.Module, lr_img: torch.Tensor, lr_txt: torch.Tensor, rows: torch.Tensor,
                 lam: torch.Tensor | None, perm: torch.Tensor | None, *, specs: tuple[HeadSpec, HeadSpec],
                 settings: DistillSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the student heads on rows `rows` of the set, blended as `lam * x + (1 - lam) * x[perm]`
    (no blending when `lam` is None); differentiable w.r.t. everything it reads."""
    x, v = blend(features[rows], lam, perm), blend(texts[rows], lam, perm)
    loss = partial(student_loss, img_spec=specs[0], txt_spec=specs[1], settings=settings)
    g_img, g_txt = grad(loss, argnums=(0, 1))(theta_img, theta_txt, x, v, sim.block_unchecked(rows))
    return theta_img - lr_img * g_img, theta_txt - lr_txt * g_txt


def unrolled_matching(features: torch.Tensor, texts: torch.Tensor, sim: torch.nn.Module, lr_img: torch.Tensor,
                      lr_txt: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor],
                      target: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, lam: torch.Tensor | None,
                      perm: torch.Tensor | None, *, step: Callable, settings: DistillSettings
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matching losses (combined, image, text) after K student steps `step` from `start`, step k on rows `idx[k]`
    with blend `lam[k]`, `perm[k]`."""
    theta_img, theta_txt = start
    for k in range(idx.shape[0]):
        theta_img, theta_txt = step(theta_img, theta_txt, features, texts, sim, lr_img, lr_txt, idx[k],
                                    None if lam is None else lam[k], None if perm is None else perm[k])
    return _matching(theta_img, theta_txt, start, target, settings)


@lru_cache(maxsize=None)
def _matching_fn(specs: tuple[HeadSpec, HeadSpec], settings: DistillSettings, mode: str | None, scope: str) -> Callable:
    """`unrolled_matching` for one configuration, compiled as asked. Cached: distillers of the same configuration in
    one process (Tune trials, tests) share one compiled graph instead of compiling again."""
    step = partial(student_step, specs=specs, settings=settings)
    compiled = partial(torch.compile, mode=mode, fullgraph=True, dynamic=False)
    if mode is not None and scope == "step":
        step = compiled(step)
    fn = partial(unrolled_matching, step=step, settings=settings)
    return compiled(fn) if mode is not None and scope == "unroll" else fn


class FusedMatch:
    """`match_unrolled`'s interface over `unrolled_matching`, compiled when `mode` (a torch.compile mode) is set,
    None runs it eagerly. `scope` is what one compiled graph holds: a student `step` (compiles in seconds, reused by
    every step) or the whole `unroll` (a minute or more to compile, fewest operations per iteration). Shapes are
    fixed for a run, so either compiles once."""

    def __init__(self, specs: tuple[HeadSpec, HeadSpec], settings: DistillSettings, mode: str | None,
                 scope: str = "step") -> None:
        reason = unsupported(specs, settings)
        if reason is not None:
            raise ValueError(f"the fused matching loss does not cover this distillation: {reason}")
        if scope not in SCOPES:
            raise ValueError(f"compile scope {scope!r} is not one of {SCOPES}")
        self._fn = _matching_fn(specs, settings, mode, scope)

    def __call__(self, features: torch.Tensor, syn: SyntheticSet, start: tuple[torch.Tensor, torch.Tensor],
                 target: tuple[torch.Tensor, torch.Tensor], batches: list[StudentBatch]) -> MatchResult:
        """Gradients accumulate in `features.grad` and in the synthetic set, as with `match_unrolled`."""
        device = features.device
        idx = torch.stack([b.idx for b in batches]).to(device)
        lam = perm = None
        if batches[0].lam is not None:
            lam = torch.tensor([b.lam for b in batches], dtype=features.dtype).to(device)
            perm = torch.stack([b.perm for b in batches]).to(device)
        # the student starts from a leaf that requires grad, as every later step's parameters do: one compiled
        # graph then serves all steps
        theta = (start[0].detach().requires_grad_(True), start[1].detach().requires_grad_(True))
        total, l_img, l_txt = self._fn(features, syn.texts, syn.sim, syn.syn_lr_img, syn.syn_lr_txt, theta, target,
                                       idx, lam, perm)
        total.backward()
        return MatchResult(total.detach(), l_img.detach(), l_txt.detach())
