"""Controlled modality-collapse experiment (ALGORITHMS.md section 7, part c): does EBR undo collapse?

    python benchmarks/collapse_study.py                  # 5 noise levels x 5 seeds x 7 arms, a few minutes on 2 cores
    python benchmarks/collapse_study.py --small          # seconds: 2 noise levels, 2 seeds, short training
    python benchmarks/collapse_study.py --alphas 0.01 0.1 1 --seeds 10 --out runs/collapse_alpha
    python benchmarks/collapse_study.py --alphas 0 0.01 --residual-alphas 0 0.01 0.1   # the residual adapter too

Task and arms: see collapse_task.py. Modality A carries ``noise`` x N(0, 1) injected features; the fusion head
has an 8-wide bottleneck. Per noise level and arm, over seeds (same data and seeds across arms): accuracy,
accuracy with A missing (B alone: how much the fused model uses B) and with B missing (zero-fill; EBR also with
its substitution h_m^-1(h_s(f_s))), effective rank of the fused bottleneck and of B's encoder output. Writes
results.json, table.md and accuracy.png / missing.png / erank.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collapse_task import TaskSpec, TrainSpec, make_task, measure, train_arm  # noqa: E402

COLUMNS = ("acc", "acc_no_a", "acc_no_a_sub", "acc_no_b", "acc_no_b_sub", "erank", "erank_b", "code_cos")


def arm_list(alphas: list[float], residual_alphas: list[float] = ()) -> list[tuple[str, str, dict]]:
    """(label, arm, TrainSpec changes): one EBR arm per alpha, one residual-adapter EBR arm per residual alpha."""
    arms = [("vanilla", "vanilla", {}), ("kd", "kd", {})]
    arms += [(f"ebr a={a:g}", "ebr", {"alpha": a}) for a in alphas]
    arms += [(f"ebr residual a={a:g}", "ebr", {"alpha": a, "ebr_residual": True}) for a in residual_alphas]
    return arms + [("dropout", "dropout", {}), ("B alone", "b_only", {})]


def run(noises: list[float], seeds: int, alphas: list[float], spec: TaskSpec, train: TrainSpec,
        log=print, residual_alphas: list[float] = ()) -> dict[str, dict[str, dict[str, list[float]]]]:
    """results[label][noise][metric] = one value per seed."""
    results: dict = {}
    for noise in noises:
        for seed in range(seeds):
            data = make_task(spec, noise, seed)
            for label, arm, changes in arm_list(alphas, residual_alphas):
                t = dataclasses.replace(train, **changes)
                metrics = measure(train_arm(arm, data, spec.classes, t, seed), data)
                cell = results.setdefault(label, {}).setdefault(f"{noise:g}", {})
                for key, value in metrics.items():
                    cell.setdefault(key, []).append(value)
        log(f"noise {noise:g}: done ({seeds} seeds)")
    return results


def _cell(values: list[float] | None, digits: int = 1) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def table(results: dict) -> str:
    lines = []
    for noise in next(iter(results.values())):
        lines += [f"\nnoise {noise} (mean ± std over seeds)", "",
                  "| arm | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for label, by_noise in results.items():
            cells = by_noise[noise]
            if label == "B alone":  # trained without A: only its A-missing accuracy and ranks mean anything
                cells = {k: v for k, v in cells.items() if k in ("acc_no_a", "erank", "erank_b")}
            lines.append(f"| {label} | " + " | ".join(
                _cell(cells.get(c), 3 if c == "code_cos" else 1) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(ax, arm, metric, **style):
        by_noise = results[arm]
        xs = [float(n) for n in by_noise if metric in by_noise[n]]
        if not xs:
            return
        means = [statistics.fmean(by_noise[f"{x:g}"][metric]) for x in xs]
        stds = [statistics.stdev(by_noise[f"{x:g}"][metric]) if len(by_noise[f"{x:g}"][metric]) > 1 else 0.0
                for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, **style)

    arms = [label for label in results if label != "B alone"]
    colors = {label: f"C{i}" for i, label in enumerate(arms)}  # substitution curves: same colour, dashed
    paths = []
    panels = {
        "accuracy.png": [("acc", "accuracy, both modalities (%)")],
        "missing.png": [("acc_no_a", "accuracy with A missing (%)"), ("acc_no_b", "accuracy with B missing (%)")],
        "erank.png": [("erank", "effective rank, fused bottleneck"), ("erank_b", "effective rank, B's encoder output")],
    }
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        for ax, (metric, title) in zip(axes[0], metrics):
            for label in arms:
                curve(ax, label, metric, label=f"{label} (zero-fill)" if "missing" in title else label,
                      color=colors[label])
                if "missing" in title and label.startswith("ebr"):
                    curve(ax, label, metric + "_sub", label=f"{label} (substitution)", linestyle="--",
                          color=colors[label])
            if metric in ("acc", "acc_no_a", "erank", "erank_b"):
                curve(ax, "B alone", "acc_no_a" if metric == "acc" else metric, label="B alone (reference)",
                      color="black", linestyle=":")
            ax.set_xlabel("injected noise strength in modality A")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best", framealpha=0.6)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="2 noise levels, 2 seeds, short training (seconds)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.01, 0.1],
                    help="one EBR arm per alpha (0: the adapter without the adversary, an ablation)")
    ap.add_argument("--residual-alphas", type=float, nargs="*", default=[],
                    help="one EBR arm per alpha with the residual adapter (ebr.residual: f + h^-1(g))")
    ap.add_argument("--epochs", type=int, default=TrainSpec.epochs)
    ap.add_argument("--rank", type=int, default=TrainSpec.rank, help="fusion bottleneck width")
    ap.add_argument("--out", default="runs/collapse_study")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = ap.parse_args()
    spec, train = TaskSpec(), TrainSpec(epochs=args.epochs, rank=args.rank)
    if args.small:
        args.noise, args.seeds, args.alphas = [0.0, 2.0], 2, [a for a in args.alphas if a > 0][:1] or args.alphas[:1]
        args.residual_alphas = args.residual_alphas[:1]
        spec, train = TaskSpec(train=300, test=400, noise_dims=32), dataclasses.replace(train, epochs=10)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(args.noise, args.seeds, args.alphas, spec, train, residual_alphas=args.residual_alphas)
    text = table(results)
    print(text)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"task": dataclasses.asdict(spec), "train": dataclasses.asdict(train),
                                                  "seeds": args.seeds, "results": results}, indent=1))
    for path in plots(results, out):
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
