"""The work of each unit of the build graph (``engine.assemble.graph``), in whichever process runs
it.

Gradients, projections and scores are computed by traker's ``TRAKer`` with trakview's extension
points (``engine.attribution``), one shard at a time: ``ShardSaver`` is a traker saver that holds
one shard's arrays in memory, and each unit writes its own files. X^T X is the sum of the shards'
X_s^T X_s (``RegularizedScoreComputer.get_xtx`` per shard), and the features of a shard are
``RegularizedScoreComputer.get_x_xtx_inv`` of its rows with the whole X^T X and its lambda.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import files
from engine.assemble.context import WorkContext
from engine.assemble.graph import Unit, unit_id
from engine.attribution.settings import MAX_CONDITION
from engine.attribution.summaries import summarize_block
from engine.models.embed import encode
from engine.run.layout import TARGETS

log = logging.getLogger(__name__)
EMBED_BATCH = 256


def run_unit(unit: Unit, ctx: WorkContext) -> dict[str, Any]:
    """Runs one unit unless its done-marker exists; returns the marker."""
    if ctx.layout.unit_done(unit.id):
        return ctx.marker(unit.id)
    t0 = time.perf_counter()
    info = RUNNERS[unit.kind](unit, ctx, t0)
    consumed = info.pop("consumed", None)  # a gather's shard folder
    marker = {
        "unit": unit.id,
        "seconds": round(time.perf_counter() - t0, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **info,
    }
    files.write_json(ctx.layout.unit(unit.id), marker)
    if consumed is not None:  # only now: a gather stopped before its marker must find them again
        shutil.rmtree(ctx.layout.shard_dir(consumed), ignore_errors=True)
        with contextlib.suppress(OSError):  # the last gather leaves no folder in shards/
            ctx.layout.shards_dir.rmdir()
    return marker


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Drops one logger's records: the per-shard calls would repeat the reduce's warning."""

    def drop(record: logging.LogRecord) -> bool:
        return False

    logger = logging.getLogger(logger_name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _save(ctx: WorkContext, group: str, name: str, shard: int, array: Any) -> None:
    files.save_npy(ctx.layout.shard(group, name, shard), np.asarray(array))


def _load(ctx: WorkContext, group: str, name: str, shard: int) -> np.ndarray:
    return files.load_npy(ctx.layout.shard(group, name, shard))


def _gather_rows(parts: list[Path], dest: Path) -> None:
    """Concatenates row shards into one npy file, one shard in memory at a time."""
    first = np.load(parts[0], mmap_mode="r")
    n = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)
    with files.atomic_path(dest) as tmp:
        out = np.lib.format.open_memmap(tmp, "w+", first.dtype, (n, *first.shape[1:]))
        row = 0
        for p in parts:
            block = np.load(p, mmap_mode="r")
            out[row : row + len(block)] = block
            row += len(block)
        out.flush()
        del out


# --- the units ---------------------------------------------------------------------------------


def _embed(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    model = ctx.bundle.model
    model.load_state_dict(ctx.state(unit.model_id))
    img, txt = [], []
    for _, x, tokens in ctx.stream(unit.split, unit.rows, EMBED_BATCH):
        i, t = encode(model, x, tokens, batch_size=len(x), device=ctx.cfg.device)
        img.append(i.numpy())
        txt.append(t.numpy())
    group = f"embed-{unit.model_id}"
    _save(ctx, group, f"{unit.split}_image", unit.shard, np.concatenate(img))  # (n_s, d)
    _save(ctx, group, f"{unit.split}_text", unit.shard, np.concatenate(txt))
    return {"pairs": unit.rows[1] - unit.rows[0]}


def _gather_embed(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, group = unit.model_id, f"embed-{unit.model_id}"
    for split in ("train", "val"):
        for modality in ("image", "text"):
            parts = [
                ctx.layout.shard(group, f"{split}_{modality}", s)
                for s in range(len(ctx.shards(split)))
            ]
            _gather_rows(parts, ctx.layout.checkpoint_embeddings(split, modality, m))
    units = list(unit.deps)
    images = sum(ctx.marker(u)["pairs"] for u in units)
    seconds = round(ctx.seconds(units) + time.perf_counter() - t0, 3)
    ctx.layout.mark_stage(
        f"embed-{m}",
        {"seconds": seconds, "images_per_second": round(images / max(seconds, 1e-9), 1)},
    )
    return {"consumed": group}


def _featurize(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, (start, stop) = unit.model_id, unit.rows
    ctx.set_embeddings(m)
    traker = ctx.traker(stop - start, train=True)
    traker.load_checkpoint(ctx.state(m), model_id=m)
    for inds, x, tokens in ctx.stream("train", unit.rows, ctx.cfg.batch_size):
        batch = (x, tokens, ctx.sim.for_train(inds, m))
        traker.featurize(batch=batch, inds=np.asarray(inds) - start)
    cur = traker.saver.current_store
    grads = torch.as_tensor(cur["grads"], device=ctx.cfg.device)  # (n_s, k)
    xtx = traker.score_computer.get_xtx(grads)  # (k, k) float64: this shard's part of X^T X
    group = f"train-{m}"
    _save(ctx, group, "grads", unit.shard, cur["grads"])
    _save(ctx, group, "out_to_loss", unit.shard, cur["out_to_loss"])  # (n_s, 1)
    _save(ctx, group, "xtx", unit.shard, xtx.cpu().numpy())
    projector = ctx.projector
    return {
        "pairs": stop - start,
        "projection": (
            f"traker {type(projector.dense_projector).__name__} (fast_jl) + keyed token blocks"
            if projector.dense_projector is not None
            else f"trakview {type(projector).__name__} ({ctx.cfg.projector})"
        ),
        "projection_type": str(getattr(projector.proj_type, "value", projector.proj_type)),
    }


def _xtx(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    """The reduce: X^T X summed over the shards in order (as get_xtx sums its blocks), and the
    ridge term and conditioning that RegularizedScoreComputer finds for it."""
    m, n_train = unit.model_id, len(ctx.pairs["train"])
    xtx = None
    for s in range(len(ctx.shards("train"))):
        part = torch.from_numpy(_load(ctx, f"train-{m}", "xtx", s))
        xtx = part if xtx is None else xtx + part
    files.save_npy(ctx.layout.trak_xtx(m), xtx.numpy())
    k = ctx.projector.proj_dim  # X^T X is (k, k), or its diagonal blocks packed (modules)
    scorer = ctx.scorer(ctx.cfg.lambda_reg)
    with _quiet(
        "engine.attribution.scoring"
    ):  # it would name 0 training pairs: warned below with all of them
        scorer.get_x_xtx_inv(torch.zeros(0, k, device=ctx.cfg.device), xtx.to(ctx.cfg.device))
    info = {**scorer.diagnostics[-1], "n_train": n_train}
    if info["condition"] > MAX_CONDITION or (info["rank"] < k and info["lambda"] == 0):
        log.warning(
            "X^T X of checkpoint %d is badly conditioned (rank %d of %d over %d training pairs, "
            "condition %.3g with lambda %.3g): scores may be noise. Lower --proj-dim (at most "
            "about n_train / 4) or raise --lambda-reg.",
            m,
            info["rank"],
            k,
            n_train,
            info["condition"],
            info["lambda"],
        )
    featurize = [unit_id("featurize", m, s) for s in range(len(ctx.shards("train")))]
    ctx.layout.mark_stage(f"featurize-{m}", {"seconds": round(ctx.seconds(featurize), 3)})
    return {"diagnostics": info}


def _features(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, group = unit.model_id, f"train-{unit.model_id}"
    lam = ctx.marker(unit_id("xtx", m))["diagnostics"]["lambda"]
    xtx = torch.from_numpy(files.load_npy(ctx.layout.trak_xtx(m))).to(ctx.cfg.device)
    grads = torch.as_tensor(_load(ctx, group, "grads", unit.shard), device=ctx.cfg.device)
    with _quiet("engine.attribution.scoring"):
        features = ctx.scorer(lam).get_x_xtx_inv(grads, xtx)  # (n_s, k)
    _save(ctx, group, "features", unit.shard, features.to(ctx.dtype).cpu().numpy())
    return {}


def _gather_trak(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    """traker's store of checkpoint m (``trak/m/``), as ``TRAKer`` reads it."""
    m, group = unit.model_id, f"train-{unit.model_id}"
    shards = range(len(ctx.shards("train")))
    for name, path in (
        ("grads", ctx.layout.trak_grads),
        ("out_to_loss", ctx.layout.trak_out_to_loss),
        ("features", ctx.layout.trak_features),
    ):
        _gather_rows([ctx.layout.shard(group, name, s) for s in shards], path(m))
    n_train = len(ctx.pairs["train"])
    files.save_npy(ctx.layout.trak_is_featurized(m), np.ones(n_train, np.int32))
    files.write_json(
        ctx.layout.trak_model_ids(m), {str(m): {"is_featurized": 1, "is_finalized": 1}}
    )
    first = ctx.marker(unit_id("featurize", m, 0))
    files.write_json(
        ctx.layout.trak_metadata,
        {
            "JL dimension": ctx.cfg.proj_dim,
            "JL matrix type": first["projection_type"],
            "train set size": n_train,
        },
    )
    reduce = unit_id("xtx", m)
    seconds = ctx.seconds([reduce, *unit.deps]) + time.perf_counter() - t0
    diagnostics = ctx.marker(reduce)["diagnostics"]
    ctx.layout.mark_stage(f"finalize-{m}", {"seconds": round(seconds, 3), **diagnostics})
    return {"consumed": group}


def _targets(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, (start, stop) = unit.model_id, unit.rows
    ctx.set_embeddings(m)
    traker = ctx.traker(len(ctx.pairs["train"]))
    traker.saver.add_finalized(m, {})  # scored against features that other units finalize
    traker.start_scoring_checkpoint(TARGETS, ctx.state(m), model_id=m, num_targets=stop - start)
    for inds, x, tokens in ctx.stream("val", unit.rows, ctx.cfg.batch_size):
        batch = (x, tokens, ctx.sim.for_targets(len(inds), m))
        traker.score(batch=batch, inds=np.asarray(inds) - start)
    grads = traker.saver.current_store[f"{TARGETS}_grads"]  # (n_v, k)
    _save(ctx, f"val-{m}", f"{TARGETS}_grads", unit.shard, grads)
    return {"pairs": stop - start}


def _gather_targets(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, group = unit.model_id, f"val-{unit.model_id}"
    parts = [ctx.layout.shard(group, f"{TARGETS}_grads", v) for v in range(len(ctx.shards("val")))]
    _gather_rows(parts, ctx.layout.trak_target_grads(m, TARGETS))
    seconds = ctx.seconds(list(unit.deps)) + time.perf_counter() - t0
    ctx.layout.mark_stage(f"score-{m}", {"seconds": round(seconds, 3)})
    return {"consumed": group}


def _scores(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    """traker's ``finalize_scores`` over every checkpoint for one shard of targets."""
    start, stop = unit.rows
    traker = ctx.traker(len(ctx.pairs["train"]))
    for m in range(ctx.n_models):
        # copy-on-write maps: torch wants writable arrays, and the run's files stay untouched
        targets = np.load(ctx.layout.trak_target_grads(m, TARGETS), mmap_mode="c")
        traker.saver.add_finalized(
            m,
            {
                "features": np.load(ctx.layout.trak_features(m), mmap_mode="c"),
                "out_to_loss": np.load(ctx.layout.trak_out_to_loss(m), mmap_mode="c"),
                f"{TARGETS}_grads": targets[start:stop],
            },
        )
    traker.saver.init_scores(TARGETS, stop - start)
    scores = np.asarray(traker.finalize_scores(exp_name=TARGETS), dtype=np.float32)
    summary = summarize_block(scores, ctx.cfg.topk)  # top-k, histograms, row sums
    for name in (*SUMMARIES, *ROW_SUMS):
        _save(ctx, "scores", name, unit.shard, summary[name])
    if ctx.cfg.scores == "dense":
        _save(ctx, "scores", "scores", unit.shard, scores)  # (n_train, n_v)
    return {"pairs": stop - start}


# per validation pair: gathered by rows; per training pair: summed over the blocks
SUMMARIES = ("topk_pos", "topk_neg", "topk_pos_scores", "topk_neg_scores", "hist", "range")
ROW_SUMS = ("sum", "negative")


def _gather_scores(unit: Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    shards = ctx.score_shards()
    n_train, n_val = len(ctx.pairs["train"]), len(ctx.pairs["val"])
    if ctx.cfg.scores == "dense":
        with files.atomic_path(ctx.layout.scores) as tmp:
            scores = np.lib.format.open_memmap(tmp, "w+", np.float32, (n_train, n_val))
            for v, (start, stop) in enumerate(shards):
                scores[:, start:stop] = _load(ctx, "scores", "scores", v)
            scores.flush()
            del scores
    layout = ctx.layout
    destinations = {
        "topk_pos": layout.topk_pos,
        "topk_neg": layout.topk_neg,
        "topk_pos_scores": layout.topk_pos_scores,
        "topk_neg_scores": layout.topk_neg_scores,
        "hist": layout.score_hist,
        "range": layout.score_range,
    }
    for name, dest in destinations.items():
        _gather_rows([layout.shard("scores", name, v) for v in range(len(shards))], dest)
    for name, dest in (("sum", layout.train_score_sum), ("negative", layout.train_negative_mass)):
        total = np.zeros(n_train, np.float64)
        for v in range(len(shards)):  # in block order: the same sums on every executor
            total += _load(ctx, "scores", name, v)
        files.save_npy(dest, total.astype(np.float32))
    seconds = ctx.seconds(list(unit.deps)) + time.perf_counter() - t0
    layout.mark_stage("scores", {"seconds": round(seconds, 3)})
    layout.mark_stage("topk", {"k": ctx.cfg.topk})
    return {"consumed": "scores"}


RUNNERS = {
    "embed": _embed,
    "gather-embed": _gather_embed,
    "featurize": _featurize,
    "xtx": _xtx,
    "features": _features,
    "gather-trak": _gather_trak,
    "targets": _targets,
    "gather-targets": _gather_targets,
    "scores": _scores,
    "gather-scores": _gather_scores,
}
