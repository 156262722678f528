"""Image–caption pairs: a run's pair lists, opening images, and streaming them to the model.

A pair list is a JSONL file, one record per pair with at least ``id``, ``caption`` and ``image``
(a path, absolute or relative to the JSONL file, or ``SHARD.tar::MEMBER`` for an image inside a
WebDataset shard); every other field is kept as it is (the demo world's ground-truth fields, for
example). Other source formats are read by ``engine.sources``.

Images are never all held in memory by a build: ``loader`` streams batches of preprocessed
images and tokens through DataLoader workers, and ``check_images`` finds the broken ones first.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
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
        """The image's path (for an image in a tar shard: ``SHARD.tar::MEMBER`` as a Path)."""
        return self.root / self.records[i]["image"]

    def image_ref(self, i: int) -> str:
        """The image as ``open_image`` takes it: a path or ``SHARD.tar::MEMBER``."""
        return str(self.image_path(i))


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


TAR_SEPARATOR = "::"  # SHARD.tar::MEMBER names an image inside a WebDataset shard


class ImageProblem(ValueError):
    """An image that cannot be used; the message is the reason recorded in skipped.jsonl."""


# Per process (each DataLoader worker has its own): tar path -> {member: (offset, size)}.
_TAR_INDEX: dict[str, dict[str, tuple[int, int]]] = {}


def _tar_member_bytes(tar_path: str, member: str) -> bytes:
    index = _TAR_INDEX.get(tar_path)
    if index is None:
        try:
            with tarfile.open(tar_path) as tar:
                index = {i.name: (i.offset_data, i.size) for i in tar if i.isfile()}
        except (OSError, tarfile.TarError) as err:
            raise ImageProblem(f"cannot read shard {tar_path}: {err}") from err
        _TAR_INDEX[tar_path] = index
    if member not in index:
        raise ImageProblem(f"{member} is not in shard {tar_path}")
    offset, size = index[member]
    with open(tar_path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I", "F"):  # 16-bit / float greyscale
        import numpy as np

        pixels = np.asarray(img, dtype=np.float32)
        top = float(pixels.max()) or 1.0
        img = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def open_image(ref: str | os.PathLike) -> Image.Image:
    """Opens an image (a path, or ``SHARD.tar::MEMBER``) fully decoded, as RGB.

    Raises:
        ImageProblem: missing, not an image, truncated, or too many pixels; the message says which.
    """
    ref = str(ref)
    try:
        if TAR_SEPARATOR in ref:
            tar_path, member = ref.split(TAR_SEPARATOR, 1)
            source: io.BytesIO | str = io.BytesIO(_tar_member_bytes(tar_path, member))
        else:
            if not os.path.isfile(ref):
                raise ImageProblem("missing: no file at this path")
            source = ref
        with Image.open(source) as img:
            img.load()  # decodes everything now: a truncated file fails here, not later
            return _to_rgb(img)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as err:
        raise ImageProblem(f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err)
        if "truncated" in text:
            raise ImageProblem(f"truncated: {text}") from err
        raise ImageProblem(f"unreadable: {type(err).__name__}: {text}") from err


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image as RGB (any mode PIL reads); raises ImageProblem when it cannot."""
    return open_image(path)


def materialize(ref: str | os.PathLike, cache: Path) -> Path:
    """A file path for an image: the path itself, or a tar member extracted once under
    ``cache`` (for viewers that need a file, such as the dashboard and exports)."""
    ref = str(ref)
    if TAR_SEPARATOR not in ref:
        return Path(ref)
    tar_path, member = ref.split(TAR_SEPARATOR, 1)
    target = cache / Path(tar_path).stem / member
    if not target.is_file():
        from engine import store

        with store.atomic_path(target) as tmp:
            tmp.write_bytes(_tar_member_bytes(tar_path, member))
    return target


def default_workers(n_images: int) -> int:
    """DataLoader workers when the user gives none: none for small sets (starting workers costs
    more than it saves), else up to 4, at most the CPU count."""
    return 0 if n_images < 1000 else min(4, os.cpu_count() or 1)


class _Images(torch.utils.data.Dataset):
    """Pair i -> (i, preprocessed image or None, token ids or None, problem or None)."""

    def __init__(
        self,
        pairs: PairSet,
        preprocess: Callable[[Image.Image], torch.Tensor] | None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
    ) -> None:
        self.refs = [pairs.image_ref(i) for i in range(len(pairs))]
        self.captions = pairs.captions
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(
        self, i: int
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        try:
            img = open_image(self.refs[i])
        except ImageProblem as err:
            return i, None, None, str(err)
        x = self.preprocess(img) if self.preprocess is not None else None
        tokens = self.tokenizer([self.captions[i]])[0] if self.tokenizer is not None else None
        return i, x, tokens, None


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None, list]:
    inds = [it[0] for it in items]
    problems = [(it[0], it[3]) for it in items if it[3] is not None]
    xs = [it[1] for it in items if it[1] is not None]
    toks = [it[2] for it in items if it[2] is not None]
    return (
        inds,
        torch.stack(xs) if xs else None,
        torch.stack(toks) if toks else None,
        problems,
    )


def _ranges(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def _batches(
    pairs: PairSet,
    batches: Sequence[Sequence[int]],
    preprocess: Callable[[Image.Image], torch.Tensor] | None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    workers: int,
) -> torch.utils.data.DataLoader:
    workers = default_workers(len(pairs)) if workers < 0 else workers
    return torch.utils.data.DataLoader(
        _Images(pairs, preprocess, tokenizer),
        batch_sampler=[list(b) for b in batches],
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )


def loader(
    pairs: PairSet,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    workers: int = -1,
    batches: Sequence[Sequence[int]] | None = None,
    desc: str | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Streams (indices, images (B, 3, H, W), tokens (B, context)) in order, in DataLoader
    workers (``workers`` < 0: ``default_workers``); ``batches`` picks which (default: all).

    Raises:
        DataError: an image that cannot be opened (the build checks them all first).
    """
    if batches is None:
        batches = [
            range(s, min(len(pairs), s + batch_size)) for s in range(0, len(pairs), batch_size)
        ]
    it = _batches(pairs, batches, preprocess, tokenizer, workers)
    for inds, x, tokens, problems in tqdm(it, desc=desc, unit="batch", disable=desc is None):
        if problems:
            i, why = problems[0]
            raise DataError(
                f"image of pair {pairs.ids[i]!r} ({pairs.records[i]['image']}) cannot be used: "
                f"{why}. It was readable when the build started; restore it or rebuild"
            )
        yield inds, x, tokens


def check_images(
    pairs: PairSet, workers: int = -1, batch_size: int = 64, desc: str | None = "checking images"
) -> tuple[PairSet, list[dict]]:
    """Opens every image (fully decoded) and checks every caption, in DataLoader workers.

    Returns:
        The usable pairs (in order) and one record per skipped pair: id, image, caption, reason.
    """
    bad: dict[int, str] = {}
    for i, rec in enumerate(pairs.records):
        if not str(rec.get("caption", "")).strip():
            bad[i] = "empty caption"
        elif not rec.get("image"):
            bad[i] = "missing: the source names no image for this pair"
    todo = [i for i in range(len(pairs)) if i not in bad]
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    it = _batches(pairs, batches, None, None, workers)
    for _, _, _, problems in tqdm(it, desc=desc, unit="batch", disable=desc is None):
        bad.update(problems)
    keep = [rec for i, rec in enumerate(pairs.records) if i not in bad]
    skipped = [
        {
            "id": str(pairs.records[i]["id"]),
            "image": pairs.records[i].get("image", ""),
            "caption": pairs.records[i].get("caption", ""),
            "reason": bad[i],
        }
        for i in sorted(bad)
    ]
    return PairSet(keep, pairs.root), skipped


def image_tensors(
    pairs: PairSet,
    preprocess: Callable[[Image.Image], torch.Tensor],
    progress: bool = True,
    workers: int = -1,
) -> torch.Tensor:
    """Every image of ``pairs`` through ``preprocess``: (n, 3, H, W) float32, in memory (for
    training and tests; builds stream with ``loader``)."""
    chunks = []
    batches = _ranges(len(pairs), 256)
    it = _batches(pairs, batches, preprocess, None, workers)
    for _, x, _, problems in tqdm(it, desc="loading images", unit="batch", disable=not progress):
        if problems:
            i, why = problems[0]
            raise DataError(f"image of pair {pairs.ids[i]!r} ({pairs.records[i]['image']}): {why}")
        chunks.append(x)
    return torch.cat(chunks)


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
