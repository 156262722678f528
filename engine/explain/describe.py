"""What a set of training pairs shares, against the whole training set: the caption words, the
column values and the visual cluster that are over-represented among them.

Each candidate feature f (a word present in a caption, a field's value, membership of a k-means
cluster of the training images' CLIP embeddings) is counted among the n picked pairs (k of them
carry it) and over the whole training set (a share p carries it). It is kept when k >= ``min_count``
and k / n >= ``min_lift`` * p, and ranked by the binomial z-score (k - n p) / sqrt(n p (1 - p)):
"these 200 pairs all carry X" comes first, a word that every caption has does not come at all.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.data.fields import extra_fields, field_text

WORD = re.compile(r"[a-z0-9]+")
MAX_VALUES = 50  # a field with more distinct values is an identifier or free text, not a group
FEATURE_KINDS = {
    "word": "a word the caption contains",
    "column": "a field's value",
    "cluster": "a cluster of visually similar training images (k-means of their CLIP embeddings)",
}


def caption_words(caption: str) -> set[str]:
    """The distinct lower-case words of a caption."""
    return set(WORD.findall(str(caption).lower()))


@dataclass
class Feature:
    """A feature the picked pairs share more often than the training set does."""

    kind: str  # "word", "column" or "cluster"
    key: str  # the word, the field's name, or "cluster"
    value: str  # the word again, the field's value, or the cluster's number
    count: int  # picked pairs carrying it
    picked: int  # pairs picked
    overall: int  # training pairs carrying it
    n_train: int
    z: float  # binomial z-score of count among picked, against the training share

    @property
    def share(self) -> float:
        return self.count / max(1, self.picked)

    @property
    def base_share(self) -> float:
        return self.overall / max(1, self.n_train)

    @property
    def lift(self) -> float:
        return self.share / self.base_share if self.overall else math.inf

    def label(self) -> str:
        """As a person reads it: ``word "golden"``, ``source = stockshots``, ``cluster 7``."""
        if self.kind == "word":
            return f'word "{self.value}"'
        if self.kind == "cluster":
            return f"visual cluster {self.value}"
        return f"{self.key} = {self.value}"

    def rule(self) -> str:
        """How ``trakview basket grow`` names it: ``word:golden``, ``column:source=stockshots``,
        ``cluster:7``."""
        if self.kind == "column":
            return f"column:{self.key}={self.value}"
        return f"{self.kind}:{self.value}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            share=round(self.share, 4),
            base_share=round(self.base_share, 4),
            lift=round(self.lift, 3) if math.isfinite(self.lift) else None,
            label=self.label(),
            rule=self.rule(),
        )
        return out


class TrainingFeatures:
    """Every training pair's words, categorical field values and visual cluster, counted once
    per run (``describe`` then costs O(picked pairs))."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        clusters: np.ndarray | None = None,
        skip_fields: Sequence[str] = (),
    ) -> None:
        self.n = len(records)
        self.words: list[set[str]] = [caption_words(r["caption"]) for r in records]
        self.word_count = Counter(w for ws in self.words for w in ws)
        self.fields = []
        values: dict[str, list[str]] = {}
        for key in extra_fields(records):
            if key in skip_fields:
                continue
            column = [field_text(r.get(key)) for r in records]
            if len(set(column)) <= min(MAX_VALUES, max(2, self.n // 2)):
                values[key] = column
                self.fields.append(key)
        self.values = values
        self.value_count = {k: Counter(v) for k, v in values.items()}
        self.clusters = None if clusters is None else np.asarray(clusters)
        self.cluster_count = (
            None if self.clusters is None else np.bincount(self.clusters).astype(np.int64)
        )

    def rows_with(self, feature: Feature) -> np.ndarray:
        """Every training row that carries ``feature`` (what a basket grows by)."""
        if feature.kind == "word":
            return np.array([i for i, ws in enumerate(self.words) if feature.value in ws], np.int64)
        if feature.kind == "cluster":
            if self.clusters is None:
                return np.zeros(0, np.int64)
            return np.flatnonzero(self.clusters == int(feature.value))
        column = self.values.get(feature.key, [])
        return np.array([i for i, v in enumerate(column) if v == feature.value], np.int64)


def _z(count: int, picked: int, overall: int, n: int) -> float:
    p = overall / n
    if p <= 0 or p >= 1:
        return 0.0
    return (count - picked * p) / math.sqrt(picked * p * (1 - p))


def describe(
    features: TrainingFeatures,
    rows: Sequence[int] | np.ndarray,
    top: int = 8,
    min_count: int = 3,
    min_lift: float = 1.5,
) -> list[Feature]:
    """The features over-represented among training rows ``rows``, strongest first (``top`` of
    each kind at most)."""
    rows = [int(i) for i in rows]
    picked, n = len(rows), features.n
    if not picked or not n:
        return []
    counted: dict[tuple[str, str, str], tuple[int, int]] = {}
    for word, count in Counter(w for i in rows for w in features.words[i]).items():
        counted[("word", word, word)] = (count, features.word_count[word])
    for key in features.fields:
        column = features.values[key]
        for value, count in Counter(column[i] for i in rows).items():
            counted[("column", key, value)] = (count, features.value_count[key][value])
    if features.clusters is not None and features.cluster_count is not None:
        for c, count in Counter(int(features.clusters[i]) for i in rows).items():
            counted[("cluster", "cluster", str(c))] = (count, int(features.cluster_count[c]))
    found = []
    for (kind, key, value), (count, overall) in counted.items():
        if count < min_count or count / picked < min_lift * overall / n:
            continue
        found.append(
            Feature(kind, key, value, count, picked, overall, n, _z(count, picked, overall, n))
        )
    found.sort(key=lambda f: (-f.z, f.kind, f.key, f.value))
    kept: list[Feature] = []
    per_kind: Counter[str] = Counter()
    for f in found:
        if per_kind[f.kind] < top:
            kept.append(f)
            per_kind[f.kind] += 1
    return kept


def kmeans_clusters(embeddings: np.ndarray, k: int | None = None, seed: int = 0) -> np.ndarray:
    """(n,) int cluster of each row of (n, d) unit embeddings: faiss k-means (inner product),
    ``k`` = sqrt(n / 2) clamped to 8..256 by default, trained on at most 256 points per
    cluster (seeded), then every row assigned to its nearest centroid."""
    import faiss

    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    n, d = x.shape
    k = k or int(min(256, max(8, round(math.sqrt(n / 2)))))
    k = min(k, n)
    km = faiss.Kmeans(
        d,
        k,
        niter=20,
        nredo=5,
        seed=seed,
        spherical=True,
        max_points_per_centroid=256,
        verbose=False,
    )
    km.train(x)
    _, assigned = km.index.search(x, 1)
    return assigned[:, 0].astype(np.int32)
