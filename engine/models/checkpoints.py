"""Checkpoint files in the formats open_clip users already have: open_clip_train's
``epoch_N.pt`` (a dict with ``state_dict``, keys possibly prefixed ``module.``), a bare state dict
(``.pt`` / ``.bin``), and ``.safetensors``. Everything is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from engine.errors import CheckpointError, CheckpointMismatchError


def find_checkpoints(folder: str | os.PathLike, epochs: str | None = None) -> list[Path]:
    """open_clip_train checkpoints under ``folder`` (``logs/NAME/checkpoints/epoch_N.pt``; the
    folder may hold one training run or several).

    Args:
        folder: searched recursively for ``epoch_N.pt`` / ``epoch_N.safetensors``.
        epochs: ``None``: the last epoch of each training run (one member per run); ``"all"``:
            every epoch; ``"8,16,32"``: those epochs of each run.

    Returns:
        Paths ordered by training run (folder, natural order), then epoch.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoints-dir {folder} does not exist or is not a folder")
    runs: dict[Path, dict[int, Path]] = {}
    for path in folder.rglob("epoch_*"):
        match = re.fullmatch(r"epoch_(\d+)\.(pt|safetensors)", path.name)
        if match and path.is_file():
            runs.setdefault(path.parent, {})[int(match.group(1))] = path
    if not runs:
        raise CheckpointError(
            f"no open_clip_train checkpoints (epoch_N.pt) under {folder}; expected "
            "logs/NAME/checkpoints/epoch_N.pt files (epoch_latest.pt is not used)"
        )

    def natural(p: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.as_posix())]

    wanted: list[int] | None = None
    if epochs and epochs != "all":
        try:
            wanted = [int(e) for e in epochs.split(",") if e.strip()]
        except ValueError as err:
            raise CheckpointError(f"--epochs must be 'all' or numbers like 8,16,32: {err}") from err
    picked = []
    for run in sorted(runs, key=natural):
        have = runs[run]
        if epochs == "all":
            picked += [have[e] for e in sorted(have)]
        elif wanted is None:
            picked.append(have[max(have)])
        else:
            missing = [e for e in wanted if e not in have]
            if missing:
                raise CheckpointError(
                    f"{run} has no epoch {missing[0]} (it has epochs {sorted(have)}); "
                    "choose --epochs among them"
                )
            picked += [have[e] for e in wanted]
    return picked


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
