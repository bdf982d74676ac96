"""The speed goals' benchmarks in one device call, most important first, inside a time budget (TARGETS.md P1-P4, P7).

    python3 benchmarks/gpu_session.py                  # on the GPU machine: the whole plan, 480 s budget
    python3 benchmarks/gpu_session.py --budget 300 --only p7 p1_p2
    python3 benchmarks/gpu_session.py --dry-run        # the plan: steps, commands, time limits
    python benchmarks/gpu_session.py --small           # the same steps at their --small shapes on a CPU (a test)

A GPU session is lent 15 minutes of device time, machine start included, so the benchmarks go in one call of a few
minutes, each step under a limit of its own, skipped when the budget left cannot hold it, so a slow compile or a
hung step costs its own limit and not the rest. Each step is a benchmarks/ script in a child process; everything it
prints goes to stdout and `<out>/session.log`, and `<out>/summary.md` gets a table of steps, goals, exit codes and
seconds. `--out` defaults to $OUT (what the device tool brings back) or runs/gpu_session.

The device machine has torch, timm and safetensors but no repblend install: where `repblend.stages` does not import,
the children get a stand-in package on PYTHONPATH (repblend/ with stages, pipeline and distributed linked in, the
layout pyproject.toml's package-dir makes). The steps use random encoder weights (TARGETS.md: random weights are fine
for timing), so no weights need carrying. Not here: P5 (the whole Flickr8k pipeline needs the images or a carried
feature cache) and P6 (several GPUs).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NFNET = ["--encoder", "nfnet_l0", "--weights", "random", "--text-dim", "768", "--embed-dim", "2304"]


@dataclass(frozen=True)
class Step:
    name: str
    goal: str
    script: str
    args: tuple[str, ...]  # on the GPU
    small: tuple[str, ...]  # on a CPU, with --small
    limit_s: int  # wall-clock limit on the GPU


PLAN = (
    Step("p7", "P7: Flickr8k shape (EfficientNet-Lite0, 99 pairs, 8 steps of 20) <= 15 ms/it; ratio to reference",
         "bench_distill.py", ("--device", "cuda", "--pairs", "99", "--weights", "random", "--fast-modes", "tesla",
                              "unroll", "factored"),
         ("--small", "--pairs", "9", "--iterations", "1", "--warmup", "1", "--encode-chunks", "0", "--fast-modes",
          "unroll", "factored"), 120),
    Step("p1_p2", "P1/P2: paper shape (NFNet-l0, 2304-d heads) at 99 and 499 pairs, >= 8x reference, memory <= it",
         "bench_distill.py", ("--device", "cuda", "--pairs", "99", "499", *NFNET, "--encode-chunks", "0"),
         ("--small", "--pairs", "9", "--iterations", "1", "--warmup", "1", "--encode-chunks", "0"), 150),
    Step("p7_compiled", "P7 with torch.compile (default, reduce-overhead = CUDA graphs), unroll",
         "bench_distill.py", ("--device", "cuda", "--pairs", "99", "--weights", "random", "--fast-modes", "unroll",
                              "--encode-chunks", "0", "--compile", "default", "reduce-overhead"),
         ("--small", "--pairs", "9", "--iterations", "1", "--warmup", "1", "--fast-modes", "unroll",
          "--encode-chunks", "0"), 180),
    Step("p3", "P3: 20 experts x 10 epochs, Flickr30k-sized features (paper shape) <= 60 s",
         "bench_buffer.py", ("--device", "cuda", "--shapes", "paper"), ("--small",), 150),
    Step("p3_batched", "P3: experts trained 4 at a time (buffer.batch_experts), 1 epoch, projected to 20 x 10",
         "bench_buffer.py", ("--device", "cuda", "--shapes", "paper", "--experts", "4", "--epochs", "1",
                             "--batch-experts", "1", "4"), ("--small", "--batch-experts", "1", "2"), 60),
    Step("p4", "P4: exact retrieval 5k x 25k <= 0.5 s on the GPU, FAISS and torch checked equal",
         "bench_retrieval.py", ("--devices", "cuda", "cpu", "--dims", "256", "1024", "2304"), ("--small",), 90),
    Step("refine", "refine iteration on the GPU: 99 and 499 pairs, whole graph against segments of 10",
         "bench_refine.py", ("--device", "cuda", "--pairs", "99", "499", "--segments", "0", "10"), ("--small",), 90),
    Step("lors", "LoRS-mode iteration (the encoder differentiated twice), 224 px: plain against loop-free + folded",
         "bench_lors.py", ("--device", "cuda", "--image-size", "224", "--weights", "random"), ("--small",), 90),
)


def command(step: Step, small: bool) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / step.script), *(step.small if small else step.args)]


def stand_in_package(where: Path) -> Path:
    """repblend/ as the installed package lays it out, its subpackages linked to the checkout's folders."""
    package = where / "repblend"
    package.mkdir(parents=True)
    shutil.copy(ROOT / "repblend" / "__init__.py", package / "__init__.py")
    for sub in ("stages", "pipeline", "distributed"):
        (package / sub).symlink_to(ROOT / sub, target_is_directory=True)
    return where


def child_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if importlib.util.find_spec("repblend") is None:
        site = stand_in_package(scratch / "site")
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_step(cmd: list[str], env: dict[str, str], limit_s: float, log) -> tuple[str, float]:
    """Run one step, its output to stdout and the log line by line; its status ("ok", "rc N", "timed out")."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = started + limit_s
    timer = _Killer(proc, deadline)
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    proc.wait()
    timer.cancel()
    seconds = time.perf_counter() - started
    if timer.fired:
        return "timed out", seconds
    return ("ok" if proc.returncode == 0 else f"rc {proc.returncode}"), seconds


class _Killer:
    """Kills a child's whole process group at its deadline (a compile may spawn workers of its own)."""

    def __init__(self, proc: subprocess.Popen, deadline: float) -> None:
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.perf_counter()), self._kill, (proc,))
        self._timer.daemon = True
        self._timer.start()

    def _kill(self, proc: subprocess.Popen) -> None:
        self.fired = True
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in PLAN], help="these steps, in plan order")
    ap.add_argument("--out", type=Path, help="log and summary folder (default: $OUT, else runs/gpu_session)")
    ap.add_argument("--small", action="store_true", help="each step at its --small shape on the CPU")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    steps = [s for s in PLAN if not args.only or s.name in args.only]
    if args.dry_run:
        for s in steps:
            print(f"{s.name:12} limit {s.limit_s:4d} s  {' '.join(command(s, args.small)[1:])}\n{'':12} {s.goal}")
        return []
    if not args.small:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_session: no CUDA device here; --small runs the same steps at CPU shapes")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_session")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    session_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, open(out / "session.log", "w") as log:
        env = child_env(Path(scratch))
        head = subprocess.run([sys.executable, "-c", "import torch, repblend.stages as s; print('torch', "
                               "torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() "
                               "if torch.cuda.is_available() else '', '| repblend.stages from', s.__path__[0])"],
                              env=env, cwd=scratch, capture_output=True, text=True)  # not ROOT: its repblend/
        print(head.stdout + head.stderr, end="")
        log.write(head.stdout + head.stderr)
        if head.returncode != 0:  # every step would fail the same way: spend no more device time
            sys.exit("gpu_session: torch or repblend does not import (above); no step run")
        for step in steps:
            left = args.budget - (time.perf_counter() - session_start)
            limit = step.limit_s if not args.small else max(step.limit_s, 300)
            if not args.small and left < min(limit, 30):
                results.append({"step": step.name, "goal": step.goal, "status": "skipped (budget)", "seconds": 0.0})
                continue
            cmd = command(step, args.small)
            banner = f"\n== {step.name}: {step.goal}\n$ {' '.join(cmd[1:])}  (limit {min(limit, left):.0f} s)\n"
            print(banner, end="", flush=True)
            log.write(banner)
            status, seconds = run_step(cmd, env, limit if args.small else min(limit, left), log)
            log.flush()
            results.append({"step": step.name, "goal": step.goal, "status": status, "seconds": seconds})
    lines = ["| step | goal | status | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['goal']} | {r['status']} | {r['seconds']:.0f} |" for r in results]
    summary = "\n".join(lines) + f"\n\n{head.stdout.strip()}; total {time.perf_counter() - session_start:.0f} s\n"
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    return results


if __name__ == "__main__":
    main()
