"""Start or attach to Ray: the same command runs on a laptop (embedded local Ray) or a cluster.

`ray.address=""` starts an embedded local instance (a fresh one, never a stranger's cluster found on the
machine); `auto` attaches to the running cluster (and fails if there is none); `ray://host:port` uses Ray
Client. Under `ray job submit` RAY_ADDRESS is set and is honoured when `ray.address` is empty.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import NoReturn

import ray

from repblend.pipeline.config import RayConfig
from repblend.stages.errors import ConfigError, RepblendError

log = logging.getLogger("repblend")


def worker_logging(tag: str = "") -> None:
    """The CLI's log format in a Ray worker process, which starts without the driver's logging setup. `tag` marks
    the lines of one of several tasks that log alike: their lines are told apart, and Ray's log dedup cannot fold
    them into one. Set afresh for every task, since Ray reuses worker processes."""
    prefix = f"[{tag}] " if tag else ""
    logging.basicConfig(level=os.environ.get("REPBLEND_LOG", "INFO"), force=True,
                        format=f"%(asctime)s %(levelname)s {prefix}%(message)s", datefmt="%H:%M:%S")


def raise_task_failure(failure: ray.exceptions.RayTaskError, others: Iterable[ray.ObjectRef]) -> NoReturn:
    """After one of several tasks failed: cancel and collect the others (an error nobody collects is printed,
    traceback and all, when Ray shuts down, after the one line the failure deserves), then raise the failure,
    a user-facing one (a divergence, a bad setting) as itself rather than wrapped in the worker's traceback."""
    refs = list(others)
    for ref in refs:
        ray.cancel(ref)
    for ref in refs:
        try:
            ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.TaskCancelledError):
            pass
    if isinstance(failure.cause, RepblendError):
        raise failure.cause from None
    raise failure


# Ray Train's preemption watcher (an actor per Train run) follows nodes that a cloud may take back. The embedded Ray is
# one machine that nothing preempts, and starting the watcher there logs an "E" line from the controller's core
# worker at every group start (its constructor arguments sit in the object store), which reads as a failure.
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _embedded(config: RayConfig) -> bool:
    return not (config.address or os.environ.get("RAY_ADDRESS", ""))


def require_resources(config: RayConfig, demand: dict[str, float], what: str, lower: str) -> None:
    """Ray waits, silently or with a traceback a minute, for resources no node has. On the embedded Ray, whose
    resources are fixed, that wait is forever: refuse it in one line instead. An attached cluster may still grow
    (autoscaling), so there it is a warning."""
    have = ray.cluster_resources()
    short = [f"{amount:g} {name} (the cluster has {have.get(name, 0):g})" for name, amount in demand.items()
             if amount > have.get(name, 0) + 1e-9]
    if not short:
        return
    message = f"{what} needs {', '.join(short)}"
    if _embedded(config):
        raise ConfigError(f"{message}; lower {lower}, or give the local Ray more with ray.num_cpus / ray.num_gpus")
    log.warning("%s: Ray waits until the cluster has them (autoscaling)", message)


def quiet_state_api_users() -> None:
    """A worker-process setup hook for the embedded Ray, which runs without the dashboard and so without Ray's State
    API. Train's placement-group cleaner (an internal actor) asks that API about the controller every second. It
    finds the cluster by auto-detection, which fails with a traceback when a second embedded Ray runs on the machine
    (two repblend commands at once), and otherwise it warns once a second for as long as the Train run lasts. Point
    it at its own cluster, and keep its errors only: the missing API is expected here, not news."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


class _TokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def _quiet_token_auth_notice() -> None:
    """Ray turns token authentication on for every new local cluster and warns each time that it did. That is its
    default and ours, not news; the warning a cluster started without authentication gets stays."""
    setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenAuthNotice) for f in setup.filters):
        setup.addFilter(_TokenAuthNotice())


def ensure_ray(config: RayConfig) -> dict[str, float]:
    """Initialise Ray once per process and return the cluster's resources."""
    if not ray.is_initialized():
        if not sys.stderr.isatty():  # Ray colours each worker line's prefix, escape codes and all, even into a log file
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        address = config.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            if config.num_cpus or config.num_gpus:
                raise ConfigError("ray.num_cpus / ray.num_gpus size an embedded Ray only; with ray.address set the "
                                  "cluster's own resources apply")
            try:
                ray.init(address=address, log_to_driver=True)
            except ConnectionError as exc:
                raise ConfigError(f"ray.address={address}: no Ray cluster to attach to ({exc})") from exc
        else:
            _quiet_token_auth_notice()
            ray.init(address="local", num_cpus=config.num_cpus or None, num_gpus=config.num_gpus or None,
                     include_dashboard=False, log_to_driver=True,
                     runtime_env={"worker_process_setup_hook": quiet_state_api_users, "env_vars": EMBEDDED_ENV})
        log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
    return ray.cluster_resources()
