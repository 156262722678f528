"""The predicted effect of removing a basket: TRAK's linear datamodel.

TRAK's scores are a linear datamodel (TRAK paper, Section 2 and eq. 9): a model trained without
a set R of training pairs has validation pair j's margin changed by about

    delta_j = -sum_{i in R} score_ij

(a pair that helps j, positive score, lowers j's margin when it goes). The prediction ranks
effects better than it sizes them, and only as well as the run's attributions can be trusted:
the result carries the run's trust verdict as its caveat, and ``trakview eval clean`` measures
the real effect by retraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.attribution.summaries import bin_edges, histogram, top_rows
from engine.curate.baskets import Basket, basket_rows
from engine.explore.run_data import RunData
from engine.explore.scores import StoredScores
from engine.explore.trust import Verdict

BLOCK_ROWS = 16384  # basket rows summed at a time
BINS = 40  # of the predicted changes' histogram


def summed_rows(scores: StoredScores, rows: np.ndarray) -> np.ndarray:
    """(n_val,) float64 the scores of training rows ``rows`` summed, for every validation pair.

    Dense form: rows of ``scores.npy``. Top-k form: G (sum_i v_i), the summed training vectors
    of traker's store times every validation pair's target vector (one product, not r rows).
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return np.zeros(scores.n_val, np.float64)
    if scores.matrix is not None:
        total = np.zeros(scores.n_val, np.float64)
        for s in range(0, rows.size, BLOCK_ROWS):
            total += np.asarray(scores.matrix[rows[s : s + BLOCK_ROWS]], np.float64).sum(axis=0)
        return total
    summed = np.zeros(scores.target_vectors.shape[1], np.float64)  # (M*k,)
    for s in range(0, rows.size, BLOCK_ROWS):
        summed += scores.vectors(rows[s : s + BLOCK_ROWS]).astype(np.float64).sum(axis=0)
    return scores.target_vectors.astype(np.float64) @ summed


def predicted_change(score_sum: np.ndarray) -> np.ndarray:
    """(n_val,) the predicted change of each validation pair's margin when the pairs whose
    scores sum to ``score_sum`` are removed: ``-score_sum``."""
    return -np.asarray(score_sum, dtype=np.float64)


@dataclass
class Effect:
    """What removing a basket should do to every validation pair's margin."""

    rows: np.ndarray  # (r,) the basket's training rows
    delta: np.ndarray  # (n_val,) predicted change of each validation pair's margin
    margin: np.ndarray  # (n_val,) the run's margins (mean over its checkpoints)
    held_out: np.ndarray  # (n_val,) bool: validation pairs not used to choose the basket
    verdict: Verdict
    counts: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # histogram
    edges: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(1))
    # the predicted change of the mean margin for a random basket of the same size (expected)
    random_mean_change: float = float("nan")

    @property
    def mean_change(self) -> float:
        """Predicted change of the validation set's mean margin."""
        return float(self.delta.mean()) if self.delta.size else 0.0

    @property
    def caveat(self) -> str:
        return (
            f"Predicted by TRAK's linear datamodel (margin change = minus the removed pairs' "
            f"scores, summed): it ranks effects better than it sizes them. The attributions "
            f"are {self.verdict.level}: {self.verdict.reason}. `trakview eval clean` measures "
            "the real effect by retraining."
        )

    def helped(self, k: int) -> np.ndarray:
        """The k validation rows whose margin should rise most (only rising ones)."""
        order = top_rows(self.delta, k)
        return order[self.delta[order] > 0]

    def hurt(self, k: int) -> np.ndarray:
        """The k validation rows whose margin should fall most (only falling ones)."""
        order = top_rows(-self.delta, k)
        return order[self.delta[order] < 0]

    def to_json(self, val: list[dict[str, Any]], k: int = 10) -> dict[str, Any]:
        """Plain JSON: the summary, the k most helped and hurt validation pairs and every
        validation pair's predicted change (``delta``, in val.jsonl order)."""

        def pairs(order: np.ndarray) -> list[dict[str, Any]]:
            return [
                {
                    "id": str(val[j]["id"]),
                    "caption": val[j]["caption"],
                    "margin": float(self.margin[j]),
                    "delta": float(self.delta[j]),
                }
                for j in order.tolist()
            ]

        held = self.held_out
        return {
            "pairs": int(self.rows.size),
            "n_val": int(self.delta.size),
            "mean_margin": float(self.margin.mean()),
            "predicted_mean_change": self.mean_change,
            "predicted_mean_margin": float((self.margin + self.delta).mean()),
            "random_basket_predicted_mean_change": self.random_mean_change,
            "held_out": {
                "n_val": int(held.sum()),
                "predicted_mean_change": float(self.delta[held].mean()) if held.any() else None,
            },
            "share_helped": float((self.delta > 0).mean()),
            "share_hurt": float((self.delta < 0).mean()),
            "histogram": {"counts": self.counts.tolist(), "edges": self.edges.tolist()},
            "most_helped": pairs(self.helped(k)),
            "most_hurt": pairs(self.hurt(k)),
            "trust": self.verdict.to_json(),
            "caveat": self.caveat,
            "delta": [round(float(d), 6) for d in self.delta],
        }


def basket_effect(
    scores: StoredScores,
    rows: np.ndarray,
    margin: np.ndarray,
    verdict: Verdict,
    held_out: np.ndarray | None = None,
) -> Effect:
    """The predicted effect of removing training rows ``rows``.

    Args:
        scores: the run's scores (either form).
        margin: (n_val,) the run's validation margins.
        verdict: the run's trust verdict (the caveat).
        held_out: (n_val,) bool, validation pairs not used to choose the rows (default: all).
    """
    delta = predicted_change(summed_rows(scores, rows))
    # a random basket of r pairs: r / n_train of every pair's scores, in expectation
    totals = np.asarray(scores.totals, dtype=np.float64)
    random_mean = -len(rows) / max(1, totals.size) * float(totals.sum()) / max(1, delta.size)
    low, high = (float(delta.min()), float(delta.max())) if delta.size else (0.0, 0.0)
    return Effect(
        rows=np.asarray(rows, dtype=np.int64),
        delta=delta,
        margin=np.asarray(margin, dtype=np.float64),
        held_out=np.ones(delta.size, bool) if held_out is None else np.asarray(held_out, bool),
        verdict=verdict,
        counts=histogram(delta, low, high, BINS),
        edges=bin_edges(low, high, BINS),
        random_mean_change=random_mean,
    )


def held_out_mask(basket: Basket, val_ids: list[str]) -> np.ndarray:
    """(n_val,) bool: the validation pairs whose scores chose none of the basket's pairs."""
    if basket.chosen_with_every_val:
        return np.zeros(len(val_ids), dtype=bool)
    used = set(basket.chosen_with_val)
    return np.array([str(v) not in used for v in val_ids], dtype=bool)


def run_effect(data: RunData, basket: Basket) -> Effect:
    """The predicted effect of removing a basket from a run's training set."""
    return basket_effect(
        data.scores,
        basket_rows(basket, data.train),
        data.val_margin,
        data.verdict(),
        held_out_mask(basket, [str(r["id"]) for r in data.val]),
    )


def failure_share(delta: np.ndarray, margin: np.ndarray, group_rows: np.ndarray) -> dict[str, Any]:
    """How much of a group's failure removing a basket is predicted to remove.

    The group's deficit is the median margin of the other validation pairs minus the group's
    mean margin; the share is the predicted change of the group's mean margin over that
    deficit (1: the group would match as well as the rest; TRAK sizes effects less well than it
    ranks them, so read it beside a random basket's).

    Args:
        delta: (n_val,) predicted change of every validation pair's margin.
        margin: (n_val,) the run's margins.
        group_rows: the group's validation rows.
    """
    group = np.asarray(group_rows, np.int64)
    rest = np.setdiff1d(np.arange(len(margin)), group)
    deficit = float(np.median(margin[rest]) - margin[group].mean()) if rest.size else 0.0
    change = float(np.asarray(delta)[group].mean()) if group.size else 0.0
    return {
        "pairs": int(group.size),
        "deficit": deficit,
        "predicted_change": change,
        "share": change / deficit if deficit > 0 else None,
        "rest_predicted_change": float(np.asarray(delta)[rest].mean()) if rest.size else None,
    }
