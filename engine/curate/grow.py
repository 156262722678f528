"""Growing a basket from what its pairs share: a fix has to catch nearly all of a cause.

Removing three quarters of the pairs that teach a shortcut can leave the shortcut alive, so a
basket of the top causes of a failure is grown by what those causes share (``engine.explain.
describe``: a column value, a caption word, a visual cluster) or by their nearest training
images. Rules, as ``trakview basket grow --by`` takes them:

=================  ==========================================================================
rule               the training pairs added
=================  ==========================================================================
column:K=V         whose field K equals V
word:W             whose caption contains the word W
cluster:C          in visual cluster C (k-means of the training images' CLIP embeddings)
neighbours:K       the K nearest training images (CLIP) of each pair in the basket
auto               the rows of the feature most of the basket's pairs carry, among those that
                   at least ``min_share`` of them carry, ``min_lift`` times as often as the
                   training set does (ties: the higher lift)
=================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.curate.choices import GROW_RULES
from engine.errors import CurateError
from engine.explain.describe import Feature, TrainingFeatures, describe
from engine.search.faiss_ops import nearest


@dataclass
class Growth:
    """What a rule adds: the rows and why (the feature, or the neighbourhood)."""

    rule: str
    rows: np.ndarray
    why: str


def feature_of(rule: str, features: TrainingFeatures) -> Feature:
    """A ``column:`` / ``word:`` / ``cluster:`` rule as the feature it names."""
    kind, _, value = rule.partition(":")
    if kind == "column":
        key, sep, val = value.partition("=")
        if not sep or key.strip() not in features.fields:
            raise CurateError(
                f"column:K=V names a categorical field of the training pairs "
                f"({', '.join(features.fields) or 'none'}), got {rule!r}"
            )
        return Feature("column", key.strip(), val.strip(), 0, 0, 0, features.n, 0.0)
    if kind == "cluster" and (features.clusters is None or not value.strip().isdigit()):
        raise CurateError(f"cluster:C takes a cluster number, got {rule!r}")
    return Feature(
        kind,
        kind,
        value.strip().lower() if kind == "word" else value.strip(),
        0,
        0,
        0,
        features.n,
        0.0,
    )


def grow(
    rule: str,
    basket_rows: np.ndarray,
    features: TrainingFeatures,
    train_image_emb: np.ndarray | None = None,
    min_share: float = 0.5,
    min_lift: float = 3.0,
    index: Any = None,
) -> Growth:
    """The training rows a rule adds to a basket of ``basket_rows`` (its own rows included).

    Args:
        features: the run's training features (``engine.explain.report.training_features``).
        train_image_emb: (n_train, D) ensemble image embeddings (``neighbours``), or ``index``
            a faiss index of them (the run's ``train_image``).

    Raises:
        CurateError: an unknown rule, or ``auto`` when nothing is shared enough.
    """
    kind = rule.partition(":")[0].strip()
    rows = np.asarray(basket_rows, np.int64)
    if kind not in GROW_RULES:
        raise CurateError(
            f"--by takes one of {', '.join(GROW_RULES)} (e.g. word:golden), got {rule!r}"
        )
    if not rows.size:
        raise CurateError("the basket is empty: add its first pairs (basket add --causes N)")
    if kind == "auto":
        shared = [
            f
            for f in describe(features, rows, top=20)
            if f.share >= min_share and f.lift >= min_lift
        ]
        if not shared:
            raise CurateError(
                f"no feature is carried by {min_share:.0%} of the basket's {rows.size} pairs at "
                f"{min_lift:g} times its share of the training set; lower --min-share or grow "
                "by a rule (basket grow without --by lists what they share)"
            )
        # a fix has to catch nearly all of a cause: the feature most of the basket carries
        best = max(shared, key=lambda f: (f.count, f.lift))
        return Growth(
            best.rule(),
            features.rows_with(best),
            f"shares {best.label()} ({best.count}/{best.picked} of the basket)",
        )
    if kind == "neighbours":
        k = rule.partition(":")[2].strip() or "10"
        if not k.isdigit() or int(k) < 1:
            raise CurateError(f"neighbours:K takes a number of neighbours, got {rule!r}")
        if train_image_emb is None:
            raise CurateError("neighbours need the run's training image embeddings")
        queries = np.asarray(train_image_emb[rows], dtype=np.float32)  # (r, D)
        if index is not None:  # the run's faiss index: no (r, n_train) matrix
            _, found = nearest(index, queries, int(k) + 1)
        else:
            sims = queries @ np.asarray(train_image_emb, dtype=np.float32).T  # (r, n_train)
            found = np.argsort(-sims, axis=1, kind="stable")[:, : int(k) + 1]
        return Growth(
            rule,
            np.unique(np.concatenate([rows, found.ravel()])),
            f"among the {k} nearest images of a basket pair",
        )
    feature = feature_of(rule, features)
    added = features.rows_with(feature)
    return Growth(feature.rule(), added, f"carries {feature.label()}")
