"""The whole chain on a small real problem: encode -> buffer -> distill -> eval, through the CLI.

A seeded Flickr8k subset with the offline encoders (EfficientNet-Lite0 + MiniLM), feature-space
distillation: a few minutes on 2 CPU cores. The distilled set must beat a random coreset of the same size
and its own initialisation; the run must write the results files in the documented shape.
"""

import json
from pathlib import Path

import pytest

from repblend.pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.max_train_images=400", "data.max_eval_images=200", "distill.num_queries=49", "distill.sim_rank=5",
         "distill.iterations=60", "buffer.num_experts=3", "eval.num_eval=2", "eval.epochs=50", "eval.full_epochs=5",
         "run.progress=false"]


@pytest.mark.slow
@pytest.mark.realdata
def test_run_end_to_end_beats_random(flickr8k_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["run", "--config", str(ROOT / "configs/flickr8k_100_cpu.yaml"), f"data.root={flickr8k_dir}",
            f"cache.dir={tmp_path / 'cache'}", "--run-dir", str(run_dir), *SMALL]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| repblend |" in table and "| random |" in table

    results = json.loads((run_dir / "results.json").read_text())
    assert results["eval_split"] == "dev" and results["pairs"] == 49
    methods = results["methods"]
    assert set(methods) >= {"repblend", "init", "random", "herding", "kcenter", "full"}
    for metrics in methods.values():
        assert set(metrics) == {"img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean"}
        assert all(0 <= m["mean"] <= 100 and m["std"] >= 0 for m in metrics.values())
    distilled = methods["repblend"]["r_mean"]["mean"]
    assert distilled > methods["random"]["r_mean"]["mean"] + 3
    assert distilled > methods["init"]["r_mean"]["mean"] + 3
    assert methods["full"]["r_mean"]["mean"] > methods["random"]["r_mean"]["mean"]

    stages = json.loads((run_dir / "stages.json").read_text())
    assert set(stages) == {"encode", "buffer", "distill", "eval", "export"}
    assert (run_dir / "export" / "synthetic.safetensors").read_bytes() == (
        run_dir / "distill" / "synthetic.safetensors").read_bytes()
    assert [p.name for p in (run_dir / "export" / "shards").glob("*.tar")] == ["distilled-000000.tar"]
    assert (run_dir / "results.md").read_text().startswith("Retrieval on dev, 49 pairs")

    # a second run reuses everything: cache, experts, and the finished distillation checkpoint
    synthetic = run_dir / "distill" / "synthetic.safetensors"
    before = synthetic.read_bytes()
    assert main(argv) == 0
    assert synthetic.read_bytes() == before
