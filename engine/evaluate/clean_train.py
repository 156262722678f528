"""Training the models of ``trakview eval clean``: each model's validation margins and
embeddings, cached the moment it is measured (``RUN/eval/clean/outputs/KEY.npy``)."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from engine import files, parallel
from engine.evaluate import common, retrain
from engine.models import train
from engine.models.checkpoints import load_into
from engine.models.embed import encode
from engine.models.factory import create
from engine.run.layout import EvalCache


def model_outputs(
    ctx: retrain.RetrainContext, job: retrain.Job, work: Path, keep_model: bool
) -> tuple[np.ndarray, float]:
    """Trains one model (``retrain.train_and_measure``) and returns (n_val, 1 + 2d) float32: its
    validation margins, image and text embeddings; and the seconds it took."""
    t0 = time.perf_counter()
    margin = retrain.train_and_measure(ctx, job, work, keep_model=True)  # (n_val,)
    bundle = create(ctx.train_cfg.model, device=ctx.device)
    load_into(bundle.model, train.final_checkpoint(work, 0, ctx.train_cfg.epochs))
    with retrain.torch_threads(1):
        images, texts = encode(
            bundle.model,
            torch.from_numpy(ctx.val_images),
            torch.from_numpy(ctx.val_tokens),
            device=ctx.device,
        )  # (n_val, d) each
    if not keep_model:
        shutil.rmtree(work, ignore_errors=True)
    out = np.concatenate([margin[:, None], images.numpy(), texts.numpy()], axis=1)
    return out.astype(np.float32), time.perf_counter() - t0


def run_models(
    jobs: list[retrain.Job],
    cache: EvalCache,
    run: Path,
    manifest: Any,
    train_cfg: train.TrainConfig,
    device: str,
    workers: int,
    keep_models: bool,
) -> dict[str, Any]:
    """Trains the jobs not cached yet (side by side, one CPU thread each, as
    ``retrain.run_jobs``) and caches each model's outputs the moment it is measured."""
    todo = [j for j in jobs if not cache.output(j.key).is_file()]
    t0 = time.perf_counter()
    if todo:
        ctx = common.retrain_context(run, manifest, train_cfg, device)
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="training", unit="model")

        def save(job: retrain.Job, out: np.ndarray, seconds: float) -> None:
            meta = {
                "seed": job.seed,
                "n_rows": len(job.rows),
                "rows_sha256": retrain.rows_digest(job.rows),
            }
            files.write_json(cache.output_info(job.key), {**meta, "seconds": round(seconds, 3)})
            files.save_npy(cache.output(job.key), out)  # last: its presence means "done"
            bar.update(1)

        workers = common.workers(workers)
        if workers <= 1 or len(todo) <= 1 or device != "cpu":
            for job in todo:
                save(job, *model_outputs(ctx, job, cache.checkpoints_dir / job.key, keep_models))
        else:
            with parallel.Pool(min(workers, len(todo)), 1) as pool:
                futures = {
                    pool.submit(
                        model_outputs, ctx, job, cache.checkpoints_dir / job.key, keep_models
                    ): job
                    for job in todo
                }
                for future in cf.as_completed(futures):
                    save(futures[future], *future.result())
        bar.close()
    return {
        "models_trained": len(todo),
        "models_reused": len(jobs) - len(todo),
        "training_seconds": round(time.perf_counter() - t0, 3),
    }
