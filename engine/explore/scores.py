"""A run's TRAK scores as the explorers read them, whichever form the run keeps them in.

Every run of format 2 stores per validation pair its top-k influencers with their scores, a
histogram of all its scores and its most similar training images, and per training pair its
scores' total and negative mass: what a selection shows costs O(k), not O(n_train). A full
column (a histogram of a run of format 1, an export of more than k) or a training pair's row is
read from ``scores.npy`` in the dense form, or recomputed exactly from traker's store in the
top-k form: score_i = (1/M) sum_m phi_m[i] . g_m * (1/M) sum_m Q_m[i] (TRAK paper, eq. 9; as
``TRAKer.finalize_scores`` computes it), one matrix-vector product per checkpoint.
"""

from __future__ import annotations

import functools

import numpy as np

from engine import files
from engine.attribution.summaries import HIST_BINS, bin_edges, histogram, top_rows
from engine.run.layout import RunLayout
from engine.run.manifest import Manifest
from engine.search.faiss_ops import trak_vectors

BLOCK_ROWS = 65536  # training rows read at a time when a column is recomputed


class StoredScores:
    """The scores of one run (``dense``: it has ``scores.npy``; format 1 runs have only that)."""

    def __init__(self, layout: RunLayout, manifest: Manifest) -> None:
        self.layout = layout
        self.n_models = manifest.n_models
        self.n_train, self.n_val = manifest.counts.n_train, manifest.counts.n_val
        self.dense = manifest.dense or manifest.format_version == 1
        self.summarized = layout.topk_pos_scores.is_file()  # format 1: only scores.npy
        self.matrix = files.load_npy(layout.scores, mmap=True) if self.dense else None

    # --- per validation pair --------------------------------------------------------------

    def column(self, j: int) -> np.ndarray:
        """(n_train,) float32 every training pair's score for validation pair j."""
        if self.matrix is not None:
            return np.asarray(self.matrix[:, j], dtype=np.float32)
        return self.column_for([self._targets[m][j] for m in range(self.n_models)])

    def column_for(self, targets: list[np.ndarray]) -> np.ndarray:
        """(n_train,) float32 every training pair's score for a target of projected gradients
        ``targets`` (one (k,) per checkpoint): traker's store read ``BLOCK_ROWS`` rows at a
        time, so memory does not grow with the training set."""
        total = np.zeros(self.n_train, np.float32)
        for m, target in enumerate(targets):
            g = np.asarray(target, dtype=np.float32)  # (k,)
            features = files.load_npy(self.layout.trak_features(m), mmap=True)  # (n_train, k)
            for s in range(0, self.n_train, BLOCK_ROWS):  # a BLAS matrix-vector product each
                total[s : s + BLOCK_ROWS] += features[s : s + BLOCK_ROWS] @ g
        return (total / self.n_models) * self.mean_out_to_loss

    @functools.cached_property
    def mean_out_to_loss(self) -> np.ndarray:
        """(n_train,) float32 each training pair's out-to-loss weight, mean over checkpoints."""
        weight = np.zeros(self.n_train, np.float32)
        for m in range(self.n_models):
            weight += files.load_npy(self.layout.trak_out_to_loss(m), mmap=True)[:, 0]
        return weight / self.n_models

    def top(self, j: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The k most positive and k most negative training rows of validation pair j with
        their scores, strongest first (ties by row)."""
        stored = np.load(self.layout.topk_pos, mmap_mode="r") if self.summarized else None
        if stored is not None and k <= stored.shape[1]:
            return (
                np.asarray(stored[j, :k]),
                np.asarray(files.load_npy(self.layout.topk_pos_scores, mmap=True)[j, :k]),
                np.asarray(files.load_npy(self.layout.topk_neg, mmap=True)[j, :k]),
                np.asarray(files.load_npy(self.layout.topk_neg_scores, mmap=True)[j, :k]),
            )
        column = self.column(j)
        pos, neg = top_rows(column, k), top_rows(-column, k)
        return pos, column[pos], neg, column[neg]

    def histogram(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(bins,) counts of validation pair j's scores and their (bins + 1,) edges."""
        if self.summarized:
            counts = files.load_npy(self.layout.score_hist, mmap=True)[j]
            low, high = files.load_npy(self.layout.score_range, mmap=True)[j]
        else:
            column = self.column(j)
            low, high = float(column.min()), float(column.max())
            counts = histogram(column, low, high)
        return np.asarray(counts), bin_edges(float(low), float(high), len(counts) or HIST_BINS)

    def column_sum(self, val_rows: np.ndarray | list[int]) -> np.ndarray:
        """(n_train,) float64 each training pair's scores summed over validation rows
        ``val_rows`` (each row once): the pair's effect on the summed margin of those pairs.

        Dense form: the columns read from ``scores.npy`` in row blocks. Top-k form: by
        linearity one column of the summed target gradients, sum_j score_ij =
        mean_m(phi_m[i] . sum_j g_mj) * mean_m(Q_m[i]).
        """
        val_rows = np.asarray(sorted({int(j) for j in val_rows}), dtype=np.int64)
        if self.matrix is not None:
            total = np.zeros(self.n_train, np.float64)
            for s in range(0, self.n_train, 16384):  # row blocks: bounded memory on big runs
                block = np.asarray(self.matrix[s : s + 16384][:, val_rows], np.float64)
                total[s : s + 16384] = block.sum(axis=1)
            return total
        summed = self.target_vectors[val_rows].sum(axis=0)  # (M*k,)
        return self.column_for(np.split(summed, self.n_models)).astype(np.float64)

    def scores_of(self, j: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) float32 the scores of some training rows for validation pair j."""
        if self.matrix is not None:
            return np.asarray(self.matrix[rows, j], dtype=np.float32)
        return (self.vectors(rows) @ self.target_vectors[j]).astype(np.float32)  # (r,)

    # --- per training pair ------------------------------------------------------------------

    def row(self, i: int) -> np.ndarray:
        """(n_val,) float32 training pair i's score for every validation pair."""
        if self.matrix is not None:
            return np.asarray(self.matrix[i], dtype=np.float32)
        return (self.target_vectors @ self.vectors([i])[0]).astype(np.float32)  # (n_val,)

    @functools.cached_property
    def totals(self) -> np.ndarray:
        """(n_train,) float32 each training pair's scores summed over the validation pairs."""
        if self.summarized:
            return files.load_npy(self.layout.train_score_sum)
        total = np.zeros(self.n_train, dtype=np.float64)
        for s in range(0, self.n_train, 4096):  # row blocks: bounded memory on big runs
            total[s : s + 4096] = np.asarray(self.matrix[s : s + 4096], np.float64).sum(axis=1)
        return total.astype(np.float32)

    # --- the linear form: score = vector_i . target_j ---------------------------------------

    @functools.cached_property
    def _targets(self) -> list[np.ndarray]:
        return [files.load_npy(self.layout.trak_target_grads(m)) for m in range(self.n_models)]

    @functools.cached_property
    def target_vectors(self) -> np.ndarray:
        """(n_val, M*k) float32 concat_m(g_m) of every validation pair."""
        return np.concatenate(self._targets, axis=1).astype(np.float32)

    def vectors(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """(len(rows), M*k) float32 exact training vectors concat_m(phi_m[i]) * mean_m(Q_m[i])
        / M of some rows, from traker's store (the float32 features)."""
        rows = np.asarray(rows)
        features, weights = (
            [files.load_npy(path(m), mmap=True)[rows] for m in range(self.n_models)]
            for path in (self.layout.trak_features, self.layout.trak_out_to_loss)
        )
        return trak_vectors(features, weights)
