"""Expert trajectories: only needed snapshots, deterministic per seed, files round-trip, experts learn."""

import torch

from repblend.stages.buffer import (ExpertSettings, heads_at, head_specs, load_trajectory, save_trajectory,
                                    train_expert, trajectory_meta)
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
