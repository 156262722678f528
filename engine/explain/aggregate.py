"""A group's aggregated effect: each training pair's scores summed over the group's validation
pairs, and how few training pairs carry most of it.

By TRAK's linear datamodel (TRAK paper, Section 2), removing training pair i changes the summed
margin of a group V by about -sum_{j in V} score_ij: the sum is the pair's effect on the group,
positive when it helps the group match, negative when it hurts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.attribution.summaries import top_rows
from engine.explore.scores import StoredScores

SHARES = (0.5, 0.8)  # concentration: how many pairs carry these shares of a sign's total


def concentration(values: np.ndarray) -> dict[str, Any]:
    """How concentrated the positive (or negative, pass ``-values``) part of an effect is.

    Returns:
        ``total`` (the sum of the positive values), ``pairs`` (how many are positive),
        ``n_for`` (share -> the fewest pairs whose values reach that share of the total) and
        ``top_percent_share`` (the share the top 1% of all training pairs carry).
    """
    v = np.asarray(values, dtype=np.float64)
    pos = np.sort(v[v > 0])[::-1]
    total = float(pos.sum())
    out: dict[str, Any] = {"total": total, "pairs": int(pos.size), "n_for": {}}
    if total <= 0:
        out["top_percent_share"] = 0.0
        return out
    cum = np.cumsum(pos) / total
    for share in SHARES:
        out["n_for"][str(share)] = int(np.searchsorted(cum, share - 1e-12) + 1)
    top = max(1, len(v) // 100)
    out["top_percent_share"] = float(pos[:top].sum() / total)
    return out


@dataclass
class GroupEffect:
    """A group of validation rows and every training pair's summed score over it."""

    val_rows: np.ndarray  # (g,) the group's validation rows
    total: np.ndarray  # (n_train,) float64: sum over the group of each pair's scores

    def helpful(self, k: int) -> np.ndarray:
        """The k training rows that raise the group's summed margin most (positive only)."""
        order = top_rows(self.total, k)
        return order[self.total[order] > 0]

    def harmful(self, k: int) -> np.ndarray:
        """The k training rows that lower it most (negative only)."""
        order = top_rows(-self.total, k)
        return order[self.total[order] < 0]

    def concentration(self) -> dict[str, Any]:
        """``concentration`` of the helpful and of the harmful part."""
        return {"helpful": concentration(self.total), "harmful": concentration(-self.total)}


def group_effect(scores: StoredScores, val_rows: np.ndarray) -> GroupEffect:
    """The group's effect in either score form (``StoredScores.column_sum``)."""
    rows = np.asarray(sorted({int(j) for j in val_rows}), np.int64)
    return GroupEffect(rows, scores.column_sum(rows))
