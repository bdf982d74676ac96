"""RepBlend's diagnostic experiments (ALGORITHMS.md section 6; issue: modality collapse, items 6a-6d) on real data.

    python benchmarks/repblend_ablations.py --study perturbation      # feature space, Flickr8k subset (CPU, ~20 min)
    python benchmarks/repblend_ablations.py --study matching          # pixel space: needs the encoder (GPU advised)
    python benchmarks/repblend_ablations.py --study perturbation --noise 0.1 1 distill.iterations=100  # overrides

Studies (each arm is one distillation from the same experts and the same initial pairs, evaluated under one
protocol; every arm logs recall and collapse diagnostics every `distill.eval_every` iterations):
- perturbation (6b): no blending; blending (Beta(a, b) of the config); Gaussian noise of strength lambda added to
  both modalities' representations instead of blending (`blend.noise`), lambda swept. RepBlend's claim: random
  noise raises the modality gap, blending lowers intra-modal similarity without raising it.
- matching (6a, 6c, 6d): blending on/off x symmetric (two heads, RepBlend) / asymmetric (the whole image
  encoder vs the text head, LoRS) matching; Sim and Gap over iterations, and the image-side vs text-side
  matching losses (the asymmetric plateau).

Writes results.json, table.md and PNGs (sim_gap.png, over_iterations.png, matching_losses.png) to --out, for
the arms of the call (all of the study's, or those --arms names).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import load_config

DEFAULT_CONFIG = {"perturbation": "configs/flickr8k_100_cpu.yaml", "matching": "configs/flickr8k_100_pixel_cpu.yaml"}
COLUMNS = ("img_r10", "txt_r10", "r_mean", "sim_img", "sim_txt", "gap", "modality_probe")


def arms(study: str, noises: list[float]) -> list[tuple[str, list[str]]]:
    """(label, config overrides) per arm."""
    if study == "perturbation":
        return ([("no blend", ["blend.enabled=false"]), ("blend", ["blend.enabled=true"])]
                + [(f"noise {lam:g}", ["blend.enabled=false", f"blend.noise={lam}"]) for lam in noises])
    return [(f"{match} / blend {'on' if on else 'off'}", [f"distill.mode={mode}", f"blend.enabled={str(on).lower()}"])
            for match, mode in (("symmetric", "repblend"), ("asymmetric", "lors")) for on in (True, False)]


def run_arm(config_path: str, overrides: list[str], arm: list[str], out: Path, label: str) -> dict:
    """Distil and evaluate one arm; experts are shared by all arms of the same matching mode. An arm whose
    distillation and evaluation finished in an earlier (killed) study is read back, not redone."""
    config = load_config(config_path, [*overrides, *arm, "eval.methods=[]", "run.progress=false"])
    mode = config.distill.mode
    config = dataclasses.replace(config, buffer=dataclasses.replace(config.buffer, dir=str(out / f"buffer-{mode}")))
    run_dir = out / label.replace(" / ", "_").replace(" ", "_")
    caches = steps.encode(config)
    steps.buffer(config, run_dir, caches)
    steps.distill(config, run_dir, caches)
    evaluated = run_dir / "results.json"
    if evaluated.is_file() and evaluated.stat().st_mtime >= steps.synthetic_path(run_dir).stat().st_mtime:
        results = json.loads(evaluated.read_text())
    else:
        results = evaluation.evaluate(config, run_dir, caches)
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    # distillation alone (the recall probes excluded), summed over the run's rows: resumed runs included
    return {"overrides": arm, "distill_seconds": round(sum(r["seconds"] for r in rows), 1),
            "final": {k: results["methods"][mode][k]["mean"] for k in COLUMNS[:3]}
            | {k: results["diagnostics"][mode][k]["mean"] for k in COLUMNS[3:]},
            "init": {k: results["methods"]["init"][k]["mean"] for k in COLUMNS[:3]}
            | {k: results["diagnostics"]["init"][k]["mean"] for k in COLUMNS[3:]},
            # the same pairs, trained as this arm's set is evaluated: asymmetric arms fine-tune the encoder
            "init_model": "encoder" if evaluation.fine_tunes_encoder(config) else "heads",
            "curve": [{"iteration": r["iteration"], "loss_img": r["loss_img"], "loss_txt": r["loss_txt"],
                       **({"r_mean": r["eval"]["r_mean"], **r["eval"].get("diagnostics", {})} if "eval" in r else {})}
                      for r in rows]}


def initial_rows(results: dict) -> dict[str, dict]:
    """The initial pairs' row once per evaluation model among the arms (all arms start from the same pairs)."""
    by_model = {r["init_model"]: r["init"] for r in results.values()}
    if len(by_model) == 1:
        return {"initial pairs": next(iter(by_model.values()))}
    return {f"initial pairs ({'encoder fine-tuned' if model == 'encoder' else 'heads'})": init
            for model, init in by_model.items()}


def table(results: dict) -> str:
    lines = ["| arm | " + " | ".join(COLUMNS) + " | distill s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for label, init in initial_rows(results).items():
        lines.append(f"| {label} | " + " | ".join(f"{init[k]:.3g}" for k in COLUMNS) + " | |")
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r['final'][k]:.3g}" for k in COLUMNS)
                     + f" | {r['distill_seconds']} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for (label, init), marker in zip(initial_rows(results).items(), "x+"):
        ax.scatter([(init["sim_img"] + init["sim_txt"]) / 2], [init["gap"]], marker=marker, color="k", label=label)
    for label, r in results.items():
        ax.scatter([(r["final"]["sim_img"] + r["final"]["sim_txt"]) / 2], [r["final"]["gap"]], label=label)
    ax.set(xlabel="Sim (mean of image and text)", ylabel="Gap", title="collapse diagnostics of the distilled sets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "sim_gap.png")
    fig.savefig(paths[-1], dpi=120)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, r in results.items():
        probed = [c for c in r["curve"] if "gap" in c]
        its = [c["iteration"] for c in probed]
        axes[0].plot(its, [(c["sim_img"] + c["sim_txt"]) / 2 for c in probed], marker=".", label=label)
        axes[1].plot(its, [c["gap"] for c in probed], marker=".", label=label)
        axes[2].plot(its, [c["r_mean"] for c in probed], marker=".", label=label)
    for ax, name in zip(axes, ("Sim", "Gap", "r_mean (1 seed)")):
        ax.set(xlabel="distillation iteration", ylabel=name)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "over_iterations.png")
    fig.savefig(paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (label, r) in enumerate(results.items()):
        its = [c["iteration"] for c in r["curve"]]
        color = f"C{i}"
        ax.plot(its, _smooth([c["loss_img"] for c in r["curve"]]), color=color, label=f"{label}: image side")
        ax.plot(its, _smooth([c["loss_txt"] for c in r["curve"]]), color=color, ls="--", label=f"{label}: text side")
    ax.set(xlabel="distillation iteration", ylabel="normalised matching loss (moving mean of 10)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "matching_losses.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=("perturbation", "matching"), default="perturbation")
    ap.add_argument("--config", help="default: configs/flickr8k_100_cpu.yaml (perturbation), "
                                     "configs/flickr8k_100_pixel_cpu.yaml (matching)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every arm")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="perturbation strengths")
    ap.add_argument("--eval-every", type=int, default=50, help="probe recall and diagnostics every N iterations")
    ap.add_argument("--out", type=Path, help="default: runs/ablations/<study>")
    ap.add_argument("--arms", nargs="+", metavar="LABEL", help="run only these arms (e.g. 'asymmetric / blend off', "
                    "to spread arms over processes; put key=value overrides before it); a call of one arm writes no "
                    "table, a call of several (or of all: the default) tables and plots those, reading finished "
                    "arms back")
    args = ap.parse_args(argv)
    config_path = args.config or DEFAULT_CONFIG[args.study]
    out = args.out or Path("runs/ablations") / args.study
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"distill.eval_every={args.eval_every}", *args.overrides]
    chosen = arms(args.study, args.noise)
    unknown = set(args.arms or []) - {label for label, _ in chosen}
    if unknown:
        ap.error(f"--arms: no arm {sorted(unknown)} in the {args.study} study; its arms: {[lab for lab, _ in chosen]}")
    results = {}
    for label, arm in chosen:
        if args.arms and label not in args.arms:
            continue
        results[label] = run_arm(config_path, overrides, arm, out, label)
        print(f"{label}: r_mean {results[label]['final']['r_mean']:.2f}, gap {results[label]['final']['gap']:.3f} "
              f"({results[label]['distill_seconds']} s)", file=sys.stderr)
    if len(results) < 2:  # a comparison needs two arms; one-arm calls may run side by side on the same --out
        return results
    (out / "results.json").write_text(json.dumps({"config": config_path, "overrides": overrides, "arms": results},
                                                 indent=1))
    text = table(results)
    (out / "table.md").write_text(text)
    print(text, end="")
    for path in plots(results, out):
        print(path)
    return results


if __name__ == "__main__":
    main()
