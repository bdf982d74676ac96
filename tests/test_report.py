"""`repblend report`: tables and plots from a run directory, image grid in pixel space."""

import pytest
from PIL import Image

from repblend.pipeline import evaluation, steps
from repblend.pipeline.cli import main
from repblend.pipeline.config import load_config
from repblend.pipeline.refinement import refine
from repblend.pipeline.rundir import mark_stage_done, prepare_run_dir
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM


@pytest.mark.parametrize("space", ["pixel", "feature"])
def test_report_renders_tables_and_plots(tmp_path, space, capsys):
    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY_ENCODERS,
                                *TINY_PROBLEM, *STABLE_LRS, f"distill.space={space}", "distill.iterations=4",
                                "distill.eval_every=2", "eval.num_eval=2", "eval.epochs=5", "eval.full_epochs=2"])
    run_dir = prepare_run_dir(config, tmp_path / "run", "run")
    caches = steps.encode(config)
    mark_stage_done(run_dir, "encode", {split: str(c.tensors_path) for split, c in caches.items()})
    steps.buffer(config, run_dir, caches)
    steps.distill(config, run_dir, caches)
    if space == "feature":  # refined through the protocol: its curves get a section
        config = load_config(run_dir / "config.yaml", ["refine.enabled=true", "refine.iterations=3",
                                                       "refine.eval_every=2", "refine.real_batch=16"])
        refine(config, run_dir, caches)
    evaluation.evaluate(config, run_dir, caches)

    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "| repblend |" in report and "Collapse diagnostics" in report and "4 iterations" in report
    expected = {"curves.png", "recall.png", "collapse.png", "similarity.png"}
    expected |= {"images.png"} if space == "pixel" else {"refine.png"}
    assert {p.name for p in (run_dir / "report").glob("*.png")} == expected
    if space == "feature":
        assert "## Refinement" in report and "3 refine iterations" in report and "last probe r_mean" in report
    for name in expected:
        assert f"]({name})" in report
        width, height = Image.open(run_dir / "report" / name).size
        assert width > 200 and height > 100


def test_report_of_a_missing_run_names_it(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no run directory here" in err and "WARNING" not in err
    (tmp_path / "runs" / "demo").mkdir(parents=True)  # the parent of a run, not a run: refused, nothing written
    assert main(["report", str(tmp_path / "runs")]) == 2
    assert "runs: not a run directory (none of config.yaml, stages.json" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "report").exists()


def test_report_counts_the_spike_guards_actions_and_the_clipped_iterations(tmp_path):
    import json

    from repblend.pipeline.report import write_report

    guards = ["", "skipped", "skipped", "rewound to 0", "", "skipped"]
    clipped = [0, 0, 0, 0, 2, 0]
    rows = [{"iteration": i + 1, "loss": 1.0, "loss_img": 0.5, "loss_txt": 0.5, "syn_lr_img": 0.1, "syn_lr_txt": 0.1,
             "seconds": 0.1, "expert": 0, "start_epoch": 0, "guard": g, "clipped": c}
            for i, (g, c) in enumerate(zip(guards, clipped))]
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    assert "Spike guard (distill.rewind_loss): 3 updates skipped, 1 rewinds at iterations 4 (rewound to 0)." in report
    assert "Outer-gradient clipping (distill.grad_clip): 1 of 6 iterations clipped (at 5)." in report


def _fake_run(run_dir, pairs: int, repblend: float, lr_img: float, seed: int = 0) -> None:
    """A run directory as `repblend run` leaves it, as far as `compare` reads it."""
    from repblend.stages.io import write_json

    def row(value: float) -> dict:
        return {k: {"mean": value, "std": 0.5} for k in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5",
                                                           "txt_r10", "r_mean")}

    write_json(run_dir / "results.json", {"methods": {"repblend": row(repblend), "random": row(20), "full": row(60)},
                                          "pairs": pairs, "eval_split": "dev", "seeds": [1, 2]})
    (run_dir / "config.yaml").write_text(f"run:\n  name: {run_dir.name}\n  seed: {seed}\ndistill:\n"
                                         f"  num_queries: {pairs}\n  lr_img: {lr_img}\n  iterations: 300\n"
                                         f"buffer:\n  dir: {run_dir}/buffer\n")


def test_compare_tables_several_runs_with_g_and_what_differs(tmp_path, capsys):
    from repblend.pipeline.cli import main

    for name, pairs, repblend in (("a", 99, 50.0), ("b", 199, 55.0)):
        (tmp_path / name).mkdir()
        _fake_run(tmp_path / name, pairs, repblend, lr_img=100)
    out_file = tmp_path / "compare.md"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--methods", "repblend",
                 "--out", str(out_file)]) == 0
    table = capsys.readouterr().out
    assert out_file.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith(f"| {tmp_path}")]
    # G = (set - random) / (full - random): (50 - 20) / 40 and (55 - 20) / 40
    assert rows == [f"| {tmp_path / 'a'} | 99 | repblend | " + " | ".join(["50.0 ± 0.5"] * 3 + ["0.75"] * 3) + " |",
                    f"| {tmp_path / 'b'} | 199 | repblend | " + " | ".join(["55.0 ± 0.5"] * 3 + ["0.88"] * 3) + " |"]
    # names and paths differ too, but only the settings are listed
    assert f"- {tmp_path / 'a'}: distill.num_queries=99\n- {tmp_path / 'b'}: distill.num_queries=199" in table

    (tmp_path / "c").mkdir()  # eval.sets is one value; a key a run's config lacks shows as "-"
    _fake_run(tmp_path / "c", 99, 50.0, lr_img=100)
    with open(tmp_path / "c" / "config.yaml", "a") as config:
        config.write("eval:\n  sets:\n    pub: /x.safetensors\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    assert (f"- {tmp_path / 'a'}: eval.sets=-\n- {tmp_path / 'c'}: eval.sets={{'pub': '/x.safetensors'}}"
            in capsys.readouterr().out)

    assert main(["compare", str(tmp_path / "a"), str(tmp_path)]) != 0
    assert f"{tmp_path}: no results.json" in capsys.readouterr().err


def test_compare_over_seeds_makes_one_row_per_experiment(tmp_path, capsys):
    from repblend.pipeline.cli import main

    for name, pairs, repblend, seed in (("a0", 99, 50.0, 0), ("a1", 99, 54.0, 1), ("b", 199, 55.0, 0)):
        (tmp_path / name).mkdir()
        _fake_run(tmp_path / name, pairs, repblend, lr_img=100, seed=seed)
    runs = [str(tmp_path / name) for name in ("a0", "a1", "b")]
    assert main(["compare", *runs, "--over-seeds", "--methods", "repblend"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(f"| {tmp_path}")]
    # a: the mean and sample std of 50 and 54 (52.0 ± 2.8), G = (52 - 20) / 40; b: one run, its mean, no spread
    assert rows == [f"| {tmp_path / 'a0'} (+1; seeds 0, 1) | 99 | repblend | " + " | ".join(
                        ["52.0 ± 2.8"] * 3 + ["0.80"] * 3) + " |",
                    f"| {tmp_path / 'b'} | 199 | repblend | " + " | ".join(["55.0"] * 3 + ["0.88"] * 3) + " |"]
    assert (f"- {tmp_path / 'a0'} (+1; seeds 0, 1): distill.num_queries=99\n"
            f"- {tmp_path / 'b'}: distill.num_queries=199") in table
    assert "run.seed" not in table.split("Settings that differ")[1]
    assert main(["compare", runs[0], runs[1], "--over-seeds"]) == 0
    assert "All 2 runs are one experiment (their configs differ only in run.seed)." in capsys.readouterr().out
