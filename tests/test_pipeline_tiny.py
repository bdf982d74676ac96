"""The chain with tiny random encoders on generated data: fast checks of stage wiring, both spaces."""

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from repblend.pipeline import evaluation, steps
from repblend.pipeline.config import load_config
from repblend.stages.diagnostics import DIAGNOSTICS
from repblend.stages.distiller import DivergenceError
from repblend.stages.errors import ConfigError
from repblend.stages.io import write_tensors
from repblend.stages.toydata import make_toy_dataset
from tiny import STABLE_LRS, TINY_ENCODERS, TINY_PROBLEM

TINY = [*TINY_ENCODERS, *TINY_PROBLEM, "distill.iterations=4", "distill.ckpt_every=2", "distill.lr_floor=0.001",
        "eval.num_eval=2", "eval.epochs=5", "eval.full_epochs=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


@pytest.mark.parametrize("space", ["feature", "pixel"])
def test_chain_writes_a_synthetic_set(toy, tmp_path, space, caplog):
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", f"distill.space={space}",
                                *STABLE_LRS, *TINY])
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    index = json.loads((tmp_path / "buffer" / "index.json").read_text())
    assert len(index["experts"]) == 2 and index["experts"][0]["epochs"] == [0, 1, 2, 3]
    assert "r_mean" in index["experts"][0]["eval_recall"]
    with caplog.at_level(logging.INFO, logger="repblend"):
        path = steps.distill(config, tmp_path, caches)
    # what runs, with distill.student=auto resolved (a CPU: factored heads)
    assert (f"distill: 8 pairs in {space} space (repblend mode), 4 iterations of 3 student steps of 4 on cpu; "
            "exact unroll, factored student heads") in caplog.text
    syn = load_file(str(path))
    expected_images = (8, 3, 32, 32) if space == "pixel" else (8, 32)
    assert tuple(syn["images"].shape) == expected_images
    assert tuple(syn["image_features"].shape) == (8, 32) and tuple(syn["texts"].shape) == (8, 32)
    assert tuple(syn["similarity"].shape) == (8, 8)
    init = caches["train"].load().text_features[syn["init_caption_index"]]
    assert not torch.allclose(syn["texts"], init)  # distillation moved the texts
    lines = (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
    with caplog.at_level(logging.INFO, logger="repblend"):
        results = evaluation.evaluate(config, tmp_path, caches)
    assert set(results["methods"]) == {"repblend", "init", "random", "herding", "kcenter", "full"}
    for name, metrics in results["methods"].items():  # each row is logged as it finishes, with its recall
        assert f"eval {name}: img_r10 {metrics['img_r10']['mean']:.2f}" in caplog.text
    assert caplog.text.count("eval full: lr ") == len(config.eval.full_lrs)
    assert set(results["diagnostics"]) == {"repblend", "init", "random", "herding", "kcenter"}
    assert 0.0 <= results["diagnostics"]["repblend"]["modality_probe"]["mean"] <= 1.0
    assert "| repblend | " in (tmp_path / "results.md").read_text().split("Collapse diagnostics")[1]
    assert "lors" in results["notes"] and "lors" not in results["methods"]  # not distilled by steps alone
    assert set(results["gap_closed"]) == {"repblend", "init", "herding", "kcenter"}
    assert "| repblend | " in (tmp_path / "results.md").read_text().split("random-to-full gap closed")[1]


def test_gap_closed_is_the_share_of_the_random_to_full_gap():
    def row(img: float, txt: float, r_mean: float) -> dict:
        return {"img_r10": {"mean": img}, "txt_r10": {"mean": txt}, "r_mean": {"mean": r_mean}}

    methods = {"repblend": row(50, 20, 44), "random": row(20, 20, 10), "full": row(60, 68, 10), "init": row(10, 44, 9)}
    assert evaluation.gap_closed(methods) == {"repblend": {"img_r10": 0.75, "txt_r10": 0.0, "r_mean": None},
                                              "init": {"img_r10": -0.25, "txt_r10": 0.5, "r_mean": None}}
    assert evaluation.gap_closed({"repblend": row(50, 20, 44), "full": row(60, 68, 10)}) == {}
    table = evaluation.results_table({"methods": {}, "gap_closed": evaluation.gap_closed(methods), "pairs": 99,
                                      "eval_split": "dev", "seeds": [1]})
    assert "| repblend | 0.75 | 0.00 | - |" in table and "| init | -0.25 | 0.50 | - |" in table


@pytest.mark.parametrize(("option", "real_loss"), [("auto", "clip"), ("clip", "clip"), ("wbce", "wbce")])
def test_coresets_train_with_the_real_pairs_loss(toy, tmp_path, option, real_loss):
    """Real pairs carry no learned similarity: the coreset rows train with eval.real_loss (auto: clip for fresh heads,
    as experts and the full bound), recomputed here seed by seed; the distilled set's eval.loss does not reach them."""
    from repblend.stages.coresets import random_coreset
    from repblend.stages.evaluate import retrieval_of, train_heads

    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, "eval.loss=wbce",
                                f"eval.real_loss={option}", "eval.methods=[random]"])
    caches = steps.encode(config)
    results = evaluation.evaluate(config, tmp_path, caches)
    assert results["protocol"]["real_loss"] == real_loss and results["protocol"]["loss"] == "wbce"
    assert f"real pairs (init, coresets) with {real_loss} at lr" in (tmp_path / "results.md").read_text()
    train, dev = caches["train"].load(), caches["dev"].load()
    settings = evaluation.train_settings(config, loss=real_loss)
    runs = []
    for seed in evaluation.eval_seeds(config):
        idx = random_coreset(train.text_features.shape[0], config.distill.num_queries, seed)
        pairs = evaluation._real_pairs(train, idx, config.distill.lr_teacher)
        heads = train_heads(pairs, settings, seed, torch.device("cpu"))
        runs.append(retrieval_of(heads, dev.image_features, dev.text_features, dev.caption_to_image, "cpu"))
    for key in ("img_r1", "txt_r10", "r_mean"):
        assert results["methods"]["random"][key]["mean"] == pytest.approx(sum(r[key] for r in runs) / len(runs))


def test_a_row_whose_training_diverges_is_reported_and_the_evaluation_goes_on(toy, tmp_path, caplog):
    """Real pairs at an absurd lr train to non-finite embeddings: their row scores 0 and says so (JSON, table, log)
    instead of a traceback that loses the other rows; the full bound's sweep passes over the diverging lr."""
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, "distill.lr_teacher=1e8",
                                "eval.methods=[random,full]", "eval.full_lrs=[1e8,0.1]", "eval.reuse_full=false"])
    with caplog.at_level(logging.WARNING, logger="repblend"):
        results = evaluation.evaluate(config, tmp_path, steps.encode(config))
    random_row, full = results["methods"]["random"], results["methods"]["full"]
    assert random_row["diverged_seeds"] == 2 and random_row["r_mean"] == {"mean": 0.0, "std": 0.0}
    assert "random" not in results["diagnostics"]
    assert results["notes"]["full"]["best_lr"] == 0.1 and full["r_mean"]["mean"] > 0 and "diverged_seeds" not in full
    assert [point["r_mean"] for point in results["notes"]["full"]["curve"] if point["lr"] == 1e8][-1] == 0.0
    assert "Diverged in training (non-finite embeddings; such a seed scores 0): random in 2 of 2 seeds" in (
        tmp_path / "results.md").read_text()
    assert "eval random: training diverged (non-finite embeddings) in 2 seed(s)" in caplog.text


def test_budget_larger_than_the_dataset_is_refused(toy, tmp_path):
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY,
                                "distill.num_queries=25"])
    caches = steps.encode(config)
    with pytest.raises(ConfigError, match=r"distill.num_queries=25 exceeds the 24 training images of split 'train'"):
        steps.check_budget(config, caches)


def test_the_spike_guard_runs_from_the_config_and_is_logged(toy, tmp_path, caplog):
    """distill.rewind_* reach the distiller: with a threshold every loss exceeds, the first iteration rewinds and
    the second, over distill.rewind_max, stops the run with the option named."""
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *STABLE_LRS, *TINY,
                                "distill.space=feature", "distill.rewind_loss=1e-9", "distill.rewind_patience=1",
                                "distill.rewind_max=1"])
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    with caplog.at_level(logging.WARNING, logger="repblend"), \
            pytest.raises(DivergenceError, match=r"after 1 rewinds \(distill.rewind_max\)"):
        steps.distill(config, tmp_path, caches)
    rows = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["iteration"], row["guard"]) for row in rows] == [(1, "rewound to 0")]
    assert "distill it 1: matching loss spike" in caplog.text


def test_learned_lr_ceilings_reach_the_distiller_from_the_config(toy, tmp_path):
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY,
                                "distill.space=feature", "distill.lr_teacher=0.1", "distill.syn_lr_img_max=0.04"])
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    distiller = steps.build_distiller(config, tmp_path, caches, torch.device("cpu")).distiller
    assert distiller.outer.syn_lr_max == (0.04, 0.0)
    assert float(distiller.syn.syn_lr_img.detach()) == pytest.approx(0.04)
    assert float(distiller.syn.syn_lr_txt.detach()) == pytest.approx(0.1)


def test_buffer_retrains_experts_that_lack_needed_snapshots(toy, tmp_path):
    base = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY]
    short = load_config(None, [*base, "distill.max_start_epoch=1"])
    caches = steps.encode(short)
    steps.buffer(short, tmp_path, caches)
    assert json.loads((tmp_path / "buffer/index.json").read_text())["experts"][0]["epochs"] == [0, 1, 2]
    longer = load_config(None, [*base, "distill.max_start_epoch=2"])
    steps.buffer(longer, tmp_path, caches)
    assert json.loads((tmp_path / "buffer/index.json").read_text())["experts"][0]["epochs"] == [0, 1, 2, 3]


def test_shared_buffer_serves_two_runs_and_refuses_other_settings(toy, tmp_path):
    shared = tmp_path / "shared_buffer"
    base = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, f"buffer.dir={shared}"]
    config = load_config(None, base)
    caches = steps.encode(config)
    assert steps.buffer(config, tmp_path / "run_a", caches) == shared
    before = {p.name: p.stat().st_mtime_ns for p in shared.glob("expert_*.safetensors")}
    steps.buffer(config, tmp_path / "run_b", caches)  # a second run reuses the experts as they are
    assert {p.name: p.stat().st_mtime_ns for p in shared.glob("expert_*.safetensors")} == before
    assert not (tmp_path / "run_a" / "buffer").exists()
    other = load_config(None, [*base, "buffer.lr_teacher_img=0.05"])
    with pytest.raises(ConfigError, match=r"shared_buffer holds experts built with different settings.lr_img"):
        steps.buffer(other, tmp_path / "run_c", caches)


def test_batched_experts_fill_the_buffer_whatever_the_group_and_keep_their_own_identity(toy, tmp_path):
    base = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, "buffer.num_experts=3"]
    config = load_config(None, [*base, "buffer.batch_experts=2"])  # groups [0, 1] and [2]
    caches = steps.encode(config)
    assert steps.expert_groups(config, [0, 1, 2]) == [[0, 1], [2]]
    pairs = steps.buffer(config, tmp_path / "pairs", caches)
    index = json.loads((pairs / "index.json").read_text())
    assert [e["path"] for e in index["experts"]] == [f"expert_{k:03d}.safetensors" for k in range(3)]
    assert index["identity"]["dropout_masks"] == "per expert" and "r_mean" in index["experts"][2]["eval_recall"]
    whole = steps.buffer(load_config(None, [*base, "buffer.batch_experts=3"]), tmp_path / "whole", caches)
    for k in range(3):  # an expert's trajectory does not depend on its group
        a, b = (load_file(str(d / f"expert_{k:03d}.safetensors")) for d in (pairs, whole))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    one = load_config(None, [*base, f"buffer.dir={pairs}"])  # one at a time: other dropout masks
    with pytest.raises(ConfigError, match="holds experts built with different dropout_masks"):
        steps.buffer(one, tmp_path / "one", caches)


def test_eval_every_logs_a_learning_curve(toy, tmp_path):
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature",
                                *TINY, *STABLE_LRS, "distill.eval_every=2", "run.tensorboard=true"])
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    steps.distill(config, tmp_path, caches)
    records = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "eval" in r] == [2, 4]
    assert set(records[1]["eval"]) == {"split", "img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean",
                                       "diagnostics"}
    assert set(records[1]["eval"]["diagnostics"]) == set(DIAGNOSTICS)
    assert 0 <= records[1]["eval"]["diagnostics"]["gap"] <= 2  # unit vectors: the means are at most 2 apart
    assert records[1]["eval"]["split"] == "dev"
    assert 0 <= records[1]["eval"]["img_r10"] <= 100

    # run.tensorboard mirrors the same numbers into event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "distill" / "tensorboard"))
    board.Reload()
    losses = [(e.step, e.value) for e in board.Scalars("distill/loss")]
    assert losses == [(r["iteration"], pytest.approx(r["loss"])) for r in records]
    assert [e.step for e in board.Scalars("eval/r_mean")] == [2, 4]
    assert [e.value for e in board.Scalars("collapse/gap")] == [pytest.approx(r["eval"]["diagnostics"]["gap"])
                                                               for r in records if "eval" in r]


def test_pixel_init_reads_images_where_the_dataset_is_now(toy, tmp_path):
    """A cache built elsewhere (another machine, another mount) still initialises pixels from this data root."""
    import shutil

    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(toy, first)
    opts = [f"cache.dir={tmp_path / 'cache'}", "distill.space=pixel", *TINY, *STABLE_LRS]
    steps.encode(load_config(None, [f"data.root={first}", *opts]))
    shutil.move(first, moved)  # the images the cache was built from are no longer where it says
    config = load_config(None, [f"data.root={moved}", *opts])
    caches = steps.encode(config)  # same content: reused, and its manifest still names the old paths
    assert caches["train"].manifest()["image_paths"][0].startswith(str(first))
    steps.buffer(config, tmp_path, caches)
    syn = load_file(str(steps.distill(config, tmp_path, caches)))
    assert syn["images"].shape == (8, 3, 32, 32)


def test_distill_compile_gives_the_eager_set_and_says_where_it_does_not_apply(toy, tmp_path, caplog,
                                                                              compile_without_inductor):
    """distill.compile=true reaches the distiller (the compiled unroll runs, same set up to rounding); where the fused
    form does not cover a setting the run goes on eagerly and the log names the reason."""
    common = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", f"buffer.dir={tmp_path / 'buffer'}",
              "distill.space=feature", *STABLE_LRS, *TINY]
    sets, graphs = [], counters["stats"]["unique_graphs"]
    for compiled in (False, True):
        config = load_config(None, [*common, f"distill.compile={compiled}"])
        caches = steps.encode(config)
        run_dir = tmp_path / f"compile_{compiled}"
        steps.buffer(config, run_dir, caches)
        with caplog.at_level(logging.INFO, logger="repblend"):
            sets.append(load_file(str(steps.distill(config, run_dir, caches))))
    assert "torch.compile (mode default, one graph per student step)" in caplog.text
    assert counters["stats"]["unique_graphs"] > graphs  # the distiller compiled, not only the log line
    assert sets[0].keys() == sets[1].keys()
    for name, tensor in sets[0].items():
        torch.testing.assert_close(sets[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    tesla = load_config(None, [*common, "distill.compile=true", "distill.grad_mode=tesla"])
    with caplog.at_level(logging.INFO, logger="repblend"):
        steps.distill(tesla, tmp_path / "tesla", caches)
    assert "distill.compile does not apply here (distill.grad_mode=tesla (the fused form is the exact unroll))" \
        in caplog.text


def test_full_bound_is_read_back_by_runs_on_the_same_features_and_protocol(toy, tmp_path, caplog):
    """The bound does not depend on the distilled set: a second run reads it back (same numbers, no training); another
    protocol, other seeds or eval.reuse_full=false train it again."""
    common = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature", *STABLE_LRS, *TINY,
              "eval.methods=[full]"]

    def bound(name: str, *overrides: str) -> tuple[dict, bool]:
        config = load_config(None, [*common, *overrides])
        caches = steps.encode(config)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="repblend"):
            results = evaluation.evaluate(config, tmp_path / name, caches)
        trained = caplog.text.count("eval full: lr ") == len(config.eval.full_lrs)
        assert trained != ("eval full: read back from" in caplog.text)
        return results, trained

    first, trained = bound("a")
    assert trained and not (tmp_path / "a" / "buffer").exists()  # it needs no experts
    again, trained = bound("b", "distill.num_queries=6")  # another N: the same bound
    assert not trained and again["methods"]["full"] == first["methods"]["full"]
    assert again["notes"]["full"]["reused"].startswith(str(tmp_path / "cache" / "bounds" / "full-"))
    assert "read back from" in (tmp_path / "b" / "results.md").read_text()
    assert {k: v for k, v in again["notes"]["full"].items() if k != "reused"} == first["notes"]["full"]
    for overrides in (["eval.full_epochs=3"], ["eval.weight_decay=0.001"], ["run.seed=1"], ["eval.reuse_full=false"]):
        _, trained = bound("c", *overrides)
        assert trained, overrides


def test_a_killed_full_bound_continues_from_its_finished_lrs_and_seeds(toy, tmp_path, monkeypatch, caplog):
    """Each lr's curve and each further seed's run is kept as it finishes: killed in its second lr, the bound trains
    only what was left when rerun, and gives the uninterrupted bound to the digit; the parts go once it is whole."""
    common = [f"data.root={toy}", "distill.space=feature", *STABLE_LRS, *TINY, "eval.methods=[full]",
              "eval.num_eval=3"]
    straight = load_config(None, [*common, f"cache.dir={tmp_path / 'a'}"])
    expected = evaluation.evaluate(straight, tmp_path / "run_a", steps.encode(straight))["methods"]["full"]

    config = load_config(None, [*common, f"cache.dir={tmp_path / 'b'}"])
    caches = steps.encode(config)
    trained: list[tuple[float, int | None]] = []
    real = evaluation.train_heads

    def counting(pairs, settings, seed, device, **kwargs):
        trained.append((pairs.lr_img, kwargs.get("stop_after")))
        if len(trained) == 2 and kill:
            raise KeyboardInterrupt  # killed in the second lr
        return real(pairs, settings, seed, device, **kwargs)

    monkeypatch.setattr(evaluation, "train_heads", counting)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(config, tmp_path / "run_b", caches)
    parts = list((tmp_path / "b" / "bounds").glob("full-*.parts"))
    assert [p.name for p in parts[0].iterdir()] == ["lr-0.01.json"]
    kill, trained[:] = False, []
    with caplog.at_level(logging.INFO, logger="repblend"):
        resumed = evaluation.evaluate(config, tmp_path / "run_b", caches)["methods"]["full"]
    assert "eval full: lr 0.01 read back from" in caplog.text
    lrs = [lr for lr, stop in trained if stop is None]
    assert lrs == [0.03, 0.1] and len(trained) == 2 + 2  # the other lrs, then the two further seeds
    assert resumed == expected
    assert not parts[0].exists()


def _rows_by_how(caplog) -> tuple[set[str], set[str]]:
    """The rows an evaluation trained and the rows it read back, from its log lines."""
    lines = [line for line in (r.getMessage() for r in caplog.records)
             if line.startswith("eval ") and "r_mean" in line]
    caplog.clear()
    names = [(line.split(":")[0].removeprefix("eval "), "(read back from " in line) for line in lines]
    return {name for name, read in names if not read}, {name for name, read in names if read}


def test_evaluation_keeps_each_row_and_reads_it_back_while_its_inputs_are_unchanged(toy, tmp_path, caplog,
                                                                                     monkeypatch):
    """A rerun trains nothing and writes the same results; a changed set retrains only its rows, a changed protocol,
    other seeds or other code every row; a run that fails in a row keeps the rows before it; eval.reuse_rows=false
    trains all again."""
    from repblend.pipeline import evalrows

    caplog.set_level(logging.INFO, logger="repblend")
    common = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature", *STABLE_LRS, *TINY,
              "eval.methods=[random,herding,kcenter]"]
    config = load_config(None, common)
    caches = steps.encode(config)
    run_dir = tmp_path / "run"
    steps.buffer(config, run_dir, caches)
    set_path = steps.distill(config, run_dir, caches)
    everything = {"repblend", "init", "random", "herding", "kcenter"}

    def evaluate(*overrides: str) -> tuple[set[str], set[str]]:
        evaluation.evaluate(load_config(None, [*common, *overrides]), run_dir, caches)
        return _rows_by_how(caplog)

    assert evaluate() == (everything, set())
    first = (run_dir / "results.json").read_text()
    assert sorted(p.stem for p in (run_dir / "eval" / "rows").glob("*.json")) == sorted(everything)

    with monkeypatch.context() as m:  # read back: no model is trained at all
        m.setattr(evaluation, "evaluate_pairs", None)
        m.setattr(evaluation, "evaluate_seeds", None)
        assert evaluate() == (set(), everything)
    assert (run_dir / "results.json").read_text() == first

    for overrides in (["eval.epochs=3"], ["run.seed=1"], ["eval.num_eval=1"], ["eval.reuse_rows=false"]):
        assert evaluate(*overrides) == (everything, set()), overrides
        evaluate()  # the kept rows are the last evaluation's: back to the first protocol
    with monkeypatch.context() as m:
        m.setattr(evalrows, "source_digest", lambda: "other code")
        assert evaluate() == (everything, set())
    evaluate()

    syn = load_file(str(set_path))
    write_tensors(set_path, {**syn, "texts": syn["texts"] + 0.01})  # another set: its rows, the coresets read back
    assert evaluate() == ({"repblend", "init"}, {"random", "herding", "kcenter"})

    fresh = tmp_path / "fresh"  # a run that fails in its k-center row keeps the rows before it
    fresh.mkdir()
    (fresh / "distill").mkdir()
    (fresh / "distill" / "synthetic.safetensors").write_bytes(set_path.read_bytes())
    coresets = evaluation._coresets
    with monkeypatch.context() as m:
        def failing(method, *args):
            if method == "kcenter":
                raise RuntimeError("killed")
            return coresets(method, *args)

        m.setattr(evaluation, "_coresets", failing)
        with pytest.raises(RuntimeError, match="killed"):
            evaluation.evaluate(load_config(None, common), fresh, caches)
    assert _rows_by_how(caplog) == ({"repblend", "init", "random", "herding"}, set())
    evaluation.evaluate(load_config(None, common), fresh, caches)
    assert _rows_by_how(caplog) == ({"kcenter"}, {"repblend", "init", "random", "herding"})
    assert (fresh / "results.json").read_text() == (run_dir / "results.json").read_text()


def test_syn_lr_img_scale_trains_distilled_sets_at_the_scaled_image_lr(toy, tmp_path):
    """eval.syn_lr_img_scale multiplies a distilled set's learned image lr (not its text lr) in evaluation: a set
    with lr 0.2 at scale 0.5 trains exactly as the same set with lr 0.1 at scale 1, and not as at 0.2."""
    from repblend.stages.evaluate import train_heads

    base = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, "distill.space=feature"]
    plain, halved = (load_config(None, [*base, f"eval.syn_lr_img_scale={s}"]) for s in (1, 0.5))
    caches = steps.encode(plain)
    train = caches["train"].load()
    syn = {"image_features": train.image_features[:8], "texts": train.text_features[:8] + 0.1,
           "similarity": torch.eye(8) + 0.2, "syn_lr_img": torch.tensor(0.2), "syn_lr_txt": torch.tensor(0.1)}
    cpu = torch.device("cpu")
    measures = {name: evaluation.protocol(config, caches, "dev", cpu) for name, config in
                (("plain", plain), ("halved", halved))}
    pairs = measures["halved"].synthetic_pairs(*(syn[k] for k in ("image_features", "texts", "similarity",
                                                                    "syn_lr_img", "syn_lr_txt")))
    assert (pairs.lr_img, pairs.lr_txt) == pytest.approx((0.1, 0.1))
    settings, seeds = evaluation.train_settings(plain), evaluation.eval_seeds(plain)

    def weights(measure, lr_img: float) -> list[torch.Tensor]:
        pairs = measure.synthetic_pairs(syn["image_features"], syn["texts"], syn["similarity"], torch.tensor(lr_img),
                                        syn["syn_lr_txt"])
        return [p.detach() for p in train_heads(pairs, settings, seeds[0], cpu).parameters()]

    scaled, slower, faster = weights(measures["halved"], 0.2), weights(measures["plain"], 0.1), weights(
        measures["plain"], 0.2)
    assert all(torch.equal(a, b) for a, b in zip(scaled, slower))
    assert not all(torch.equal(a, b) for a, b in zip(scaled, faster))
    assert (evaluation.evaluate_synthetic(syn, measures["halved"], settings, seeds, cpu)
            == evaluation.evaluate_synthetic({**syn, "syn_lr_img": torch.tensor(0.1)}, measures["plain"], settings,
                                             seeds, cpu))
    protocol = {"epochs": 5, "loss": "wbce", "real_loss": "clip", "coreset_lr": 0.1, "syn_lr_img_scale": 0.5}
    table = evaluation.results_table({"methods": {}, "eval_split": "dev", "pairs": 8, "seeds": seeds,
                                      "protocol": protocol})
    assert "at their learned lrs (the image lr x0.5, eval.syn_lr_img_scale)" in table
    assert "image lr x" not in evaluation.results_table({"methods": {}, "eval_split": "dev", "pairs": 8, "seeds": seeds,
                                                         "protocol": {**protocol, "syn_lr_img_scale": 1.0}})
    with pytest.raises(ConfigError, match="eval.syn_lr_img_scale"):
        load_config(None, [*base, "eval.syn_lr_img_scale=0"])


def test_eval_sets_evaluates_other_sets_in_the_same_table_and_refuses_those_that_do_not_fit(toy, tmp_path, caplog):
    """A set named in eval.sets (here run A's own set, evaluated from run B) gets its own row, equal to the row run A
    gives it; a set from another encoder, of other feature widths, of LoRS mode or missing is refused before any row
    trains, in a line that names its key."""
    import repblend
    from repblend.stages.errors import DataError
    from repblend.stages.evaluate import retrieval_of
    from repblend.stages.io import tensors_metadata

    common = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature", *STABLE_LRS, *TINY,
              "eval.methods=[random]"]
    config = load_config(None, common)
    caches = steps.encode(config)
    steps.buffer(config, tmp_path / "a", caches)
    set_path = steps.distill(config, tmp_path / "a", caches)
    own = evaluation.evaluate(config, tmp_path / "a", caches)
    # repblend.train_on: a reader's heads trained as the run's evaluation trained them, to the same recalls
    dev = caches["dev"].load()
    runs = [retrieval_of(repblend.train_on(set_path, seed), dev.image_features, dev.text_features,
                         dev.caption_to_image, torch.device("cpu")) for seed in evaluation.eval_seeds(config)]
    assert {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]} == pytest.approx(
        {k: v["mean"] for k, v in own["methods"]["repblend"].items() if k != "diagnostics"}, abs=1e-9)

    caplog.set_level(logging.INFO, logger="repblend")
    other = evaluation.evaluate(load_config(None, [*common, f"eval.sets.from_a={set_path}"]), tmp_path / "b", caches)
    assert list(other["methods"]) == ["from_a", "random"]  # run B has no set of its own
    assert other["methods"]["from_a"] == own["methods"]["repblend"]
    assert other["gap_closed"] == {} and other["diagnostics"]["from_a"] == own["diagnostics"]["repblend"]
    assert other["notes"]["from_a"].startswith(f"eval.sets: {set_path} (8 pairs, repblend mode, feature space, "
                                               "4 iterations, seed 0; sha256 ")
    assert "| from_a | " in (tmp_path / "b" / "results.md").read_text()
    assert "eval from_a: img_r10" in caplog.text

    syn, meta = load_file(str(set_path)), tensors_metadata(set_path)
    made_with = meta["config"]
    bad = {
        "other_encoder": ({}, {"config": made_with.replace("name: tiny", "name: efficientnet_lite0", 1)},
                          r"another image encoder: name 'efficientnet_lite0' \(this config: 'tiny'\)"),
        "other_size": ({}, {"config": made_with.replace("image_size: 32", "image_size: 64", 1)},
                       r"another image encoder: image_size 64 \(this config: 32\)"),
        "wider_texts": ({"texts": torch.zeros(8, 48)}, {},
                        "has 48-d text embeddings, this config's encoder gives 32-d"),
        "lors_set": ({}, {"mode": "lors"}, "is a LoRS set"),
    }
    for name, (tensors, metadata, message) in bad.items():
        path = tmp_path / f"{name}.safetensors"
        write_tensors(path, {**syn, **tensors}, metadata={**meta, **metadata})
        with pytest.raises(DataError, match=rf"^eval.sets.{name}: {path} .*{message}"):
            evaluation.evaluate(load_config(None, [*common, f"eval.sets.ok={set_path}", f"eval.sets.{name}={path}"]),
                                tmp_path / name, caches)
        assert not (tmp_path / name / "eval" / "rows").exists()  # refused before the good set's row trained
    bare = tmp_path / "bare.safetensors"
    write_tensors(bare, syn, metadata={k: v for k, v in meta.items() if k != "config"})
    with pytest.raises(DataError, match=rf"^{bare}: its metadata has no config to take the evaluation protocol from"):
        repblend.train_on(bare)
    with pytest.raises(DataError, match=rf"^eval.sets.gone: {tmp_path / 'gone.safetensors'}: no distilled set here"):
        evaluation.evaluate(load_config(None, [*common, f"eval.sets.gone={tmp_path / 'gone.safetensors'}"]),
                            tmp_path / "gone", caches)
    with pytest.raises(ConfigError, match="eval.sets.random: a row name .* not one of the table's own rows"):
        load_config(None, [*common, f"eval.sets.random={set_path}"])


def test_a_run_directory_continues_only_the_set_its_settings_made(toy, tmp_path):
    """distill/identity.json records what the set depends on. A longer run, other checkpoints or another student form
    continue it; another N, blend, seed or expert setting is refused before any work, naming the keys. A run
    directory from before that record is checked against its saved set's own config, and one from before a setting
    existed continues while that setting holds its default."""
    common = [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", "distill.space=feature", *STABLE_LRS, *TINY]
    config = load_config(None, common)
    caches = steps.encode(config)
    run_dir = tmp_path / "run"
    steps.buffer(config, run_dir, caches)
    steps.distill(config, run_dir, caches)
    recorded = json.loads((run_dir / "distill" / "identity.json").read_text())
    assert recorded == steps.distill_identity(config)
    assert recorded["distill"]["num_queries"] == 8 and "iterations" not in recorded["distill"]

    refused = {"distill.num_queries=6": "distill.num_queries 8 there, 6 here",
               "blend.beta_a=2": "blend.beta_a 1.0 there, 2.0 here",
               "run.seed=3": "seed 0 there, 3 here",
               "buffer.lr_teacher_img=0.05": "experts.lr_img 0.1 there, 0.05 here",
               "data.max_train_images=20": "data.max_train_images 0 there, 20 here"}
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=rf"^{run_dir / 'distill'} holds a set distilled with other settings "
                                              rf"\({re.escape(message)}\): pass another --run-dir"):
            steps.distill(load_config(None, [*common, override]), run_dir, caches)
    for override in ("distill.ckpt_every=3", "distill.student=flat", "distill.eval_every=0", "distill.iterations=6"):
        steps.distill(load_config(None, [*common, override]), run_dir, caches)
    assert steps._saved_iterations(steps.synthetic_path(run_dir)) == 6  # the longer run continued the set

    (run_dir / "distill" / "identity.json").unlink()  # a run directory from before the record
    with pytest.raises(ConfigError, match=r"distill.num_queries 8 there, 6 here"):
        steps.claim_distill_dir(load_config(None, [*common, "distill.num_queries=6"]), run_dir, record=False)
    assert not (run_dir / "distill" / "identity.json").exists()
    steps.claim_distill_dir(load_config(None, [*common, "distill.iterations=6"]), run_dir)
    assert json.loads((run_dir / "distill" / "identity.json").read_text()) == recorded

    # a record written before repblend had a setting continues under the default the record was made with; another
    # value is refused, naming that default. distill.rewind_loss kept its default (0); distill.grad_clip came in
    # with 0 and is 5 now, so such a record continues only with distill.grad_clip=0
    older = {**recorded, "distill": {k: v for k, v in recorded["distill"].items()
                                     if k not in ("grad_clip", "rewind_loss")}}
    (run_dir / "distill" / "identity.json").write_text(json.dumps(older))
    steps.claim_distill_dir(load_config(None, [*common, "distill.grad_clip=0"]), run_dir, record=False)
    with pytest.raises(ConfigError, match=r"\(distill.grad_clip 0.0 there, 5.0 here\)"):
        steps.claim_distill_dir(load_config(None, common), run_dir, record=False)
    with pytest.raises(ConfigError, match=r"\(distill.rewind_loss 0.0 there, 2.0 here\)"):
        steps.claim_distill_dir(load_config(None, [*common, "distill.grad_clip=0", "distill.rewind_loss=2"]), run_dir,
                                record=False)
