"""`repblend tune`: Ray Tune over the blend Beta(a, b) (optionally the outer lrs).

OptunaSearch, seeded with the paper's Beta(1, 1), proposes; ASHA stops weak trials early. Each trial is a
short distillation that reports its recall on the validation split every `tune.report_every` iterations.
Then the best parameters and the default Beta(1, 1) are rerun at full length and evaluated on the eval
split under the normal protocol, so the comparison is made on data the search never saw. Only glue lives
here: trials call the same stage functions as `repblend distill`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from unittest import mock

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from repblend.distributed.buffer import expert_runner
from repblend.distributed.cluster import ensure_ray, raise_task_failure, require_resources, worker_logging
from repblend.distributed.encode import images_encoder_for
from repblend.distributed.paths import absolute
from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import Config, to_yaml
from repblend.pipeline.evalrows import log as row_logger, log_row
from repblend.stages.encode import FeatureCache
from repblend.stages.distiller import DivergenceError
from repblend.stages.errors import ConfigError, DataError, RepblendError
from repblend.stages.evaluate import METRICS
from repblend.stages.io import write_json, write_text

log = logging.getLogger("repblend")

LR_KEYS = ("lr_img", "lr_txt", "lr_sim")


def search_space(config: Config) -> tuple[dict, dict]:
    """Tune's parameter space and the default point (the config's own values) that seeds the search."""
    low, high = config.tune.beta_range
    space = {"beta_a": tune.loguniform(low, high), "beta_b": tune.loguniform(low, high)}
    default = {"beta_a": 1.0, "beta_b": 1.0}
    if config.tune.search_lrs:
        for key in LR_KEYS:
            value = getattr(config.distill, key)
            space[key] = tune.loguniform(value / math.sqrt(10), value * math.sqrt(10))
            default[key] = value
    return space, default


def with_params(config: Config, params: dict) -> Config:
    blend = dataclasses.replace(config.blend, beta_a=float(params["beta_a"]), beta_b=float(params["beta_b"]))
    lrs = {k: float(params[k]) for k in LR_KEYS if k in params}
    return dataclasses.replace(config, blend=blend, distill=dataclasses.replace(config.distill, **lrs))


def _trial(params: dict, *, config: Config, caches: dict[str, FeatureCache], tune_dir: str) -> None:
    import torch

    torch.set_num_threads(max(1, int(config.tune.trial_cpus)))
    short = with_params(config, params)
    short = dataclasses.replace(
        short,
        distill=dataclasses.replace(short.distill, iterations=config.tune.short_iterations,
                                    eval_every=config.tune.report_every, ckpt_every=config.tune.report_every),
        run=dataclasses.replace(short.run, progress=False))
    trial_dir = Path(tune_dir) / "trials" / tune.get_context().get_trial_id()

    def report(iteration: int, metrics: dict) -> None:
        tune.report({"r_mean": metrics["r_mean"], "img_r10": metrics["img_r10"], "txt_r10": metrics["txt_r10"],
                     "iteration": iteration})

    steps.distill(short, trial_dir, caches, probe_split=config.data.val_split, on_eval=report)


def _concurrency(config: Config) -> int:
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0 and config.tune.trial_gpus > 0:
        return max(1, int(resources["GPU"] // config.tune.trial_gpus))
    return max(1, int(resources.get("CPU", 1) // config.tune.trial_cpus))


def _trial_resources(config: Config) -> dict[str, float]:
    """One trial's resources, checked against the cluster before any work (an infeasible trial waits forever)."""
    trial_gpus = config.tune.trial_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    require_resources(config.ray, {"CPU": config.tune.trial_cpus, "GPU": trial_gpus}, "a Tune trial",
                      "tune.trial_cpus or tune.trial_gpus")
    return {"cpu": config.tune.trial_cpus, "gpu": trial_gpus}


def _tuner(config: Config, caches: dict[str, FeatureCache], tune_dir: Path,
           resources: dict[str, float]) -> tune.Tuner:
    space, default = search_space(config)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, config=config, caches=caches, tune_dir=str(tune_dir)), resources)
    experiment = tune_dir / "experiment"
    log.info("tune: %d trials; their results and TensorBoard events go to %s (tensorboard --logdir %s)",
             config.tune.num_samples, experiment, experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" in the run's log
    if tune.Tuner.can_restore(str(experiment)):  # a killed search continues where it stopped
        log.info("tune: resuming the search in %s", experiment)
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    max_reports = config.tune.short_iterations // config.tune.report_every
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="r_mean", mode="max", num_samples=config.tune.num_samples,
            max_concurrent_trials=_concurrency(config),
            search_alg=OptunaSearch(points_to_evaluate=[default], seed=config.run.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_reports,
                                    grace_period=min(config.tune.grace_period, max_reports),
                                    reduction_factor=config.tune.reduction_factor)),
        run_config=tune.RunConfig(name=experiment.name, storage_path=str(tune_dir), verbose=0))


def _trial_rows(grid, max_reports: int) -> list[dict]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rows.append({"params": dict(result.config),  # exact: the best is rerun with these; tables round
                     "val_r_mean": metrics.get("r_mean"), "val_img_r10": metrics.get("img_r10"),
                     "val_txt_r10": metrics.get("txt_r10"), "iterations": metrics.get("iteration", 0),
                     "completed": metrics.get("training_iteration") == max_reports,
                     "error": str(result.error).splitlines()[0] if result.error else None})
    return sorted(rows, key=lambda r: -(r["val_r_mean"] if r["val_r_mean"] is not None else -1))


def _final(config: Config, params: dict, run_dir: Path, caches: dict[str, FeatureCache]) -> dict:
    """Full-length distillation with `params`, evaluated on the eval split: its row and its initial pairs' row
    (mean +- std over seeds), or {"error": ...} where it diverged."""
    full = with_params(config, params)
    full = dataclasses.replace(full, eval=dataclasses.replace(full.eval, methods=["repblend"]))
    steps.claim_distill_dir(full, run_dir, record=False)  # a set of other parameters there keeps its config.yaml
    write_text(run_dir / "config.yaml", to_yaml(full))
    try:
        steps.distill(full, run_dir, caches)
    except DivergenceError as exc:  # a finding about these parameters, not a reason to lose the search
        return {"error": str(exc)}
    methods = evaluation.evaluate(full, run_dir, caches)["methods"]
    return {"repblend": methods["repblend"], "init": methods["init"]}


@ray.remote
def _final_task(config: Config, params: dict, run_dir: str, caches: dict[str, FeatureCache]) -> dict:
    """`_final` where a trial would run (a GPU node, not the driver's head node), with a trial's resources."""
    import torch

    worker_logging(f"{Path(run_dir).name} run")
    # Ray forwards a worker's lines to the driver's terminal late, after the driver's results table if they are the
    # task's last: the driver logs this run's rows (and a divergence) when the task is back
    row_logger.setLevel(logging.ERROR)
    torch.set_num_threads(max(1, int(config.tune.trial_cpus)))
    try:
        return _final(config, params, Path(run_dir), caches)
    finally:
        row_logger.setLevel(logging.NOTSET)  # Ray reuses the worker process for other tasks


def _finals(config: Config, runs: dict[str, dict], run_dir: Path, caches: dict[str, FeatureCache],
            resources: dict[str, float]) -> dict[str, dict]:
    """The full-length reruns (label -> params), side by side as Ray tasks; a user-facing error comes back as
    its own line."""
    task = _final_task.options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    refs = {label: task.remote(config, params, str(run_dir / label), caches) for label, params in runs.items()}
    try:
        finals = {label: ray.get(ref) for label, ref in refs.items()}
    except ray.exceptions.RayTaskError as exc:
        raise_task_failure(exc, refs.values())
    for label, final in finals.items():
        if "error" in final:
            log.warning("tune: the full-length %s run in %s diverged: %s", label, run_dir / label, final["error"])
            continue
        for method in ("repblend", "init"):
            log_row(f"[{label} run] {method}", final[method], f"on {config.data.eval_split}")
    return finals


def run_tune(config: Config, run_dir: Path) -> dict:
    """Encode (before any Ray work), buffer, search, rerun best and default at full length; write the tables."""
    if not config.ray.enabled:
        raise ConfigError("repblend tune runs its trials on Ray: drop ray.enabled=false (ray.address picks the "
                          "cluster; an embedded local Ray by default)")
    if config.tune.short_iterations > config.distill.iterations:
        raise ConfigError(f"tune.short_iterations={config.tune.short_iterations} is longer than the full-length run "
                          f"it shortens (distill.iterations={config.distill.iterations}): set tune.short_iterations "
                          f"to at most {config.distill.iterations}")
    run_dir = run_dir.resolve()
    steps.claim_tune_dir(config, run_dir, record=False)
    data = config.data
    try:
        caches = steps.encode(config, [data.train_split, data.eval_split, data.val_split],
                              encode_images_with=images_encoder_for(config))
    except DataError as exc:
        if data.val_images or data.val_split not in str(exc):
            raise
        raise ConfigError(f"{exc}. repblend tune selects on data.val_split={data.val_split!r}: set "
                          "data.val_images=N to hold out N training images for it") from exc
    steps.check_budget(config, caches)
    config, caches = absolute(config, caches, run_dir, buffer_dir=run_dir / "buffer")
    ensure_ray(config.ray)
    resources = _trial_resources(config)
    steps.buffer(config, run_dir, caches, expert_runner(config, run_dir / "buffer", caches))
    # Tune's newer console output prints, even at verbose=0, a TensorBoard command for the driver's staging folder in
    # Ray's session directory, which holds no trial's events and is gone with the session. Its older output
    # (RAY_AIR_NEW_OUTPUT=0, read when the search starts) is silent at verbose=0; _tuner logs the right folder.
    steps.claim_tune_dir(config, run_dir)  # recorded as the search starts: an attempt refused earlier is not kept
    with mock.patch.dict(os.environ, {"RAY_AIR_NEW_OUTPUT": "0"}):
        grid = _tuner(config, caches, run_dir, resources).fit()
    max_reports = config.tune.short_iterations // config.tune.report_every
    rows = _trial_rows(grid, max_reports)
    scored = [r for r in rows if r["val_r_mean"] is not None]
    if not scored:
        raise RepblendError(f"tune: no trial reported a score; first error: {rows[0]['error'] if rows else 'none'}")
    best = next((r for r in scored if r["completed"]), scored[0])
    _, default = search_space(config)
    best_params = {k: best["params"][k] for k in default}
    results = {"select_split": data.val_split, "eval_split": data.eval_split, "num_trials": len(rows),
               "short_iterations": config.tune.short_iterations, "full_iterations": config.distill.iterations,
               "trials": rows, "best_params": best_params, "default_params": default, "final": {}}
    write_text(run_dir / "best_config.yaml", to_yaml(with_params(config, best_params)))
    _write(run_dir, results)  # the search is on disk before the long reruns start
    finals = _finals(config, {"default": default, **({"best": best_params} if best_params != default else {})},
                     run_dir, caches, resources)
    final_rows = {label: final.get("repblend", final) for label, final in finals.items()}  # or its error
    results["final"] = {"default": final_rows["default"], "best": final_rows.get("best", final_rows["default"])}
    # both runs start from the same real pairs (the seed picks them; the searched parameters do not)
    results["initial_pairs"] = next((final["init"] for final in finals.values() if "init" in final), None)
    _write(run_dir, results)
    return results


def _write(run_dir: Path, results: dict) -> None:
    write_json(run_dir / "tune_results.json", results)
    write_text(run_dir / "tune_results.md", tune_table(results))


def tune_table(results: dict) -> str:
    lines = [f"Trials: {results['num_trials']} short runs ({results['short_iterations']} iterations), scored on "
             f"{results['select_split']} (r_mean, last report)", "",
             "| params | val r_mean | val IR@10 | val TR@10 | iterations | completed |", "|---|---|---|---|---|---|"]
    for row in results["trials"]:
        params = ", ".join(f"{k}={v:g}" for k, v in row["params"].items())
        score = lambda key: "-" if row[key] is None else f"{row[key]:.2f}"  # noqa: E731
        state = "yes" if row["completed"] else "stopped" if not row["error"] else "error"
        lines.append(f"| {params} | {score('val_r_mean')} | {score('val_img_r10')} | {score('val_txt_r10')} | "
                     f"{row['iterations']} | {state} |")
    lines += ["", f"Full length ({results['full_iterations']} iterations), evaluated on {results['eval_split']}, "
              "mean ± std over evaluation seeds:", "", "| run | " + " | ".join(METRICS) + " |",
              "|---" * (len(METRICS) + 1) + "|"]

    def row(name: str, metrics: dict) -> str:
        cells = ([f"{metrics[k]['mean']:.1f} ± {metrics[k]['std']:.1f}" for k in METRICS] if "error" not in metrics
                 else ["diverged"] + [""] * (len(METRICS) - 1))
        return f"| {name} | " + " | ".join(cells) + " |"

    for label, metrics in results["final"].items():
        params = results["default_params"] if label == "default" else results["best_params"]
        lines.append(row(f"{label} ({', '.join(f'{k}={v:g}' for k, v in params.items())})", metrics))
    if results.get("initial_pairs"):
        lines.append(row("initial pairs (the real pairs both runs start from)", results["initial_pairs"]))
    return "\n".join(lines) + "\n"
