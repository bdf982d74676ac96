"""Benchmark expert buffering on Flickr30k-sized cached features (TARGETS.md P3: 20 experts x 10 epochs <= 60 s, H100).

    python benchmarks/bench_buffer.py --small           # 2 experts x 2 epochs, 1000 images, dims / 8: seconds on a CPU
    python benchmarks/bench_buffer.py --device cuda     # 20 x 10 on 29k images / 145k captions, both feature shapes
    python benchmarks/bench_buffer.py --device cuda --shapes paper --experts 4   # a quick look, projected to 20 x 10
    python benchmarks/bench_buffer.py --device cuda --batch-experts 1 4 20      # experts trained together, speed-up

Times `stages.buffer.train_expert` (what the buffer stage runs for every expert, in-process or as a Ray task) on
random features already on the device, one expert after the other, all epochs trained and snapshotted; with
`--batch-experts K`, `train_experts` on groups of K (`buffer.batch_experts`: one batched step for the group). Shapes:
paper = NFNet-l0 2304-d images, BERT 768-d texts, heads to 2304; ours = EfficientNet-Lite0 1280-d, MiniLM 384-d,
heads to 1024. Left out: loading the cache, each expert's recall on the eval split, writing the safetensors.
Prints seconds in all, per expert-epoch and per SGD step, and the total projected to 20 experts x 10 epochs.
"""

from __future__ import annotations

import argparse
import time

import torch

from repblend.stages.buffer import ExpertSettings, train_expert, train_experts

SHAPES = {"paper": (2304, 768, 2304), "ours": (1280, 384, 1024)}  # image dim, text dim, head output
GOAL_S, GOAL_EXPERTS, GOAL_EPOCHS = 60.0, 20, 10


def make_features(n_img: int, caps_per_image: int, img_dim: int, txt_dim: int, device: torch.device, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random image and caption features plus a shuffled caption -> image map, made on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.randn(n_img, img_dim, generator=g, device=device)
    c2i = torch.arange(n_img, device=device).repeat_interleave(caps_per_image)
    c2i = c2i[torch.randperm(len(c2i), generator=g, device=device)]
    txt = img[c2i, :txt_dim] + torch.randn(len(c2i), txt_dim, generator=g, device=device)  # learnable pairing
    return img, txt, c2i


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_buffer(features: tuple[torch.Tensor, torch.Tensor, torch.Tensor], settings: ExpertSettings, experts: int,
                device: torch.device, seed: int, together: int = 1) -> list[float]:
    """Seconds per group of `together` experts (`buffer.batch_experts`; 1 = one after the other, `train_expert`)."""
    img, txt, c2i = features
    warm = settings.batch_size * 4  # kernels, cuBLAS handles, allocator: not part of any expert
    short = ExpertSettings(**{**settings.__dict__, "epochs": 1})

    def train(settings: ExpertSettings, seeds: list[int], n: int | None = None) -> None:
        if together == 1:
            train_expert(img, txt[:n], c2i[:n], settings, seeds[0], device)
        else:
            train_experts(img, txt[:n], c2i[:n], settings, seeds, device)

    train(short, [seed] * min(together, experts), warm)
    seconds = []
    for first in range(0, experts, together):
        sync(device)
        t0 = time.perf_counter()
        train(settings, [seed + k for k in range(first, min(first + together, experts))])
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1000 images, dims / 8, 2 experts x 2 epochs (quick check)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--images", type=int, default=29_000)
    ap.add_argument("--caps-per-image", type=int, default=5)
    ap.add_argument("--experts", type=int, default=GOAL_EXPERTS)
    ap.add_argument("--epochs", type=int, default=GOAL_EPOCHS)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batch-experts", type=int, nargs="+", default=[1],
                    help="experts trained together (buffer.batch_experts), one row each; ratios against the first")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 cuts noise on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.small:
        args.images, args.experts, args.epochs = 1000, 2, 2
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark and print its table; returns the figures (for tests and notes)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    captions = args.images * args.caps_per_image
    steps = max(1, captions // args.batch_size)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} images, "
          f"{captions} captions, batch {args.batch_size} ({steps} steps/epoch); {args.experts} experts x "
          f"{args.epochs} epochs")
    print(f"{'shape':6} {'img':>5} {'txt':>5} {'head':>5} {'together':>8} {'seconds':>9} {'s/exp-epoch':>11} "
          f"{'ms/step':>8} {'20x10 (s)':>10} {'speed-up':>8} {'goal':>6}")
    rows = []
    for name in args.shapes:
        img_dim, txt_dim, embed = (d // 8 if args.small else d for d in SHAPES[name])
        features = make_features(args.images, args.caps_per_image, img_dim, txt_dim, device, args.seed)
        settings = ExpertSettings(embed_dim=embed, epochs=args.epochs, batch_size=args.batch_size)
        first = None
        for together in args.batch_experts:
            seconds = time_buffer(features, settings, args.experts, device, args.seed, together)
            total = sum(seconds)
            per_epoch = total / (args.experts * args.epochs)
            projected = per_epoch * GOAL_EXPERTS * GOAL_EPOCHS
            first = first or total
            goal = "-" if args.small or args.images != 29_000 else f"{GOAL_S:.0f}"
            print(f"{name:6} {img_dim:>5} {txt_dim:>5} {embed:>5} {together:>8} {total:9.2f} {per_epoch:11.3f} "
                  f"{1000 * per_epoch / steps:8.2f} {projected:10.1f} {first / total:7.2f}x {goal:>6}", flush=True)
            rows.append({"shape": name, "together": together, "seconds": total, "per_expert_epoch": per_epoch,
                         "projected_20x10": projected, "speed_up": first / total})
        del features
    if args.small or args.images != 29_000:
        print(f"(projected at this data size; P3's {GOAL_S:.0f} s goal is for 29k images / 145k captions on the H100)")
    return rows


if __name__ == "__main__":
    main()
