"""Retraining for the counterfactual evaluation: models trained on subsets of a run's training
pairs with the run's trainer, and their model output on the run's validation pairs.

The model output is the quantity TRAK attributes: the CLIP margin of each validation pair
(TRAK paper, Section 5.1.1; ``engine.models.embed.clip_margin``) over the run's simulated target
batches (``SimulatedBatch.for_targets``), the margin of a model being the mean over the run's M
batch draws. Every retrained model is one ``engine.models.train.train_member`` call (the run's
trainer) with one CPU thread, so its result does not depend on how many run side by side.

A model's output is cached in an ``EvalCache`` (with seed, rows, seconds) the moment it is
measured; its checkpoint lives in the cache's ``checkpoints/KEY/`` while it trains (so a killed
evaluation resumes mid-training) and is deleted afterwards unless ``keep_models``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from engine import files, parallel
from engine.attribution.margin import SimulatedBatch
from engine.data.loading import image_tensors, tokenize
from engine.data.pairs import PairSet
from engine.models import train
from engine.models.checkpoints import load_into
from engine.models.embed import clip_margin, encode
from engine.models.factory import create
from engine.run.layout import EvalCache, RunLayout
from engine.run.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class RetrainContext:
    """What every retrained model needs: the run's inputs, trainer settings and target batches."""

    train_images: np.ndarray  # (n_train, 3, H, W) float32, preprocessed
    train_tokens: np.ndarray  # (n_train, context_length) int64
    val_images: np.ndarray  # (n_val, 3, H, W)
    val_tokens: np.ndarray  # (n_val, context_length)
    draws: np.ndarray  # (D, S) int64: the run's simulated target batches, one per checkpoint
    train_cfg: train.TrainConfig
    device: str = "cpu"


@dataclass(frozen=True)
class Job:
    """One model to train: on training rows ``rows`` with seed ``seed``; cached under ``key``."""

    key: str
    rows: np.ndarray  # sorted training rows the model sees
    seed: int  # initialisation and data order (``train_member`` with this seed)


def target_draws(n_train: int, sim_batch_size: int, seed: int, n_draws: int) -> np.ndarray:
    """(n_draws, S) the run's simulated target batches (``SimulatedBatch.for_targets``)."""
    sim = SimulatedBatch(n_train, sim_batch_size, seed=seed)
    return np.stack([sim.for_targets(1, m)[0].numpy() for m in range(n_draws)])


@torch.no_grad()
def model_output(
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_tokens: torch.Tensor,
    val_images: torch.Tensor,
    val_tokens: torch.Tensor,
    draws: np.ndarray,
    device: str = "cpu",
) -> np.ndarray:
    """(n_val,) the CLIP margin of every validation pair, mean over the simulated batches.

    Args:
        model: the open_clip model whose output is measured.
        train_images, train_tokens: all training pairs' inputs (only the drawn rows are encoded).
        val_images, val_tokens: the validation pairs' inputs.
        draws: (D, S) training rows of each simulated target batch.
    """
    needed = np.unique(draws)  # (U,)
    tr_img, tr_txt = encode(
        model, train_images[needed], train_tokens[needed], device=device
    )  # (U, d)
    va_img, va_txt = encode(model, val_images, val_tokens, device=device)  # (n_val, d)
    va_img, va_txt = va_img.numpy(), va_txt.numpy()
    n_val = va_img.shape[0]
    total = np.zeros(n_val, dtype=np.float64)
    for draw in draws:
        pos = np.searchsorted(needed, draw)  # (S,) rows of the encoded batch
        shape = (n_val, len(draw), va_img.shape[1])
        sim_img = np.broadcast_to(tr_img.numpy()[pos], shape)  # (n_val, S, d), no copy
        sim_txt = np.broadcast_to(tr_txt.numpy()[pos], shape)
        total += clip_margin(va_img, va_txt, sim_img, sim_txt)
    return (total / len(draws)).astype(np.float32)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` torch CPU threads, then restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_and_measure(ctx: RetrainContext, job: Job, work: Path, keep_model: bool) -> np.ndarray:
    """Trains one model on ``job.rows`` (one CPU thread) and returns its (n_val,) output."""
    cfg = replace(ctx.train_cfg, seed=job.seed, members=1, threads=0, save_epochs=[])
    rows = torch.from_numpy(job.rows)
    with torch_threads(1):
        path = train.train_member(
            torch.from_numpy(ctx.train_images)[rows],
            torch.from_numpy(ctx.train_tokens)[rows],
            cfg,
            0,
            work,
            device=ctx.device,
            progress=False,
        )
        bundle = create(cfg.model, device=ctx.device)
        load_into(bundle.model, path)
        out = model_output(
            bundle.model,
            torch.from_numpy(ctx.train_images),
            torch.from_numpy(ctx.train_tokens),
            torch.from_numpy(ctx.val_images),
            torch.from_numpy(ctx.val_tokens),
            ctx.draws,
            device=ctx.device,
        )
    if not keep_model:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _timed(ctx: RetrainContext, job: Job, work: Path, keep_model: bool) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = train_and_measure(ctx, job, work, keep_model)
    return out, time.perf_counter() - t0


def rows_digest(rows: np.ndarray) -> str:
    """Short content hash of a set of training rows (recorded with each cached model)."""
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def run_jobs(
    ctx: RetrainContext,
    jobs: list[Job],
    cache: EvalCache,
    workers: int = 1,
    keep_models: bool = False,
    desc: str = "retraining",
) -> dict[str, Any]:
    """Trains every job whose output is not cached yet and caches its output.

    Args:
        cache: where outputs are cached (models train in its checkpoints folder).
        workers: processes training side by side (one CPU thread each); 1 = in this process.

    Returns:
        ``{"trained": n, "reused": n, "seconds": wall seconds}`` of this call.
    """
    todo = [j for j in jobs if not cache.output(j.key).is_file()]
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="model")

    def save(job: Job, out: np.ndarray, seconds: float) -> None:
        meta = {"seed": job.seed, "n_rows": len(job.rows), "rows_sha256": rows_digest(job.rows)}
        files.write_json(cache.output_info(job.key), {**meta, "seconds": round(seconds, 3)})
        files.save_npy(cache.output(job.key), out)  # last: its presence means "done"
        bar.update(1)

    if workers <= 1 or len(todo) <= 1 or ctx.device != "cpu":
        for job in todo:
            save(job, *_timed(ctx, job, cache.checkpoints_dir / job.key, keep_models))
    else:
        # engine.parallel's processes: spawned (a fork would copy torch's thread pools) and
        # without the caller's __main__ (a script, a notebook or a dashboard is not run again);
        # an error or an interrupt stops the others at once, finished models are kept
        with parallel.Pool(min(workers, len(todo)), 1) as pool:
            futures = {
                pool.submit(_timed, ctx, job, cache.checkpoints_dir / job.key, keep_models): job
                for job in todo
            }
            for future in cf.as_completed(futures):
                save(futures[future], *future.result())
    bar.close()
    return {
        "trained": len(todo),
        "reused": len(jobs) - len(todo),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def load_outputs(cache: EvalCache, keys: list[str]) -> np.ndarray:
    """(len(keys), n_val) cached outputs, in the order of ``keys``."""
    return np.stack([files.load_npy(cache.output(k)) for k in keys])


def load_inputs(
    run: Path, model_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The run's training and validation pairs as model inputs (images, tokens) x 2, numpy."""
    bundle = create(model_name)
    layout = RunLayout(run)
    out = []
    for split in ("train", "val"):
        pairs = PairSet(files.read_jsonl(layout.pairs(split)), Path(run).resolve())
        images = image_tensors(pairs, bundle.preprocess, progress=False)
        tokens = tokenize(bundle.tokenizer, pairs.captions)
        out += [images.numpy(), tokens.numpy()]
    return out[0], out[1], out[2], out[3]


def run_train_config(run: Path, manifest: Manifest) -> tuple[dict[str, Any], str | None]:
    """The training settings recorded beside the run's checkpoints, if any.

    ``train_ensemble`` writes ``OUT/train_config.json`` and its checkpoints are
    ``OUT/member-K/checkpoints/epoch_N.pt``.

    Returns:
        (the recorded TrainConfig fields, the file they came from), or ({}, None).
    """
    known = {f.name for f in fields(train.TrainConfig)}
    for path in manifest.checkpoint_paths(run):
        if len(path.parents) < 3:
            continue
        candidate = path.parents[2] / train.TRAIN_CONFIG_FILE
        if candidate.is_file():
            recorded = train.read_settings(candidate)
            # checkpoints kept beside the run are recorded as RUN/../models/...: say models/...
            return {k: v for k, v in recorded.items() if k in known}, os.path.normpath(candidate)
    return {}, None


def train_settings(cfg: train.TrainConfig) -> dict[str, Any]:
    """The settings that define a retrained model (what a cache must agree on)."""
    out = asdict(cfg)
    # per-model seeds; threads are always 1; a retrained model keeps only its final epoch
    for key in ("members", "seed", "threads", "save_epochs"):
        out.pop(key)
    return out
