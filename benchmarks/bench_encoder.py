"""Benchmark the frozen image encoder: its BatchNorms folded into the convolutions (what `ImageEncoder` runs,
stages/bnfold.py) against the backbone as loaded, in the same process.

    python benchmarks/bench_encoder.py                   # EfficientNet-Lite0 (package weights), 224 px, 33 images
    python benchmarks/bench_encoder.py --device cuda --batch 99 160
    python benchmarks/bench_encoder.py --small           # random weights, 32 px: seconds on a CPU

Two passes per batch size: a forward under inference mode (what `repblend encode` does) and a forward + backward
to the pixels (what `repblend invert` and pixel-space distillation do every step). Prints the median seconds, images
per second, the speed-up of the folded encoder, and how far its features and pixel gradients are from the
unfolded backbone's (rounding only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from repblend.pipeline.hostmem import keep_freed_memory
from repblend.stages.encoders import build_image_encoder


def _timed(run, iterations: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _forward_backward(module: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = pixels.clone().requires_grad_(True)
    features = module(x).float()
    features.square().sum().backward()
    return features.detach(), x.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--weights", default="package")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, nargs="+", default=[33])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--small", action="store_true", help="random weights, 32 px, batch 2, one timed pass")
    args = ap.parse_args(argv)
    if args.small:
        args.weights, args.image_size, args.batch, args.iterations, args.warmup = "random", 32, [2], 1, 0
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """The table's rows (batch, pass, seconds as loaded and folded, speed-up, feature and gradient differences)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.small:  # as the repblend command does, so the figures are what a run sees (--small runs in tests)
        keep_freed_memory()
    device = torch.device(args.device)
    encoder = build_image_encoder(args.encoder, args.weights, args.image_size).to(device)
    if encoder.folded is None:
        raise SystemExit(f"{args.encoder}: no BatchNorm to fold, nothing to compare")
    print(f"{args.encoder} ({args.weights}), {args.image_size} px, {encoder.folded_batchnorms} BatchNorms folded, "
          f"device {device}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'pass':>14} {'as loaded s':>12} {'folded s':>9} {'img/s':>7} {'speed-up':>9} "
          f"{'feature diff':>13} {'grad diff':>10}")
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        pixels = torch.randn(batch, 3, args.image_size, args.image_size, generator=generator).to(device)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        want, want_grad = _forward_backward(encoder.backbone, pixels)
        got, got_grad = _forward_backward(encoder.folded, pixels)
        for name in ("forward", "fwd+bwd pixels"):
            def once(module: torch.nn.Module, name: str = name) -> None:
                if name == "forward":
                    with torch.inference_mode():
                        module(pixels)
                else:
                    _forward_backward(module, pixels)

            loaded = _timed(lambda: once(encoder.backbone), args.iterations, args.warmup, device)
            folded = _timed(lambda: once(encoder.folded), args.iterations, args.warmup, device)
            row = {"batch": batch, "pass": name, "loaded_s": loaded, "folded_s": folded,
                   "speed_up": loaded / folded, "feature_diff": _rel(got, want), "grad_diff": _rel(got_grad, want_grad)}
            rows.append(row)
            print(f"{batch:>6} {name:>14} {loaded:>12.3f} {folded:>9.3f} {batch / folded:>7.1f} "
                  f"{row['speed_up']:>8.2f}x {row['feature_diff']:>13.1e} {row['grad_diff']:>10.1e}")
    return rows


if __name__ == "__main__":
    main()
