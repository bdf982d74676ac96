"""R1: `kill -9` during distillation, then the same command again, gives the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

ROOT = Path(__file__).resolve().parents[1]
ARGS = [*TINY_ENCODERS, *TINY_PROBLEM, "distill.space=feature", "distill.iterations=200", "distill.ckpt_every=10",
        *STABLE_LRS, "ray.enabled=false"]


def _command(toy: Path, cache: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "repblend.pipeline", "distill", "--config", str(ROOT / "configs/flickr8k_100.yaml"),
            f"data.root={toy}", f"cache.dir={cache}", "--run-dir", str(run_dir), *ARGS]


@pytest.mark.slow
def test_kill_during_distill_then_rerun_matches_uninterrupted(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    cache = tmp_path / "cache"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(toy, cache, straight), check=True, capture_output=True)

    process = subprocess.Popen(_command(toy, cache, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "distill" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "distill" / "synthetic.safetensors").exists(), "the run finished before it was killed"
    stopped_at = torch.load(checkpoint, weights_only=False)["iteration"]
    assert 0 < stopped_at < 200

    subprocess.run(_command(toy, cache, killed), check=True, capture_output=True)
    a = load_file(str(straight / "distill" / "synthetic.safetensors"))
    b = load_file(str(killed / "distill" / "synthetic.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
