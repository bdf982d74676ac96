"""Benchmark `repblend run` stage by stage (TARGETS.md P5) and the configuration's distillation iteration (P7).

    python benchmarks/bench_run.py --small            # generated toy data, tiny encoders: well under a minute on a CPU
    python benchmarks/bench_run.py --config configs/flickr8k_100.yaml data.root=../shared/data/flickr8k   # P5, H100
    python benchmarks/bench_run.py --config configs/flickr8k_100_cpu.yaml   # the CPU config (P5: <= 15 min)

Runs the pipeline in this process (`repblend run`, any key=value overrides after the options) into a fresh run
directory (default runs/bench_run/<time>, or a temp dir with --small) with a fresh feature cache inside it, so
nothing is reused (--reuse-cache keeps the configured cache). Stage times come from this process's clock around
each stage's completion mark, and, as a cross-check, from the timestamps the run directory records (env.json
"started", stages.json "finished"; whole seconds). Distillation seconds per iteration come from
distill/metrics.jsonl (the time of `Distiller.step`, evaluation probes and checkpoints excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from repblend.pipeline import cli, rundir
from repblend.pipeline.hostmem import keep_freed_memory, malloc_mode
from repblend.stages.toydata import make_toy_dataset

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flickr8k_100.yaml"
STAGES = ("encode", "buffer", "distill", "eval", "export")
P5_GOAL_S, P7_GOAL_S = 600.0, 0.015
# the same chain at toy size: tiny random encoders, few experts, iterations and evaluation epochs
SMALL_OVERRIDES = [
    "encoders.image.name=tiny", "encoders.image.weights=random", "encoders.image.image_size=32",
    "encoders.text.name=tiny", "encoders.text.weights=random", "encoders.num_workers=0", "ray.enabled=false",
    "model.embed_dim=16", "buffer.num_experts=2", "buffer.train_epochs=3", "buffer.batch_size=16",
    "distill.num_queries=19", "distill.sim_rank=2", "distill.mini_batch_size=4", "distill.iterations=20",
    "distill.lr_img=0.1", "distill.lr_txt=0.1", "distill.lr_sim=0.01", "distill.lr_lr=1e-4", "distill.ckpt_every=10",
    "eval.num_eval=1", "eval.epochs=5", "eval.full_epochs=2", "eval.full_lrs=[0.1]", "run.progress=false",
]


def run_pipeline(config: str, overrides: list[str], run_dir: Path) -> tuple[dict[str, float], float]:
    """`repblend run` in this process; seconds from the start to each stage's completion mark, and in all."""
    marks: dict[str, float] = {}
    original = rundir.mark_stage_done

    def timed(path: Path, stage: str, record: dict) -> None:  # observe only: the record is written as usual
        original(path, stage, record)
        marks[stage] = time.perf_counter()

    argv = ["run", "--config", config, "--run-dir", str(run_dir), *overrides]
    rundir.mark_stage_done = timed
    start = time.perf_counter()
    try:
        code = cli.main(argv)
    finally:
        rundir.mark_stage_done = original
    total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"repblend {' '.join(argv)} failed with exit code {code}")
    return {stage: at - start for stage, at in marks.items()}, total


def recorded_marks(run_dir: Path) -> dict[str, float]:
    """Seconds from env.json's start to each stage's recorded finish (whole seconds)."""
    started = datetime.datetime.fromisoformat(json.loads((run_dir / "env.json").read_text())["started"])
    stages = json.loads((run_dir / "stages.json").read_text())
    return {s: (datetime.datetime.fromisoformat(r["finished"]) - started).total_seconds() for s, r in stages.items()}


def iteration_seconds(run_dir: Path, skip: int) -> list[float]:
    """Per-iteration seconds of the distillation, without the first `skip` (warm-up) iterations."""
    path = run_dir / "distill" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r["seconds"] for r in rows if r["iteration"] > skip]


def durations(marks: dict[str, float]) -> dict[str, float]:
    """Stage durations from cumulative marks (a stage runs from the previous mark to its own)."""
    out, last = {}, 0.0
    for stage in STAGES:
        if stage in marks:
            out[stage], last = marks[stage] - last, marks[stage]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="toy dataset and tiny overrides (quick CPU check)")
    ap.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.name}, shrunk by --small)")
    ap.add_argument("--run-dir", help="run directory (default: runs/bench_run/<time>; --small: a temp dir)")
    ap.add_argument("--reuse-cache", action="store_true", help="keep the configured feature cache (encode may skip)")
    ap.add_argument("--threads", type=int, help="torch CPU threads in this process (1 cuts noise on a shared CPU)")
    ap.add_argument("--skip-iterations", type=int, default=5, help="warm-up iterations left out of s/iteration")
    args, overrides = ap.parse_known_args(argv)
    stray = [o for o in overrides if "=" not in o or o.startswith("-")]
    if stray:
        ap.error(f"unrecognized arguments: {' '.join(stray)}")
    args.config = args.config or str(DEFAULT_CONFIG)
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the pipeline once and print its stage table; returns the figures (for tests and notes)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.small:  # as the `repblend` command does (pipeline/hostmem.py); --small runs inside the tests
        keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        overrides = list(args.overrides)
        if args.small:
            toy = make_toy_dataset(Path(tmp) / "toy", n_train=60, n_dev=20, size=32)
            overrides = [f"data.root={toy}", "data.name=toy", *SMALL_OVERRIDES, *overrides]
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.run_dir or (Path(tmp) / "run" if args.small else Path("runs") / "bench_run" / stamp))
        if not args.reuse_cache:
            overrides.append(f"cache.dir={run_dir / 'cache'}")
        marks, total = run_pipeline(args.config, overrides, run_dir)
        recorded = recorded_marks(run_dir)
        seconds = iteration_seconds(run_dir, args.skip_iterations)
    ours, theirs = durations(marks), durations(recorded)
    extra = " (+ the --small overrides)" if args.small else ""
    print(f"\nrepblend run --config {args.config} {' '.join(args.overrides)}".rstrip() + extra)
    print(f"run directory {run_dir}{' (removed)' if args.small and not args.run_dir else ''}; malloc {malloc_mode()}")
    print(f"{'stage':8} {'seconds':>9} {'recorded':>9} {'share':>6}")
    for stage in STAGES:
        if stage in ours:
            print(f"{stage:8} {ours[stage]:9.2f} {theirs.get(stage, float('nan')):9.0f} {ours[stage] / total:6.1%}")
    print(f"{'total':8} {total:9.2f} {max(recorded.values(), default=float('nan')):9.0f}  (P5 goal "
          f"{P5_GOAL_S:.0f} s for flickr8k_100 on the H100)")
    figures = {"stages": ours, "recorded": theirs, "total": total, "iterations": len(seconds)}
    if seconds:
        figures["median_iteration_s"] = statistics.median(seconds)
        print(f"distill: {len(seconds)} iterations after {args.skip_iterations} left out, median "
              f"{1000 * figures['median_iteration_s']:.1f} ms/iteration, mean {1000 * statistics.mean(seconds):.1f} "
              f"ms (P7 goal {1000 * P7_GOAL_S:.0f} ms for flickr8k_100 on the H100)")
    return figures


if __name__ == "__main__":
    main()
