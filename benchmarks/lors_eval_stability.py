"""Why the LoRS-protocol evaluation of some distilled sets collapses the image tower (r_mean ~20 vs ~4).

    python benchmarks/lors_eval_stability.py runs/evalstudy/set_100.safetensors runs/evalstudy/set_120.safetensors
    python benchmarks/lors_eval_stability.py SET... --arms base "lr x0.5" "identity S"   # a subset of the arms
    python benchmarks/lors_eval_stability.py SET... --config configs/flickr8k_100_pixel_cpu.yaml key=value ...

Each set (a LoRS-mode `synthetic.safetensors`, e.g. copied out of a run at several iterations) is evaluated by
the LoRS protocol (the image encoder fine-tuned with a text head, wBCE against the set's S at its learned lrs)
and by interventions on that protocol, one factor each, so the factor that separates collapsing sets from
healthy ones shows: the learned image lr scaled (up, to find a healthy set's margin, and down), the learned S
replaced by the identity, the CLIP loss, the initial pixels instead of the distilled ones. Per arm and epoch it
traces the encoder's relative drift from its start and the mean off-diagonal cosine (Sim) of the training
images' features; dev r_mean at a few epochs. Prints each set's statistics and a table of the arms, writes a
JSON and a plot (per-epoch Sim and drift) beside the first set unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import load_config
from repblend.stages.diagnostics import mean_offdiagonal_similarity
from repblend.stages.evaluate import retrieval_of, train_heads

PROBE_EPOCHS = (1, 5, 10, 25, 50, 100)


def arms(init_pixels: torch.Tensor) -> dict[str, dict]:
    """label -> changes to the protocol (pixels, targets, lr scale, loss); one factor each."""
    return {
        "base": {},
        "lr x1.5": {"lr_scale": 1.5},
        "lr x0.5": {"lr_scale": 0.5},
        "lr x0.25": {"lr_scale": 0.25},
        "identity S": {"targets": None},
        "clip loss": {"loss": "clip"},
        "init pixels": {"images": init_pixels},
    }


def set_statistics(syn: dict[str, torch.Tensor], init_pixels: torch.Tensor) -> dict[str, float]:
    s = syn["similarity"].float()
    off = s[~torch.eye(len(s), dtype=torch.bool)]
    delta = syn["images"].float() - init_pixels.float()
    return {"lr_img": float(syn["syn_lr_img"]), "lr_txt": float(syn["syn_lr_txt"]),
            "S_diag": float(s.diagonal().mean()), "S_off_mean": float(off.mean()), "S_off_max": float(off.max()),
            "S_off_min": float(off.min()),
            "pix_std": float(syn["images"].float().std()), "pix_absmax": float(syn["images"].float().abs().max()),
            "pix_delta_rms": float(delta.pow(2).mean().sqrt())}


def _flat(module: torch.nn.Module) -> torch.Tensor:
    """All parameters in one vector (reshape: the encoder's weights may be channels_last)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def run_arm(syn, measure, settings, seed: int, device, change: dict) -> dict:
    images = change.get("images", syn["images"])
    targets = change["targets"] if "targets" in change else syn["similarity"]
    scale = change.get("lr_scale", 1.0)
    # the protocol as configured (eval.syn_lr_img_scale included), then the arm's own scale on top
    pairs = measure.synthetic_pairs(images, syn["texts"], targets, syn["syn_lr_img"] * scale, syn["syn_lr_txt"])
    run_settings = dataclasses.replace(settings, loss=change.get("loss", settings.loss))
    train_pixels = images.to(device).float()
    start = _flat(measure.model().image.backbone)
    start_norm = float(start.norm())
    trace = []

    def on_epoch(epoch: int, model) -> None:
        with torch.no_grad():
            drift = float((_flat(model.image.backbone) - start).norm()) / start_norm
            sim = mean_offdiagonal_similarity(model.image(train_pixels))
        row = {"epoch": epoch, "drift": drift, "sim_img": sim}
        if epoch in PROBE_EPOCHS:
            row["r_mean"] = retrieval_of(model, *measure.eval_features, device)["r_mean"]
        trace.append(row)

    started = time.perf_counter()
    model = train_heads(pairs, run_settings, seed, device, on_epoch=on_epoch, model=measure.model)
    final = retrieval_of(model, *measure.eval_features, device)
    return {"r_mean": final["r_mean"], "sim_img": trace[-1]["sim_img"], "drift": trace[-1]["drift"],
            "seconds": round(time.perf_counter() - started, 1), "trace": trace}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", nargs="+", metavar="SET|key=value",
                    help="LoRS-mode synthetic.safetensors files, and config overrides")
    ap.add_argument("--config", default="configs/flickr8k_100_pixel_cpu.yaml", help="the config the sets came from")
    ap.add_argument("--arms", nargs="+", metavar="LABEL", help="only these arms (default: all)")
    ap.add_argument("--seeds", type=int, default=1, help="evaluation seeds per arm (the run's first seeds)")
    ap.add_argument("--out", type=Path, help="JSON and plot prefix (default: beside the first set)")
    args = ap.parse_intermixed_args(argv)
    args.overrides = [item for item in args.items if "=" in item]
    args.sets = [Path(item) for item in args.items if "=" not in item]
    if not args.sets:
        ap.error("no set given")
    for path in args.sets:
        if not path.is_file():
            ap.error(f"no set at {path}")
    config = load_config(args.config, [*args.overrides, "distill.mode=lors", "run.progress=false"])
    device = evaluation.resolve_device(config.run.device)
    caches = steps.encode(config)
    measure = evaluation.protocol(config, caches, config.data.eval_split, device)
    settings = evaluation.train_settings(config)
    seeds = evaluation.eval_seeds(config)[:args.seeds]
    results: dict[str, dict] = {}
    for path in args.sets:
        syn = load_file(str(path), device=str(device))
        if "images" not in syn:
            ap.error(f"{path} has no pixels: only pixel-space LoRS sets are evaluated by fine-tuning")
        init_pixels = measure.train_images(syn["init_image_index"].cpu()).to(device)
        chosen = arms(init_pixels)
        unknown = set(args.arms or []) - set(chosen)
        if unknown:
            ap.error(f"--arms: no arm {sorted(unknown)}; the arms: {list(chosen)}")
        entry = {"stats": set_statistics(syn, init_pixels), "arms": {}}
        print(f"{path}: " + ", ".join(f"{k} {v:.4g}" for k, v in entry["stats"].items()), file=sys.stderr)
        for label, change in chosen.items():
            if args.arms and label not in args.arms:
                continue
            entry["arms"][label] = [run_arm(syn, measure, settings, seed, device, change) for seed in seeds]
            first = entry["arms"][label][0]
            print(f"  {label}: r_mean {first['r_mean']:.2f}, Sim img {first['sim_img']:.3f}, drift "
                  f"{first['drift']:.4f} ({first['seconds']} s)", file=sys.stderr)
        results[str(path)] = entry
    out = args.out or args.sets[0].with_name("lors_eval_stability")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(table(results), end="")
    print(plot(results, out.with_suffix(".png")))
    return results


def table(results: dict) -> str:
    labels = list(dict.fromkeys(label for entry in results.values() for label in entry["arms"]))
    lines = ["| set | lr_img | S off mean / max | " + " | ".join(labels) + " |", "|---" * (len(labels) + 3) + "|"]
    for path, entry in results.items():
        st = entry["stats"]
        cells = []
        for label in labels:
            runs = entry["arms"].get(label, [])
            cells.append(" / ".join(f"{r['r_mean']:.1f} ({r['sim_img']:.2f})" for r in runs) or "-")
        lines.append(f"| {Path(path).stem} | {st['lr_img']:.3g} | {st['S_off_mean']:.3f} / {st['S_off_max']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(["r_mean on the eval split (image Sim of the training images' features after training)", "",
                      *lines, ""])


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for set_path, entry in results.items():
        for label, runs in entry["arms"].items():
            trace = runs[0]["trace"]
            name = f"{Path(set_path).stem} {label}"
            axes[0].plot([t["epoch"] for t in trace], [t["sim_img"] for t in trace], label=name)
            axes[1].plot([t["epoch"] for t in trace], [t["drift"] for t in trace], label=name)
    axes[0].set(xlabel="epoch", ylabel="image Sim (training images)", title="feature concentration")
    axes[1].set(xlabel="epoch", ylabel="|theta - theta0| / |theta0|", yscale="log", title="encoder drift")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
