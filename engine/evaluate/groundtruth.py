"""Checks of a run against the demo world's planted ground truth.

They read only what a run stores for everyone (``scores.npy``, ``suspect_mislabeled.npy`` and
the jsonl records), so they apply to any run whose data carries the demo's ground-truth fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def near_duplicate_hits(
    scores: np.ndarray, train: list[dict[str, Any]], val: list[dict[str, Any]], k: int = 5
) -> dict[str, Any]:
    """For each validation pair with a planted near-duplicate: is it among the top-k influencers?

    Args:
        scores: (n_train, n_val) TRAK scores.
        train, val: the run's records; train records carry ``near_duplicate_of`` (a val id).

    Returns:
        ``{"n", "hits", "rate", "ranks", "k"}``; ``ranks`` holds each duplicate's rank (1 = top).
    """
    val_index = {str(r["id"]): j for j, r in enumerate(val)}
    ranks = []
    for i, rec in enumerate(train):
        target = rec.get("near_duplicate_of")
        if target is None or str(target) not in val_index:
            continue
        column = scores[:, val_index[str(target)]]
        ranks.append(int((column > column[i]).sum()) + 1)
    hits = sum(r <= k for r in ranks)
    return {
        "n": len(ranks),
        "hits": hits,
        "rate": hits / len(ranks) if ranks else float("nan"),
        "ranks": ranks,
        "k": k,
    }


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half).

    The Mann–Whitney U statistic divided by n_pos * n_neg.
    """
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def mislabeled_auc(suspicion: np.ndarray, train: list[dict[str, Any]]) -> float:
    """ROC AUC of a suspicion score (higher = more suspect) for the planted mislabeled pairs."""
    labels = np.array([bool(r.get("mislabeled")) for r in train])
    return roc_auc(np.asarray(suspicion, dtype=np.float64), labels)


def has_mislabeled_truth(train: list[dict[str, Any]]) -> bool:
    """Whether the records carry the planted ``mislabeled`` flag, with both classes present."""
    flags = [bool(r.get("mislabeled")) for r in train if "mislabeled" in r]
    return len(flags) == len(train) and 0 < sum(flags) < len(flags)


def signal_aurocs(
    signals: dict[str, np.ndarray], train: list[dict[str, Any]]
) -> dict[str, float] | None:
    """ROC AUC of each suspect signal for the planted mislabeled pairs; None without them."""
    if not has_mislabeled_truth(train):
        return None
    return {name: mislabeled_auc(values, train) for name, values in signals.items()}
