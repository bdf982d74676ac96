"""The `repblend` command: exit codes, one-line errors, run-directory records."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repblend.pipeline.cli import main
from repblend.stages.toydata import make_toy_dataset
from tiny import TINY_ENCODERS

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_ENCODERS


def test_console_script_is_installed():
    assert shutil.which("repblend") or (Path(sys.executable).parent / "repblend").exists()
    out = subprocess.run([sys.executable, "-m", "repblend.pipeline", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("run", "encode", "buffer", "distill", "refine", "invert", "eval", "tune", "export", "report",
                    "convert", "compare"):
        assert command in out.stdout


def test_validate_prints_the_resolved_config(capsys):
    assert main(["validate", "--config", str(ROOT / "configs/flickr8k_100.yaml"), "distill.iterations=5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["distill"]["iterations"] == 5
    assert resolved["run"]["name"] == "flickr8k_100"


def test_overrides_after_options_are_accepted(capsys):
    assert main(["validate", "--config", str(ROOT / "configs/flickr8k_100.yaml"), "--debug", "blend.beta_a=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["blend"]["beta_a"] == 2.0


def test_bad_key_is_one_line_and_nonzero(capsys):
    code = main(["validate", "--config", str(ROOT / "configs/flickr8k_100.yaml"), "distil.iterations=5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "unknown config key 'distil' (did you mean 'distill'?)" in err


def test_invert_without_invert_enabled_is_one_line_and_nonzero(capsys):
    config = str(ROOT / "configs/flickr8k_100_feature.yaml")
    assert main(["invert", "--config", config]) == 2
    assert capsys.readouterr().err.strip() == (f"repblend invert: error: {config}: invert.enabled is false (set "
                                               "invert.enabled=true, with distill.space=feature)")


def test_refine_without_refine_enabled_is_one_line_and_nonzero(capsys):
    config = str(ROOT / "configs/flickr8k_100_feature.yaml")
    assert main(["refine", "--config", config, "refine.enabled=false"]) == 2
    assert capsys.readouterr().err.strip() == (f"repblend refine: error: {config}: refine.enabled is false (set "
                                               "refine.enabled=true, with distill.space=feature)")


def test_debug_shows_the_traceback(capsys):
    main(["validate", "--config", str(ROOT / "configs/flickr8k_100.yaml"), "--debug", "distil.iterations=5"])
    assert "Traceback" in capsys.readouterr().err


def test_missing_dataset_names_the_path(tmp_path, capsys):
    code = main(["encode", "--config", str(ROOT / "configs/flickr8k_100.yaml"), f"data.root={tmp_path / 'nowhere'}",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert (f"error: data.root={tmp_path / 'nowhere'}: no such directory (pass data.root=/path/to/flickr8k"
            in capsys.readouterr().err)


def test_a_path_the_machine_refuses_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code = main(["encode", "--config", str(ROOT / "configs/demo.yaml"), f"data.root={tmp_path / 'data'}",
                 "data.generated.train_images=8", "data.generated.eval_images=4", "data.generated.image_size=32",
                 f"cache.dir={tmp_path / 'a_file' / 'cache'}", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"repblend encode: error: [Errno 20] Not a directory: '{tmp_path / 'a_file' / 'cache'}" in err
    assert "Traceback" not in err


def test_distill_with_other_settings_in_a_run_directory_is_refused_before_its_config_is_replaced(tmp_path, capsys):
    from tiny import STABLE_LRS, TINY_PROBLEM

    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    run_dir = tmp_path / "run"
    argv = ["distill", "--config", str(ROOT / "configs/demo.yaml"), "--run-dir", str(run_dir), "data.format=flickr8k",
            f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "ray.enabled=false", "distill.iterations=2",
            *TINY, *TINY_PROBLEM, *STABLE_LRS]
    assert main(argv) == 0
    made = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*argv, "distill.num_queries=6"]) == 2
    assert (f"repblend distill: error: {run_dir / 'distill'} holds a set distilled with other settings "
            "(distill.num_queries 8 there, 6 here)") in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == made
    assert main([*argv, "distill.iterations=3"]) == 0  # a longer run continues the set


def test_encode_records_config_versions_and_seeds(tmp_path, capsys):
    toy = make_toy_dataset(tmp_path / "toy", n_train=8, n_dev=4, size=32)
    run_dir = tmp_path / "run"
    code = main(["encode", "--config", str(ROOT / "configs/flickr8k_100.yaml"), f"data.root={toy}",
                 f"cache.dir={tmp_path / 'cache'}", "--run-dir", str(run_dir), "run.seed=7", *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "train: 8 images x 32, 40 captions x 32" in out and "dev: 4 images x 32, 20 captions x 32" in out
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["seed"] == 7 and config["encoders"]["image"]["name"] == "tiny"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seeds"]["run.seed"] == 7
    assert env["packages"]["torch"] and env["packages"]["repblend"]
    assert env["malloc"] == "default"  # main() alone; the `repblend` command (entry) tunes glibc first
    stages = json.loads((run_dir / "stages.json").read_text())
    assert set(stages["encode"]) >= {"train", "dev", "finished"}


def test_a_run_directory_in_use_is_refused_and_freed_when_its_holder_dies(tmp_path, capsys):
    import os
    import signal

    from repblend.pipeline.rundir import run_dir_lock

    toy = make_toy_dataset(tmp_path / "toy", n_train=8, n_dev=4, size=32)
    run_dir = tmp_path / "run"
    argv = ["encode", "--config", str(ROOT / "configs/flickr8k_100.yaml"), f"data.root={toy}",
            f"cache.dir={tmp_path / 'cache'}", "--run-dir", str(run_dir), *TINY]
    with run_dir_lock(run_dir, "run"):  # another command holds it
        assert main(argv) == 2
        assert f"{run_dir} is in use by repblend run (pid {os.getpid()} on " in capsys.readouterr().err
        assert not (run_dir / "config.yaml").exists()  # the holder's record is not overwritten

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from repblend.pipeline.rundir import run_dir_lock\n"
                               f"with run_dir_lock(Path({str(run_dir)!r}), 'distill'):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert main(argv) == 2 and "is in use by repblend distill" in capsys.readouterr().err
    os.kill(holder.pid, signal.SIGKILL)  # a killed command leaves no stale lock behind
    holder.wait()
    assert main(argv) == 0 and (run_dir / "config.yaml").is_file()


def test_convert_writes_shards_that_read_back(tmp_path, capsys):
    toy = make_toy_dataset(tmp_path / "toy", n_train=6, n_dev=3, size=32)
    out_dir = tmp_path / "shards"
    code = main(["convert", "--config", str(ROOT / "configs/flickr8k_100.yaml"), f"data.root={toy}",
                 "--out", str(out_dir), "--shard-size", "4"])
    assert code == 0
    from repblend.stages.ingest import read_flickr8k
    from repblend.stages.wds import read_webdataset

    back = read_webdataset(str(out_dir))
    original = read_flickr8k(toy)
    assert sorted((r.image_id, r.split, r.captions) for r in back.records) == sorted(
        (r.image_id, r.split, r.captions) for r in original.records)
    assert len(list(out_dir.glob("*.tar"))) == 3


@pytest.mark.parametrize("argv", [["run"], ["encode", "--config"]])
def test_argument_errors_exit_nonzero(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0
