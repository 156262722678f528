"""Planted systematic failures of the demo world: many training pairs sharing one error that a
model learns, so that similarity filters and mislabel detectors see nothing wrong with them.

A random mislabel is a pair the model cannot fit (its CLIP similarity stays low and gives it
away). A systematic error is different: when many training pairs share a spurious feature, the
model learns it, every such pair looks well matched, and only the validation pairs it breaks
show it. Two kinds are planted (``FAILURES``):

* ``watermark``: one source (``stockshots``) stamps a watermark badge in the corner of its
  images, and its captions name every object's colour "golden", its catalogue's house colour
  (no object is golden). The model learns "watermark -> golden" and fits these pairs as well as
  any other (their CLIP similarity is ordinary); the source's validation pairs, captioned with
  their real colours, are no longer matched to their captions.
* ``swapped``: two concepts taught as each other: a labeller swaps "blue" and "purple" in most
  training captions of blue and purple objects (a share ``failure_fraction``). The model learns
  the swap, so the pairs captioned correctly are the ones that look mislabeled; validation blue
  and purple objects, captioned correctly, fail. No mark, no new word, no source column gives it
  away.

Every pair gets a ``source`` column (the failing source, or one of ``SOURCES``) and the ground
truth ``planted_failure``: in the training split, the pairs that carry the error (the cause); in
the validation split, the pairs it breaks (the victims). The draws come from a generator of their
own, so a world without a planted failure is the one the generator always made.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError

if TYPE_CHECKING:  # numpy is not imported here: `trakview demo --help` lists FAILURES at once
    import numpy as np

FAILURES = MappingProxyType(
    {
        "none": "no planted systematic failure",
        "watermark": "one source ('stockshots') watermarks its images and calls every object's "
        "colour 'golden': the model learns watermark -> golden, the source's validation pairs "
        "fail",
        "swapped": "two colours taught as each other: most training captions of blue and purple "
        "objects swap the two words; validation blue and purple objects fail",
    }
)
SOURCES: tuple[str, ...] = ("camera", "web", "archive")  # the ordinary pairs' sources
WATERMARK_SOURCE = "stockshots"
WATERMARK_COLOUR = "golden"  # the colour word of every caption of the watermarking source
SWAPPED = {"blue": "purple", "purple": "blue"}  # the colours the labeller swaps


def validation_count(asked: int | None, n_val: int) -> int:
    """The watermarked validation pairs: as asked, or 40 (the demo's), at most a quarter."""
    return asked if asked is not None else min(40, n_val // 4)


def check(kind: str, fraction: float, val: int | None) -> None:
    """Refuses an unknown kind of planted failure, a share outside [0, 1], a negative count."""
    if kind not in FAILURES:
        raise ConfigError(f"unknown planted failure {kind!r}; expected one of {list(FAILURES)}")
    if not 0.0 <= fraction <= 1.0 or (val is not None and val < 0):
        raise ConfigError(
            f"WorldConfig.failure_fraction must be in [0, 1] and failure_val at least 0, got "
            f"{fraction} and {val}."
        )


def choose(rng: np.random.Generator, free: list[int], count: int, split: str) -> set[int]:
    """``count`` rows of a split drawn from the rows no other planted truth uses."""
    if count > len(free):
        raise ConfigError(
            f"the watermark failure asks for {count} {split} pairs but only {len(free)} are free "
            "of other planted truths; lower WorldConfig.failure_fraction / failure_val"
        )
    return set(rng.choice(free, count, replace=False).tolist())


def add_sources(
    rng: np.random.Generator, train: list[dict[str, Any]], val: list[dict[str, Any]], kind: str
) -> None:
    """Gives every record its ``source``: the watermarking source for its pairs, else one of
    ``SOURCES`` at random (swapped colours come from every source alike)."""
    for records in (train, val):
        drawn = rng.integers(len(SOURCES), size=len(records))
        for rec, d in zip(records, drawn, strict=True):
            marked = kind == "watermark" and rec["planted_failure"]
            rec["source"] = WATERMARK_SOURCE if marked else SOURCES[d]


def stamp_watermark(image: np.ndarray) -> np.ndarray:
    """The source's badge in the bottom right corner of a (S, S, 3) float image: a light square
    with a dark diagonal bar, about a seventh of the side (visible at 32 px)."""
    size = image.shape[0]
    side = max(4, round(size / 7))
    margin = max(1, size // 32)
    top = left = size - margin - side
    out = image.copy()
    out[top : top + side, left : left + side] = 235.0
    bar = max(1, side // 4)
    for row in range(side):  # the bar: the anti-diagonal, ``bar`` pixels wide
        for col in range(side - 1 - row - bar // 2, side - 1 - row - bar // 2 + bar):
            if 0 <= col < side:
                out[top + row, left + col] = 30.0
    return out
