"""The attribution methods an evaluation compares: the run's TRAK scores and the baselines.

Each gives an (n_train, n_val) score matrix: ``trak`` (the run's scores: ``TrakScores``, which
never forms the matrix of a run in the top-k form), CLIP similarities, gradient dot products in
the run's projected gradients (TracIn-style), and random scores. ``predict`` and ``column`` take
either kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine import files
from engine.errors import EvalError
from engine.evaluate import stats
from engine.explore.scores import StoredScores
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

METHODS = {
    "trak": "trakview's TRAK scores (the run's, in either form)",
    "clip-image": "cosine similarity of the training image to the target image (ensemble CLIP)",
    "clip-text": "cosine similarity of the training caption to the target caption (ensemble CLIP)",
    "clip-pair": "mean of the image-image and caption-caption CLIP similarities",
    "grad-dot": "gradient dot product of the training pair and the target at each of the run's "
    "M checkpoints, averaged (TracIn-style; TracIn's sum over training when the checkpoints are "
    "epochs of one run), in the run's projected gradients",
    "random": "independent standard normal scores (seeded)",
}


class TrakScores:
    """A run's TRAK scores in either form, as the evaluations use them: predictions for
    subsets, and single columns."""

    def __init__(self, run: Path) -> None:
        layout = RunLayout(run)
        self.stored = StoredScores(layout, open_manifest(run))

    def column(self, j: int) -> np.ndarray:
        return self.stored.column(j)

    def predict(self, masks: np.ndarray, block: int = 65536) -> np.ndarray:
        """(N, n_val) float64 the scores summed over each subset: masks @ scores. In the
        top-k form, (masks @ V) @ G^T with the training vectors V read ``block`` rows at a time:
        memory (N + n_val) x M*k, never n_train x n_val."""
        stored = self.stored
        if stored.matrix is not None:
            return stats.subset_predictions(stored.matrix, masks)
        summed = np.zeros((masks.shape[0], stored.target_vectors.shape[1]), np.float64)
        for s in range(0, stored.n_train, block):
            rows = np.arange(s, min(stored.n_train, s + block))
            summed += masks[:, rows].astype(np.float64) @ stored.vectors(rows)
        return summed @ stored.target_vectors.T.astype(np.float64)


def predict(scores: np.ndarray | TrakScores, masks: np.ndarray) -> np.ndarray:
    """(N, n_val) a method's scores summed over each subset (``masks``: (N, n_train))."""
    if isinstance(scores, TrakScores):
        return scores.predict(masks)
    return stats.subset_predictions(scores, masks)


def column(scores: np.ndarray | TrakScores, j: int) -> np.ndarray:
    """(n_train,) a method's scores for validation pair j."""
    return scores.column(j) if isinstance(scores, TrakScores) else scores[:, j]


def method_scores(run: Path, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """(n_train, n_val) scores of each named method (``METHODS``) for a run."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise EvalError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    run = Path(run)
    layout = RunLayout(run)
    n_models = open_manifest(run).n_models
    emb = {
        (s, m): files.load_npy(layout.embeddings(s, m))
        for s in ("train", "val")
        for m in ("image", "text")
    }
    out = {}
    for name in names:
        if name == "trak":
            out[name] = TrakScores(run)
        elif name in ("clip-image", "clip-text"):
            mod = name.split("-")[1]
            out[name] = emb[("train", mod)] @ emb[("val", mod)].T
        elif name == "clip-pair":
            image = emb[("train", "image")] @ emb[("val", "image")].T
            out[name] = (image + emb[("train", "text")] @ emb[("val", "text")].T) / 2
        elif name == "grad-dot":
            out[name] = stats.grad_dot_scores(
                *trak_store_arrays(run, range(n_models), ("grads", "val"))
            )
        else:
            n_train, n_val = emb[("train", "image")].shape[0], emb[("val", "image")].shape[0]
            out[name] = stats.random_scores(n_train, n_val, seed)
    return out


def trak_store_arrays(run: Path, model_ids: Any, kinds: tuple[str, ...]) -> list[list[np.ndarray]]:
    """Per kind, the arrays of checkpoints ``model_ids`` in the run's traker store (memmaps):
    ``grads`` (X_m), ``features`` (phi_m), ``val`` (target gradients), ``out_to_loss``."""
    layout = RunLayout(run)
    paths = {
        "features": layout.trak_features,
        "out_to_loss": layout.trak_out_to_loss,
        "val": layout.trak_target_grads,
        "grads": layout.trak_grads,
    }
    result = []
    for kind in kinds:
        arrays = []
        for m in model_ids:
            path = paths[kind](m)
            if not path.is_file():
                raise EvalError(f"{path} is missing: the run's trak/ store is needed for this")
            arrays.append(np.load(path, mmap_mode="r"))
        result.append(arrays)
    return result


def store_trak_scores(run: Path, model_ids: list[int]) -> np.ndarray:
    """TRAK scores from the run's traker store using only checkpoints ``model_ids``."""
    return stats.trak_scores(
        *trak_store_arrays(Path(run), model_ids, ("features", "val", "out_to_loss"))
    )
