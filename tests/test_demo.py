"""The README quick start, verbatim: `repblend run --config configs/demo.yaml` (generated data, offline encoders,
embedded local Ray), then `repblend report` on its run directory. Only where it writes is redirected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _repblend(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("REPBLEND_LOG", "RAY_AUTH_MODE")}
    return subprocess.run([sys.executable, "-m", "repblend.pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.ray
def test_demo_distils_better_than_random_and_reports(tmp_path):
    config = tmp_path / "configs" / "demo.yaml"  # the shipped file, run from a fresh folder like a new user
    config.parent.mkdir()
    config.write_text((ROOT / "configs" / "demo.yaml").read_text())
    done = _repblend("run", "--config", "configs/demo.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| repblend |" in done.stdout and "| random |" in done.stdout
    # what the log shows when it is a file, not a terminal: each expert's dev recall, in order, from the driver (not
    # folded by Ray's dedup), the distillation's progress, and no warning from the embedded Ray's start
    log = done.stderr
    experts = [line for line in log.splitlines() if "buffer: expert" in line]
    assert [line.split("done (")[1][:3] for line in experts] == ["1/4", "2/4", "3/4", "4/4"], experts
    assert all(" dev r_mean " in line for line in experts), experts
    assert "distill: 200/200 it (100%)" in log and "; loss=" in log
    assert "repeated" not in log and "Token authentication" not in log, log[-3000:]

    run_dir = tmp_path / "runs" / "demo"
    assert (tmp_path / "runs" / "data" / "demo" / "generated.json").is_file()
    methods = json.loads((run_dir / "results.json").read_text())["methods"]
    distilled = methods["repblend"]["r_mean"]["mean"]
    assert distilled > methods["random"]["r_mean"]["mean"] + 5
    assert distilled > methods["init"]["r_mean"]["mean"] + 5
    assert distilled < methods["full"]["r_mean"]["mean"]
    assert [p.name for p in (run_dir / "export" / "shards").glob("*.tar")] == ["distilled-000000.tar"]

    report = _repblend("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (run_dir / "report" / "report.md").read_text()
    assert "| repblend |" in text
    for png in ("curves.png", "similarity.png"):
        assert (run_dir / "report" / png).stat().st_size > 10_000, png
