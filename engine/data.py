"""Image–caption pairs: reading a pair list and turning it into model inputs.

A pair list is a JSONL file, one record per pair with at least ``id``, ``caption`` and ``image``
(a path, absolute or relative to the JSONL file); every other field is kept as it is (the demo
world's ground-truth fields, for example).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from engine import store

REQUIRED_FIELDS = ("id", "caption", "image")


class DataError(ValueError):
    """A pair list that cannot be used as it is."""


@dataclass
class PairSet:
    """The pairs of one split, with the folder their relative image paths start from."""

    records: list[dict[str, Any]]
    root: Path

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.records]

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.records]

    def image_path(self, i: int) -> Path:
        return self.root / self.records[i]["image"]


def read_pairs(path: str | os.PathLike) -> PairSet:
    """Reads a JSONL pair list and checks that every record has an id, a caption and an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pair list {path} does not exist; expected a .jsonl file of pairs")
    records = store.read_jsonl(path)
    if not records:
        raise DataError(f"pair list {path} is empty; expected one JSON record per line")
    seen: set[str] = set()
    for n, rec in enumerate(records, 1):
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        if missing:
            raise DataError(
                f"{path}: record {n} lacks {missing}; every record needs "
                f"{list(REQUIRED_FIELDS)}, got keys {sorted(rec)}"
            )
        rid = str(rec["id"])
        if rid in seen:
            raise DataError(f"{path}: id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
    return PairSet(records, path.parent.resolve())


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image as RGB (any mode PIL reads)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def image_tensors(
    pairs: PairSet, preprocess: Callable[[Image.Image], torch.Tensor], progress: bool = True
) -> torch.Tensor:
    """Every image of ``pairs`` through ``preprocess``: (n, 3, H, W) float32."""
    items = range(len(pairs))
    if progress:
        items = tqdm(items, desc="loading images", unit="img", leave=False)
    return torch.stack([preprocess(load_image(pairs.image_path(i))) for i in items])


def tokenize(
    tokenizer: Callable[[list[str]], torch.Tensor], captions: Sequence[str]
) -> torch.Tensor:
    """Captions -> (n, context_length) int64 token ids (open_clip truncates long captions)."""
    return tokenizer(list(captions))


class InputError(ValueError):
    """A query image or caption that cannot be used."""


# Pixels above which an image is refused (decompression bombs): 40 megapixels.
MAX_PIXELS = 40_000_000


def open_query_image(
    source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Opens a user's image (a path or the bytes of a file) as RGB, checking it first.

    Raises:
        InputError: missing or unreadable file, not an image, or more than ``max_pixels`` pixels.
    """
    import io

    name = "the uploaded file" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise InputError(f"image {name} does not exist or is not a file")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as err:
        raise InputError(f"cannot read image {name}: {err.strerror}") from err
    with handle:
        try:
            with Image.open(handle) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise InputError(
                        f"image {name} has {width}x{height} = {width * height:,} pixels, more than "
                        f"the limit of {max_pixels:,}; downscale it first"
                    )
                return img.convert("RGB")
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(
                f"{name} is not an image PIL can read ({type(err).__name__}: {err}); "
                "expected a PNG, JPEG, WebP, ... file"
            ) from err


def check_caption(
    caption: str, tokenizer: Callable[..., torch.Tensor], context_length: int
) -> list[str]:
    """Checks a query caption; returns notes for the user (e.g. that it will be truncated).

    Raises:
        InputError: an empty caption.
    """
    if not caption or not caption.strip():
        raise InputError("the caption is empty; give the text the image should match")
    notes = []
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        n_tokens = len(encode(caption.strip())) + 2  # start and end tokens
        if n_tokens > context_length:
            notes.append(f"caption truncated: {n_tokens} tokens, the model reads {context_length}")
    return notes
