"""Streaming pairs to a model: preprocessed images and token ids in DataLoader workers.

Images are never all held in memory by a build: ``loader`` streams batches of preprocessed
images and tokens, and ``check_images`` finds the broken ones first.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from engine.data.images import open_image
from engine.data.pairs import PairSet
from engine.errors import DataError, ImageProblem, InputError


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


MAX_CAPTION_CHARS = 2000  # a caption is cut here before tokenizing (the model reads ~77 tokens)


def clean_caption(caption: str) -> tuple[str, list[str]]:
    """A user's caption ready to tokenize, and notes on what was changed: control characters
    become spaces, whitespace is collapsed, a very long caption is cut.

    Raises:
        InputError: a caption with nothing left to read.
    """
    notes = []
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in str(caption))
    if text != caption and text.strip() != str(caption).strip():
        notes.append("control characters in the caption were replaced by spaces")
    text = " ".join(text.split())
    if not text:
        raise InputError("the caption is empty; give the text the image should match")
    if len(text) > MAX_CAPTION_CHARS:
        notes.append(f"caption cut to its first {MAX_CAPTION_CHARS} of {len(text)} characters")
        text = text[:MAX_CAPTION_CHARS]
    return text, notes


def check_caption(
    caption: str, tokenizer: Callable[..., torch.Tensor], context_length: int
) -> list[str]:
    """Checks a query caption; returns notes for the user (e.g. that it will be truncated).

    Raises:
        InputError: an empty caption.
    """
    text, notes = clean_caption(caption)
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        n_tokens = len(encode(text)) + 2  # start and end tokens
        if n_tokens > context_length:
            notes.append(f"caption truncated: {n_tokens} tokens, the model reads {context_length}")
    return notes
