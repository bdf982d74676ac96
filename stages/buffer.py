"""Expert trajectories: projection heads trained on cached features, snapshotted per epoch.

The encoders are frozen, so an expert is just two small MLPs trained on two feature matrices: no JPEG
decoding, no augmentation, no encoder forward. Only the snapshots distillation reads
(0 .. max_start_epoch + expert_epochs) are kept unless asked otherwise.

The LoRS baseline's experts (`encoder=` given) train the whole image encoder on pixels instead of an image
head on features, and a text head into the encoder's feature space (stages/lors.py); same loop, same files.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from repblend.stages.errors import DivergenceError
from repblend.stages.heads import DualHeads, HeadSpec, heads_sgd, similarity_logits
from repblend.stages.io import write_json, write_tensors
from repblend.stages.losses import clip_loss


ProgressFactory = Callable[[int], Any]  # total steps -> a progress bar (stages/progress.py) to update per step

_MASK_SEED_OFFSET = 7_777_777  # train_experts' dropout generators: apart from the seeds' data-order generators


@dataclass(frozen=True)
class ExpertSettings:
    embed_dim: int
    dropout: float = 0.1
    temperature: float = 0.07
    epochs: int = 10
    lr_img: float = 0.1
    lr_txt: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    keep_epochs: tuple[int, ...] | None = None  # None = all 0..epochs


@dataclass(frozen=True)
class Trajectory:
    """One expert's kept snapshots, flat, per modality: {epoch: tensor[P]}."""

    image: dict[int, torch.Tensor]
    text: dict[int, torch.Tensor]


def head_specs(img_dim: int, txt_dim: int, settings: ExpertSettings) -> tuple[HeadSpec, HeadSpec]:
    return (HeadSpec(img_dim, settings.embed_dim, settings.dropout),
            HeadSpec(txt_dim, settings.embed_dim, settings.dropout))


def expert_model(img_dim: int, txt_dim: int, settings: ExpertSettings, generator: torch.Generator,
                 encoder: nn.Module | None = None) -> tuple[nn.Module, tuple]:
    """A fresh expert and the specs that flatten its two sides: heads drawn from `generator`, or (LoRS) the
    pretrained `encoder` backbone, `img_dim` wide, with a fresh text head into its feature space."""
    if encoder is None:
        model = DualHeads(img_dim, txt_dim, settings.embed_dim, settings.dropout)
        specs = head_specs(img_dim, txt_dim, settings)
        specs[0].load_flat(model.image, specs[0].init_flat(generator))
    else:
        from repblend.stages.lors import LorsModel, lors_specs

        model = LorsModel(encoder, txt_dim, img_dim, settings.dropout)
        specs = lors_specs(encoder, txt_dim, img_dim, settings.dropout)
    specs[1].load_flat(model.text, specs[1].init_flat(generator))
    return model, specs


def train_expert(image_inputs: torch.Tensor, text_features: torch.Tensor, caption_to_image: torch.Tensor,
                 settings: ExpertSettings, seed: int, device: str | torch.device = "cpu",
                 encoder: nn.Module | None = None, feature_dim: int | None = None,
                 progress: ProgressFactory | None = None) -> Trajectory:
    """Train one expert with the symmetric CLIP loss, one sample per caption (ALGORITHMS.md section 2).

    `image_inputs` are cached features, or with `encoder` (LoRS: a backbone giving `feature_dim`-d features)
    the pixels of every image. `progress(total_steps)` gives the bar its steps advance: an encoder expert on a CPU
    takes minutes an epoch."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks inside the module
    img_dim = image_inputs.shape[1] if encoder is None else feature_dim
    model, (img_spec, txt_spec) = expert_model(img_dim, text_features.shape[1], settings, generator, encoder)
    model.to(device).train()
    optimizer = heads_sgd(model, settings.lr_img, settings.lr_txt, settings.momentum, settings.weight_decay)
    img_all = image_inputs.to(device, torch.float32)
    txt_all = text_features.to(device, torch.float32)
    c2i = caption_to_image.to(device)
    keep = set(settings.keep_epochs) if settings.keep_epochs is not None else set(range(settings.epochs + 1))
    traj = Trajectory({}, {})

    def snapshot(epoch: int) -> None:
        if epoch in keep:
            traj.image[epoch] = img_spec.flatten(model.image).detach().cpu().clone()
            traj.text[epoch] = txt_spec.flatten(model.text).detach().cpu().clone()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        img_emb, txt_emb = model(img_all[c2i[idx]], txt_all[idx])
        return clip_loss(img_emb @ txt_emb.T / settings.temperature)

    n = txt_all.shape[0]
    _sgd_epochs(min(settings.epochs, max(keep)), n, settings.batch_size,
                lambda: torch.randperm(n, generator=generator).to(device), loss_of, optimizer, snapshot,
                f"expert with seed {seed}", progress)
    return traj


def _sgd_epochs(epochs: int, n: int, batch_size: int, draw_order: Callable[[], torch.Tensor],
                loss_of: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                snapshot: Callable[[int], None], who: str, progress: ProgressFactory | None = None) -> None:
    """Epochs of SGD over `n` captions in the drawn order (drop_last, as the references), a snapshot after each
    (epoch 0 included); `draw_order` gives [n] or, for experts trained together, [E, n]."""
    steps = max(1, n // batch_size)
    snapshot(0)
    with contextlib.nullcontext() if progress is None else progress(epochs * steps) as bar:
        for epoch in range(1, epochs + 1):
            order = draw_order()
            for step in range(steps):
                loss = loss_of(order[..., step * batch_size:(step + 1) * batch_size])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if bar is not None:
                    bar.update(1)
            last = loss.item()  # one host sync per epoch, not per step
            if not math.isfinite(last):
                raise DivergenceError(f"{who} diverged: loss {last} at epoch {epoch}; lower buffer.lr_teacher_img / "
                                      "buffer.lr_teacher_txt")
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{last:.4f}")
            snapshot(epoch)


def train_experts(image_features: torch.Tensor, text_features: torch.Tensor, caption_to_image: torch.Tensor,
                  settings: ExpertSettings, seeds: list[int], device: str | torch.device = "cpu") -> list[Trajectory]:
    """Train one head expert per seed, all in the same steps: one batched matrix product per layer for all of them.

    On a GPU one expert's step is a few small kernels, launch-bound, so E experts batched cost little more than one
    (TARGETS.md P3). Each expert starts from the heads and sees the captions in the order `train_expert` gives the
    same seed; its dropout masks come from a generator of its own, so its trajectory does not depend on which experts
    share its steps, but with dropout > 0 it is not `train_expert`'s (whose masks come from the global RNG)."""
    device = torch.device(device)
    img_dim, txt_dim = image_features.shape[1], text_features.shape[1]
    img_spec, txt_spec = head_specs(img_dim, txt_dim, settings)
    orders_from = [torch.Generator().manual_seed(seed) for seed in seeds]  # init, then one permutation per epoch
    masks_from = [torch.Generator(device=device).manual_seed(seed + _MASK_SEED_OFFSET) for seed in seeds]
    inits = [(img_spec.init_flat(g), txt_spec.init_flat(g)) for g in orders_from]
    img_params = [p.requires_grad_(True) for p in img_spec.stack(torch.stack([i for i, _ in inits]).to(device))]
    txt_params = [p.requires_grad_(True) for p in txt_spec.stack(torch.stack([t for _, t in inits]).to(device))]
    optimizer = torch.optim.SGD([{"params": img_params, "lr": settings.lr_img},
                                 {"params": txt_params, "lr": settings.lr_txt}],
                                lr=settings.lr_img, momentum=settings.momentum, weight_decay=settings.weight_decay)
    img_all = image_features.to(device, torch.float32)
    txt_all = text_features.to(device, torch.float32)
    c2i = caption_to_image.to(device)
    keep = set(settings.keep_epochs) if settings.keep_epochs is not None else set(range(settings.epochs + 1))
    trajs = [Trajectory({}, {}) for _ in seeds]
    n_exp, n = len(seeds), txt_all.shape[0]
    batch = min(settings.batch_size, n)  # fewer captions than a batch: one step on all of them, as train_expert
    rows = torch.arange(batch, device=device).repeat(n_exp)

    def snapshot(epoch: int) -> None:
        if epoch in keep:
            with torch.no_grad():
                img_rows, txt_rows = img_spec.unstack(img_params).cpu(), txt_spec.unstack(txt_params).cpu()
            for traj, img, txt in zip(trajs, img_rows, txt_rows):
                traj.image[epoch], traj.text[epoch] = img.clone(), txt.clone()

    def dropout_keep(width: int) -> torch.Tensor | None:
        p = settings.dropout
        if p <= 0:
            return None
        draws = [torch.rand(batch, width, generator=g, device=device) for g in masks_from]
        return (torch.stack(draws) >= p).float() / (1 - p)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:  # idx [E, B]
        img_emb = img_spec.apply_stacked(img_params, img_all[c2i[idx]], dropout_keep(img_spec.out_dim))
        txt_emb = txt_spec.apply_stacked(txt_params, txt_all[idx], dropout_keep(txt_spec.out_dim))
        logits = similarity_logits(img_emb, txt_emb, settings.temperature)  # [E, B, B]
        # the sum of the experts' CLIP losses: each expert's gradient is its own loss's
        return 0.5 * n_exp * (F.cross_entropy(logits.reshape(-1, batch), rows)
                              + F.cross_entropy(logits.transpose(1, 2).reshape(-1, batch), rows))

    _sgd_epochs(min(settings.epochs, max(keep)), n, settings.batch_size,
                lambda: torch.stack([torch.randperm(n, generator=g) for g in orders_from]).to(device), loss_of,
                optimizer, snapshot, f"experts with seeds {seeds}")
    return trajs


def heads_at(traj: Trajectory, epoch: int, settings: ExpertSettings, img_dim: int, txt_dim: int,
             encoder: nn.Module | None = None) -> nn.Module:
    """The expert as a module at one snapshot (to measure its retrieval quality); `encoder` as in train_expert,
    with `img_dim` its feature width."""
    model, (img_spec, txt_spec) = expert_model(img_dim, txt_dim, settings, torch.Generator(), encoder)
    img_spec.load_flat(model.image, traj.image[epoch])
    txt_spec.load_flat(model.text, traj.text[epoch])
    return model.eval()


def expert_path(buffer_dir: Path, expert: int) -> Path:
    return Path(buffer_dir) / f"expert_{expert:03d}.safetensors"


def save_trajectory(path: Path, traj: Trajectory, meta: dict) -> None:
    tensors = {f"image.{e}": t for e, t in traj.image.items()}
    tensors.update({f"text.{e}": t for e, t in traj.text.items()})
    write_tensors(path, tensors, metadata={"meta": json.dumps(meta)})


def trajectory_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load_trajectory(path: Path) -> Trajectory:
    traj = Trajectory({}, {})
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            side, epoch = key.split(".")
            getattr(traj, side)[int(epoch)] = f.get_tensor(key)
    return traj


def write_index(buffer_dir: Path, index: dict) -> None:
    write_json(Path(buffer_dir) / "index.json", index)
