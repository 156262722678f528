"""CLIP models by name: open_clip architectures and trakview's small CPU configs, with the
preprocessing and tokenizer that belong to them; pretrained weights found in the local cache."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from engine.errors import CheckpointError, ConfigError, UnknownModelError

CONFIG_DIR = Path(__file__).parent / "model_configs"
SMALL_CONFIGS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


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


def create(
    name: str, seed: int | None = None, device: str = "cpu", pretrained: str | None = None
) -> ClipBundle:
    """Builds an open_clip architecture by name with random initialisation.

    Args:
        name: an open_clip model name (``ViT-B-32``) or a trakview config (``trakview-tiny``).
        seed: seeds the random initialisation, so the same seed gives the same weights.
        device: where the model lives.
        pretrained: an open_clip pretrained tag (``openai``): the model gets that tag's
            preprocessing (mean, std, interpolation) and activation (QuickGELU), not its weights.

    Returns:
        The model in eval mode with its validation preprocessing and tokenizer.
    """
    if name not in open_clip.list_models():
        raise UnknownModelError(
            f"unknown model {name!r}: expected an open_clip architecture such as "
            f"'ViT-B-32' or one of trakview's small configs {list(SMALL_CONFIGS)}"
        )
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    overrides: dict[str, Any] = {
        "force_quick_gelu": bool(tag.get("quick_gelu", False)),
        "image_mean": tag.get("mean"),
        "image_std": tag.get("std"),
        "image_interpolation": tag.get("interpolation"),
        "image_resize_mode": tag.get("resize_mode"),
    }
    if seed is not None:
        torch.manual_seed(seed)
    with _quiet_root_logger():  # open_clip logs every step of model creation on the root logger
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, device=device, **overrides
        )
        tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    return ClipBundle(name, model, preprocess, tokenizer)


def resolve_pretrained(name: str, pretrained: str, cache_dir: str | None = None) -> Path:
    """The local file of pretrained weights: ``pretrained`` itself when it is a file, else the
    file open_clip's tag resolves to in the local cache. Never downloads.

    Raises:
        CheckpointError: an unknown tag, or weights that are not in the cache (this machine
            would have to download them).
    """
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise CheckpointError(
            f"--pretrained {pretrained!r} is neither a file nor a pretrained tag of {name} "
            f"(its tags: {', '.join(tags) or 'none'})"
        )
    looked = []
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download

        # "org/model/" (default file names) or "org/model/file.bin", as open_clip writes them
        repo, filename = os.path.split(cfg["hf_hub"])
        names = (
            [filename]
            if filename
            else [
                "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin",
            ]
        )
        for filename in names:
            try:
                return Path(
                    hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
                )
            except Exception:  # noqa: BLE001 (not in the cache: any of several hub errors)
                looked.append(f"{repo}/{filename} in the Hugging Face cache")
    if cfg.get("url"):
        target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
        if target.is_file():
            return target
        looked.append(str(target))
    raise CheckpointError(
        f"the weights of {name} {pretrained!r} are not in the local cache (looked for "
        f"{'; '.join(looked)}) and trakview never downloads. On a machine with network run "
        f"`python -c \"import open_clip; open_clip.create_model('{name}', pretrained="
        f"'{pretrained}')\"` and copy its cache (~/.cache/huggingface), or pass --pretrained "
        "PATH to a weights file"
    )


def check_quick_gelu(name: str, tag: str) -> None:
    """Refuses an open_clip pretrained tag trained with QuickGELU on a GELU architecture."""
    if (
        open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")
        and "quickgelu" not in name.lower()
    ):
        raise ConfigError(
            f"{name} {tag!r} was trained with QuickGELU: train it as --model {name}-quickgelu"
        )
