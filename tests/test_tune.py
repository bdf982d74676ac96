"""`repblend tune`: a small search completes, selects on the held-out val split, compares with Beta(1, 1)."""

import json
import logging

import pytest

from repblend.distributed.tune import search_space, with_params
from repblend.pipeline.cli import main
from repblend.pipeline.config import load_config
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

TINY = [*TINY_ENCODERS, *TINY_PROBLEM, "distill.space=feature", "distill.iterations=6", *STABLE_LRS,
        "distill.lr_teacher=0.01", "eval.num_eval=2", "eval.epochs=5", "run.device=cpu", "tune.short_iterations=4",
        "tune.report_every=2"]


def test_params_reach_the_config():
    config = load_config(None, ["tune.search_lrs=true", "distill.lr_img=100"])
    space, default = search_space(config)
    assert set(space) == {"beta_a", "beta_b", "lr_img", "lr_txt", "lr_sim"}
    assert default == {"beta_a": 1.0, "beta_b": 1.0, "lr_img": 100.0, "lr_txt": 100.0, "lr_sim": 10.0}
    changed = with_params(config, {"beta_a": 0.5, "beta_b": 2.0, "lr_img": 30.0})
    assert (changed.blend.beta_a, changed.blend.beta_b, changed.distill.lr_img) == (0.5, 2.0, 30.0)


def test_tune_needs_a_validation_split(tmp_path, capsys):
    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    code = main(["tune", "--config", "configs/flickr8k_100.yaml", f"data.root={toy}", f"cache.dir={tmp_path / 'c'}",
                 "--run-dir", str(tmp_path / "run"), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "split 'val' is empty or absent" in err and "data.val_images=N" in err


def test_tune_refuses_to_run_without_ray(tmp_path, capsys):
    code = main(["tune", "--config", "configs/flickr8k_100.yaml", f"data.root={tmp_path / 'none'}",
                 "--run-dir", str(tmp_path / "run"), *TINY, "ray.enabled=false"])
    assert code == 2
    assert "repblend tune runs its trials on Ray: drop ray.enabled=false" in capsys.readouterr().err
    assert not (tmp_path / "run" / "buffer").exists()


def test_tune_refuses_trials_longer_than_the_full_run(tmp_path, capsys):
    code = main(["tune", "--config", "configs/flickr8k_100.yaml", f"data.root={tmp_path / 'none'}",
                 "--run-dir", str(tmp_path / "run"), *TINY, "tune.short_iterations=8", "tune.report_every=4"])
    assert code == 2
    assert ("tune.short_iterations=8 is longer than the full-length run it shortens (distill.iterations=6): set "
            "tune.short_iterations to at most 6") in capsys.readouterr().err
    assert not (tmp_path / "run" / "buffer").exists()


@pytest.mark.ray
def test_small_search_completes_and_compares_with_the_default(ray_session, tmp_path, capfd, caplog):
    toy = make_toy_dataset(tmp_path / "toy", n_train=30, n_dev=8, size=32)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="repblend"):
        code = main(["tune", "--config", "configs/flickr8k_100.yaml", f"data.root={toy}",
                     f"cache.dir={tmp_path / 'c'}", "--run-dir", str(run_dir), *TINY, "data.val_images=6",
                     "tune.num_samples=4", "tune.max_concurrent_trials=2"])
    output = capfd.readouterr()
    assert code == 0, output.err
    # where each trial's TensorBoard events are, and no command pointing at Ray's session folder, which has none
    assert f"(tensorboard --logdir {run_dir / 'experiment'})" in caplog.text
    assert len(list((run_dir / "experiment").glob("_trial_*/events.out.tfevents.*"))) == 4
    printed = output.out + output.err
    assert "To visualize your results" not in printed and "driver_artifacts" not in printed
    assert "A new study created" not in printed
    results = json.loads((run_dir / "tune_results.json").read_text())
    assert results["num_trials"] == 4 and results["select_split"] == "val" and results["eval_split"] == "dev"
    assert {"beta_a": 1.0, "beta_b": 1.0} in [t["params"] for t in results["trials"]]  # the search is seeded with it
    assert all(t["error"] is None for t in results["trials"])
    assert any(t["completed"] for t in results["trials"])
    for label in ("default", "best"):
        assert 0 <= results["final"][label]["r_mean"]["mean"] <= 100
    # the reruns' rows are logged by the driver once their tasks are back, so they come before the table; "best" is
    # rerun only where the search found other parameters than the default (ASHA's timing decides on this toy search)
    rerun = ["default"] + (["best"] if results["best_params"] != results["default_params"] else [])
    for label in rerun:
        assert f"eval [{label} run] repblend: img_r10 {results['final'][label]['img_r10']['mean']:.2f}" in caplog.text
    assert caplog.text.count("eval [") == 2 * len(rerun)  # its own row and its initial pairs'
    assert 0 <= results["initial_pairs"]["r_mean"]["mean"] < 100
    assert "| initial pairs (the real pairs both runs start from) |" in (run_dir / "tune_results.md").read_text()
    best = load_config(run_dir / "best_config.yaml", [])
    assert (best.blend.beta_a, best.blend.beta_b) == (results["best_params"]["beta_a"],
                                                      results["best_params"]["beta_b"])
    assert "| default (beta_a=1, beta_b=1) |" in (run_dir / "tune_results.md").read_text()
    # the val images were held out of training: the train cache holds 24 of the 30 training images
    train_manifest = json.loads(next((tmp_path / "c").glob("train*.json")).read_text())
    assert train_manifest["num_images"] == 24
    # Ray Tune would restore this search whatever the config says now: a search with other settings is refused
    # before it replaces the run's config.yaml
    made = (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "tune_identity.json").read_text())["tune"]["num_samples"] == 4
    code = main(["tune", "--config", "configs/flickr8k_100.yaml", f"data.root={toy}", f"cache.dir={tmp_path / 'c'}",
                 "--run-dir", str(run_dir), *TINY, "data.val_images=6", "tune.num_samples=6",
                 "tune.max_concurrent_trials=2"])
    assert code == 2
    assert (f"repblend tune: error: {run_dir} holds a search with other settings (tune.num_samples 4 there, 6 here)"
            in capfd.readouterr().err)
    assert (run_dir / "config.yaml").read_text() == made


@pytest.mark.ray
def test_a_trial_larger_than_the_local_ray_is_refused_before_any_expert_trains(ray_session, tmp_path, capsys):
    toy = make_toy_dataset(tmp_path / "toy", n_train=30, n_dev=8, size=32)
    run_dir = tmp_path / "run"
    code = main(["tune", "--config", "configs/flickr8k_100.yaml", f"data.root={toy}", f"cache.dir={tmp_path / 'c'}",
                 "--run-dir", str(run_dir), *TINY, "data.val_images=6", "tune.trial_cpus=3"])
    assert code == 2
    assert ("a Tune trial needs 3 CPU (the cluster has 2); lower tune.trial_cpus or tune.trial_gpus"
            in capsys.readouterr().err)
    assert not list(run_dir.glob("buffer/expert_*"))


@pytest.mark.ray
def test_the_full_length_reruns_are_ray_tasks_whose_errors_come_back_as_one_line(ray_session, tmp_path):
    from repblend.distributed.tune import _finals
    from repblend.pipeline import steps
    from repblend.stages.errors import ConfigError

    toy = make_toy_dataset(tmp_path / "toy", n_train=12, n_dev=8, size=32)
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'c'}", *TINY, "distill.num_queries=20"])
    caches = steps.encode(config)
    with pytest.raises(ConfigError, match=r"^distill.num_queries=20 exceeds the 12 training images"):
        _finals(config, {"default": {"beta_a": 1.0, "beta_b": 1.0}}, tmp_path, caches, {"cpu": 1, "gpu": 0})
