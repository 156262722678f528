"""The work of each unit of the build graph (``engine.graph``), in whichever process runs it.

Gradients, projections and scores are computed by traker's ``TRAKer`` with trakview's extension
points (``engine.trak``), one shard at a time: ``engine.shard_saver.ShardSaver`` is a traker
saver that holds one shard's arrays in memory, and each unit writes its own files. X^T X is the
sum of the shards' X_s^T X_s (``RegularizedScoreComputer.get_xtx`` per shard), and the features
of a shard are ``RegularizedScoreComputer.get_x_xtx_inv`` of its rows with the whole X^T X and
its lambda."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from trak import TRAKer

from engine import data, diagnose, embed, graph, models, store
from engine.shard_saver import ShardSaver
from engine.trak import (
    MAX_CONDITION,
    ClipMargin,
    RegularizedScoreComputer,
    SelectiveGradientComputer,
    SimulatedBatch,
    select_parameters,
)

if TYPE_CHECKING:
    from engine.attribute import BuildConfig

log = logging.getLogger(__name__)
EXPERIMENT = "val"  # traker's experiment name of the validation targets (trak/m/val_grads.mmap)
EMBED_BATCH = 256


class WorkContext:
    """What the units of one run share within one process, each made on first use: the pairs,
    the model, the current checkpoint's weights, the projection. The local executor keeps one for
    a whole build; each Ray task makes its own."""

    def __init__(self, out: Path, cfg: BuildConfig) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self._state: tuple[int, dict[str, torch.Tensor]] | None = None
        self._embeddings_of: int | None = None

    @functools.cached_property
    def pairs(self) -> dict[str, data.PairSet]:
        return {s: data.read_pairs(store.pairs_path(self.out, s)) for s in ("train", "val")}

    @property
    def n_models(self) -> int:
        return len(self.cfg.checkpoints)

    def shards(self, split: str) -> list[tuple[int, int]]:
        return graph.shard_rows(len(self.pairs[split]), self.cfg.shard_size)

    def score_shards(self) -> list[tuple[int, int]]:
        n_train, n_val = len(self.pairs["train"]), len(self.pairs["val"])
        return graph.shard_rows(n_val, graph.score_shard_size(n_train, self.cfg.shard_size))

    @functools.cached_property
    def bundle(self) -> models.ClipBundle:
        device = self.cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}, but torch sees no CUDA device on {socket.gethostname()}; "
                "give each task a GPU (--gpus-per-task 1) or build with --device cpu"
            )
        return models.create(self.cfg.model, device=device, pretrained=self.cfg.pretrained)

    @functools.cached_property
    def names(self) -> list[str]:
        return select_parameters(self.bundle.model, self.cfg.grad_params)

    @functools.cached_property
    def projector(self) -> Any:
        from engine.attribute import projector_for  # attribute runs the graph: import late

        return projector_for(self.bundle.model, self.cfg, self.names)

    @functools.cached_property
    def sim(self) -> SimulatedBatch:
        return SimulatedBatch(len(self.pairs["train"]), self.cfg.sim_batch_size, seed=self.cfg.seed)

    @functools.cached_property
    def task(self) -> ClipMargin:
        return ClipMargin()

    def state(self, m: int) -> dict[str, torch.Tensor]:
        """Checkpoint m's weights (the last one read is kept)."""
        if self._state is None or self._state[0] != m:
            self._state = None  # free the previous checkpoint first
            self._state = (m, models.read_state_dict(self.cfg.checkpoints[m]))
        return self._state[1]

    def set_embeddings(self, m: int) -> None:
        """The margin's simulated batches use checkpoint m's training embeddings."""
        if self._embeddings_of != m:
            img = store.load_npy(store.checkpoint_embeddings_path(self.out, "train", "image", m))
            txt = store.load_npy(store.checkpoint_embeddings_path(self.out, "train", "text", m))
            self.task.set_embeddings(torch.from_numpy(img), torch.from_numpy(txt))
            self._embeddings_of = m

    def stream(
        self, split: str, rows: tuple[int, int], batch_size: int
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Batches of the split's rows [start, stop), read in DataLoader workers."""
        start, stop = rows
        batches = [range(s, min(stop, s + batch_size)) for s in range(start, stop, batch_size)]
        return data.loader(
            self.pairs[split],
            self.bundle.preprocess,
            self.bundle.tokenizer,
            batch_size,
            workers=self.cfg.workers,
            batches=batches,
        )

    def scorer(self, lambda_reg: float | None) -> RegularizedScoreComputer:
        return RegularizedScoreComputer(
            self.dtype, self.cfg.device, lambda_reg=lambda_reg, lambda_rel=self.cfg.lambda_rel
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.cfg.half else torch.float32

    def traker(self, n: int) -> TRAKer:
        """A TRAKer over ``n`` pairs whose arrays live in a ``ShardSaver``."""
        return TRAKer(
            model=self.bundle.model,
            task=self.task,
            train_set_size=n,
            save_dir=str(store.trak_dir(self.out)),
            load_from_save_dir=False,
            device=self.cfg.device,
            gradient_computer=SelectiveGradientComputer,
            projector=self.projector,
            saver=ShardSaver,
            score_computer=functools.partial(
                RegularizedScoreComputer, lambda_rel=self.cfg.lambda_rel
            ),
            use_half_precision=self.cfg.half,
            grad_wrt=self.names,
            lambda_reg=self.cfg.lambda_reg,
            logging_level=logging.WARNING,
        )

    def marker(self, unit_id: str) -> dict[str, Any]:
        return store.read_json(store.unit_path(self.out, unit_id))

    def seconds(self, unit_ids: list[str]) -> float:
        return sum(self.marker(u)["seconds"] for u in unit_ids)


def run_unit(unit: graph.Unit, ctx: WorkContext) -> dict[str, Any]:
    """Runs one unit unless its done-marker exists; returns the marker."""
    if store.unit_done(ctx.out, unit.id):
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
    store.write_json(store.unit_path(ctx.out, unit.id), marker)
    if consumed is not None:  # only now: a gather stopped before its marker must find them again
        shutil.rmtree(store.shard_dir(ctx.out, consumed), ignore_errors=True)
        with contextlib.suppress(OSError):  # the last gather leaves no folder in shards/
            store.shard_dir(ctx.out, "").rmdir()
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
    store.save_npy(store.shard_path(ctx.out, group, name, shard), np.asarray(array))


def _load(ctx: WorkContext, group: str, name: str, shard: int) -> np.ndarray:
    return store.load_npy(store.shard_path(ctx.out, group, name, shard))


def _gather_rows(parts: list[Path], dest: Path) -> None:
    """Concatenates row shards into one npy file, one shard in memory at a time."""
    first = np.load(parts[0], mmap_mode="r")
    n = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)
    with store.atomic_path(dest) as tmp:
        out = np.lib.format.open_memmap(tmp, "w+", first.dtype, (n, *first.shape[1:]))
        row = 0
        for p in parts:
            block = np.load(p, mmap_mode="r")
            out[row : row + len(block)] = block
            row += len(block)
        out.flush()
        del out


# --- the units ---------------------------------------------------------------------------------


def _embed(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    model = ctx.bundle.model
    model.load_state_dict(ctx.state(unit.model_id))
    img, txt = [], []
    for _, x, tokens in ctx.stream(unit.split, unit.rows, EMBED_BATCH):
        i, t = embed.encode(model, x, tokens, batch_size=len(x), device=ctx.cfg.device)
        img.append(i.numpy())
        txt.append(t.numpy())
    group = f"embed-{unit.model_id}"
    _save(ctx, group, f"{unit.split}_image", unit.shard, np.concatenate(img))  # (n_s, d)
    _save(ctx, group, f"{unit.split}_text", unit.shard, np.concatenate(txt))
    return {"pairs": unit.rows[1] - unit.rows[0]}


def _gather_embed(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, group = unit.model_id, f"embed-{unit.model_id}"
    for split in ("train", "val"):
        for modality in ("image", "text"):
            parts = [
                store.shard_path(ctx.out, group, f"{split}_{modality}", s)
                for s in range(len(ctx.shards(split)))
            ]
            _gather_rows(parts, store.checkpoint_embeddings_path(ctx.out, split, modality, m))
    units = list(unit.deps)
    images = sum(ctx.marker(u)["pairs"] for u in units)
    seconds = round(ctx.seconds(units) + time.perf_counter() - t0, 3)
    store.mark_stage(
        ctx.out,
        f"embed-{m}",
        {"seconds": seconds, "images_per_second": round(images / max(seconds, 1e-9), 1)},
    )
    return {"consumed": group}


def _featurize(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, (start, stop) = unit.model_id, unit.rows
    ctx.set_embeddings(m)
    traker = ctx.traker(stop - start)
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
            else f"trakview KeyedProjector ({ctx.cfg.projector})"
        ),
        "projection_type": str(getattr(projector.proj_type, "value", projector.proj_type)),
    }


def _xtx(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    """The reduce: X^T X summed over the shards in order (as get_xtx sums its blocks), and the
    ridge term and conditioning that RegularizedScoreComputer finds for it."""
    m, n_train = unit.model_id, len(ctx.pairs["train"])
    xtx = None
    for s in range(len(ctx.shards("train"))):
        part = torch.from_numpy(_load(ctx, f"train-{m}", "xtx", s))
        xtx = part if xtx is None else xtx + part
    store.save_npy(store.trak_xtx_path(ctx.out, m), xtx.numpy())
    k = xtx.shape[0]
    scorer = ctx.scorer(ctx.cfg.lambda_reg)
    with _quiet("engine.trak"):  # it would name 0 training pairs: warned below with all of them
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
    featurize = [graph.unit_id("featurize", m, s) for s in range(len(ctx.shards("train")))]
    store.mark_stage(ctx.out, f"featurize-{m}", {"seconds": round(ctx.seconds(featurize), 3)})
    return {"diagnostics": info}


def _features(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, group = unit.model_id, f"train-{unit.model_id}"
    lam = ctx.marker(graph.unit_id("xtx", m))["diagnostics"]["lambda"]
    xtx = torch.from_numpy(store.load_npy(store.trak_xtx_path(ctx.out, m))).to(ctx.cfg.device)
    grads = torch.as_tensor(_load(ctx, group, "grads", unit.shard), device=ctx.cfg.device)
    with _quiet("engine.trak"):
        features = ctx.scorer(lam).get_x_xtx_inv(grads, xtx)  # (n_s, k)
    _save(ctx, group, "features", unit.shard, features.to(ctx.dtype).cpu().numpy())
    return {}


def _gather_trak(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    """traker's store of checkpoint m (``trak/m/``), as ``TRAKer`` reads it."""
    m, group = unit.model_id, f"train-{unit.model_id}"
    shards = range(len(ctx.shards("train")))
    for name, path in (
        ("grads", store.trak_grads_path),
        ("out_to_loss", store.trak_out_to_loss_path),
        ("features", store.trak_features_path),
    ):
        _gather_rows([store.shard_path(ctx.out, group, name, s) for s in shards], path(ctx.out, m))
    n_train = len(ctx.pairs["train"])
    trak = store.trak_dir(ctx.out)
    store.save_npy(trak / str(m) / "_is_featurized.mmap", np.ones(n_train, np.int32))
    store.write_json(trak / f"id_{m}.json", {str(m): {"is_featurized": 1, "is_finalized": 1}})
    first = ctx.marker(graph.unit_id("featurize", m, 0))
    store.write_json(
        trak / "metadata.json",
        {
            "JL dimension": ctx.cfg.proj_dim,
            "JL matrix type": first["projection_type"],
            "train set size": n_train,
        },
    )
    reduce = graph.unit_id("xtx", m)
    seconds = ctx.seconds([reduce, *unit.deps]) + time.perf_counter() - t0
    diagnostics = ctx.marker(reduce)["diagnostics"]
    store.mark_stage(ctx.out, f"finalize-{m}", {"seconds": round(seconds, 3), **diagnostics})
    return {"consumed": group}


def _targets(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, (start, stop) = unit.model_id, unit.rows
    ctx.set_embeddings(m)
    traker = ctx.traker(len(ctx.pairs["train"]))
    traker.saver.add_finalized(m, {})  # scored against features that other units finalize
    traker.start_scoring_checkpoint(EXPERIMENT, ctx.state(m), model_id=m, num_targets=stop - start)
    for inds, x, tokens in ctx.stream("val", unit.rows, ctx.cfg.batch_size):
        batch = (x, tokens, ctx.sim.for_targets(len(inds), m))
        traker.score(batch=batch, inds=np.asarray(inds) - start)
    grads = traker.saver.current_store[f"{EXPERIMENT}_grads"]  # (n_v, k)
    _save(ctx, f"val-{m}", f"{EXPERIMENT}_grads", unit.shard, grads)
    return {"pairs": stop - start}


def _gather_targets(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    m, group = unit.model_id, f"val-{unit.model_id}"
    parts = [
        store.shard_path(ctx.out, group, f"{EXPERIMENT}_grads", v)
        for v in range(len(ctx.shards("val")))
    ]
    _gather_rows(parts, store.trak_target_grads_path(ctx.out, m, EXPERIMENT))
    seconds = ctx.seconds(list(unit.deps)) + time.perf_counter() - t0
    store.mark_stage(ctx.out, f"score-{m}", {"seconds": round(seconds, 3)})
    return {"consumed": group}


def _scores(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    """traker's ``finalize_scores`` over every checkpoint for one shard of targets."""
    start, stop = unit.rows
    traker = ctx.traker(len(ctx.pairs["train"]))
    for m in range(ctx.n_models):
        # copy-on-write maps: torch wants writable arrays, and the run's files stay untouched
        targets = np.load(store.trak_target_grads_path(ctx.out, m, EXPERIMENT), mmap_mode="c")
        traker.saver.add_finalized(
            m,
            {
                "features": np.load(store.trak_features_path(ctx.out, m), mmap_mode="c"),
                "out_to_loss": np.load(store.trak_out_to_loss_path(ctx.out, m), mmap_mode="c"),
                f"{EXPERIMENT}_grads": targets[start:stop],
            },
        )
    traker.saver.init_scores(EXPERIMENT, stop - start)
    scores = np.asarray(traker.finalize_scores(exp_name=EXPERIMENT), dtype=np.float32)
    pos, neg = diagnose.topk_indices(scores, ctx.cfg.topk)  # (n_v, topk) each
    _save(ctx, "scores", "scores", unit.shard, scores)  # (n_train, n_v)
    _save(ctx, "scores", "topk_pos", unit.shard, pos)
    _save(ctx, "scores", "topk_neg", unit.shard, neg)
    return {"pairs": stop - start}


def _gather_scores(unit: graph.Unit, ctx: WorkContext, t0: float) -> dict[str, Any]:
    shards = ctx.score_shards()
    n_train, n_val = len(ctx.pairs["train"]), len(ctx.pairs["val"])
    with store.atomic_path(store.scores_path(ctx.out)) as tmp:
        scores = np.lib.format.open_memmap(tmp, "w+", np.float32, (n_train, n_val))
        for v, (start, stop) in enumerate(shards):
            scores[:, start:stop] = _load(ctx, "scores", "scores", v)
        scores.flush()
        del scores
    for name in ("topk_pos", "topk_neg"):
        parts = [store.shard_path(ctx.out, "scores", name, v) for v in range(len(shards))]
        _gather_rows(parts, ctx.out / f"{name}.npy")
    seconds = ctx.seconds(list(unit.deps)) + time.perf_counter() - t0
    store.mark_stage(ctx.out, "scores", {"seconds": round(seconds, 3)})
    store.mark_stage(ctx.out, "topk", {"k": ctx.cfg.topk})
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
