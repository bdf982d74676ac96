"""Expert trajectories: only needed snapshots, deterministic per seed, files round-trip, experts learn."""

import dataclasses

import pytest
import torch

from repblend.stages.buffer import (ExpertSettings, heads_at, head_specs, load_trajectory, save_trajectory,
                                    train_expert, train_experts, trajectory_meta)
from repblend.stages.evaluate import retrieval_of


def _data(n_img=60, d_img=12, d_txt=10, seed=0):
    """Captions are noisy linear views of their image: retrieval is learnable."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, d_img, generator=g)
    mix = torch.randn(d_img, d_txt, generator=g)
    c2i = torch.arange(n_img).repeat_interleave(3)
    txt = img[c2i] @ mix + 0.3 * torch.randn(len(c2i), d_txt, generator=g)
    return img, txt, c2i


SETTINGS = ExpertSettings(embed_dim=16, dropout=0.1, epochs=10, batch_size=16, keep_epochs=(0, 1, 2, 3))


def test_keeps_only_needed_snapshots_and_stops_training_there():
    img, txt, c2i = _data()
    traj = train_expert(img, txt, c2i, SETTINGS, seed=0)
    assert sorted(traj.image) == sorted(traj.text) == [0, 1, 2, 3]
    img_spec, txt_spec = head_specs(12, 10, SETTINGS)
    assert traj.image[0].shape == (img_spec.num_params,) and traj.text[3].shape == (txt_spec.num_params,)
    assert not torch.equal(traj.image[0], traj.image[1])


def test_all_epochs_when_asked():
    img, txt, c2i = _data()
    settings = ExpertSettings(embed_dim=8, epochs=4, batch_size=16, keep_epochs=None)
    assert sorted(train_expert(img, txt, c2i, settings, seed=0).image) == [0, 1, 2, 3, 4]


def test_same_seed_same_trajectory_other_seed_differs():
    img, txt, c2i = _data()
    a = train_expert(img, txt, c2i, SETTINGS, seed=5)
    b = train_expert(img, txt, c2i, SETTINGS, seed=5)
    c = train_expert(img, txt, c2i, SETTINGS, seed=6)
    for epoch in a.image:
        assert torch.equal(a.image[epoch], b.image[epoch]) and torch.equal(a.text[epoch], b.text[epoch])
    assert not torch.equal(a.image[0], c.image[0])


def _assert_same_trajectory(a, b, atol):
    assert sorted(a.image) == sorted(b.image) and sorted(a.text) == sorted(b.text)
    for epoch in a.image:
        torch.testing.assert_close(a.image[epoch], b.image[epoch], rtol=0, atol=atol)
        torch.testing.assert_close(a.text[epoch], b.text[epoch], rtol=0, atol=atol)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_batched_experts_follow_one_at_a_time_training_without_dropout(momentum, weight_decay):
    """Same heads, same caption order, same SGD: the batched steps are the experts' own steps, to rounding."""
    img, txt, c2i = _data()
    settings = dataclasses.replace(SETTINGS, dropout=0.0, momentum=momentum, weight_decay=weight_decay)
    batched = train_experts(img, txt, c2i, settings, [3, 4, 5])
    for seed, traj in zip([3, 4, 5], batched):
        one = train_expert(img, txt, c2i, settings, seed)
        assert torch.equal(traj.image[0], one.image[0]) and torch.equal(traj.text[0], one.text[0])
        assert not torch.equal(traj.image[3], one.image[0])
        _assert_same_trajectory(traj, one, atol=1e-5)


def test_a_batched_expert_does_not_depend_on_its_batch_mates():
    img, txt, c2i = _data()
    three = train_experts(img, txt, c2i, SETTINGS, [3, 4, 5])  # dropout 0.1
    _assert_same_trajectory(three[1], train_experts(img, txt, c2i, SETTINGS, [4])[0], atol=1e-6)
    again = train_experts(img, txt, c2i, SETTINGS, [3, 4, 5])
    for a, b in zip(three, again):
        _assert_same_trajectory(a, b, atol=0)
    no_dropout = train_experts(img, txt, c2i, dataclasses.replace(SETTINGS, dropout=0.0), [4])[0]
    assert not torch.allclose(three[1].image[3], no_dropout.image[3], atol=1e-4)  # the masks are applied


def test_batched_experts_learn_retrieval_and_take_fewer_captions_than_a_batch():
    img, txt, c2i = _data()
    settings = ExpertSettings(embed_dim=16, epochs=10, batch_size=16, lr_img=0.1, lr_txt=0.1)
    for traj in train_experts(img, txt, c2i, settings, [0, 1]):
        before = retrieval_of(heads_at(traj, 0, settings, 12, 10), img, txt, c2i, torch.device("cpu"))
        after = retrieval_of(heads_at(traj, 10, settings, 12, 10), img, txt, c2i, torch.device("cpu"))
        assert after["r_mean"] > before["r_mean"] + 20
    small = dataclasses.replace(settings, batch_size=64, epochs=2, dropout=0.0)
    few = train_experts(img[:8], txt[:24], c2i[:24], small, [0])[0]
    _assert_same_trajectory(few, train_expert(img[:8], txt[:24], c2i[:24], small, 0), atol=1e-5)


def test_expert_learns_retrieval():
    img, txt, c2i = _data()
    settings = ExpertSettings(embed_dim=16, epochs=10, batch_size=16, lr_img=0.1, lr_txt=0.1)
    traj = train_expert(img, txt, c2i, settings, seed=0)
    before = retrieval_of(heads_at(traj, 0, settings, 12, 10), img, txt, c2i, torch.device("cpu"))
    after = retrieval_of(heads_at(traj, 10, settings, 12, 10), img, txt, c2i, torch.device("cpu"))
    assert after["r_mean"] > before["r_mean"] + 20


def test_files_round_trip(tmp_path):
    img, txt, c2i = _data()
    traj = train_expert(img, txt, c2i, SETTINGS, seed=1)
    path = tmp_path / "expert_000.safetensors"
    save_trajectory(path, traj, {"seed": 1, "epochs": [0, 1, 2, 3]})
    back = load_trajectory(path)
    for epoch in traj.image:
        assert torch.equal(back.image[epoch], traj.image[epoch]) and torch.equal(back.text[epoch], traj.text[epoch])
    assert trajectory_meta(path) == {"seed": 1, "epochs": [0, 1, 2, 3]}
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    from repblend.stages.io import write_json

    path = write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)


@pytest.mark.parametrize("batched", [False, True])
def test_a_diverging_expert_stops_with_one_line_naming_it_and_the_lrs_to_lower(batched):
    """R5: an expert at an absurd lr reaches a non-finite loss; the run stops with a user-facing error (no traceback
    from the CLI) that names the expert and the settings to lower, rather than saving a useless trajectory."""
    from repblend.stages.errors import DivergenceError, RepblendError

    img, txt, c2i = _data()
    settings = dataclasses.replace(SETTINGS, lr_img=1e8, lr_txt=1e8, weight_decay=0.1)  # each step scales W by -1e7
    with pytest.raises(DivergenceError) as info:
        if batched:
            train_experts(img, txt, c2i, settings, seeds=[4, 5])
        else:
            train_expert(img, txt, c2i, settings, seed=4)
    message = str(info.value)
    assert isinstance(info.value, RepblendError) and "\n" not in message
    assert ("experts with seeds [4, 5] diverged" if batched else "expert with seed 4 diverged") in message
    assert "lower buffer.lr_teacher_img / buffer.lr_teacher_txt" in message


def test_an_expert_advances_its_progress_per_step_and_shows_each_epochs_loss(caplog):
    """An encoder expert takes minutes an epoch on a CPU: its bar counts steps; the result is the same without it."""
    import logging

    from repblend.stages.progress import LogProgress

    caplog.set_level(logging.INFO, logger="repblend")
    img, txt, c2i = _data(n_img=20)  # 60 captions, batches of 16: 3 steps an epoch (drop_last)
    settings = dataclasses.replace(SETTINGS, keep_epochs=(0, 1, 2))
    bars = []

    def progress(total):
        bars.append(LogProgress(total, desc="buffer: LoRS expert 4 training", unit="step", every=1e9))
        return bars[-1]

    shown = train_expert(img, txt, c2i, settings, seed=3, progress=progress)
    plain = train_expert(img, txt, c2i, settings, seed=3)
    for epoch in plain.image:
        assert torch.equal(shown.image[epoch], plain.image[epoch]) and torch.equal(shown.text[epoch], plain.text[epoch])
    assert len(bars) == 1 and bars[0].total == bars[0].n == 6  # epochs 1-2 (the last kept), 3 steps each
    (line,) = [r.getMessage() for r in caplog.records if r.name == "repblend"]  # the closing line
    assert line.startswith("buffer: LoRS expert 4 training: 6/6 step (100%), ") and "; epoch=2 loss=" in line
