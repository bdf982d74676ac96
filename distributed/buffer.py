"""Experts as Ray tasks: independent, so they spread over every CPU/GPU; a task whose worker dies is rerun.

Each task trains one expert, or a group of `buffer.batch_experts` in one batched step, through the same stage
function as the local path and writes their files; only the paths travel back. Features are read from the cache
files by each worker (once per worker process).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from repblend.distributed.cluster import ensure_ray, raise_task_failure, require_resources, worker_logging
from repblend.distributed.faults import die_once, forwarded
from repblend.pipeline import steps
from repblend.pipeline.config import Config
from repblend.stages.encode import FeatureCache

log = logging.getLogger("repblend")

FAULT_ENV = "REPBLEND_FAULT_EXPERT"  # "k:marker": expert k's first attempt kills its worker (tests)


@ray.remote
def _expert_task(config: Config, buffer_dir: str, group: list[int], caches: dict[str, FeatureCache]) -> list[str]:
    import torch

    worker_logging()
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    for k in group:
        die_once(FAULT_ENV, k)
    return [str(path) for path in steps.train_expert_files(config, Path(buffer_dir), group, caches)]


def expert_runner(config: Config, buffer_dir: Path, caches: dict[str, FeatureCache]):
    """A `run_experts` callable for `steps.buffer` that trains the given experts as Ray tasks."""

    def run(todo: list[int]) -> None:
        ensure_ray(config.ray)  # started only when there is work: a complete buffer costs no Ray start
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        options = {"num_cpus": config.ray.expert_cpus, "num_gpus": config.ray.expert_gpus if has_gpus else 0,
                   "max_retries": config.ray.max_retries}
        require_resources(config.ray, {"CPU": options["num_cpus"], "GPU": options["num_gpus"]}, "an expert task",
                          "ray.expert_cpus or ray.expert_gpus")
        if forwarded(FAULT_ENV):
            options["runtime_env"] = forwarded(FAULT_ENV)
        pending = {_expert_task.options(**options).remote(config, str(buffer_dir), group, caches): group
                   for group in steps.expert_groups(config, todo)}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready[0])
            try:
                paths = ray.get(ready[0])  # raises if the task failed after all retries
            except ray.exceptions.RayTaskError as exc:  # a diverging expert, say: its one line
                raise_task_failure(exc, pending)
            done += len(group)
            steps.log_experts_done(config, group, [Path(path) for path in paths], done, len(todo))

    return run
