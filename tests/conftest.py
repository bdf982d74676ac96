"""Shared pytest helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def flickr8k_root() -> Path:
    """The real Flickr8k data: $REPBLEND_FLICKR8K, else ../shared/data/flickr8k next to the repository."""
    env = os.environ.get("REPBLEND_FLICKR8K")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/flickr8k"


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    """The real Flickr8k root; skips the test cleanly when the data is not there."""
    root = flickr8k_root()
    if not (root / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real Flickr8k data not found at {root} (set REPBLEND_FLICKR8K)")
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (a start costs seconds on 2 cores); never a stranger's cluster."""
    import ray

    from repblend.distributed.cluster import ensure_ray
    from repblend.pipeline.config import RayConfig

    if ray.is_initialized():
        ray.shutdown()
    resources = ensure_ray(RayConfig(num_cpus=2))
    yield resources
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """Tiny matmuls: one torch thread is ~40x faster than two on a busy 2-core machine (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def compile_without_inductor(monkeypatch):
    """torch.compile traced as in a real run (Dynamo and AOTAutograd: graph breaks and graph counts are real) but
    run without Inductor's C++ code generation, which costs 40-90 s per graph on a cold 2-core machine. For tests of
    what reaches the compiler; test_fused checks Inductor's numbers against the eager loop."""
    import torch

    compile_ = torch.compile

    def compile_aot_eager(model=None, *, mode=None, **kwargs):
        return compile_(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
