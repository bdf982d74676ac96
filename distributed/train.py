"""Distillation across Ray Train workers (`ray.workers=K`): data parallel over trajectory samples.

Every worker holds the same synthetic set and optimiser; each draws its own expert, start epoch and
mini-batches, computes its matching-loss gradient, and the gradients are averaged (one all-reduce per
iteration) before the identical update on every worker: K trajectory samples per iteration instead of one.
Every worker reports at each checkpoint (Ray Train needs the same number of reports from all), each with its
own state file, so a restarted group continues exactly where the last checkpoint left off. The restarts are
`distill_with_ray`'s own, not Train's FailureConfig, so that a divergence is not retried.
Only glue: the iteration itself is the stage's `Distiller.step`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from repblend.distributed.cluster import ensure_ray, require_resources, worker_logging
from repblend.distributed.faults import die_once, forwarded
from repblend.distributed.paths import absolute
from repblend.pipeline import steps
from repblend.pipeline.config import Config
from repblend.stages.encode import FeatureCache
from repblend.stages.errors import RepblendError

log = logging.getLogger("repblend")

FAULT_ENV = "REPBLEND_FAULT_DISTILL"  # "iteration:marker": rank 0 dies once after that iteration (tests)


def mean_across_workers(tensors: list[torch.Tensor]) -> None:
    """Average in place over the process group, in one collective."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _state_file(rank: int) -> str:
    return f"rank{rank:03d}.pt"


def _quiet_train_reports() -> None:
    """Train logs two lines per worker per checkpoint ("Checkpoint successfully created at", "Reporting training
    result"), 240 in a 3000-iteration run on two workers, while rank 0's progress lines already say where the run
    is. Its warnings stay. (The report line's logger is named after its file, so it is reached through the module;
    should Ray move it, the lines come back, nothing breaks.)"""
    loggers = [logging.getLogger("ray.train.v2._internal.execution.storage")]
    try:
        from ray.train.v2._internal.execution import context as train_context

        loggers.append(train_context.logger)
    except (ImportError, AttributeError):
        pass
    for logger in loggers:
        logger.setLevel(logging.WARNING)


def _train_fn(loop: dict) -> None:
    config: Config = loop["config"]
    run_dir, caches = Path(loop["run_dir"]), loop["caches"]
    rank = ray.train.get_context().get_world_rank()
    worker_logging()
    _quiet_train_reports()
    torch.set_num_threads(max(1, int(config.ray.worker_cpus)))
    job = steps.build_distiller(config, run_dir, caches, ray.train.torch.get_device(), rank=rank,
                                mean_across_workers=mean_across_workers)
    distiller, dc = job.distiller, config.distill
    if rank == 0:
        steps.log_plan(config, distiller)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            distiller.load(Path(folder) / _state_file(rank))
        log.info("distill (rank %d): resuming from iteration %d", rank, distiller.iteration)
    metrics = steps.open_metrics(run_dir / "distill" / "metrics.jsonl", distiller.iteration) if rank == 0 else None
    on_step = steps.step_logger(config, caches, job, metrics) if rank == 0 else None
    try:
        while distiller.iteration < dc.iterations:
            step = distiller.step()
            if on_step is not None:
                on_step(step)
            if rank == 0:
                die_once(FAULT_ENV, step.iteration, settle=ray.train.get_all_reported_checkpoints)
            if step.iteration % dc.ckpt_every == 0 or step.iteration == dc.iterations:
                with tempfile.TemporaryDirectory() as folder:
                    distiller.save(Path(folder) / _state_file(rank))
                    ray.train.report({"iteration": step.iteration, "loss": step.loss},
                                     checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        if metrics is not None:
            metrics.close()
    if rank == 0:
        steps.save_synthetic(config, run_dir, job)


def distill_with_ray(config: Config, run_dir: Path, caches: dict[str, FeatureCache]) -> Path:
    """`steps.distill` on `ray.workers` Ray Train workers; resumes from run_dir/distill/train after a crash."""
    steps.check_budget(config, caches)
    steps.claim_distill_dir(config, run_dir, record=False)
    if steps.distill_is_complete(config, run_dir):
        return steps.synthetic_path(run_dir)
    run_dir = run_dir.resolve()
    config, caches = absolute(config, caches, run_dir)
    ensure_ray(config.ray)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    workers = config.ray.workers
    require_resources(config.ray, {"CPU": workers * config.ray.worker_cpus, **({"GPU": workers} if use_gpu else {})},
                      f"distillation on ray.workers={workers} (ray.worker_cpus={config.ray.worker_cpus:g} each"
                      f"{', one GPU each' if use_gpu else ''})", "ray.workers or ray.worker_cpus")
    steps.claim_distill_dir(config, run_dir)
    retries, attempt = config.ray.max_retries, 0
    while True:
        try:
            _trainer(config, run_dir, caches, use_gpu).fit()
            return steps.synthetic_path(run_dir)
        except ray.train.WorkerGroupError as exc:
            failures = list(exc.worker_failures.values())
            causes = [failure for failure in failures if isinstance(failure, RepblendError)]
            if causes:  # a user-facing error on a worker (a divergence) repeats on every retry: its one line, now
                raise causes[0] from None
            if attempt == retries:
                raise
            attempt += 1
            log.warning("distill: the Ray Train worker group failed (%s); restarting it from the last checkpoint, "
                        "retry %d of %d (ray.max_retries)", type(failures[0]).__name__ if failures else "unknown",
                        attempt, retries)


def _trainer(config: Config, run_dir: Path, caches: dict[str, FeatureCache],
             use_gpu: bool) -> ray.train.torch.TorchTrainer:
    """One attempt. Retries are the caller's, not Train's (`max_failures=0`): Train would also retry a worker's
    deterministic error, such as a divergence, which only repeats. A new trainer with the same name and storage
    path resumes from that run's latest reported checkpoint."""
    return ray.train.torch.TorchTrainer(
        _train_fn,
        train_loop_config={"config": config, "run_dir": str(run_dir), "caches": caches},
        scaling_config=ray.train.ScalingConfig(num_workers=config.ray.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.ray.worker_cpus}),
        run_config=ray.train.RunConfig(
            name="train", storage_path=str(run_dir / "distill"),
            failure_config=ray.train.FailureConfig(max_failures=0),
            worker_runtime_env=forwarded(FAULT_ENV)))
