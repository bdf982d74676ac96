"""Ray glue: experts as Ray tasks give the local buffer, and survive a worker that dies mid-buffer."""

import pytest
import torch
from safetensors.torch import load_file

from repblend.distributed.buffer import FAULT_ENV, expert_runner
from repblend.pipeline import steps
from repblend.pipeline.config import load_config
from repblend.stages.toydata import make_toy_dataset

pytestmark = pytest.mark.ray

TINY = ["encoders.image.name=tiny", "encoders.image.weights=random", "encoders.image.image_size=32",
        "encoders.text.name=tiny", "encoders.text.weights=random", "encoders.num_workers=0", "run.progress=false",
        "model.embed_dim=16", "buffer.num_experts=3", "buffer.train_epochs=3", "buffer.batch_size=16",
        "distill.num_queries=8", "distill.sim_rank=2", "run.device=cpu"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


def _config(toy, tmp_path):
    return load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY])


def test_ray_experts_equal_local_experts(ray_session, toy, tmp_path):
    config = _config(toy, tmp_path)
    caches = steps.encode(config)
    local = steps.buffer(config, tmp_path / "local", caches)
    remote_dir = tmp_path / "remote" / "buffer"
    remote = steps.buffer(config, tmp_path / "remote", caches, expert_runner(config, remote_dir, caches))
    assert remote == remote_dir
    for k in range(3):
        a = load_file(str(local / f"expert_{k:03d}.safetensors"))
        b = load_file(str(remote / f"expert_{k:03d}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:  # same seeds and data; only thread counts may differ, so float sums agree closely
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_expert_whose_worker_dies_is_retried(ray_session, toy, tmp_path, monkeypatch):
    config = _config(toy, tmp_path)
    caches = steps.encode(config)
    marker = tmp_path / "expert1_killed_once"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")
    buffer_dir = tmp_path / "run" / "buffer"
    steps.buffer(config, tmp_path / "run", caches, expert_runner(config, buffer_dir, caches))
    assert marker.exists(), "the fault was not injected: the test would prove nothing"
    assert sorted(p.name for p in buffer_dir.glob("expert_*.safetensors")) == [
        "expert_000.safetensors", "expert_001.safetensors", "expert_002.safetensors"]
