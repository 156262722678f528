"""What the explorers return: a target (a validation pair or a new query) and its influencers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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
class QueryResult:
    """A target (a validation pair or a new query) and its influencers."""

    caption: str
    positive: list[Influencer]
    negative: list[Influencer]
    similar: list[Influencer]  # nearest training pairs by CLIP similarity (image to image)
    clip_similarity: float  # mean cosine of the target's image and caption over the ensemble
    margin: float  # the CLIP margin (the attributed model output), mean over checkpoints
    scores: np.ndarray = field(repr=False)  # (n_train,) TRAK score of every training pair
    train_similarity: np.ndarray = field(repr=False)  # (n_train,) CLIP similarity to the target
    val_id: str | None = None
    image: str | None = None  # the validation pair's image path, when it is one
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)  # the run's verdict (engine.explore.trust)

    def to_json(self) -> dict[str, Any]:
        """Everything but the full arrays, as plain JSON types."""
        out = asdict(self)
        out.pop("scores")
        out.pop("train_similarity")
        return out


def make_cards(
    train: list[dict[str, Any]], order: np.ndarray, values: np.ndarray, sign: str
) -> list[Influencer]:
    """Gallery cards for training rows ``order`` (strongest first), scored by ``values``."""
    return [
        Influencer(
            rank=r + 1,
            sign=sign,
            index=int(i),
            id=str(train[i]["id"]),
            caption=train[i]["caption"],
            image=train[i]["image"],
            score=float(values[i]),
        )
        for r, i in enumerate(order)
    ]


def ranked_result(
    train: list[dict[str, Any]],
    caption: str,
    column: np.ndarray,
    similarity: np.ndarray,
    clip_sim: float,
    margin: float,
    k: int,
    **extra: Any,
) -> QueryResult:
    """The top-k positive, negative and most similar training pairs of one target.

    Args:
        train: the run's training records.
        column: (n_train,) the target's TRAK scores.
        similarity: (n_train,) CLIP image similarity of each training pair to the target.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    k = min(k, len(column))
    pos = np.argsort(-column, kind="stable")[:k]
    neg = np.argsort(column, kind="stable")[:k]
    near = np.argsort(-similarity, kind="stable")[:k]
    return QueryResult(
        caption=caption,
        positive=make_cards(train, pos, column, "positive"),
        negative=make_cards(train, neg, column, "negative"),
        similar=make_cards(train, near, similarity, "similar"),
        clip_similarity=clip_sim,
        margin=margin,
        scores=column,
        train_similarity=similarity.astype(np.float32),
        **extra,
    )
