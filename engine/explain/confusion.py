"""Attributing the confusion: what a failing validation pair is matched to instead of its own,
and which training pairs drive those wrong matches.

A pair j fails when the model prefers another validation caption k for its image (or another
image for its caption). Its own margin's attribution answers "what helps j match", which for a
systematic error mixes the cause with everything else j shares with the training set. The wrong
match itself is a new target: the image of j with the caption of k, scored exactly as a new query
(``QueryEngine``: the run's model output, parameters and projection). The training pairs that
most help the wrong matches, summed over the failing pairs, are the ones that teach the error.

Each failing pair has weight 1, split equally over its wrong matches; by linearity the group's
sum is one column of the summed target gradients (``StoredScores.column_for``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

KINDS = {
    "caption": "the pair's image matched to another validation caption",
    "image": "the pair's caption matched to another validation image",
}


@dataclass
class WrongMatch:
    """A match a validation pair makes instead of its own."""

    val_row: int  # the failing pair j
    other_row: int  # the pair k (of the gallery) whose caption (or image) j is matched to
    kind: str  # "caption": image j with caption k; "image": image k with caption j
    similarity: float  # mean cosine of that image and caption over the ensemble
    own_similarity: float  # mean cosine of j's own image and caption
    weight: float = 1.0  # j's weight (1) split over its wrong matches

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wrong_matches(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    rows: Sequence[int],
    gallery_image: np.ndarray | None = None,
    gallery_text: np.ndarray | None = None,
    per_pair: int = 3,
    kinds: Sequence[str] = ("caption",),
) -> list[WrongMatch]:
    """The matches each row in ``rows`` prefers to its own: up to ``per_pair`` gallery captions
    closer to its image than its own caption (``kind="caption"``) and gallery images closer to
    its caption (``"image"``), closest first. A row that prefers nothing to its own has none.

    Args:
        image_emb, text_emb: (n, D) ensemble embeddings of the pairs (inner product = mean
            cosine).
        gallery_image, gallery_text: (n_gallery, D) the candidates (default: the pairs
            themselves, the pair's own row excluded). The training set's captions are what a
            failing image is drawn to; the validation set's are what its caption rank counts.
    """
    same = gallery_image is None and gallery_text is None
    g_img = image_emb if gallery_image is None else gallery_image
    g_txt = text_emb if gallery_text is None else gallery_text
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown wrong-match kinds {unknown}; expected some of {list(KINDS)}")
    out: list[WrongMatch] = []
    for j in rows:
        j = int(j)
        own = float(image_emb[j] @ text_emb[j])
        found: list[WrongMatch] = []
        for kind in kinds:
            sims = g_txt @ image_emb[j] if kind == "caption" else g_img @ text_emb[j]
            sims = np.asarray(sims, dtype=np.float64)
            if same:
                sims[j] = -np.inf
            order = np.argsort(-sims, kind="stable")[:per_pair]
            found += [
                WrongMatch(j, int(k), kind, float(sims[k]), own) for k in order if sims[k] > own
            ]
        for m in found:
            m.weight = 1.0 / len(found)
        out += found
    return out


def match_pair(
    m: WrongMatch,
    pairs: Sequence[dict[str, Any]],
    gallery: Sequence[dict[str, Any]],
    image_of: Callable[[str], Image.Image],
) -> tuple[Image.Image, str]:
    """The image and caption of a wrong match, as a new query (``pairs``: the failing pairs'
    records; ``gallery``: the records the match was found among)."""
    if m.kind == "caption":
        return image_of(pairs[m.val_row]["image"]), str(gallery[m.other_row]["caption"])
    return image_of(gallery[m.other_row]["image"]), str(pairs[m.val_row]["caption"])


def confusion_gradients(
    matches: Sequence[WrongMatch],
    pairs: Sequence[dict[str, Any]],
    gallery: Sequence[dict[str, Any]],
    image_of: Callable[[str], Image.Image],
    batch_gradients: Callable[[list[Image.Image], list[str]], np.ndarray],
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 32,
) -> np.ndarray:
    """(M, k) the wrong matches' projected gradients, weighted and summed.

    Args:
        batch_gradients: (images, captions) -> (n, M, k) projected gradients of new queries
            (``QueryEngine.batch_gradients``).
        progress: called with (done, total) after each chunk of matches.
    """
    if not matches:
        raise ValueError("no wrong match to attribute")
    total: np.ndarray | None = None
    for s in range(0, len(matches), chunk):
        part = matches[s : s + chunk]
        images, captions = zip(
            *(match_pair(m, pairs, gallery, image_of) for m in part), strict=True
        )
        grads = np.asarray(batch_gradients(list(images), list(captions)), dtype=np.float64)
        weights = np.array([m.weight for m in part])
        summed = np.tensordot(weights, grads, axes=1)  # (M, k)
        total = summed if total is None else total + summed
        if progress is not None:
            progress(min(s + chunk, len(matches)), len(matches))
    return total
