"""How much of a full-data expert can N training pairs express? The capacity limit behind the G goals.

    python benchmarks/rank_limit.py --config configs/flickr8k_100_feature.yaml          # its run's buffer
    python benchmarks/rank_limit.py --config C --ranks 99 499 --experts 5 buffer.dir=runs/buffer_f8k
    python benchmarks/rank_limit.py --config configs/flickr8k_100_feature.yaml --train --ranks 99 199

Why: a projection head's first layer is h = W1 x + b1, so every gradient step on a set of N pairs changes W1 by a
sum of outer products with those N inputs (blending mixes inputs, it never leaves their span). Whatever a distilled
set of N pairs trains, the head's W1 moves from its initialisation by a matrix of rank <= N. This script takes
experts trained on the full data (the buffer), truncates each head's W1 update (last kept epoch minus epoch 0)
to its best rank-k approximation (SVD), and measures retrieval on the eval split. Rank N is an estimate of what a
perfect N-pair set could reach with these heads (an estimate, not a proof: another rank-N update than the SVD's
might retrieve better, and the second layer's inputs are not confined the same way).

Prints a table per rank: r_mean, IR@10, TR@10 (mean over experts) and the share of the update's energy kept.

`--train` answers the same question without the SVD's guess: heads trained on ALL real pairs by the full-data
bound's own protocol (CLIP loss, cosine schedule, (lr, epoch) swept on the eval split, the other evaluation seeds
at the chosen pair), with each first layer confined to what N pairs can reach: W1 = s * W1_0 + A B, W1_0 the
head's random initialisation, s a learned scale (weight decay shrinks W1_0 too), A B a learned move of rank k
(A from zero, B from the inputs' top-k principal directions). A trained model shows what rank k CAN reach, so it
bounds the capacity from below, as the SVD cut does; neither proves what rank k cannot reach.
The unconstrained row is the full-data bound itself (read back where a run kept it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import torch.nn.functional as F
from torch import nn

from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import load_config
from repblend.pipeline.rundir import default_run_dir
from repblend.stages.buffer import Trajectory, expert_path, head_specs, heads_at, load_trajectory
from repblend.stages.evaluate import retrieval_of
from repblend.stages.heads import DualHeads, HeadSpec


def low_rank_update(start: torch.Tensor, end: torch.Tensor, spec: HeadSpec, rank: int) -> tuple[torch.Tensor, float]:
    """`end` with its first layer's move away from `start` cut to rank `rank`; the share of that move's squared
    Frobenius norm kept. Every other parameter is `end`'s."""
    params, start_w1 = spec.unflatten(end.clone()), spec.unflatten(start)["fc1.weight"]
    update = params["fc1.weight"] - start_w1
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    params["fc1.weight"].copy_(start_w1 + kept.to(update.dtype))
    total = float((s ** 2).sum())
    return torch.cat([params[name].reshape(-1) for name, _, _ in spec.layout()]), (
        float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0)


def truncated_recall(traj: Trajectory, rank: int, settings, dims: tuple[int, int], evalset, device) -> dict:
    """Eval-split recall of the expert at its last kept epoch with both heads' W1 updates cut to `rank`."""
    last = max(traj.image)
    img_spec, txt_spec = head_specs(*dims, settings)
    image, energy_img = low_rank_update(traj.image[0], traj.image[last], img_spec, rank)
    text, energy_txt = low_rank_update(traj.text[0], traj.text[last], txt_spec, rank)
    model = heads_at(Trajectory({last: image}, {last: text}), last, settings, *dims).to(device)
    recall = retrieval_of(model, evalset.image_features, evalset.text_features, evalset.caption_to_image, device)
    return recall | {"energy_img": energy_img, "energy_txt": energy_txt}


class RankLimitedLinear(nn.Module):
    """`base` (a head's fc1) with its weight confined to scale * W1_0 + left @ right: the move away from the
    initialisation has rank <= len(right), as it has for any head trained on that many pairs. `left` starts at zero,
    so the layer starts as `base`; with orthonormal rows in `right`, A's steps are W1's steps projected onto them."""

    def __init__(self, base: nn.Linear, right: torch.Tensor) -> None:
        super().__init__()
        out_dim, in_dim = base.weight.shape
        if right.ndim != 2 or right.shape[1] != in_dim:
            raise ValueError(f"right must be [rank, {in_dim}], got {list(right.shape)}")
        self.register_buffer("start", base.weight.detach().clone())
        self.scale = nn.Parameter(torch.ones((), dtype=base.weight.dtype))
        self.bias = nn.Parameter(base.bias.detach().clone())
        self.left = nn.Parameter(torch.zeros(out_dim, right.shape[0], dtype=base.weight.dtype))
        self.right = nn.Parameter(right.detach().clone().to(base.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.scale * self.start + self.left @ self.right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def principal_directions(features: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` directions that carry most of the inputs' energy (top right singular vectors), as orthonormal rows:
    the subspace a rank-limited first layer starts learning in (a random one trains far worse)."""
    _, _, vh = torch.linalg.svd(features.double(), full_matrices=False)
    return vh[:rank].to(features.dtype)


def rank_limited_heads(dims: tuple[int, int], embed_dim: int, dropout: float,
                       rights: tuple[torch.Tensor, torch.Tensor]) -> DualHeads:
    """Fresh heads (the protocol's initialisation, from the current torch seed) with both fc1 rank-limited."""
    heads = DualHeads(*dims, embed_dim, dropout)
    heads.image.fc1 = RankLimitedLinear(heads.image.fc1, rights[0])
    heads.text.fc1 = RankLimitedLinear(heads.text.fc1, rights[1])
    return heads


def trained_rows(config, caches, ranks: list[int], train, evalset, device) -> dict[int, dict[str, float]]:
    """Per rank, the full-data bound's protocol with rank-limited first layers; the last row is the bound itself."""
    settings = evaluation.full_settings(config)
    dims = (train.image_features.shape[1], train.text_features.shape[1])
    rows: dict[int, dict[str, float]] = {}
    for rank in ranks:
        rights = (principal_directions(train.image_features, rank), principal_directions(train.text_features, rank))
        metrics, info = evaluation.full_bound(config, train, evalset, device, model=lambda rights=rights: (
            rank_limited_heads(dims, settings.embed_dim, settings.dropout, rights)))
        rows[rank] = {key: metrics[key]["mean"] for key in ("r_mean", "img_r10", "txt_r10")} | {
            "best_lr": info["best_lr"], "best_epoch": info["best_epoch"]}
        print(f"rank {rank} (trained): r_mean {rows[rank]['r_mean']:.2f}", file=sys.stderr)
    metrics, info = evaluation.reused_full_bound(config, caches, train, evalset, device)
    rows[max(dims)] = {key: metrics[key]["mean"] for key in ("r_mean", "img_r10", "txt_r10")} | {
        "best_lr": info["best_lr"], "best_epoch": info["best_epoch"]}
    print(f"Heads trained on all {config.data.train_split} pairs by the full-data bound's protocol, both first layers "
          f"confined to scale * W1_0 + a rank-k move; {config.data.eval_split} recall, mean over "
          f"{len(evaluation.eval_seeds(config))} seeds\n")
    print("| rank k | r_mean | IR@10 | TR@10 | lr, epoch |\n|---|---|---|---|---|")
    for rank, row in rows.items():
        label = "unconstrained (the full-data bound)" if rank == max(dims) else str(rank)
        print(f"| {label} | {row['r_mean']:.2f} | {row['img_r10']:.2f} | {row['txt_r10']:.2f} | "
              f"{row['best_lr']:g}, {row['best_epoch']} |")
    return rows


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--run-dir", type=Path, help="the run whose buffer to read (default: runs/<run.name>)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[25, 50, 99, 199, 499])
    ap.add_argument("--experts", type=int, default=3, help="how many experts of the buffer to measure")
    ap.add_argument("--train", action="store_true",
                    help="train rank-limited heads on all real pairs instead of cutting the buffer's experts")
    args = ap.parse_args(argv)
    if min(args.ranks) < 1:
        ap.error(f"--ranks must be positive, got {args.ranks}")
    config = load_config(args.config, [*args.overrides, "run.progress=false"])
    if config.distill.mode == "lors":
        ap.error("rank_limit measures head experts; distill.mode=lors trains the encoder")
    config = dataclasses.replace(config, buffer=dataclasses.replace(
        config.buffer, num_experts=min(args.experts, config.buffer.num_experts)))
    caches = steps.encode(config)
    device = steps.resolve_device(config.run.device)
    evalset = steps.load_features(caches, config.data.eval_split, device)
    train = steps.load_features(caches, config.data.train_split, device)
    if args.train:
        return trained_rows(config, caches, sorted(set(args.ranks)), train, evalset, device)
    run_dir = args.run_dir or default_run_dir(config)
    buffer_dir = steps.buffer(config, run_dir, caches)  # reuses the experts already there
    settings = steps.expert_settings(config)
    dims = (train.image_features.shape[1], train.text_features.shape[1])
    trajectories = [load_trajectory(expert_path(buffer_dir, k)) for k in range(config.buffer.num_experts)]
    ranks = sorted(set(args.ranks)) + [max(dims)]  # the last one keeps the whole update: the expert itself
    rows: dict[int, dict[str, float]] = {}
    for rank in ranks:
        runs = [truncated_recall(traj, rank, settings, dims, evalset, device) for traj in trajectories]
        rows[rank] = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
        print(f"rank {rank}: r_mean {rows[rank]['r_mean']:.2f}", file=sys.stderr)
    print(f"Experts of {buffer_dir} at epoch {max(trajectories[0].image)}, each head's W1 update cut to rank k; "
          f"{config.data.eval_split} recall, mean over {len(trajectories)} experts\n")
    print("| rank k | r_mean | IR@10 | TR@10 | energy kept (img / txt head) |\n|---|---|---|---|---|")
    for rank, row in rows.items():
        label = "full (the expert)" if rank == ranks[-1] else str(rank)
        print(f"| {label} | {row['r_mean']:.2f} | {row['img_r10']:.2f} | {row['txt_r10']:.2f} | "
              f"{row['energy_img']:.3f} / {row['energy_txt']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
