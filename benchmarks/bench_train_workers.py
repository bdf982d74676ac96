"""Distillation on K Ray Train workers against one (TARGETS.md P6: per-worker throughput >= 0.8 of one worker).

    python benchmarks/bench_train_workers.py                      # demo data, 1 and 2 workers of 1 CPU, 40 iterations
    python benchmarks/bench_train_workers.py --workers 1 2 4 --worker-cpus 4 --config configs/flickr8k_100_feature.yaml

Each worker draws its own trajectory sample and the gradients are averaged once per iteration, so K workers match
K samples per iteration. Per-worker throughput relative to one worker is therefore t_1 / t_K (seconds per
iteration): 1.0 when the all-reduce and the lock-step cost nothing. Times come from rank 0's `metrics.jsonl`
(`seconds`: sampling, matching, the all-reduce and the update), median over the iterations after `--warmup`.
The buffer is built once and shared. Prints one row per K and the all-reduce payload (the synthetic set's learnable
parameters, float32). With CPU workers the workers share the machine's memory bandwidth, so a ratio below 1 here is
an upper bound on the all-reduce's cost, not a measure of it on GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch

from repblend.distributed.train import distill_with_ray
from repblend.pipeline import steps
from repblend.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_iteration(run_dir: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    steady = [row["seconds"] for row in rows if row["iteration"] > warmup]
    if not steady:
        raise SystemExit(f"--iterations must exceed --warmup={warmup}")
    return statistics.median(steady)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker-cpus", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="", help="run directories here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)

    base = load_config(args.config, [*args.overrides, f"distill.iterations={args.iterations}",
                                     f"distill.ckpt_every={args.iterations}", "distill.eval_every=0",
                                     "run.progress=false", f"ray.worker_cpus={args.worker_cpus}"])
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        caches = steps.encode(base)
        buffer = steps.buffer(base, out / "shared", caches)
        base = dataclasses.replace(base, buffer=dataclasses.replace(base.buffer, dir=str(buffer)))
        payload = sum(p.numel() for p in steps.build_distiller(base, out / "shared", caches, torch.device("cpu"))
                      .distiller.syn.parameters())
        rows = []
        for k in args.workers:
            config = dataclasses.replace(base, ray=dataclasses.replace(base.ray, workers=k))
            run_dir = out / f"workers{k}"
            distill_with_ray(config, run_dir, caches)
            rows.append({"workers": k, "seconds": seconds_per_iteration(run_dir, args.warmup)})
    print(f"\nDistillation on Ray Train workers ({args.worker_cpus:g} CPU each), {args.iterations} iterations, median "
          f"after {args.warmup}; all-reduce payload {payload} floats ({payload * 4 / 2**20:.2f} MiB)\n")
    print("| workers | s/iteration | samples/s | per-worker throughput vs the first row |")
    print("|---|---|---|---|")
    for row in rows:
        row["samples_per_s"] = row["workers"] / row["seconds"]
        row["per_worker"] = rows[0]["seconds"] / row["seconds"]  # (K / t_K) / K against the first row's
        print(f"| {row['workers']} | {row['seconds']:.4f} | {row['samples_per_s']:.1f} | {row['per_worker']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
