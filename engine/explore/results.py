"""What the explorers return: a target (a validation pair or a new query) and its influencers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.attribution.summaries import bin_edges, histogram, top_rows
from engine.errors import InputError


@dataclass
class Influencer:
    """One training pair in a gallery."""

    rank: int  # 1 = strongest
    sign: str  # "positive", "negative", "similar" (nearest by CLIP similarity) or "suspect"
    index: int  # row in train.jsonl / scores.npy
    id: str
    caption: str
    image: str  # path as stored in train.jsonl (relative to the run directory, or absolute)
    score: float  # TRAK score, or the value the cards are ranked by


@dataclass
class Points:
    """Some training pairs as the plots draw them: a fixed sample and the shown influencers."""

    rows: np.ndarray  # (p,) training rows
    scores: np.ndarray  # (p,) their TRAK scores for the target
    similarity: np.ndarray  # (p,) their CLIP image similarity to the target

    @classmethod
    def empty(cls) -> Points:
        nothing = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int64), nothing, nothing)


@dataclass
class QueryResult:
    """A target (a validation pair or a new query) and its influencers.

    What it carries does not grow with the training set: its galleries, a histogram of all its
    scores and the plots' points; a new query also carries its full column (``scores``).
    """

    caption: str
    positive: list[Influencer]
    negative: list[Influencer]
    similar: list[Influencer]  # nearest training pairs by CLIP similarity (image to image)
    clip_similarity: float  # mean cosine of the target's image and caption over the ensemble
    margin: float  # the CLIP margin (the attributed model output), mean over checkpoints
    histogram: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (B,) counts, (B + 1,) edges
    points: Points = field(repr=False, default_factory=Points.empty)
    scores: np.ndarray | None = field(repr=False, default=None)  # (n_train,) when computed
    val_id: str | None = None
    image: str | None = None  # the validation pair's image path, when it is one
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)  # the run's verdict (engine.explore.trust)

    def to_json(self) -> dict[str, Any]:
        """Everything but the full arrays, as plain JSON types."""
        out = asdict(self)
        for name in ("scores", "histogram", "points"):
            out.pop(name)
        return out


def make_cards(
    train: Sequence[dict[str, Any]], order: np.ndarray, scores: np.ndarray, sign: str
) -> list[Influencer]:
    """Gallery cards for training rows ``order`` (strongest first) with their ``scores``."""
    cards = []
    for r, (i, score) in enumerate(zip(order, scores, strict=True)):
        rec = train[int(i)]
        cards.append(
            Influencer(
                rank=r + 1,
                sign=sign,
                index=int(i),
                id=str(rec["id"]),
                caption=rec["caption"],
                image=rec["image"],
                score=float(score),
            )
        )
    return cards


def ranked_result(
    train: Sequence[dict[str, Any]],
    caption: str,
    column: np.ndarray,
    similarity: np.ndarray,
    clip_sim: float,
    margin: float,
    k: int,
    sample: np.ndarray,
    **extra: Any,
) -> QueryResult:
    """The top-k positive, negative and most similar training pairs of a target whose full
    column of scores was computed (a new query).

    Args:
        train: the run's training records.
        column: (n_train,) the target's TRAK scores.
        similarity: (n_train,) CLIP image similarity of each training pair to the target.
        sample: the training rows the plots draw besides the shown ones.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    k = min(k, len(column))
    pos, neg, near = top_rows(column, k), top_rows(-column, k), top_rows(similarity, k)
    low, high = float(column.min()), float(column.max())
    drawn = np.union1d(sample, np.concatenate([pos, neg]))
    return QueryResult(
        caption=caption,
        positive=make_cards(train, pos, column[pos], "positive"),
        negative=make_cards(train, neg, column[neg], "negative"),
        similar=make_cards(train, near, similarity[near], "similar"),
        clip_similarity=clip_sim,
        margin=margin,
        histogram=(histogram(column, low, high), bin_edges(low, high)),
        points=Points(drawn, column[drawn], similarity[drawn].astype(np.float32)),
        scores=column,
        **extra,
    )
