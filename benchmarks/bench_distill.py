"""Benchmark one pixel-space distillation iteration: fast path against the references' loop (TARGETS.md P1, P2, P7).

    python benchmarks/bench_distill.py --small          # tiny random encoder, 32 px: seconds on a CPU
    python benchmarks/bench_distill.py --device cuda    # EfficientNet-Lite0 (package weights), 224 px, MiniLM texts
    python benchmarks/bench_distill.py --device cuda --pairs 99 --compile default reduce-overhead   # P7
    python benchmarks/bench_distill.py --device cuda --encoder nfnet_l0 --weights random \\
        --text-dim 768 --embed-dim 2304                 # the paper's shape (P1, P2)

Both modes run on the same random problem in one process, one after the other (fresh state each):
- fast: `Distiller.step` in pixel space; each synthetic image the iteration uses is encoded once and its features
  serve every student step (and both TESLA passes); grad modes tesla and unroll; with --compile, also the exact
  unroll through torch.compile in each given mode, one graph per student step (stages/fused.py; compiling is in
  the warm-up);
- reference: the same iteration with `stages.reference_loop.match_tesla_reencode`: every student step re-encodes
  its mini-batch through the frozen encoder, in both TESLA passes (pass 1 builds its graph, as the references do).
Prints the median seconds per iteration, peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth over the
warm-up and timed iterations), encoder forwards per iteration, the speed-up over the reference and the memory
ratio, and the agreement of fast (tesla) and reference gradients on one sample. No pass/fail: figures for the issue.
On a CPU at 224 px, glibc serves the large activation tensors with fresh mmaps (page faults dominate); run with
MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 (and --threads 1 on a shared CPU).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch

from repblend.stages.buffer import Trajectory
from repblend.stages.distill import DistillSettings, SyntheticSet
from repblend.stages.distiller import Distiller, OuterSettings
from repblend.stages.encoders import build_image_encoder
from repblend.stages.heads import HeadSpec
from repblend.stages.reference_loop import match_tesla_reencode

SMALL = {"encoder": "tiny", "weights": "random", "image_size": 32, "text_dim": 32, "embed_dim": 32,
         "iterations": 3, "warmup": 1}
REAL = {"encoder": "efficientnet_lite0", "weights": "package", "image_size": 224, "text_dim": 384,
        "embed_dim": 1024, "iterations": 10, "warmup": 2}
MAX_START, EXPERT_EPOCHS = 2, 1


class PeakMemory:
    """Peak memory over a stretch of work: CUDA's allocator peak, or on Linux the growth of the peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.base = device, 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # hand freed heap back first (glibc), then "5" resets VmHWM (the peak RSS) to the RSS (Linux >= 4.0)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status_kib("VmRSS:")
        except (OSError, AttributeError):
            self.base = -1

    def read(self) -> float | None:
        """GiB (CUDA, absolute) or MiB (CPU, growth); None where it cannot be measured."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.base < 0:
            return None
        return (self._status_kib("VmHWM:") - self.base) / 1024


def random_trajectories(specs: tuple[HeadSpec, HeadSpec], experts: int, device: torch.device,
                        generator: torch.Generator) -> list[Trajectory]:
    """Experts whose snapshots drift a little each epoch: timing does not depend on trained weights."""
    out = []
    for _ in range(experts):
        traj = Trajectory({}, {})
        for side, spec in zip((traj.image, traj.text), specs):
            theta = spec.init_flat(generator)
            for epoch in range(MAX_START + EXPERT_EPOCHS):
                side[epoch] = theta.to(device)
                theta = theta + 0.01 * torch.randn(theta.shape, generator=generator)
            side[MAX_START + EXPERT_EPOCHS] = theta.to(device)
        out.append(traj)
    return out


def build(args: argparse.Namespace, pairs: int, encoder: torch.nn.Module, trajs: list[Trajectory],
          specs: tuple[HeadSpec, HeadSpec], grad_mode: str, device: torch.device, encode_chunk: int = 0,
          compile_mode: str | None = None) -> Distiller:
    """A fresh distiller on random pixels and texts (same seed for every mode, so the draws agree)."""
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(pairs, 3, args.image_size, args.image_size, generator=g)
    texts = torch.randn(pairs, args.text_dim, generator=g)
    syn = SyntheticSet(images, texts, sim_rank=min(10, pairs), sim_alpha=3.0, lr_init=0.1, generator=g)
    student = "flat"
    if grad_mode == "factored":  # the exact unroll with factored student heads (distill.student=factored)
        grad_mode, student = "unroll", "factored"
    settings = DistillSettings(syn_steps=args.syn_steps, expert_epochs=EXPERT_EPOCHS, max_start_epoch=MAX_START,
                               mini_batch_size=args.mini_batch, grad_mode=grad_mode, encode_chunk=encode_chunk,
                               student=student)
    # small outer lrs: random data must not diverge while being timed
    outer = OuterSettings(lr_img=1e-3, lr_txt=1e-3, lr_lr=1e-6, lr_sim=1e-3)
    return Distiller(syn, trajs, specs, settings, outer, seed=args.seed, image_encoder=encoder, device=device,
                     compile=compile_mode)


def reference_grads(d: Distiller, trajs: list[Trajectory], sample, pass1_graph: bool):
    """`Distiller.gradients`, computed the references' way (re-encoding in every student step)."""
    traj, s = trajs[sample.expert], sample.start_epoch
    e = s + d.settings.expert_epochs
    d.optimizer.zero_grad(set_to_none=True)
    return match_tesla_reencode(d.image_encoder, d.syn, d.specs, (traj.image[s], traj.text[s]),
                                (traj.image[e], traj.text[e]), sample.batches, d.settings, pass1_graph=pass1_graph)


def reference_step(d: Distiller, trajs: list[Trajectory], pass1_graph: bool) -> float:
    """One outer iteration of the reference-style loop: sample, gradients, update, one host sync."""
    result = reference_grads(d, trajs, d.sample(), pass1_graph)
    d.optimizer.step()
    return result.loss.item()


def agreement(d: Distiller, trajs: list[Trajectory], pass1_graph: bool) -> dict[str, float]:
    """Relative difference (||fast - ref|| / ||ref||) of the loss and of every gradient on one sample."""
    sample = d.sample()
    fast = d.gradients(sample)
    fast_grads = {n: p.grad.clone() for n, p in d.syn.named_parameters() if p.grad is not None}
    ref = reference_grads(d, trajs, sample, pass1_graph)
    ref_grads = {n: p.grad for n, p in d.syn.named_parameters() if p.grad is not None}
    assert fast_grads.keys() == ref_grads.keys(), (fast_grads.keys(), ref_grads.keys())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    return {"loss": rel(fast.loss, ref.loss), **{n: rel(fast_grads[n], ref_grads[n]) for n in ref_grads}}


def measure(step: Callable[[], object], iterations: int, warmup: int, device: torch.device,
            peak: PeakMemory) -> tuple[float, float | None]:
    """Median seconds per call after `warmup` calls, and the peak memory of all calls. The peak is reset before
    the warm-up: on a CPU its heap trim would otherwise make the timed calls fault all their memory in again."""
    peak.reset()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak.read()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny random encoder, 32 px, small heads (quick CPU check)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--pairs", type=int, nargs="+", default=[99, 499])
    ap.add_argument("--iterations", type=int, help="timed iterations per cell (median reported)")
    ap.add_argument("--warmup", type=int, help="untimed iterations first")
    ap.add_argument("--encoder", help="image encoder name (efficientnet_lite0, nfnet_l0, tiny, ...)")
    ap.add_argument("--weights", help="package | random | hub | a weights file")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--text-dim", type=int, help="synthetic text embedding size (MiniLM 384, BERT 768)")
    ap.add_argument("--embed-dim", type=int, help="projection heads' output size (paper 2304)")
    ap.add_argument("--syn-steps", type=int, default=8)
    ap.add_argument("--mini-batch", type=int, default=20)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--fast-modes", nargs="+", default=["tesla", "unroll"], choices=["tesla", "unroll", "factored"],
                    help="grad modes of the fast path; factored: the exact unroll with factored student heads "
                         "(distill.student=factored)")
    ap.add_argument("--encode-chunks", type=int, nargs="+", default=[0, 20],
                    help="fast path's distill.encode_chunk values (0 = keep the whole encoder graph)")
    ap.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                    help="also time the exact unroll compiled in these torch.compile modes (default, reduce-overhead)")
    ap.add_argument("--ref-pass1-nograd", action="store_true", help="reference pass 1 without a graph (less memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 cuts noise on a shared CPU)")
    args = ap.parse_args(argv)
    for key, value in (SMALL if args.small else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _fmt_mem(value: float | None, device: torch.device) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} GiB" if device.type == "cuda" else f"{value:.1f} MiB"


def device_and_encoder(args: argparse.Namespace) -> tuple[torch.device, torch.nn.Module]:
    """--threads applied, --device resolved (auto: cuda where there is one) and the image encoder built there, its
    random weights (if any) drawn from --seed. Shared with bench_lors."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)  # random encoder weights
    return device, build_image_encoder(args.encoder, weights=args.weights, image_size=args.image_size).to(device)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its table; returns the figures (for tests and notes)."""
    args = parse_args(argv)
    device, encoder = device_and_encoder(args)
    calls = [0]
    encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    specs = (HeadSpec(encoder.feature_dim, args.embed_dim, 0.1), HeadSpec(args.text_dim, args.embed_dim, 0.1))
    trajs = random_trajectories(specs, args.experts, device, torch.Generator().manual_seed(args.seed + 1))
    pass1_graph = not args.ref_pass1_nograd
    peak = PeakMemory(device)
    mem_unit = "peak GiB" if device.type == "cuda" else "RSS growth"
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; encoder {args.encoder} "
          f"({args.weights}, {args.image_size} px, {encoder.feature_dim}-d); text {args.text_dim}-d; heads -> "
          f"{args.embed_dim}; syn_steps {args.syn_steps}, mini-batch {args.mini_batch}; {args.iterations} timed "
          f"iterations after {args.warmup} warm-up (median)")
    print(f"{'pairs':>5}  {'mode':40} {'s/iter':>9} {mem_unit:>11} {'enc fwd/it':>10} {'speed-up':>9} {'mem ratio':>9}")
    figures: dict = {"rows": [], "agreement": {}}
    for pairs in args.pairs:
        check = build(args, pairs, encoder, trajs, specs, "tesla", device)
        figures["agreement"][pairs] = agreement(check, trajs, pass1_graph)
        del check
        cells = {}
        # (label, grad_mode, encode_chunk, compile mode); chunk None marks the reference loop
        variants = ([(f"fast ({m}{f', chunk {c}' if c else ''})", m, c, None) for m in args.fast_modes
                     for c in args.encode_chunks]
                    + [(f"fast (unroll, compiled {c})", "unroll", 0, c) for c in args.compile]
                    + [("reference (tesla, re-encode)", "tesla", None, None)])
        modes = [label for label, *_ in variants]
        for mode, grad_mode, chunk, compiled in reversed(variants):  # the reference first: rows are compared with it
            d = build(args, pairs, encoder, trajs, specs, grad_mode, device, chunk or 0, compiled)
            step = (lambda d=d: reference_step(d, trajs, pass1_graph)) if chunk is None else d.step
            warmup = max(args.warmup, 3) if compiled else args.warmup  # compiling (and CUDA graph recording)
            calls[0] = 0
            seconds, mem = measure(step, args.iterations, warmup, device, peak)
            cells[mode] = (seconds, mem, calls[0] / (args.iterations + warmup))
            del d, step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ref_s, ref_mem, _ = cells[modes[-1]]
        for mode in modes:
            seconds, mem, fwd = cells[mode]
            mem_ratio = f"{mem / ref_mem:.2f}" if mem is not None and ref_mem else "n/a"
            print(f"{pairs:>5}  {mode:40} {seconds:9.4f} {_fmt_mem(mem, device):>11} {fwd:10.1f} "
                  f"{ref_s / seconds:8.1f}x {mem_ratio:>9}", flush=True)
            figures["rows"].append({"pairs": pairs, "mode": mode, "seconds": seconds, "memory": mem,
                                    "encoder_forwards": fwd, "speedup": ref_s / seconds})
    for pairs, diffs in figures["agreement"].items():
        worst = max(diffs, key=diffs.get)
        print(f"agreement at {pairs} pairs, fast (tesla) vs reference on one sample: max relative difference "
              f"{diffs[worst]:.2e} ({worst}); " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return figures


if __name__ == "__main__":
    main()
