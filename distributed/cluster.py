"""Start or attach to Ray: the same command runs on a laptop (embedded local Ray) or a cluster.

`ray.address=""` starts an embedded local instance (a fresh one, never a stranger's cluster found on the
machine); `auto` attaches to the running cluster (and fails if there is none); `ray://host:port` uses Ray
Client. Under `ray job submit` RAY_ADDRESS is set and is honoured when `ray.address` is empty.
"""

from __future__ import annotations

import logging
import os

import ray

from repblend.pipeline.config import RayConfig
from repblend.stages.errors import ConfigError

log = logging.getLogger("repblend")


def ensure_ray(config: RayConfig) -> dict[str, float]:
    """Initialise Ray once per process and return the cluster's resources."""
    if not ray.is_initialized():
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
            ray.init(address="local", num_cpus=config.num_cpus or None, num_gpus=config.num_gpus or None,
                     include_dashboard=False, log_to_driver=True)
        log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
    return ray.cluster_resources()
