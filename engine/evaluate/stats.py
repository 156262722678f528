"""The statistics of the counterfactual evaluation (``engine.evaluate``): ranks, Spearman
correlations, the linear datamodeling score with paired bootstrap intervals, random subsets, and
the score matrices of the methods built from arrays. Arrays in, arrays out; nothing is read or
written here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

REFERENCE = "trak"  # the method whose difference to every other method gets an interval


def rank_columns(x: np.ndarray) -> np.ndarray:
    """Ranks (1..n) of each column of ``x`` (n, c), ties sharing their average rank."""
    n, _ = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, axis=0)
    pos = np.arange(n)[:, None]
    starts = np.ones(xs.shape, dtype=bool)
    starts[1:] = xs[1:] != xs[:-1]
    ends = np.ones(xs.shape, dtype=bool)
    ends[:-1] = xs[:-1] != xs[1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=0)  # start of each tie run
    last = np.minimum.accumulate(np.where(ends, pos, n)[::-1], axis=0)[::-1]
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    return ranks


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=0) / den, np.nan)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(c,) Spearman correlation of each column of ``a`` with the same column of ``b`` (n, c);
    NaN where a column is constant."""
    return _pearson_columns(rank_columns(a), rank_columns(b))


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, n_val) the sum of a method's scores over each subset: masks (N, n_train) @ scores."""
    return masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64)


def lds_per_target(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(n_val,) LDS of each target: Spearman over subsets of predicted and actual outputs.

    Args:
        scores: (n_train, n_val) attribution scores.
        masks: (N, n_train) bool, the training pairs of each subset.
        outputs: (N, n_val) model output of each target for models trained on each subset.
    """
    return spearman_columns(subset_predictions(scores, masks), outputs)


def bootstrap_lds(
    predictions: dict[str, np.ndarray],
    outputs: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    reference: str | None = REFERENCE,
) -> dict[str, dict[str, Any]]:
    """LDS of every method with a bootstrap confidence interval.

    Each resample draws subsets (rows) and targets (columns) with replacement, the same draw for
    every method, so the interval of a difference between two methods is paired.

    Args:
        predictions: method -> (N, n_val) subset predictions (``subset_predictions``).
        outputs: (N, n_val) actual outputs.
        reference: a method whose difference to every other method gets an interval too.

    Returns:
        method -> ``{"lds", "ci": [low, high], "half_width", "per_target",
        "reference_minus_this": {"mean", "ci"}}`` (the last only beside a reference).
    """
    n_sub, n_val = outputs.shape
    rng = np.random.default_rng(seed)
    per_target = {k: spearman_columns(p, outputs) for k, p in predictions.items()}
    reps = {k: np.empty(n_boot) for k in predictions}
    for b in range(n_boot):
        rows = rng.integers(0, n_sub, n_sub)
        weights = np.bincount(rng.integers(0, n_val, n_val), minlength=n_val).astype(np.float64)
        ranked_out = rank_columns(outputs[rows])
        for name, pred in predictions.items():
            rho = _pearson_columns(rank_columns(pred[rows]), ranked_out)
            ok = ~np.isnan(rho) & (weights > 0)
            reps[name][b] = (rho[ok] * weights[ok]).sum() / weights[ok].sum() if ok.any() else 0
    tails = [(1 - level) / 2, 1 - (1 - level) / 2]
    point = {name: float(np.nanmean(rho)) for name, rho in per_target.items()}
    result = {}
    for name, rho in per_target.items():
        low, high = np.quantile(reps[name], tails)
        result[name] = {
            "lds": point[name],
            "ci": [float(low), float(high)],
            "half_width": float((high - low) / 2),
            "per_target": [None if np.isnan(v) else round(float(v), 5) for v in rho],
        }
        if reference in predictions and name != reference:
            result[name]["reference_minus_this"] = {
                "mean": point[reference] - point[name],
                "ci": [float(v) for v in np.quantile(reps[reference] - reps[name], tails)],
            }
    return result


def subset_masks(n_train: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """(count, n_train) bool: subset s holds round(fraction * n_train) pairs drawn from the
    generator seeded by (seed, s), so a longer evaluation starts with the same subsets."""
    size = int(round(fraction * n_train))
    masks = np.zeros((count, n_train), dtype=bool)
    for s in range(count):
        masks[s, np.random.default_rng([seed, s]).choice(n_train, size, replace=False)] = True
    return masks


def subset_model_seed(seed: int, subset: int, model: int) -> int:
    """Seed (initialisation, data order) of model ``model`` of subset ``subset``."""
    return 10_000_000 * (seed + 1) + 100 * subset + model


def mean_ci(values: np.ndarray, n_boot: int, seed: int, level: float) -> list[float]:
    """Bootstrap percentile interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    return [float(v) for v in np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])]


def trak_scores(
    features: list[np.ndarray], target_grads: list[np.ndarray], out_to_loss: list[np.ndarray]
) -> np.ndarray:
    """(n_train, n_val) TRAK scores from per-checkpoint store arrays (TRAK paper eq. 9, as
    traker's ``finalize_scores``): mean_m(phi_m @ g_m^T) * mean_m(out_to_loss_m).

    Args:
        features: per checkpoint (n_train, k) phi_m = X_m (X_m^T X_m + lambda I)^-1.
        target_grads: per checkpoint (n_val, k) projected target gradients g_m.
        out_to_loss: per checkpoint (n_train, 1) or (n_train,) 1 - p.
    """
    m = len(features)
    total = sum(
        np.asarray(f, np.float32) @ np.asarray(g, np.float32).T
        for f, g in zip(features, target_grads, strict=True)
    )
    weight = sum(np.asarray(q, np.float32).reshape(-1, 1) for q in out_to_loss) / m
    return (total / m * weight).astype(np.float32)


def grad_dot_scores(train_grads: list[np.ndarray], target_grads: list[np.ndarray]) -> np.ndarray:
    """(n_train, n_val) mean over checkpoints of the projected gradient dot products x_m . g_m."""
    total = sum(
        np.asarray(x, np.float32) @ np.asarray(g, np.float32).T
        for x, g in zip(train_grads, target_grads, strict=True)
    )
    return (total / len(train_grads)).astype(np.float32)


def random_scores(n_train: int, n_val: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7]).standard_normal((n_train, n_val)).astype(np.float32)
