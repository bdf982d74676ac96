"""The exact unroll's two student forms, flat and factored (`distill.student`), side by side.

    python benchmarks/bench_student.py                  # CPU, the shapes of the configs
    python benchmarks/bench_student.py --device cuda    # the same on a GPU (decides what `auto` should pick there)
    python benchmarks/bench_student.py --small          # a tiny shape: seconds

For each shape (pairs, input sizes, head width, student steps of a mini-batch), on random features, texts and expert
snapshots: the median seconds of one matching call (the student unroll and the backward to the set) and its peak
memory, in each form, and the largest relative difference between their gradients. Only the heads' loop is timed:
no encoder (feature space; in pixel space the same loop runs on the encoded images). No pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import PeakMemory, _fmt_mem, measure  # noqa: E402 - a sibling script

from repblend.stages.distill import DistillSettings, SyntheticSet, match_unrolled, sample_batches  # noqa: E402
from repblend.stages.factored import match_factored  # noqa: E402
from repblend.stages.heads import HeadSpec  # noqa: E402


class Shape(NamedTuple):
    label: str
    pairs: int
    image_dim: int
    text_dim: int
    embed_dim: int
    syn_steps: int
    mini_batch: int


SHAPES = (
    Shape("demo", 49, 1280, 384, 256, 8, 20),
    Shape("flickr8k_100_cpu", 99, 1280, 384, 512, 8, 20),
    Shape("flickr8k_100 (heads)", 99, 1280, 384, 1024, 8, 20),
    Shape("flickr8k_100_feature", 99, 1280, 384, 1024, 16, 20),
    Shape("flickr8k_500_feature", 499, 1280, 384, 1024, 16, 40),
    Shape("paper (heads)", 99, 2304, 768, 2304, 8, 20),
)
SMALL = (Shape("small", 19, 24, 16, 32, 3, 4),)
FORMS = {"flat": match_unrolled, "factored": match_factored}


def problem(shape: Shape, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    specs = (HeadSpec(shape.image_dim, shape.embed_dim, 0.1), HeadSpec(shape.text_dim, shape.embed_dim, 0.1))
    start = tuple(spec.init_flat(g).to(device) for spec in specs)
    target = tuple(t + 0.01 * torch.randn(t.shape, generator=g).to(device) for t in start)
    syn = SyntheticSet(torch.rand(shape.pairs, shape.image_dim, generator=g),
                       torch.randn(shape.pairs, shape.text_dim, generator=g),
                       sim_rank=min(10, shape.pairs), sim_alpha=3.0, lr_init=0.1, generator=g).to(device)
    settings = DistillSettings(syn_steps=shape.syn_steps, mini_batch_size=shape.mini_batch)
    batches = sample_batches(shape.pairs, settings, np.random.default_rng(seed))
    return specs, start, target, syn, settings, batches


def run(form: str, specs, start, target, syn: SyntheticSet, settings, batches) -> list[torch.Tensor]:
    """One matching call; the set's gradients (features first)."""
    syn.zero_grad(set_to_none=True)
    features = syn.images.detach().requires_grad_(True)
    FORMS[form](features, syn, specs, start, target, batches, settings)
    return [features.grad] + [p.grad for p in syn.parameters() if p is not syn.images]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = PeakMemory(device)
    print(f"device {device}, torch {torch.__version__}, median of {args.iterations} calls after {args.warmup}")
    print(f"{'shape':22} {'pairs':>5} {'dims':>16} {'steps':>8} {'flat s':>8} {'factored s':>10} {'speed-up':>8} "
          f"{'flat mem':>10} {'fact. mem':>10} {'max rel diff':>12}")
    rows = []
    for shape in SMALL if args.small else SHAPES:
        setup = problem(shape, device)
        seconds, memory, grads = {}, {}, {}
        calls = {form: functools.partial(run, form, *setup[:3], copy.deepcopy(setup[3]), *setup[4:]) for form in FORMS}
        for call in calls.values():  # once each before any is measured: the first call's one-time costs go to neither
            call()
        for form, call in calls.items():
            seconds[form], memory[form] = measure(call, args.iterations, args.warmup, device, peak)
            grads[form] = call()
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                   for a, b in zip(grads["factored"], grads["flat"]))
        row = {"shape": shape.label, "seconds": seconds, "memory": memory, "max_rel_diff": diff}
        rows.append(row)
        dims = f"{shape.image_dim}/{shape.text_dim}->{shape.embed_dim}"
        print(f"{shape.label:22} {shape.pairs:>5} {dims:>16} {f'{shape.syn_steps}x{shape.mini_batch}':>8} "
              f"{seconds['flat']:8.3f} {seconds['factored']:10.3f} {seconds['flat'] / seconds['factored']:7.2f}x "
              f"{_fmt_mem(memory['flat'], device):>10} {_fmt_mem(memory['factored'], device):>10} {diff:12.1e}",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
