"""``trakview eval``: are a run's attributions right? Counterfactual checks with retrained models.

Two checks of the TRAK paper (Park et al. 2023):

- **LDS**, the linear datamodeling score (Section 2): draw N random training subsets S_s (each a
  fraction alpha of the pairs), train models on each with the run's trainer, and measure the
  model output y_s,j (the attributed CLIP margin, ``engine.retrain.model_output``) of every
  validation pair j. A method with scores tau predicts g_s,j = sum_{i in S_s} tau_ij; its LDS for
  target j is the Spearman correlation over subsets of g_.,j and y_.,j, and the LDS is the mean
  over targets. The confidence interval is a bootstrap over subsets and targets jointly, paired
  across methods (the same resamples), so differences between methods get their own interval.
- **Removal** (Section 5, counterfactual evaluation): retrain without the top-k positive
  influencers of a target (and, as controls, without the top-k by CLIP similarity and without k
  random pairs) and measure how the target's margin changes against a model trained on every
  pair with the same seed.

The statistics (ranks, Spearman, predictions, bootstrap, score matrices) live in
``engine.evaluate.stats``; ``evaluate_lds`` (here) and ``removal.evaluate_removal`` read the run,
train what is not cached under ``RUN/eval/`` and write their results there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import files
from engine.errors import EvalError
from engine.evaluate import common, retrain, stats
from engine.evaluate.methods import METHODS, method_scores, predict
from engine.explore.trust import lds_trust
from engine.models import train
from engine.run.layout import RunLayout
from engine.run.lock import run_lock
from engine.run.manifest import open_manifest

log = logging.getLogger(__name__)


@dataclass
class LdsConfig:
    """Settings of ``trakview eval lds`` (recorded in lds.json)."""

    subsets: int = 64  # random training subsets, one or more models trained on each
    fraction: float = 0.5  # share of the training pairs in each subset
    models_per_subset: int = 1  # models per subset (their outputs are averaged)
    seed: int = 0  # seeds the subsets, the models' seeds, the random baseline and the bootstrap
    bootstrap: int = 1000  # bootstrap resamples of the confidence interval
    level: float = 0.95  # confidence level
    workers: int = 0  # models trained side by side, one CPU thread each; 0 = one per core
    keep_models: bool = False  # keep the subset models' checkpoints (13 MB each for tiny)
    methods: list[str] = field(default_factory=lambda: list(METHODS))


def evaluate_lds(
    run: str | os.PathLike,
    cfg: LdsConfig,
    train_cfg: train.TrainConfig,
    device: str = "cpu",
    overwrite: bool = False,
    train_source: str = "defaults",
) -> dict[str, Any]:
    """LDS of the run's scores and the baselines; trains the subset models not cached yet.

    Args:
        run: a finished run directory.
        cfg: subsets, fraction, models per subset, seed, bootstrap, workers.
        train_cfg: the trainer of the run's checkpoints (model, epochs, lr, batch size, ...).
        overwrite: delete cached subset models made with other settings.
        train_source: where ``train_cfg`` came from (recorded).

    Returns:
        The content of ``RUN/eval/lds.json`` (also written there).
    """
    open_manifest(run)  # a missing or unfinished run is refused before anything is written
    with run_lock(run):
        return _evaluate_lds(run, cfg, train_cfg, device, overwrite, train_source)


def _evaluate_lds(
    run: str | os.PathLike,
    cfg: LdsConfig,
    train_cfg: train.TrainConfig,
    device: str,
    overwrite: bool,
    train_source: str,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = Path(run)
    layout = RunLayout(run)
    manifest = open_manifest(run)
    n_train = manifest.counts.n_train
    if not 0 < cfg.fraction < 1:
        raise EvalError(f"--fraction must be between 0 and 1 (exclusive), got {cfg.fraction}")
    if cfg.subsets < 3:
        raise EvalError(f"--subsets must be at least 3 (a rank correlation), got {cfg.subsets}")
    if not 1 <= cfg.models_per_subset <= 99:
        raise EvalError(f"--models-per-subset must be 1..99, got {cfg.models_per_subset}")
    common.check_trainable(int(round(cfg.fraction * n_train)), train_cfg, "each subset")
    scores = method_scores(run, cfg.methods, seed=cfg.seed)

    cache = layout.eval_cache("lds")
    identity = {**common.identity(manifest, train_cfg), "fraction": cfg.fraction, "seed": cfg.seed}
    common.open_cache(cache, identity, overwrite)
    masks = stats.subset_masks(n_train, cfg.subsets, cfg.fraction, cfg.seed)
    files.save_npy(cache.subsets, masks)
    keys = [[f"s{s:05d}-r{r:02d}" for r in range(cfg.models_per_subset)] for s in range(len(masks))]
    jobs = [
        retrain.Job(keys[s][r], np.flatnonzero(masks[s]), stats.subset_model_seed(cfg.seed, s, r))
        for s in range(len(masks))
        for r in range(cfg.models_per_subset)
    ]
    todo = [j for j in jobs if not cache.output(j.key).is_file()]
    work = {"trained": 0, "reused": len(jobs), "seconds": 0.0}
    if todo:
        ctx = common.retrain_context(run, manifest, train_cfg, device)
        work = retrain.run_jobs(
            ctx,
            jobs,
            cache,
            workers=common.workers(cfg.workers),
            keep_models=cfg.keep_models,
            desc="training subset models",
        )
    per_model = np.stack([retrain.load_outputs(cache, row) for row in keys])
    outputs = per_model.mean(axis=1)  # (N, n_val): (N, R, n_val) averaged over each subset's models
    files.save_npy(cache.outputs, outputs.astype(np.float32))
    # How much the seed noise caps every method's LDS: the rank agreement, over subsets, of two
    # models per subset. A method predicting the expected output perfectly reaches only about the
    # square root of this per model (of R r / (1 + (R - 1) r) for the mean of R models).
    reliability = (
        float(np.nanmean(stats.spearman_columns(per_model[:, 0], per_model[:, 1])))
        if cfg.models_per_subset >= 2
        else None
    )

    t_score = time.perf_counter()
    predictions = {k: predict(v, masks) for k, v in scores.items()}
    methods = stats.bootstrap_lds(predictions, outputs, cfg.bootstrap, cfg.seed, cfg.level)
    for name in methods:
        methods[name]["description"] = METHODS[name]
    result = {
        "format": common.FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": asdict(cfg),
        "train": asdict(train_cfg),
        "train_source": train_source,
        "model_output": identity["model_output"],
        "counts": {"subsets": len(masks), "models": len(jobs), "n_val": outputs.shape[1]},
        "split_half_reliability": reliability,
        "methods": methods,
        "trust": lds_trust(methods),
        "timings": {
            "models_trained": work["trained"],
            "models_reused": work["reused"],
            "training_seconds": work["seconds"],
            "scoring_seconds": round(time.perf_counter() - t_score, 3),
            "total_seconds": round(time.perf_counter() - t0, 3),
        },
    }
    files.write_json(layout.lds_result, result)
    return result


def load_lds_cache(run: Path, subsets: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, n_train), outputs (N, n_val)) of the run's last LDS evaluation, to score other
    methods against the same retrained models."""
    cache = RunLayout(run).eval_cache("lds")
    if not cache.outputs.is_file():
        raise EvalError(f"{run} has no LDS evaluation yet: run `trakview eval lds {run}` first")
    masks, outputs = files.load_npy(cache.subsets), files.load_npy(cache.outputs)
    return masks[:subsets], outputs[:subsets]
