"""What the evaluations share: the cache of retrained models and the run's trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine import files
from engine.errors import EvalError, EvalMismatchError
from engine.evaluate import retrain
from engine.models import train
from engine.run.layout import EvalCache
from engine.run.manifest import Manifest

FORMAT = 1  # version of eval/lds.json and eval/remove.json


def open_cache(cache: EvalCache, identity: dict[str, Any], overwrite: bool) -> None:
    """Creates a cache folder, or checks that an existing one was made with the same settings."""
    have = files.claim_folder(cache.folder, cache.config, identity, overwrite)
    if have is None:
        return
    diffs = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in identity.items() if have.get(k) != v]
    if diffs:
        raise EvalMismatchError(
            f"{cache.folder} holds models made with other settings ({'; '.join(diffs[:3])}). "
            "Pass --overwrite to delete them and start again, or use the same settings"
        )


def retrain_context(
    run: Path, manifest: Manifest, train_cfg: train.TrainConfig, device: str
) -> retrain.RetrainContext:
    """What every retrained model of an evaluation of ``run`` needs."""
    cfg = manifest.config
    draws = retrain.target_draws(
        manifest.counts.n_train, cfg.sim_batch_size, cfg.seed, manifest.n_models
    )
    inputs = retrain.load_inputs(run, cfg.model)
    return retrain.RetrainContext(*inputs, draws=draws, train_cfg=train_cfg, device=device)


def identity(manifest: Manifest, train_cfg: train.TrainConfig) -> dict[str, Any]:
    """What cached retrained models of a run must agree on."""
    cfg, counts = manifest.config, manifest.counts
    return {
        "format": FORMAT,
        "n_train": counts.n_train,
        "n_val": counts.n_val,
        "train": retrain.train_settings(train_cfg),
        "model_output": {
            "sim_batch_size": cfg.sim_batch_size,
            "seed": cfg.seed,
            "draws": counts.n_checkpoints,
        },
    }


def workers(requested: int) -> int:
    """Models trained side by side: ``requested``, or one per CPU core."""
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def check_trainable(n_rows: int, train_cfg: train.TrainConfig, what: str) -> None:
    """Refuses a training set smaller than one batch."""
    if n_rows < train_cfg.batch_size:
        raise EvalError(
            f"{what} has {n_rows} training pairs, fewer than one batch ({train_cfg.batch_size}); "
            "raise --fraction or lower --batch-size"
        )
