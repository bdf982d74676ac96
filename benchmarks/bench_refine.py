"""Benchmark one refine iteration (stages/refine.py): seconds and peak memory, the graph held whole against replayed
in segments of `refine.segment_epochs` epochs.

    python benchmarks/bench_refine.py --small                                  # seconds on a CPU
    python benchmarks/bench_refine.py --pairs 99 499 --segments 0 10 5         # our shapes, 100 protocol epochs
    python benchmarks/bench_refine.py --device cuda --pairs 499 999 --segments 0 10

One iteration is what `Refiner.step` costs: the protocol's whole training of fresh heads unrolled on a random set of
`pairs` (1280-d features, 384-d texts, heads to 1024, batches of 128), then the real-pairs loss on 1024 real pairs
and the backward pass to the set. Each setting runs in a fresh process, so its peak (RSS on a CPU, the allocator's
peak on CUDA) is its own. Prints seconds, peak GiB, both as ratios to the first setting that ran (the whole graph
by default; a setting that does not fit is reported and skipped), and the largest relative difference of the set's
gradient from that setting's (rounding only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from repblend.stages.evaluate import TrainSettings
from repblend.stages.heads import HeadSpec
from repblend.stages.refine import protocol_unroll, real_pairs_loss

SHAPES = {"ours": (1280, 384, 1024), "small": (160, 48, 128)}  # image dim, text dim, head output


def one_iteration(pairs: int, segment: int, epochs: int, shape: str, device: torch.device, grad_file: Path) -> dict:
    """Time one unroll + backward, save the set's gradient to `grad_file`, report seconds and peak GiB."""
    d_img, d_txt, d_out = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(pairs, d_img, generator=g).to(device).requires_grad_(True)
    texts = torch.randn(pairs, d_txt, generator=g).to(device).requires_grad_(True)
    similarity = (torch.eye(pairs) + 0.01 * torch.rand(pairs, pairs, generator=g)).to(device).requires_grad_(True)
    real = (torch.randn(1024, d_img, generator=g).to(device), torch.randn(1024, d_txt, generator=g).to(device))
    specs = (HeadSpec(d_img, d_out, 0.0), HeadSpec(d_txt, d_out, 0.0))
    theta = tuple(spec.init_flat(g).to(device) for spec in specs)
    settings = TrainSettings(embed_dim=d_out, dropout=0.0, epochs=epochs)
    lrs = torch.tensor([0.3, 0.3], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trained = protocol_unroll(theta, specs, images, texts, similarity, lrs, settings, g, segment)
    real_pairs_loss(trained, specs, *real, 0.07).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    seconds = time.perf_counter() - start
    torch.save([images.grad.cpu(), texts.grad.cpu(), similarity.grad.cpu()], grad_file)
    return {"seconds": seconds, "peak_gib": peak}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[99, 499])
    ap.add_argument("--segments", type=int, nargs="+", default=[0, 10, 5],
                    help="0 = the graph held whole; the first that runs is the reference of the ratios")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="20 pairs, dims / 8, 10 epochs, segments 0 and 3")
    ap.add_argument("--child", nargs=2, metavar=("PAIRS", "SEGMENT"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="ours", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--grad-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        args.pairs, args.segments, args.epochs, args.shape = [20], [0, 3], 10, "small"
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """The table's rows (pairs, segment, seconds, peak_gib, grad_diff); fails if a segmented gradient is not the
    whole graph's."""
    args = parse_args(argv)
    if args.child:
        result = one_iteration(int(args.child[0]), int(args.child[1]), args.epochs, args.shape,
                               torch.device(args.device), args.grad_file)
        print(json.dumps(result))
        return [result]
    print(f"one refine iteration, {args.epochs} protocol epochs, shape {args.shape}, device {args.device}")
    print(f"{'pairs':>6} {'segment':>8} {'seconds':>8} {'peak GiB':>9} {'time x':>7} {'memory x':>9} {'grad diff':>10}")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for pairs in args.pairs:
            reference = None
            for segment in args.segments:
                grad_file = Path(tmp) / f"{pairs}_{segment}.pt"
                out = subprocess.run([sys.executable, __file__, "--child", str(pairs), str(segment), "--epochs",
                                      str(args.epochs), "--device", args.device, "--shape", args.shape,
                                      "--grad-file", str(grad_file)], capture_output=True, text=True)
                if out.returncode != 0:  # the whole graph of a large set may not fit: say so, go on
                    print(f"{pairs:>6} {segment or 'whole':>8}  failed (exit {out.returncode}; out of memory?)")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                reference = reference or (row, torch.load(grad_file))
                diff = max(float((a - b).abs().max() / b.abs().max())
                           for a, b in zip(torch.load(grad_file), reference[1]))
                print(f"{pairs:>6} {segment or 'whole':>8} {row['seconds']:>8.1f} {row['peak_gib']:>9.2f} "
                      f"{row['seconds'] / reference[0]['seconds']:>7.2f} "
                      f"{row['peak_gib'] / reference[0]['peak_gib']:>9.2f} {diff:>10.1e}")
                table.append({"pairs": pairs, "segment": segment, **row, "grad_diff": diff})
                if diff > 1e-4:
                    raise SystemExit(f"segments of {segment} epochs change the gradient by {diff:.1e} (> 1e-4)")
    return table


if __name__ == "__main__":
    main()
