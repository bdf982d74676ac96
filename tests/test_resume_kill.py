"""R1: `kill -9` during distillation or buffering, then the same command again, gives the uninterrupted result."""

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


def _command(toy: Path, cache: Path, run_dir: Path, command: str = "distill", args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "-m", "repblend.pipeline", command, "--config", str(ROOT / "configs/flickr8k_100.yaml"),
            f"data.root={toy}", f"cache.dir={cache}", "--run-dir", str(run_dir), *args]


def _kill_when(process: subprocess.Popen, ready) -> None:
    deadline = time.time() + 120
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _assert_same_tensors(a_path: Path, b_path: Path) -> None:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (a_path.name, key)


@pytest.mark.slow
def test_kill_during_distill_then_rerun_matches_uninterrupted(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    cache = tmp_path / "cache"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(toy, cache, straight), check=True, capture_output=True)

    process = subprocess.Popen(_command(toy, cache, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "distill" / "checkpoint.pt"
    _kill_when(process, checkpoint.exists)
    assert not (killed / "distill" / "synthetic.safetensors").exists(), "the run finished before it was killed"
    stopped_at = torch.load(checkpoint, weights_only=False)["iteration"]
    assert 0 < stopped_at < 200

    rerun = subprocess.run(_command(toy, cache, killed), check=True, capture_output=True, text=True)
    assert f"distill: resuming from iteration {stopped_at} " in rerun.stderr  # not from scratch, which ends equal
    _assert_same_tensors(straight / "distill" / "synthetic.safetensors", killed / "distill" / "synthetic.safetensors")


@pytest.mark.slow
def test_kill_during_buffer_then_rerun_matches_uninterrupted(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    cache = tmp_path / "cache"
    args = [*TINY_ENCODERS, *TINY_PROBLEM, "buffer.num_experts=8", "buffer.train_epochs=25", "ray.enabled=false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(toy, cache, straight, "buffer", args), check=True, capture_output=True)

    process = subprocess.Popen(_command(toy, cache, killed, "buffer", args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _kill_when(process, lambda: (killed / "buffer" / "expert_000.safetensors").exists())
    done = sorted(p.name for p in (killed / "buffer").glob("expert_*.safetensors"))
    assert 0 < len(done) < 8 and not (killed / "buffer" / "index.json").exists(), done

    kept = {name: (killed / "buffer" / name).stat().st_mtime_ns for name in done}
    subprocess.run(_command(toy, cache, killed, "buffer", args), check=True, capture_output=True)
    assert {name: (killed / "buffer" / name).stat().st_mtime_ns for name in done} == kept  # not retrained
    for k in range(8):
        name = f"expert_{k:03d}.safetensors"
        _assert_same_tensors(straight / "buffer" / name, killed / "buffer" / name)
