"""Config schema: every shipped file loads, overrides are typed, mistakes name the key."""

from pathlib import Path

import pytest

from repblend.pipeline.config import Config, load_config, to_yaml
from repblend.stages.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    for budget in (100, 200, 500):
        assert {f"flickr8k_{budget}", f"flickr30k_{budget}", f"coco_{budget}"} <= names
    assert "flickr8k_100_cpu" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.run.name == path.stem
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each config starts with a comment"
    command = "tune" if path.name.startswith("tune_") else "run"
    assert f"repblend {command} --config configs/{path.name}" in path.read_text(), \
        "each config shows its launch command"
    # the resolved YAML loads back to the same config
    assert load_config(None, []) is not None
    assert to_yaml(config) == to_yaml(load_config(path))


def test_reference_hyperparameters():
    """The paper-shaped configs carry RepBlend's reference values (ALGORITHMS.md section 4)."""
    f30k_500 = load_config(CONFIGS[0].parent / "flickr30k_500.yaml")
    assert (f30k_500.distill.num_queries, f30k_500.distill.max_start_epoch, f30k_500.distill.lr_img) == (499, 3, 1000)
    assert (f30k_500.distill.lr_sim, f30k_500.distill.sim_rank, f30k_500.distill.sim_alpha) == (100, 20, 0.01)
    coco_500 = load_config(CONFIGS[0].parent / "coco_500.yaml")
    assert coco_500.distill.merge_loss_branches and coco_500.model.temperature == 0.1
    assert coco_500.distill.lr_img == 5000 and coco_500.distill.sim_rank == 40


def test_overrides_are_typed():
    config = load_config(None, ["distill.iterations=12", "blend.enabled=false", "blend.beta_a=0.5", "data.root=/x"])
    assert config.distill.iterations == 12 and isinstance(config.distill.iterations, int)
    assert config.blend.enabled is False
    assert config.blend.beta_a == 0.5
    assert config.data.root == "/x"


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  iterations: 5\n")
    assert load_config(path).distill.iterations == 5
    assert load_config(path, ["distill.iterations=7"]).distill.iterations == 7


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.roott=/x"], "unknown config key 'data.roott' (did you mean 'data.root'?)"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["distill.iterations=many"], "'distill.iterations'"),
        (["blend.enabled=perhaps"], "'blend.enabled'"),
        (["data.format=zip"], "data.format='zip'"),
        (["distill.lr_img=-1"], "distill.lr_img=-1"),
        (["distill.sim_rank=500"], "distill.sim_rank=500"),
        (["model.dropout=1.5"], "model.dropout=1.5"),
        (["distill.compile_mode=fast"], "distill.compile_mode='fast'"),
        (["distill.compile_scope=all"], "distill.compile_scope='all'"),
        (["distill.rewind_backoff=0"], "distill.rewind_backoff=0.0 must be in (0, 1]"),
        (["distill.rewind_loss=-1"], "distill.rewind_loss=-1.0 must be >= 0"),
        (["distill.rewind_patience=0"], "distill.rewind_patience=0 must be > 0"),
        (["distill.syn_lr_img_max=-0.1"], "distill.syn_lr_img_max=-0.1 must be >= 0"),
        (["distill.grad_clip=1"], "distill.grad_clip=1.0 must be above 1"),
        (["distill.grad_clip=-2"], "distill.grad_clip=-2.0 must be above 1"),
        (["distill.syn_lr_txt_max=0.001"], "distill.syn_lr_txt_max=0.001 must be above distill.lr_floor=0.001"),
        (["justakey"], "'justakey' is not of the form key=value"),
        (["eval.methods=random"], "bad value for 'eval.methods': a list is expected, such as [a,b] or []"),
        (["eval.methods={a: 1}"], "bad value for 'eval.methods': a list is expected, such as [a,b] or []"),
        (["eval.sets=[a]"], "bad value for 'eval.sets': a mapping is expected, such as {name: value} or {}"),
        (["eval.sets.1st=x.safetensors"], "eval.sets.1st: a row name is a letter then letters, digits, _ or -"),
        (["eval.sets.hub="], "'eval.sets.hub'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files_name_the_file(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("distill:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key 'distill.iteratons' \(did you mean"):
        load_config(unknown)
    broken = tmp_path / "broken.yaml"
    broken.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="scalar.yaml: a config must be a mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
