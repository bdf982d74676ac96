"""Explicit Basis Reallocation (EBR, ALGORITHMS.md section 7) on top of the projection heads.

EBR counters modality collapse by making the shared codes of the modalities indistinguishable to an
adversary while the task loss keeps them semantic. Per modality i, a projector h_i (Linear d->H, ReLU,
Linear H->S) maps a feature f_i to a code g_i = h_i(f_i) and a decoder h_i^-1 (S->H->d) maps it back; the
decoded f~_i = h_i^-1(g_i) replaces f_i in the semantic loss (and at retrieval). A discriminator psi
(S->H->M) predicts the modality of a code; L_md is its cross-entropy.

Total loss ``L_sem + alpha * L_md`` with a gradient-reversal layer (GRL) between the codes and psi: in one
backward pass psi receives ``+alpha * dL_md`` (it descends L_md) and the codes, hence the projectors and
everything upstream, receive ``-alpha * dL_md`` (they ascend it). ``interleave=True`` replaces the GRL by
two updates per batch: psi first (on detached codes), then the rest against the updated psi.

In this project the features are the projection heads' outputs; ``EBRDualHeads`` wraps ``DualHeads`` so
that ``model.image(x)`` / ``model.text(x)`` return decoded embeddings and retrieval code works unchanged.
It applies to evaluation training only (``ebr.apply_to``): distillation replays head-only trajectories
with the plain loss, so experts trained through an adapter would be trajectories it cannot follow.
No reconstruction loss: the decoders learn only through L_sem, as in the sources ALGORITHMS.md cites.

``residual=True`` (not the paper's form) decodes to ``f_i + h_i^-1(g_i)`` with each decoder's last layer starting
at zero, so the model starts as the plain heads and the adapter only adds to them: on 99 pairs the paper's
bottleneck costs recall by itself (alpha = 0 loses as much as alpha > 0), and this separates that cost from
what the adversarial term does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblend.stages.heads import DualHeads

__all__ = ["EBRSettings", "grad_reverse", "mlp", "EBRAdapter", "EBRDualHeads", "ebr_param_groups", "ebr_step"]


@dataclass(frozen=True)
class EBRSettings:
    """Third-party defaults (alpha 0.01, H 1024, S 512); the paper's own values are unknown."""

    alpha: float = 0.01
    hidden: int = 1024
    shared_dim: int = 512
    interleave: bool = False
    lr_scale: float = 0.1  # adapter lr = lr_scale x its modality's head lr (psi: x their mean); see ebr_param_groups
    residual: bool = False  # decoded = f + h^-1(g), decoders' last layers from zero (the module docstring says why)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.hidden < 1 or self.shared_dim < 1 or self.lr_scale < 0:
            raise ValueError(f"EBR needs alpha >= 0 and positive widths, got {self}")


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D401 - identity
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.neg()


def grad_reverse(x: Tensor) -> Tensor:
    """Identity forward, negated gradient backward; alpha is applied once, on the loss, so it scales both sides."""
    return _GradReverse.apply(x)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class EBRAdapter(nn.Module):
    """Projectors h_i, decoders h_i^-1 (one per modality, feature widths ``dims``) and one discriminator psi."""

    def __init__(self, dims: Sequence[int], hidden: int, shared_dim: int, residual: bool = False) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"EBR needs at least two modalities, got dims={list(dims)}")
        self.dims = tuple(int(d) for d in dims)
        if residual and len(set(self.dims)) != 1:
            raise ValueError(f"a residual EBR adapter needs one feature width for all modalities, got {list(dims)}")
        self.residual = residual
        self.projectors = nn.ModuleList(mlp(d, hidden, shared_dim) for d in self.dims)
        self.decoders = nn.ModuleList(mlp(shared_dim, hidden, d) for d in self.dims)
        self.discriminator = mlp(shared_dim, hidden, len(self.dims))
        if residual:
            for decoder in self.decoders:
                nn.init.zeros_(decoder[-1].weight)
                nn.init.zeros_(decoder[-1].bias)

    @property
    def num_modalities(self) -> int:
        return len(self.dims)

    def encode(self, modality: int, features: Tensor) -> Tensor:
        return self.projectors[modality](features)

    def decode(self, modality: int, codes: Tensor) -> Tensor:
        return self.decoders[modality](codes)

    def reconstruct(self, modality: int, base: Tensor, codes: Tensor) -> Tensor:
        """What replaces a feature: its decoded code, plus ``base`` (the feature the code came from) if residual."""
        decoded = self.decode(modality, codes)
        return base + decoded if self.residual else decoded

    def discrimination_loss(self, codes: Sequence[Tensor], reverse: bool = True) -> Tensor:
        """L_md: cross-entropy of psi on the codes of each modality (rows of absent items simply not passed).

        ``reverse`` puts the GRL in front of psi, so one backward gives psi the descent and the codes the ascent."""
        if len(codes) != self.num_modalities:
            raise ValueError(f"expected codes of {self.num_modalities} modalities, got {len(codes)}")
        stacked = torch.cat(list(codes))
        labels = torch.cat([torch.full((c.shape[0],), i, dtype=torch.long, device=c.device)
                            for i, c in enumerate(codes)])
        return F.cross_entropy(self.discriminator(grad_reverse(stacked) if reverse else stacked), labels)

    def translate(self, target: int, source: int, features: Tensor) -> Tensor:
        """Proxy for a missing modality: h_target^-1(h_source(f_source)) (plus f_source if residual: the widths are
        equal then, and the heads put both modalities in one space)."""
        return self.reconstruct(target, features, self.encode(source, features))


class EBRDualHeads(nn.Module):
    """``DualHeads`` followed by EBR (image = modality 0, text = modality 1).

    ``image(x)``/``text(x)`` return the decoded (unnormalised) embeddings, like ``ProjectionHead`` does, so
    ``retrieval_of`` and the collapse diagnostics measure the representation the semantic loss trained."""

    def __init__(self, heads: DualHeads, settings: EBRSettings) -> None:
        super().__init__()
        self.heads = heads
        self.settings = settings
        self.adapter = EBRAdapter((heads.image.out_dim, heads.text.out_dim), settings.hidden, settings.shared_dim,
                                  settings.residual)

    def _side(self, modality: int, head_out: Tensor) -> Tensor:
        return self.adapter.reconstruct(modality, head_out, self.adapter.encode(modality, head_out))

    def image(self, x: Tensor) -> Tensor:
        return self._side(0, self.heads.image(x))

    def text(self, x: Tensor) -> Tensor:
        return self._side(1, self.heads.text(x))

    def head_outputs(self, img_feats: Tensor, txt_feats: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads.image(img_feats), self.heads.text(txt_feats)

    def codes(self, img_feats: Tensor, txt_feats: Tensor) -> tuple[Tensor, Tensor]:
        return self.codes_of(*self.head_outputs(img_feats, txt_feats))

    def codes_of(self, f_img: Tensor, f_txt: Tensor) -> tuple[Tensor, Tensor]:
        return self.adapter.encode(0, f_img), self.adapter.encode(1, f_txt)

    def embeddings(self, f_img: Tensor, f_txt: Tensor, g_img: Tensor, g_txt: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised decoded embeddings of the head outputs f and their codes g (what the semantic loss and
        retrieval see)."""
        return (F.normalize(self.adapter.reconstruct(0, f_img, g_img), dim=-1),
                F.normalize(self.adapter.reconstruct(1, f_txt, g_txt), dim=-1))

    def forward(self, img_feats: Tensor, txt_feats: Tensor) -> tuple[Tensor, Tensor]:
        """The drop-in for ``DualHeads.forward``."""
        f_img, f_txt = self.head_outputs(img_feats, txt_feats)
        return self.embeddings(f_img, f_txt, *self.codes_of(f_img, f_txt))


def ebr_param_groups(adapter: EBRAdapter, lrs: Sequence[float], lr_scale: float = 1.0) -> list[dict]:
    """Each modality's projector and decoder train at ``lr_scale`` x that modality's lr, psi at the mean of those.

    Why a scale: the heads end in LayerNorm and tolerate the protocol's SGD lrs (0.1, momentum 0.9), the
    un-normalised adapter MLPs do not: at the heads' lr their outputs grow and recall collapses. Measured on
    the toy problem of tests/test_ebr.py (heads lr 0.1, momentum 0.9, 20 epochs): r_mean 23 at scale 1, 79 at
    0.1, 92 at 0.03; plain heads 99."""
    lrs = [lr * lr_scale for lr in lrs]
    groups = [{"params": [*adapter.projectors[i].parameters(), *adapter.decoders[i].parameters()], "lr": lr}
              for i, lr in enumerate(lrs)]
    groups.append({"params": list(adapter.discriminator.parameters()), "lr": sum(lrs) / len(lrs)})
    return groups


def ebr_step(model: EBRDualHeads, optimizer: torch.optim.Optimizer, semantic: Callable[[Tensor, Tensor], Tensor],
             img_feats: Tensor, txt_feats: Tensor) -> Tensor:
    """One training step of L_sem + alpha * L_md; ``semantic`` maps normalised embeddings to L_sem.

    Returns the semantic loss (detached). Parameters without a gradient are skipped by torch's optimisers,
    so the interleaved discriminator update moves psi only and the encoder update never moves psi."""
    settings, adapter = model.settings, model.adapter
    f_img, f_txt = model.head_outputs(img_feats, txt_feats)
    g_img, g_txt = model.codes_of(f_img, f_txt)
    sem = semantic(*model.embeddings(f_img, f_txt, g_img, g_txt))
    if not settings.interleave:
        optimizer.zero_grad(set_to_none=True)
        (sem + settings.alpha * adapter.discrimination_loss((g_img, g_txt), reverse=True)).backward()
        optimizer.step()
        return sem.detach()
    optimizer.zero_grad(set_to_none=True)
    (settings.alpha * adapter.discrimination_loss((g_img.detach(), g_txt.detach()), reverse=False)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (sem - settings.alpha * adapter.discrimination_loss((g_img, g_txt), reverse=False)).backward()
    for p in adapter.discriminator.parameters():
        p.grad = None
    optimizer.step()
    return sem.detach()
