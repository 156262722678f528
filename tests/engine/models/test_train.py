"""The ensemble trainer: it learns the demo world, saves open_clip_train checkpoints and resumes."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from engine import files
from engine.data import synthetic
from engine.models import checkpoints, embed, train
from engine.models.checkpoints import load_into, read_state_dict, save_checkpoint
from engine.models.factory import create


@pytest.fixture(scope="module")
def world_tensors():
    """A 1000-pair demo world (plus 200 validation pairs) as model inputs."""
    world = synthetic.generate_world(synthetic.WorldConfig(n_train=1000, n_val=200, seed=11))
    bundle = create("trakview-tiny")
    from PIL import Image

    def prep(images, records):
        x = torch.stack([bundle.preprocess(Image.fromarray(a)) for a in images])
        return x, bundle.tokenizer([r["caption"] for r in records])

    return prep(world.train_images, world.train), prep(world.val_images, world.val)


def test_trained_model_matches_images_to_their_captions(tmp_path, world_tensors):
    (x, t), (vx, vt) = world_tensors
    cfg = train.TrainConfig(members=1, epochs=16, batch_size=100, lr=3e-3, warmup_steps=10)
    (path,) = train.train_ensemble(x, t, cfg, tmp_path)
    model = load_into(create("trakview-tiny").model, path)
    img, txt = embed.encode(model, vx, vt)
    sim = img @ txt.T  # (200, 200)
    top1 = (sim.argmax(1) == torch.arange(200)).float().mean().item()
    # Chance is 1/200 = 0.005 for the exact caption among all 200 validation captions (most
    # captions are unique: template, size, colour, shape, position, background).
    assert top1 > 0.05, f"image->text top-1 {top1:.3f} is not well above chance (0.005)"
    # Among groups of 10 captions (chance 0.1), the right one should win most of the time.
    groups = sim.reshape(20, 10, 20, 10).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (20, 10, 10)
    top1_of_10 = (groups.argmax(2) == torch.arange(10)).float().mean().item()
    assert top1_of_10 > 0.5, f"top-1 among 10 captions {top1_of_10:.3f} (chance 0.1)"


def test_members_have_their_own_seed_and_checkpoint_format(tmp_path, world_tensors):
    (x, t), _ = world_tensors
    cfg = train.TrainConfig(members=2, epochs=1, batch_size=200, warmup_steps=2)
    paths = train.train_ensemble(x[:400], t[:400], cfg, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "member-0/checkpoints/epoch_1.pt",
        "member-1/checkpoints/epoch_1.pt",
    ]
    raw = [torch.load(p, weights_only=True) for p in paths]
    assert raw[0]["epoch"] == 1 and raw[0]["name"] == "trakview-tiny"
    assert not torch.equal(
        raw[0]["state_dict"]["text_projection"], raw[1]["state_dict"]["text_projection"]
    )


def test_interrupted_member_resumes_to_the_same_weights(tmp_path, world_tensors, monkeypatch):
    (x, t), _ = world_tensors
    x, t = x[:400], t[:400]
    cfg = train.TrainConfig(members=1, epochs=3, batch_size=100, warmup_steps=2)
    (straight,) = train.train_ensemble(x, t, cfg, tmp_path / "straight")

    original = save_checkpoint
    saved = {"n": 0}

    def crash_after_second_epoch(*args, **kwargs):
        out = original(*args, **kwargs)
        saved["n"] += 1
        if saved["n"] == 2:
            raise KeyboardInterrupt("killed after epoch 2")
        return out

    monkeypatch.setattr(checkpoints, "save_checkpoint", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train_ensemble(x, t, cfg, tmp_path / "resumed")
    latest = train.member_dir(tmp_path / "resumed", 0) / "epoch_latest.pt"
    assert torch.load(latest, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(checkpoints, "save_checkpoint", original)
    (resumed,) = train.train_ensemble(x, t, cfg, tmp_path / "resumed")
    a = read_state_dict(straight)
    b = read_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not latest.exists()


def test_bad_settings(tmp_path, world_tensors):
    (x, t), _ = world_tensors
    with pytest.raises(ValueError, match="fewer than one batch"):
        train.train_ensemble(x[:50], t[:50], replace(train.TrainConfig(), batch_size=128), tmp_path)
    with pytest.raises(ValueError, match="members must be at least 1"):
        train.train_ensemble(x, t, replace(train.TrainConfig(), members=0), tmp_path)
    with pytest.raises(ValueError, match="outside 1..15"):
        train.train_ensemble(x, t, replace(train.TrainConfig(), save_epochs=[0, 5]), tmp_path)


def test_snapshot_epochs():
    assert train.snapshot_epochs(15, 3) == [5, 10, 15]
    assert train.snapshot_epochs(15, 1) == [15]
    assert train.snapshot_epochs(6, 3) == [2, 4, 6]
    assert train.snapshot_epochs(2, 2) == [1, 2]
    with pytest.raises(ValueError, match="between 1 and the epochs"):
        train.snapshot_epochs(3, 4)


def test_saved_epochs_are_the_trajectory_of_the_final_model(tmp_path, world_tensors):
    """save_epochs keeps earlier checkpoints of the same run: the final weights do not change,
    and a member finished without a now-wanted epoch is trained again to the same weights."""
    (x, t), _ = world_tensors
    x, t = x[:400], t[:400]
    plain = train.TrainConfig(members=1, epochs=3, batch_size=100, warmup_steps=2)
    (final_plain,) = train.train_ensemble(x, t, plain, tmp_path / "plain")
    kept = replace(plain, save_epochs=[1, 2])
    (final_kept,) = train.train_ensemble(x, t, kept, tmp_path / "kept")
    paths = train.member_checkpoints(tmp_path / "kept", 0, kept)
    assert [p.name for p in paths] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert [torch.load(p, weights_only=True)["epoch"] for p in paths] == [1, 2, 3]
    a, b = read_state_dict(final_plain), read_state_dict(final_kept)
    assert all(torch.equal(a[k], b[k]) for k in a)
    early = read_state_dict(paths[0])
    assert not torch.equal(early["text_projection"], b["text_projection"])
    assert "optimizer" not in torch.load(paths[0], weights_only=True)

    # the plain run asked for epoch 2 afterwards: trained again, same final weights
    again = replace(plain, save_epochs=[2])
    train.train_ensemble(x, t, again, tmp_path / "plain")
    mid = train.member_checkpoints(tmp_path / "plain", 0, again)[0]
    c = read_state_dict(mid)
    d = read_state_dict(paths[1])
    assert all(torch.equal(c[k], d[k]) for k in c)
    e = read_state_dict(final_plain)
    assert all(torch.equal(a[k], e[k]) for k in a)


def test_members_trained_side_by_side_equal_those_trained_one_by_one(tmp_path, world_tensors):
    """Worker processes change where a member trains, not its weights (same thread count)."""
    (x, t), _ = world_tensors
    cfg = train.TrainConfig(members=2, epochs=1, batch_size=200, warmup_steps=2, threads=1)
    before = torch.get_num_threads()
    try:
        one_by_one = train.train_ensemble(x[:400], t[:400], cfg, tmp_path / "a", jobs=1)
    finally:
        torch.set_num_threads(before)
    side_by_side = train.train_ensemble(x[:400], t[:400], cfg, tmp_path / "b", jobs=2)
    for a, b in zip(one_by_one, side_by_side, strict=True):
        assert a.relative_to(tmp_path / "a") == b.relative_to(tmp_path / "b")
        sa = torch.load(a, weights_only=True)["state_dict"]
        sb = torch.load(b, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="jobs must be 0"):
        train.train_ensemble(x, t, cfg, tmp_path / "c", jobs=-1)


def test_auto_jobs_trains_small_ensembles_in_one_process():
    cfg = train.TrainConfig(members=4, epochs=15)
    assert train.auto_jobs(cfg, 3000, 4, "cpu", 37 << 20) == min(4, os.cpu_count() or 1)
    assert train.auto_jobs(cfg, 3000, 1, "cpu", 37 << 20) == 1  # one member left
    assert train.auto_jobs(cfg, 300, 4, "cpu", 4 << 20) == 1  # 4500 samples: too little work
    assert train.auto_jobs(cfg, 3000, 4, "cuda", 37 << 20) == 1
    assert train.auto_jobs(cfg, 3000, 4, "cpu", 2 << 30) == 1  # images too large to copy


def test_init_starts_every_member_from_the_given_checkpoint(tmp_path, world_tensors):
    """``init``: members are fine-tuned from one checkpoint (how the demo trains its ensemble)."""
    (x, t), _ = world_tensors
    (base,) = train.train_ensemble(
        x[:200],
        t[:200],
        train.TrainConfig(members=1, epochs=1, batch_size=100, seed=5),
        tmp_path / "b",
    )
    still = train.TrainConfig(members=2, epochs=1, batch_size=100, lr=1e-12, weight_decay=0.0)
    tuned = train.train_ensemble(x[:200], t[:200], replace(still, init=str(base)), tmp_path / "f")
    fresh = train.train_ensemble(x[:200], t[:200], still, tmp_path / "r")
    start = read_state_dict(base)
    for path in tuned:  # a learning rate of 1e-12 leaves the starting weights as they were
        got = read_state_dict(path)
        assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in start.items())
    got = read_state_dict(fresh[0])
    assert not torch.allclose(got["text_projection"], start["text_projection"], atol=1e-3)


def test_recorded_init_moves_with_its_folder(tmp_path):
    """A starting checkpoint beside the ensemble is recorded relative to it (the demo's base/),
    any other as given; reading resolves it."""
    out = tmp_path / "demo" / "models"
    beside = tmp_path / "demo" / "base" / "model" / "member-0" / "checkpoints" / "epoch_15.pt"
    elsewhere = tmp_path.parent / "weights" / "pretrained.pt"
    rec = train.recorded_settings(train.TrainConfig(init=str(beside)), out)
    assert rec["init"] == "../base/model/member-0/checkpoints/epoch_15.pt"
    assert train.recorded_settings(train.TrainConfig(init=str(elsewhere)), out)["init"] == str(
        elsewhere
    )
    assert train.recorded_settings(train.TrainConfig(), out)["init"] is None
    out.mkdir(parents=True)
    files.write_json(out / train.TRAIN_CONFIG_FILE, rec)
    moved = (tmp_path / "demo").rename(tmp_path / "elsewhere")
    got = train.read_settings(moved / "models" / train.TRAIN_CONFIG_FILE)
    assert got["init"] == str(moved.resolve() / "base/model/member-0/checkpoints/epoch_15.pt")
