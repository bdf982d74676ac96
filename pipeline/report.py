"""`repblend report RUN_DIR`: what a run produced, as report.md plus PNG plots in RUN_DIR/report/.

Reads only the run directory (results.json, distill/ and refine/ metrics.jsonl, the synthetic sets), so it works
on a copy of a run made elsewhere; parts whose inputs are missing are left out with a line saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from repblend.pipeline.evaluation import results_table  # noqa: E402
from repblend.stages.errors import DataError, RepblendError  # noqa: E402
from repblend.stages.io import write_text  # noqa: E402

log = logging.getLogger("repblend")


def _metrics(run_dir: Path, stage: str = "distill") -> list[dict]:
    path = run_dir / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(rows: list[dict], out: Path) -> list[str]:
    """Matching loss (per modality) and learned student lrs against iterations; eval recall if it was logged."""
    its = [r["iteration"] for r in rows]
    window = max(1, len(rows) // 60)
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    sides = (("loss", "total", "C0"), ("loss_img", "image side", "C1"), ("loss_txt", "text side", "C2"))
    for key, label, color in sides:
        values = [r[key] for r in rows]
        loss_ax.plot(its, values, color=color, lw=0.5, alpha=0.25)
        loss_ax.plot(its, _running_mean(values, window), color=color, lw=1.5, label=f"{label} (mean of {window})")
    # where the loop stepped in: an outer gradient clipped (distill.grad_clip), an update skipped or rewound (guard)
    for key, label, color in (("clipped", "gradient clipped", "C3"), ("guard", "spike guard", "C4")):
        for k, at in enumerate(r["iteration"] for r in rows if r.get(key)):
            loss_ax.axvline(at, color=color, lw=0.7, ls=":", label=None if k else label)
    loss_ax.set(xlabel="iteration", ylabel="matching loss", yscale="log", title="trajectory matching")
    loss_ax.legend()
    lr_ax.plot(its, [r["syn_lr_img"] for r in rows], label="image head")
    lr_ax.plot(its, [r["syn_lr_txt"] for r in rows], label="text head")
    lr_ax.set(xlabel="iteration", ylabel="learned student lr", title="learned lrs")
    lr_ax.legend()
    names = [_save(fig, out / "curves.png")]
    evals = [r for r in rows if "eval" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for key, label in (("img_r10", "IR@10"), ("txt_r10", "TR@10"), ("r_mean", "r_mean")):
            ax.plot([r["iteration"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=label)
        ax.set(xlabel="iteration", ylabel="recall (%)", title=f"{evals[0]['eval'].get('split', 'eval')} recall, 1 seed")
        ax.legend()
        names.append(_save(fig, out / "recall.png"))
    diagnosed = [r for r in evals if "diagnostics" in r["eval"]]
    if diagnosed:
        names.append(plot_collapse_curve(diagnosed, out / "collapse.png"))
    return names


def plot_refinement(rows: list[dict], path: Path) -> str:
    """The trained heads' real-pairs loss and the student lrs over refinement, and the probe's recall if taken."""
    its, evals = [r["iteration"] for r in rows], [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(14 if evals else 10, 3.6))
    axes[0].plot(its, [r["real_loss"] for r in rows], color="C0")
    axes[0].set(xlabel="refine iteration", ylabel="CLIP loss on real pairs", title="heads trained on the set")
    axes[1].plot(its, [r["lr_img"] for r in rows], label="image head")
    axes[1].plot(its, [r["lr_txt"] for r in rows], label="text head")
    axes[1].set(xlabel="refine iteration", ylabel="learned student lr", title="learned lrs")
    axes[1].legend()
    if evals:
        for key, label in (("img_r10", "IR@10"), ("txt_r10", "TR@10"), ("r_mean", "r_mean")):
            axes[2].plot([r["iteration"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=label)
        axes[2].set(xlabel="refine iteration", ylabel="recall (%)", title="eval-split recall, 1 seed")
        axes[2].legend()
    return _save(fig, path)


def plot_collapse_curve(rows: list[dict], path: Path) -> str:
    """Sim per modality and Gap of the set as it stands (heads trained on it, 1 seed) against iterations."""
    its = [r["iteration"] for r in rows]
    fig, (sim_ax, gap_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("sim_img", "image"), ("sim_txt", "text")):
        sim_ax.plot(its, [r["eval"]["diagnostics"][key] for r in rows], marker="o", label=label)
    sim_ax.set(xlabel="iteration", ylabel="mean off-diagonal cosine", title="intra-modal similarity (Sim)")
    sim_ax.legend()
    gap_ax.plot(its, [r["eval"]["diagnostics"]["gap"] for r in rows], marker="o", color="C3")
    gap_ax.set(xlabel="iteration", ylabel="|mean(img) - mean(txt)|", title="modality gap (Gap)")
    return _save(fig, path)


def plot_similarity(similarity: torch.Tensor, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(similarity.float().numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set(title="learned soft targets S", xlabel="text", ylabel="image")
    return _save(fig, out / "similarity.png")


def plot_images(images: torch.Tensor, init: torch.Tensor | None, denormalize, out: Path, count: int = 8) -> str:
    """Distilled pixels (bottom row) under the real images they started from (top row)."""
    rows = [("initial", init), ("distilled", images)] if init is not None else [("distilled", images)]
    count = min(count, images.shape[0])
    fig, axes = plt.subplots(len(rows), count, figsize=(1.6 * count, 1.7 * len(rows)), squeeze=False)
    for r, (label, batch) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(denormalize(batch[c].float()).clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)
    return _save(fig, out / "images.png")


def pixel_sources(run_dir: Path):
    """(initial_pixels, denormalize) for a pixel-space run's report, or (None, None) when the run's config,
    cache or images are not at hand (the report then leaves the image grid out)."""
    from repblend.pipeline import steps
    from repblend.pipeline.config import load_config

    try:
        config = load_config(run_dir / "config.yaml")
        if config.distill.space != "pixel" and not config.invert.enabled:
            return None, None
        encoder = steps.build_image_encoder(config, torch.device("cpu"))
        manifest = json.loads((run_dir / "stages.json").read_text())["encode"][config.data.train_split]
        ids = json.loads(Path(manifest).with_suffix(".json").read_text())["image_ids"]
        return (lambda index: steps.pixels_of(config, [ids[i] for i in index.tolist()], encoder),
                encoder.preprocess.denormalize)
    except (RepblendError, OSError, KeyError, ValueError) as exc:
        log.warning("report: no image grid (%s)", str(exc).splitlines()[0])
        return None, None


RUN_MARKS = ("config.yaml", "stages.json", "results.json", "distill", "refine")  # what any run leaves behind


def require_run_dir(run_dir: Path) -> None:
    """Refuse a folder no run wrote (e.g. `runs/` instead of `runs/demo`): a report there would be empty."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no run directory here")
    if not any((run_dir / mark).exists() for mark in RUN_MARKS):
        raise DataError(f"{run_dir}: not a run directory (none of {', '.join(RUN_MARKS)}); give the --run-dir of "
                        "a run, e.g. runs/demo")


def write_report(run_dir: Path, initial_pixels=None, denormalize=None) -> Path:
    """Render RUN_DIR/report/report.md and its plots. `initial_pixels(index)` and `denormalize` (pixel space)
    come from the caller, which knows the dataset and encoder."""
    run_dir = Path(run_dir)
    require_run_dir(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# repblend report: {run_dir.name}", ""]
    results_path = run_dir / "results.json"
    if results_path.is_file():
        lines += ["## Results", "", results_table(json.loads(results_path.read_text())), ""]
    else:
        lines += ["No results.json yet (run `repblend eval`).", ""]
    rows = _metrics(run_dir)
    if rows:
        lines += ["## Distillation", ""] + [f"![{name}]({name})" for name in plot_curves(rows, out)] + [""]
        last = rows[-1]
        lines += [f"{last['iteration']} iterations; last matching loss {last['loss']:.4f} "
                  f"(image {last['loss_img']:.4f}, text {last['loss_txt']:.4f}); "
                  f"learned lrs {last['syn_lr_img']:.4f} / {last['syn_lr_txt']:.4f}.",
                  ""]
        guarded = [r for r in rows if r.get("guard")]
        if guarded:
            rewound = [f"{r['iteration']} ({r['guard']})" for r in guarded if r["guard"] != "skipped"]
            lines += [f"Spike guard (distill.rewind_loss): {len(guarded) - len(rewound)} updates skipped, "
                      f"{len(rewound)} rewinds" + (f" at iterations {', '.join(rewound)}" if rewound else "") + ".",
                      ""]
        clipped = [r["iteration"] for r in rows if r.get("clipped")]
        if clipped:
            shown = ", ".join(map(str, clipped[:10])) + (", ..." if len(clipped) > 10 else "")
            lines += [f"Outer-gradient clipping (distill.grad_clip): {len(clipped)} of {len(rows)} iterations clipped "
                      f"(at {shown}).", ""]
    refined = _metrics(run_dir, "refine")
    if refined:
        first, last = refined[0], refined[-1]
        probes = [r for r in refined if "eval" in r]
        lines += ["## Refinement", "", f"![refinement]({plot_refinement(refined, out / 'refine.png')})", "",
                  f"{last['iteration']} refine iterations; real-pairs loss {first['real_loss']:.4f} at the first, "
                  f"{last['real_loss']:.4f} at the last; learned lrs {last['lr_img']:.4f} / {last['lr_txt']:.4f}"
                  + (f"; last probe r_mean {probes[-1]['eval']['r_mean']:.2f} (iteration {probes[-1]['iteration']},"
                     " 1 seed)." if probes else "."), ""]
    from repblend.pipeline.steps import inverted_path, refined_path, synthetic_path

    synthetic = refined_path(run_dir) if refined_path(run_dir).is_file() else synthetic_path(run_dir)
    if synthetic.is_file():
        from repblend.stages.export import load_distilled

        distilled = load_distilled(synthetic)
        lines += ["## The distilled set", "", f"![similarity]({plot_similarity(distilled.similarity, out)})", ""]
        inverted = inverted_path(run_dir)  # a feature set's images (invert.enabled)
        shown = distilled if distilled.pixel_space else load_distilled(inverted) if inverted.is_file() else None
        if shown is None:
            lines += ["Feature space: the synthetic image side is a feature tensor, there are no pixels to show.", ""]
        elif denormalize is not None:
            init = initial_pixels(shown.init_image_index[:8]) if initial_pixels is not None else None
            if shown is not distilled:
                lines += ["Feature space, inverted to images (`invert.enabled`, `invert/synthetic.safetensors`):", ""]
            lines += [f"![images]({plot_images(shown.images, init, denormalize, out)})", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
