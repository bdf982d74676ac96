"""benchmarks/collapse_study.py --small runs end to end: the table, results.json and the three PNGs appear."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_collapse_study_small(tmp_path):
    out = tmp_path / "study"
    script = ROOT / "benchmarks" / "collapse_study.py"
    done = subprocess.run([sys.executable, str(script), "--small", "--residual-alphas", "0.01", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for arm in ("vanilla", "kd", "ebr a=0.01", "ebr residual a=0.01", "dropout", "B alone"):
        assert f"| {arm} |" in done.stdout
    assert "| arm | acc | acc_no_a |" in (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results["vanilla"]["0"]["acc"]) == 2  # two seeds
    assert "acc_no_a_sub" in results["ebr a=0.01"]["2"] and "acc_no_a_sub" in results["ebr residual a=0.01"]["2"]
    for name in ("accuracy.png", "missing.png", "erank.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
