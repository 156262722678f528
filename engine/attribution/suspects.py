"""Suspected mislabeled training pairs: which signals rank them, and the one a run ships.

A pair whose caption contradicts its image is hard for the model: its caption ranks badly among
the training captions for its image (``caption rank``), its image and caption are far apart
(low ``CLIP similarity``), and TRAK sees a gradient the rest of the data does not explain (high
``self-influence``, Koh & Liang 2017; Pruthi et al. 2020). On the demo world's planted ground
truth (BENCHMARKS.md, suspects) self-influence alone ranks the mislabeled pairs a little worse
than the caption rank does; their rank average ranks them best, so a run ships that as
``suspect_mislabeled.npy``, and the dashboard shows every signal's ROC AUC where a run has
ground truth.
"""

from __future__ import annotations

import numpy as np

SHIPPED = "self-influence + caption rank"


def average_ranks(values: np.ndarray) -> np.ndarray:
    """(n,) ranks of ``values`` scaled to (0, 1], ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks / len(values)


def suspect_signals(
    self_influence: np.ndarray, clip_sim: np.ndarray, caption_rank: np.ndarray
) -> dict[str, np.ndarray]:
    """Every signal, oriented so that higher = more suspect, (n_train,) float64 each.

    Args:
        self_influence: TRAK self-influence of each training pair.
        clip_sim: mean cosine of each pair's image and caption.
        caption_rank: rank (1 = best) of each pair's caption among the training captions.
    """
    signals = {
        "self-influence": np.asarray(self_influence, dtype=np.float64),
        "CLIP similarity (low)": -np.asarray(clip_sim, dtype=np.float64),
        "caption rank": np.asarray(caption_rank, dtype=np.float64),
    }
    signals[SHIPPED] = average_ranks(signals["self-influence"]) + average_ranks(
        signals["caption rank"]
    )
    return signals
