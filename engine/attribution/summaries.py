"""What a run keeps of a block of TRAK scores besides (or instead of) the scores themselves.

Per validation pair (column): its top-k positive and negative training rows with their scores,
and a histogram of all its scores; per training pair (row): its scores summed over the block,
and the sum of its negative scores. These are everything the dashboard and the exports show, so
a run that keeps no dense ``scores.npy`` (the top-k form) loses nothing they need; a full column
is recomputed exactly when one is asked for.
"""

from __future__ import annotations

import numpy as np

HIST_BINS = 80


def top_rows(column: np.ndarray, k: int) -> np.ndarray:
    """The k rows of the largest values, largest first, ties by row: ``argsort(-column,
    kind="stable")[:k]`` in O(n) instead of O(n log n).

    Args:
        column: (n,) values.
    """
    n = column.shape[0]
    k = min(k, n)
    if k == n:
        return np.argsort(-column, kind="stable")
    part = np.argpartition(-column, k - 1)[:k]
    threshold = column[part].min()
    above = np.flatnonzero(column > threshold)
    tied = np.flatnonzero(column == threshold)[: k - len(above)]
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -column[chosen]))]


def summarize_block(scores: np.ndarray, k: int, bins: int = HIST_BINS) -> dict[str, np.ndarray]:
    """The summaries of a block of scores.

    Args:
        scores: (n_train, n_v) float32 scores of every training pair for n_v validation pairs.
        k: influencers kept per validation pair and sign.

    Returns:
        ``topk_pos``, ``topk_neg``: (n_v, k) int32 rows, strongest first (ties by row);
        ``topk_pos_scores``, ``topk_neg_scores``: (n_v, k) float32 their scores;
        ``hist``: (n_v, bins) int64 counts over ``range``; ``range``: (n_v, 2) float32 lowest
        and highest score; ``sum``, ``negative``: (n_train,) float64 row sums of the scores and
        of their negative parts.
    """
    n_train, n_v = scores.shape
    k = min(k, n_train)
    out = {
        "topk_pos": np.empty((n_v, k), np.int32),
        "topk_neg": np.empty((n_v, k), np.int32),
        "topk_pos_scores": np.empty((n_v, k), np.float32),
        "topk_neg_scores": np.empty((n_v, k), np.float32),
        "hist": np.empty((n_v, bins), np.int64),
        "range": np.empty((n_v, 2), np.float32),
    }
    for j in range(n_v):
        column = np.ascontiguousarray(scores[:, j])  # (n_train,)
        pos, neg = top_rows(column, k), top_rows(-column, k)
        out["topk_pos"][j], out["topk_neg"][j] = pos, neg
        out["topk_pos_scores"][j], out["topk_neg_scores"][j] = column[pos], column[neg]
        low, high = float(column.min()), float(column.max())
        out["hist"][j] = histogram(column, low, high, bins)
        out["range"][j] = (low, high)
    out["sum"] = scores.sum(axis=1, dtype=np.float64)
    out["negative"] = np.minimum(scores, 0).sum(axis=1, dtype=np.float64)
    return out


def histogram(values: np.ndarray, low: float, high: float, bins: int = HIST_BINS) -> np.ndarray:
    """(bins,) counts of ``values`` in ``bins`` equal bins from ``low`` to ``high``."""
    if high <= low:
        high = low + 1e-12  # one value repeated: every count in the first bin
    return np.histogram(values, bins=bins, range=(low, high))[0]


def bin_edges(low: float, high: float, bins: int = HIST_BINS) -> np.ndarray:
    """(bins + 1,) the edges ``histogram`` counted between."""
    return np.linspace(low, high if high > low else low + 1e-12, bins + 1)
