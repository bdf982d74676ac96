"""Benchmark one LoRS-mode distillation iteration (the asymmetric baseline: the student's image side is the whole
image encoder, differentiated twice per student step) with and without the encoder speed-ups of stages/lors.py.

    python benchmarks/bench_lors.py --small            # random EfficientNet-Lite0 at 32 px: seconds on a CPU
    python benchmarks/bench_lors.py --threads 2        # EfficientNet-Lite0 (package weights), 128 px, 99 pairs
    python benchmarks/bench_lors.py --device cuda --image-size 224

Three forms of `EncoderSpec.apply_flat` on the same random problem (same draws, fresh state each):
- plain: `functional_call` of the backbone as loaded; PyTorch's double backward of a grouped (depthwise)
  convolution runs one convolution per group for two of its terms;
- loop-free: grouped convolutions through stages/convgrad.py (whole convolutions in the double backward);
- loop-free + folded: also the BatchNorms folded into the convolutions (stages/bnfold.py, `fold_parameters`).
Prints the median seconds per `Distiller.step` (float32), the speed-up over plain, peak memory, and how far each
form's gradients of the synthetic set are from the plain form's in float64 on one sample (the plain row: float32's
own error). The experts are trained first, on random data. No pass/fail: figures for the issue.

EfficientNet's ReLU6 has kinks at 0 and 6: a pre-activation within rounding of one lands on either side in another
arithmetic, which moves a gradient by a unit's whole contribution. Every form, plain included, is then 1e-3 to 1e-1
off float64 through an 8-step unroll; `--smooth` swaps ReLU6 for SiLU so that the column measures the arithmetic
alone (all forms agree with float64 to ~1e-6 there).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import PeakMemory, _fmt_mem, device_and_encoder, measure  # noqa: E402 - a sibling script

from repblend.stages.buffer import ExpertSettings, Trajectory, train_expert
from repblend.stages.distill import DistillSettings, SyntheticSet
from repblend.stages.distiller import Distiller, OuterSettings
from repblend.stages.heads import HeadSpec
from repblend.stages.lors import EncoderSpec

# --small keeps the architecture (its BatchNorms and depthwise convolutions are what the forms differ in)
SMALL = {"encoder": "efficientnet_lite0", "weights": "random", "image_size": 32, "text_dim": 32, "pairs": 12,
         "syn_steps": 3, "mini_batch": 4, "iterations": 1, "warmup": 1}
REAL = {"encoder": "efficientnet_lite0", "weights": "package", "image_size": 128, "text_dim": 384, "pairs": 99,
        "syn_steps": 8, "mini_batch": 20, "iterations": 3, "warmup": 1}
FORMS = {"plain": {"fold": False, "loop_free_convs": False}, "loop-free": {"fold": False},
         "loop-free + folded": {}}
MAX_START, EXPERT_EPOCHS = 2, 1


def trajectories(args: argparse.Namespace, backbone: torch.nn.Module, feature_dim: int,
                 device: torch.device) -> list[Trajectory]:
    """Two experts trained as the pipeline trains LoRS experts (the whole encoder and a text head, CLIP loss, SGD at
    the buffer's default lrs) on random pixels with two random captions each: targets a student can head for, so
    that float32 gradients are comparable with float64 ones (random-walk targets were 10-20 % off in float32)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    pixels = torch.randn(args.pairs, 3, args.image_size, args.image_size, generator=g)
    texts = torch.randn(2 * args.pairs, args.text_dim, generator=g)
    settings = ExpertSettings(embed_dim=feature_dim, epochs=MAX_START + EXPERT_EPOCHS, batch_size=32)
    return [train_expert(pixels, texts, torch.arange(2 * args.pairs) // 2, settings, seed=args.seed + e,
                         device=device, encoder=backbone, feature_dim=feature_dim) for e in range(2)]


def build(args: argparse.Namespace, backbone: torch.nn.Module, text_spec: HeadSpec, experts: list[Trajectory],
          form: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Distiller:
    """A fresh distiller on random pixels and texts (same seeds for every form and dtype, so the draws agree)."""
    if dtype != torch.float32:
        backbone = copy.deepcopy(backbone).to(dtype)
        experts = [Trajectory({k: v.to(dtype) for k, v in t.image.items()}, {k: v.to(dtype) for k, v in t.text.items()})
                   for t in experts]
    specs = (EncoderSpec(backbone, **FORMS[form]), text_spec)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.pairs, 3, args.image_size, args.image_size, generator=g)
    texts = torch.randn(args.pairs, args.text_dim, generator=g)
    syn = SyntheticSet(images, texts, sim_rank=min(10, args.pairs), sim_alpha=3.0, lr_init=0.01, generator=g)
    settings = DistillSettings(syn_steps=args.syn_steps, expert_epochs=EXPERT_EPOCHS, max_start_epoch=MAX_START,
                               mini_batch_size=args.mini_batch, grad_mode=args.grad_mode, blend=False)
    outer = OuterSettings(lr_img=1e-3, lr_txt=1e-3, lr_lr=1e-6, lr_sim=1e-3)  # random data must not diverge
    return Distiller(syn.to(dtype), experts, specs, settings, outer, seed=args.seed, image_encoder=None, device=device)


def gradients(d: Distiller) -> dict[str, torch.Tensor]:
    """The synthetic set's gradients on the distiller's first sample."""
    d.gradients(d.sample())
    return {n: p.grad.detach().double() for n, p in d.syn.named_parameters() if p.grad is not None}


def smooth(module: torch.nn.Module) -> int:
    """SiLU in place of every ReLU6 / Hardtanh (in place); how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, torch.nn.Hardtanh):  # ReLU6 is a Hardtanh
                parent._modules[name] = torch.nn.SiLU()
                swapped += 1
    return swapped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="random EfficientNet-Lite0 at 32 px, 12 pairs (quick check)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--iterations", type=int, help="timed iterations per form (median reported)")
    ap.add_argument("--warmup", type=int, help="untimed iterations first")
    ap.add_argument("--encoder", help="image encoder name (efficientnet_lite0, tiny, ...)")
    ap.add_argument("--weights", help="package | random | a weights file")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--text-dim", type=int, help="synthetic text embedding size (MiniLM 384)")
    ap.add_argument("--syn-steps", type=int)
    ap.add_argument("--mini-batch", type=int)
    ap.add_argument("--grad-mode", default="unroll", choices=["unroll", "tesla"])
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--smooth", action="store_true", help="SiLU in place of ReLU6 (see above)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args(argv)
    for key, value in (SMALL if args.small else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iterations < 1 or args.warmup < 0:
        ap.error(f"--iterations must be >= 1 and --warmup >= 0, got {args.iterations} and {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its table; returns the figures (for tests and notes)."""
    args = parse_args(argv)
    device, encoder = device_and_encoder(args)
    if args.smooth:
        smooth(encoder.backbone)
    text_spec = HeadSpec(args.text_dim, encoder.feature_dim, 0.1)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; encoder {args.encoder} "
          f"({args.weights}, {args.image_size} px, {sum(p.numel() for p in encoder.backbone.parameters())} "
          f"parameters, {encoder.feature_dim}-d); {args.pairs} pairs, syn_steps {args.syn_steps} of "
          f"{args.mini_batch}, grad_mode {args.grad_mode}{', SiLU for ReLU6' if args.smooth else ''}; "
          f"{args.iterations} timed iterations after {args.warmup} warm-up (median)")
    experts = trajectories(args, encoder.backbone, encoder.feature_dim, device)
    truth = gradients(build(args, encoder.backbone, text_spec, experts, "plain", device, torch.float64))
    peak = PeakMemory(device)
    mem_unit = "peak GiB" if device.type == "cuda" else "RSS growth"
    print(f"{'form':20} {'s/iter':>9} {'speed-up':>9} {mem_unit:>11}  first sample's gradients against float64 "
          "(plain): max relative difference, then each")
    figures: dict = {"rows": []}
    for form in ["plain", *(f for f in args.forms if f != "plain")]:
        grads = gradients(build(args, encoder.backbone, text_spec, experts, form, device))
        diffs = {n: float((grads[n] - truth[n]).norm() / truth[n].norm().clamp_min(1e-30)) for n in grads}
        worst = max(diffs, key=diffs.get)
        d = build(args, encoder.backbone, text_spec, experts, form, device)
        seconds, memory = measure(d.step, args.iterations, args.warmup, device, peak)
        plain_s = figures["rows"][0]["seconds"] if figures["rows"] else seconds
        print(f"{form:20} {seconds:9.3f} {plain_s / seconds:8.2f}x {_fmt_mem(memory, device):>11}  "
              f"{diffs[worst]:.1e} ({worst}); " + ", ".join(f"{n} {v:.1e}" for n, v in diffs.items()), flush=True)
        figures["rows"].append({"form": form, "seconds": seconds, "speedup": plain_s / seconds, "memory": memory,
                                "grad_diff": diffs})
        del d
        gc.collect()
    return figures


if __name__ == "__main__":
    main()
