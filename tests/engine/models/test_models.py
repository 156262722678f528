"""Model creation by name and checkpoints in the three formats open_clip users have."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointError, CheckpointMismatchError, UnknownModelError
from engine.models.checkpoints import load_into, read_state_dict, save_checkpoint
from engine.models.factory import create


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_small_configs_are_registered_with_open_clip():
    assert "trakview-tiny" in open_clip.list_models()
    model = open_clip.create_model("trakview-tiny")
    tokens = open_clip.get_tokenizer("trakview-tiny")(["a red circle"])
    assert tokens.shape == (1, model.context_length) == (1, 24)


def test_create_is_seeded_and_has_its_preprocessing():
    a, b, c = (create("trakview-tiny", seed=s) for s in (1, 1, 2))
    assert _same_weights(a.model, b.model)
    assert not _same_weights(a.model, c.model)
    assert a.image_size == 32 and a.context_length == 24


def test_unknown_model_names_the_choices():
    with pytest.raises(UnknownModelError, match="unknown model 'ViT-Z-99'.*trakview-tiny"):
        create("ViT-Z-99")


@pytest.mark.parametrize("fmt", ["open_clip_train", "bare", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    src = create("trakview-tiny", seed=5).model
    dst = create("trakview-tiny", seed=6).model
    state = src.state_dict()
    if fmt == "open_clip_train":  # as written by DDP training: module. prefixes, extra entries
        path = tmp_path / "epoch_3.pt"
        torch.save(
            {
                "epoch": 3,
                "name": "x",
                "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []},
            },
            path,
        )
    elif fmt == "bare":
        path = tmp_path / "weights.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    load_into(dst, path)
    assert _same_weights(src, dst)


def test_save_checkpoint_writes_open_clip_train_format(tmp_path):
    model = create("trakview-tiny", seed=1).model
    path = save_checkpoint(tmp_path / "epoch_2.pt", model, epoch=2, name="trakview-tiny")
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 2 and set(raw["state_dict"]) == set(model.state_dict())
    safe = save_checkpoint(tmp_path / "m.safetensors", model, epoch=2, name="t")
    assert _same_weights(model, load_into(create("trakview-tiny").model, safe))
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_wrong_architecture_names_both_shapes(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(create("trakview-small").model.state_dict(), path)
    tiny = create("trakview-tiny").model
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(tiny, path)
    message = str(err.value)
    assert (
        "positional_embedding has shape (32, 128) in the checkpoint but (24, 64) in the model"
        in (message)
    )
    assert "Check --model" in message


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*broken.pt"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds list, expected a state dict"):
        read_state_dict(tmp_path / "list.pt")
