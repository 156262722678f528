"""CLIP models: open_clip architectures by name, trakview's small CPU configs, checkpoint I/O.

Checkpoints are read in the formats open_clip users already have: open_clip_train's
``epoch_N.pt`` (a dict with ``state_dict``, keys possibly prefixed ``module.``), a bare state dict
(``.pt`` / ``.bin``), and ``.safetensors``. Everything is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

CONFIG_DIR = Path(__file__).parent / "model_configs"
SMALL_CONFIGS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or is not a CLIP state dict."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameters do not fit the model's architecture."""


class UnknownModelError(ValueError):
    """A model name that neither open_clip nor trakview knows."""


def register_small_configs() -> None:
    """Registers trakview's small CPU configs with open_clip (idempotent).

    Afterwards ``open_clip.create_model("trakview-tiny")`` and
    ``open_clip.get_tokenizer("trakview-tiny")`` work like any built-in architecture.
    """
    if not set(SMALL_CONFIGS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


register_small_configs()


@dataclass
class ClipBundle:
    """A CLIP model with the preprocessing and tokenizer that belong to it."""

    name: str
    model: torch.nn.Module
    preprocess: Any  # torchvision transform: PIL image -> (3, H, W) tensor
    tokenizer: Any  # list[str] -> (B, context_length) int64 tensor

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def available_models() -> list[str]:
    """Every architecture name ``create`` accepts (open_clip's and trakview's)."""
    return sorted(open_clip.list_models())


def create(name: str, seed: int | None = None, device: str = "cpu") -> ClipBundle:
    """Builds an open_clip architecture by name with random initialisation.

    Args:
        name: an open_clip model name (``ViT-B-32``) or a trakview config (``trakview-tiny``).
        seed: seeds the random initialisation, so the same seed gives the same weights.
        device: where the model lives.

    Returns:
        The model in eval mode with its validation preprocessing and tokenizer.
    """
    if name not in open_clip.list_models():
        raise UnknownModelError(
            f"unknown model {name!r}: expected an open_clip architecture such as "
            f"'ViT-B-32' or one of trakview's small configs {list(SMALL_CONFIGS)}"
        )
    if seed is not None:
        torch.manual_seed(seed)
    with _quiet_root_logger():  # open_clip logs every step of model creation on the root logger
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    return ClipBundle(name, model, preprocess, tokenizer)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a CLIP state dict from any of the supported checkpoint formats.

    Args:
        path: ``.safetensors``, open_clip_train's ``epoch_N.pt`` or a bare state dict.

    Returns:
        Parameter name -> tensor, with DataParallel/DDP ``module.`` prefixes removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            raw: Any = load_safetensors(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {err}. Expected open_clip_train's epoch_N.pt, "
            "a state dict saved with torch.save, or a .safetensors file"
        ) from err
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(
            f"checkpoint {path} holds {type(raw).__name__}, expected a state dict "
            "(parameter name -> tensor) or a dict with a 'state_dict' entry"
        )
    return {k.removeprefix("module."): v for k, v in raw.items()}


def check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointMismatchError naming the first differences between model and state."""
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"{key} {tuple(tensor.shape)} is missing from the checkpoint")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(
                f"{key} has shape {tuple(state[key].shape)} in the checkpoint "
                f"but {tuple(tensor.shape)} in the model"
            )
    problems += [
        f"{k} is in the checkpoint but not in the model" for k in state if k not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit the model architecture: "
            + "; ".join(problems[:3])
            + more
            + ". Check --model: it must be the architecture the checkpoint was trained with"
        )


def load_into(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Loads a checkpoint file into ``model`` after checking that every shape fits."""
    state = read_state_dict(path)
    check_fits(model, state, str(path))
    model.load_state_dict(state)
    return model


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    epoch: int,
    name: str,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``model`` atomically in open_clip_train's format (epoch, name, state_dict).

    A ``.safetensors`` path gets the bare weights instead (safetensors holds tensors only).
    """
    path = Path(path)
    tmp = _atomic_target(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_safetensors(state, str(tmp))
    else:
        payload: dict[str, Any] = {"epoch": epoch, "name": name, "state_dict": state}
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
        payload.update(extra or {})
        torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in an open_clip_train checkpoint except the weights (epoch, optimizer, ...)."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    return {k: v for k, v in raw.items() if k != "state_dict"} if isinstance(raw, dict) else {}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of a file, recorded in run manifests to tie a run to its checkpoints."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
