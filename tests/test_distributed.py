"""Ray glue: experts as Ray tasks give the local buffer, and survive a worker that dies mid-buffer."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from repblend.distributed.buffer import FAULT_ENV, expert_runner
from repblend.pipeline import steps
from repblend.pipeline.config import load_config
from repblend.stages.buffer import trajectory_meta
from repblend.stages.toydata import make_toy_dataset
from tiny import TINY_ENCODERS, TINY_PROBLEM

pytestmark = pytest.mark.ray

TINY = [*TINY_ENCODERS, *TINY_PROBLEM, "buffer.num_experts=3", "run.device=cpu"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=24, n_dev=8, size=32)


def _config(toy, tmp_path):
    return load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY])


def test_ray_experts_equal_local_experts(ray_session, toy, tmp_path):
    config = _config(toy, tmp_path)
    caches = steps.encode(config)
    local = steps.buffer(config, tmp_path / "local", caches)
    remote_dir = tmp_path / "remote" / "buffer"
    remote = steps.buffer(config, tmp_path / "remote", caches, expert_runner(config, remote_dir, caches))
    assert remote == remote_dir
    for k in range(3):
        a = load_file(str(local / f"expert_{k:03d}.safetensors"))
        b = load_file(str(remote / f"expert_{k:03d}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:  # same seeds and data; only thread counts may differ, so float sums agree closely
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _expert_lines(caplog) -> dict[int, str]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("buffer: expert ")]
    caplog.clear()
    return {int(line.split()[2]): line for line in lines}


def test_ray_expert_groups_equal_local_groups(ray_session, toy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="repblend")
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, "buffer.batch_experts=2"])
    caches = steps.encode(config)
    caplog.clear()
    local = steps.buffer(config, tmp_path / "local", caches)
    local_lines = _expert_lines(caplog)
    remote_dir = tmp_path / "remote" / "buffer"
    steps.buffer(config, tmp_path / "remote", caches, expert_runner(config, remote_dir, caches))
    remote_lines = _expert_lines(caplog)
    for k in range(3):  # groups [0, 1] and [2], each one task
        a = load_file(str(local / f"expert_{k:03d}.safetensors"))
        b = load_file(str(remote_dir / f"expert_{k:03d}.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # one line per expert from the process that collects them (the driver, for tasks), with the recall in its file
    assert [local_lines[k].split("(")[1].split(")")[0] for k in range(3)] == ["1/3", "2/3", "3/3"]
    assert sorted(line.split("(")[1].split(")")[0] for line in remote_lines.values()) == ["1/3", "2/3", "3/3"]
    for k in range(3):
        meta = trajectory_meta(remote_dir / f"expert_{k:03d}.safetensors")
        assert f"seed {meta['seed']}, epoch {max(meta['epochs'])} dev r_mean {meta['eval_recall']['r_mean']:.2f}" \
            in remote_lines[k]


def test_a_diverging_expert_task_raises_its_own_one_line_error(ray_session, toy, tmp_path):
    """The Ray task's DivergenceError reaches the driver as itself (the CLI prints its line), not as a RayTaskError
    with the worker's traceback in its message."""
    from repblend.stages.distiller import DivergenceError

    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY,
                                "buffer.lr_teacher_img=1e8", "buffer.lr_teacher_txt=1e8", "buffer.weight_decay=0.1"])
    caches = steps.encode(config)
    buffer_dir = tmp_path / "buffer"
    with pytest.raises(DivergenceError) as info:
        steps.buffer(config, tmp_path, caches, expert_runner(config, buffer_dir, caches))
    assert type(info.value) is DivergenceError and "diverged: loss" in str(info.value)
    assert "\n" not in str(info.value) and not list(buffer_dir.glob("expert_*.safetensors"))


def test_expert_whose_worker_dies_is_retried(ray_session, toy, tmp_path, monkeypatch):
    config = _config(toy, tmp_path)
    caches = steps.encode(config)
    marker = tmp_path / "expert1_killed_once"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")
    buffer_dir = tmp_path / "run" / "buffer"
    steps.buffer(config, tmp_path / "run", caches, expert_runner(config, buffer_dir, caches))
    assert marker.exists(), "the fault was not injected: the test would prove nothing"
    assert sorted(p.name for p in buffer_dir.glob("expert_*.safetensors")) == [
        "expert_000.safetensors", "expert_001.safetensors", "expert_002.safetensors"]


DISTILL = ["distill.space=feature", "distill.mini_batch_size=4", "distill.syn_steps=3", "distill.iterations=4",
           "distill.ckpt_every=2", "distill.lr_img=0.1", "distill.lr_txt=0.1", "distill.lr_sim=0.01",
           "distill.lr_lr=1e-4", "distill.lr_teacher=0.01", "ray.workers=2", "ray.worker_cpus=0.5"]


def _one_process_reference(config, run_dir, caches):
    """Two ranks' gradients averaged by hand in one process: what the all-reduce must reproduce."""
    rank1 = steps.build_distiller(config, run_dir, caches, torch.device("cpu"), rank=1).distiller
    job = steps.build_distiller(config, run_dir, caches, torch.device("cpu"), rank=0)

    def mean_with_rank1(tensors):
        mine = [t.clone() for t in tensors]
        rank1.syn.load_state_dict(job.distiller.syn.state_dict())  # rank 1 holds the same set before the update
        result = rank1.gradients(rank1.sample())
        theirs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in rank1.syn.parameters()]
        theirs.append(torch.stack([result.loss, result.loss_img, result.loss_txt]))
        for t, a, b in zip(tensors, mine, theirs):
            t.copy_((a + b) / 2)

    job.distiller.mean_across_workers = mean_with_rank1
    job.distiller.run(config.distill.iterations)
    return job.distiller.syn


def _distill_on_two_workers_and_check(config, run_dir, caches):
    from repblend.distributed.train import distill_with_ray

    steps.buffer(config, run_dir, caches)
    synthetic = load_file(str(distill_with_ray(config, run_dir, caches)))
    reference = _one_process_reference(config, run_dir, caches)
    torch.testing.assert_close(synthetic["texts"], reference.texts.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(synthetic["images"], reference.images.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(synthetic["similarity"], reference.sim.full().detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(synthetic["texts"], caches["train"].load().text_features[synthetic["init_caption_index"]])
    return synthetic


def test_two_train_workers_average_what_one_process_averages(ray_session, toy, tmp_path, monkeypatch, caplog):
    """Rank 0 dies after iteration 3 (checkpoint at 2): the group restarts from that checkpoint and still ends with
    the set that one process averaging both ranks' gradients makes, so one Train run (a start costs ~20 s on 2
    cores) checks both the all-reduce and the resume."""
    from repblend.distributed.train import FAULT_ENV

    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, *DISTILL])
    caches = steps.encode(config)
    marker = tmp_path / "rank0_killed_once"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}")
    with caplog.at_level(logging.WARNING, logger="repblend"):
        _distill_on_two_workers_and_check(config, tmp_path / "killed", caches)
    retries = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith("distill: the Ray Train worker group failed (")
    assert retries[0].endswith("restarting it from the last checkpoint, retry 1 of 3 (ray.max_retries)")
    assert marker.exists(), "the fault was not injected: the test would prove nothing"
    iterations = [json.loads(line)["iteration"]
                  for line in (tmp_path / "killed" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4]  # the iteration redone after the restart is logged once
    # resumed, not restarted from scratch (which ends with the same set): iteration 2 was checkpointed only once
    reported = [torch.load(path, weights_only=False)["iteration"]
                for path in sorted((tmp_path / "killed" / "distill" / "train").glob("checkpoint_*/rank000.pt"))]
    assert reported == [2, 4]


def test_a_diverging_train_worker_raises_its_own_one_line_error(ray_session, toy, tmp_path, monkeypatch, capfd):
    """A DivergenceError on a Ray Train worker reaches the driver as itself (the CLI prints its one line), not as a
    WorkerGroupError carrying the workers' tracebacks; and at once: a retry would only diverge again."""
    from repblend.distributed import train
    from repblend.stages.distiller import DivergenceError

    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, *DISTILL,
                                "distill.lr_lr=1e6", "ray.max_retries=3"])  # the learned lr goes below 0 at once
    caches = steps.encode(config)
    steps.buffer(config, tmp_path, caches)
    attempts = []

    def counted(*args):
        trainer = build_trainer(*args)
        attempts.append(trainer.run_config.failure_config.max_failures)
        return trainer

    build_trainer = train._trainer
    monkeypatch.setattr(train, "_trainer", counted)
    with pytest.raises(DivergenceError) as info:
        train.distill_with_ray(config, tmp_path, caches)
    assert type(info.value) is DivergenceError and "<= 0" in str(info.value) and "\n" not in str(info.value)
    assert attempts == [0]  # one group, which Train itself does not restart either
    # Train's placement-group cleaner, without the State API of a dashboard, warned once a second throughout
    captured = capfd.readouterr()
    assert "PlacementGroupCleaner" not in captured.out + captured.err
    # nor, on a single machine that nothing can preempt, Train's preemption watcher's error line at every group start
    assert "PreemptionWatcher" not in captured.out + captured.err


def test_lors_on_two_train_workers_averages_what_one_process_averages(ray_session, toy, tmp_path):
    """The LoRS baseline (the encoder itself is the image-side student) through the same Ray Train glue."""
    lors = [*DISTILL, "distill.space=pixel", "distill.mode=lors", "blend.enabled=false", "distill.lr_img=1.0"]
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, *lors])
    caches = steps.encode(config)
    synthetic = _distill_on_two_workers_and_check(config, tmp_path / "lors", caches)
    initial = steps.build_distiller(config, tmp_path / "lors", caches, torch.device("cpu")).distiller.syn.images
    assert synthetic["images"].shape == initial.shape and initial.dim() == 4  # pixels
    assert not torch.allclose(synthetic["images"], initial.detach())  # moved by the gradient through the encoder

def test_ray_data_encode_equals_local_encode(ray_session, toy, tmp_path):
    from repblend.distributed.encode import image_encoder_with_ray_data

    local = steps.encode(load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'local'}", *TINY]))
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'ray'}", *TINY, "ray.data_encode=true",
                                "encoders.image_batch_size=5"])  # batches that do not divide the split
    remote = steps.encode(config, encode_images_with=image_encoder_with_ray_data(config))
    for split in ("train", "dev"):
        a, b = local[split].load(), remote[split].load()
        torch.testing.assert_close(b.image_features, a.image_features, rtol=1e-3, atol=1e-3)  # fp16 cache
        torch.testing.assert_close(b.text_features, a.text_features, rtol=0, atol=0)
        assert b.image_ids == a.image_ids and b.captions == a.captions
        assert torch.equal(b.caption_to_image, a.caption_to_image)
    assert remote["train"].manifest()["inputs_fingerprint"] == local["train"].manifest()["inputs_fingerprint"]


def test_ray_data_encode_survives_a_dead_decode_worker(ray_session, toy, tmp_path, monkeypatch):
    from repblend.distributed.encode import FAULT_ENV as DECODE_FAULT
    from repblend.distributed.encode import image_encoder_with_ray_data

    marker = tmp_path / "decode_killed_once"
    monkeypatch.setenv(DECODE_FAULT, f"5:{marker}")  # the batch starting at image 5 loses its worker once
    local = steps.encode(load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'local'}", *TINY]))
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'ray'}", *TINY, "ray.data_encode=true",
                                "encoders.image_batch_size=5"])
    remote = steps.encode(config, encode_images_with=image_encoder_with_ray_data(config))
    assert marker.exists(), "the fault was not injected: the test would prove nothing"
    a, b = local["train"].load(), remote["train"].load()
    torch.testing.assert_close(b.image_features, a.image_features, rtol=1e-3, atol=1e-3)
    assert b.image_ids == a.image_ids


def test_ray_data_parts_are_kept_once_whole_whatever_the_order_or_repeats(tmp_path, monkeypatch):
    """No Ray needed: the bookkeeping alone. A part is written when each of its images has arrived (a row delivered
    twice counts once), read back with its broken images' errors, and only by an encode made the same way."""
    import numpy as np

    from repblend.distributed.encode import _Parts
    from repblend.stages import encode as encode_stage

    monkeypatch.setattr(encode_stage, "CHUNK_IMAGES", 4)
    made_by = {"via": "ray data", "device": "cpu"}
    features = np.arange(20, dtype=np.float32).reshape(10, 2)
    errors = [""] * 9 + ["x.jpg: cannot decode image"]
    parts = _Parts(tmp_path, 10, made_by)
    parts.arrived(np.array([1, 0, 1, 1]), features, errors)  # four rows, two images: the first part is not whole
    assert not list(tmp_path.iterdir())
    parts.arrived(np.array([8, 9, 2, 3]), features, errors)  # the first part, and the last (two images), are
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-images-000000000.safetensors",
                                                          "ray-images-000000008.safetensors"]
    again = _Parts(tmp_path, 10, made_by)
    read, read_errors = again.read_back()
    assert [again.done(i) for i in range(10)] == [True] * 4 + [False] * 4 + [True] * 2
    np.testing.assert_array_equal(read[[0, 1, 2, 3, 8, 9]], features[[0, 1, 2, 3, 8, 9]])
    assert read_errors == errors
    elsewhere = _Parts(tmp_path, 10, {**made_by, "device": "cuda"})
    assert elsewhere.read_back()[0] is None and not any(elsewhere.done(i) for i in range(10))


def test_a_killed_ray_data_encode_continues_from_its_kept_parts(ray_session, tmp_path, monkeypatch, caplog):
    """Ray Data delivers features in any order; each part of consecutive images is kept once all of it has arrived.
    Killed after its first part, a rerun sends only the other images through Ray Data, and gives the local features;
    a broken image's error is kept with its part, so a rerun that skips broken images still names it."""
    from repblend.distributed import encode as ray_encode
    from repblend.distributed.encode import image_encoder_with_ray_data
    from repblend.stages import encode as encode_stage

    toy = make_toy_dataset(tmp_path / "toy", n_train=12, n_dev=4, size=32)
    victims = sorted((toy / "images").iterdir())[1:12:4]  # a broken train image in each part of 4 (whichever is kept)
    for victim in victims:
        victim.write_bytes(b"not a jpeg")
    local = steps.encode(load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'local'}", *TINY,
                                            "data.on_error=skip"]))
    monkeypatch.setattr(encode_stage, "CHUNK_IMAGES", 4)
    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'ray'}", *TINY, "ray.data_encode=true",
                                "encoders.image_batch_size=2", "data.on_error=skip"])
    real, written = ray_encode.write_tensors, []

    def write(path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ray_encode, "write_tensors", write)
    with pytest.raises(KeyboardInterrupt):
        steps.encode(config, encode_images_with=image_encoder_with_ray_data(config))
    assert [p.name for p in (tmp_path / "ray").glob("*.parts-*/ray-images-*")] == written
    monkeypatch.setattr(ray_encode, "write_tensors", real)
    with caplog.at_level(logging.INFO, logger="repblend"), pytest.warns(UserWarning) as warned:
        remote = steps.encode(config, encode_images_with=image_encoder_with_ray_data(config))
    assert "encode train: 9 images through Ray Data (1 encoder actor(s)), 4 of them read back" in caplog.text
    assert all(any(v.name in str(w.message) for w in warned) for v in victims)
    a, b = local["train"].load(), remote["train"].load()
    torch.testing.assert_close(b.image_features, a.image_features, rtol=1e-3, atol=1e-3)
    assert b.image_ids == a.image_ids and len(b.image_ids) == 9
    assert not list((tmp_path / "ray").glob("*.parts-*"))


def test_ray_data_encode_names_a_broken_image(ray_session, tmp_path):
    from repblend.distributed.encode import image_encoder_with_ray_data
    from repblend.stages.errors import DataError

    broken = make_toy_dataset(tmp_path / "broken", n_train=6, n_dev=3, size=32)
    victim = sorted((broken / "images").iterdir())[2]
    victim.write_bytes(b"not a jpeg")
    config = load_config(None, [f"data.root={broken}", f"cache.dir={tmp_path / 'c'}", *TINY,
                                "distill.num_queries=2", "ray.data_encode=true"])
    with pytest.raises(DataError, match=victim.name):
        steps.encode(config, encode_images_with=image_encoder_with_ray_data(config))
    assert not list((tmp_path / "c").glob("*.json")), "no manifest: nothing that looks like a finished cache"


def test_ray_data_encodes_webdataset_shards_like_local(ray_session, toy, tmp_path):
    from repblend.distributed.encode import image_encoder_with_ray_data
    from repblend.stages.wds import write_webdataset

    folder = load_config(None, [f"data.root={toy}", *TINY])
    write_webdataset(steps.load_table(folder), tmp_path / "shards", shard_size=10)
    opts = [f"data.root={tmp_path / 'shards'}", "data.format=webdataset", *TINY]
    local = steps.encode(load_config(None, [*opts, f"cache.dir={tmp_path / 'local'}"]))
    config = load_config(None, [*opts, f"cache.dir={tmp_path / 'ray'}", "ray.data_encode=true"])
    remote = steps.encode(config, encode_images_with=image_encoder_with_ray_data(config))
    a, b = local["train"].load(), remote["train"].load()
    torch.testing.assert_close(b.image_features, a.image_features, rtol=1e-3, atol=1e-3)
    assert b.image_ids == a.image_ids


def test_more_than_the_local_ray_has_is_refused_in_one_line_not_waited_for(ray_session, toy, tmp_path, caplog):
    """Ray waits forever for resources no node has (Train retries its worker-group start every minute, an
    infeasible task just sits): on the embedded Ray, whose 2 CPUs are all there will be, each request is refused."""
    from repblend.distributed.cluster import require_resources
    from repblend.distributed.train import distill_with_ray
    from repblend.pipeline.config import RayConfig
    from repblend.stages.errors import ConfigError

    config = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, *DISTILL,
                                "ray.workers=3", "ray.worker_cpus=1"])
    caches = steps.encode(config)
    with pytest.raises(ConfigError, match=r"^distillation on ray.workers=3 \(ray.worker_cpus=1 each\) needs 3 CPU "
                                          r"\(the cluster has 2\); lower ray.workers or ray.worker_cpus"):
        distill_with_ray(config, tmp_path, caches)
    assert not (tmp_path / "distill" / "train").exists()  # no Train run was started

    experts = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'cache'}", *TINY, "ray.expert_cpus=2.5"])
    with pytest.raises(ConfigError,
                       match=r"^an expert task needs 2.5 CPU \(the cluster has 2\); lower ray.expert_cpus"):
        expert_runner(experts, tmp_path / "buffer", caches)([0, 1])

    from repblend.distributed.encode import image_encoder_with_ray_data  # 2 actors hold both CPUs: nothing decodes

    encode = load_config(None, [f"data.root={toy}", f"cache.dir={tmp_path / 'other'}", *TINY, "ray.data_encode=true",
                                "ray.encode_actors=2"])
    with pytest.raises(ConfigError, match=r"^Ray Data encoding with 2 encoder actors \(one CPU each, and a CPU to "
                                          r"decode\) needs 3 CPU \(the cluster has 2\); lower ray.encode_actors"):
        steps.encode(encode, encode_images_with=image_encoder_with_ray_data(encode))

    require_resources(RayConfig(), {"CPU": 2, "GPU": 0}, "exactly what there is", "nothing")  # fits: no error
    with caplog.at_level(logging.WARNING, logger="repblend"):  # an attached cluster may grow: warned, not refused
        require_resources(RayConfig(address="auto"), {"CPU": 8}, "a big task", "it")
    assert "a big task needs 8 CPU (the cluster has 2): Ray waits until the cluster has them" in caplog.text


def test_worker_lines_reach_a_log_file_without_colour_codes(ray_session, capfd):
    """Off a terminal (here pytest's capture; a log file, Slurm) Ray would wrap each forwarded worker line's prefix in
    colour escape codes. Ray forwards worker output asynchronously: wait for the line, then read it."""
    import sys
    import time

    import ray

    @ray.remote
    def shout() -> None:
        print("repblend colour probe", file=sys.stderr, flush=True)

    ray.get(shout.remote())
    seen, deadline = "", time.monotonic() + 60
    while "repblend colour probe" not in seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen += "".join(capfd.readouterr())
    line = next(line for line in seen.splitlines() if "repblend colour probe" in line)
    assert line.startswith("(shout pid=") and "\x1b[" not in line, repr(line)
