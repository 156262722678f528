"""The attribution methods an evaluation compares: the run's TRAK scores and the baselines.

Each gives an (n_train, n_val) score matrix: ``trak`` (the run's scores), CLIP similarities,
gradient dot products in the run's projected gradients (TracIn-style), and random scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine import files
from engine.errors import EvalError
from engine.evaluate import stats
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

METHODS = {
    "trak": "trakview's TRAK scores (scores.npy)",
    "clip-image": "cosine similarity of the training image to the target image (ensemble CLIP)",
    "clip-text": "cosine similarity of the training caption to the target caption (ensemble CLIP)",
    "clip-pair": "mean of the image-image and caption-caption CLIP similarities",
    "grad-dot": "gradient dot product of the training pair and the target at each of the run's "
    "M checkpoints, averaged (TracIn-style; TracIn's sum over training when the checkpoints are "
    "epochs of one run), in the run's projected gradients",
    "random": "independent standard normal scores (seeded)",
}


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
            out[name] = files.load_npy(layout.scores)
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
