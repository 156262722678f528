"""What a run derives from its scores: top-k influencers, ensemble embeddings, per-pair CLIP
statistics and the "suspected mislabeled" ranking of training pairs.

Suspected mislabeled pairs are ranked by TRAK self-influence (Koh & Liang 2017; Pruthi et al.
2020): the score of a training pair for itself, x_i (X^T X + lambda I)^-1 x_i times its out-to-loss
weight, averaged over checkpoints. A pair whose caption contradicts its image has a large loss
(out-to-loss weight near 1) and a gradient the rest of the data does not explain (high leverage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine import embed, store
from engine.trak import SimulatedBatch


def topk_indices(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per validation pair (column), the k most positive and k most negative training indices.

    Args:
        scores: (n_train, n_val) TRAK scores.

    Returns:
        (n_val, k) int32 each: most positive first, and most negative first.
    """
    order = np.argsort(-scores, axis=0, kind="stable")  # (n_train, n_val)
    pos = order[:k].T
    neg = np.argsort(scores, axis=0, kind="stable")[:k].T
    return pos.astype(np.int32), neg.astype(np.int32)


def self_influence(out: Path, n_models: int, block: int = 65536) -> np.ndarray:
    """(n_train,) mean over checkpoints of x_i . phi_i, times the mean out-to-loss weight, from
    the run's ``trak/`` store (``block`` rows in memory at a time)."""
    arrays = [
        [
            store.load_npy(path(out, m), mmap=True)
            for path in (
                store.trak_grads_path,
                store.trak_features_path,
                store.trak_out_to_loss_path,
            )
        ]
        for m in range(n_models)
    ]
    n_train = arrays[0][0].shape[0]
    result = np.empty(n_train, np.float32)
    for s in range(0, n_train, block):
        rows = slice(s, min(n_train, s + block))
        leverage = 0.0
        out_to_loss = 0.0
        for grads, feats, weights in arrays:
            x = np.asarray(grads[rows], dtype=np.float64)  # (b, k)
            phi = np.asarray(feats[rows], dtype=np.float64)  # (b, k)
            leverage = leverage + (x * phi).sum(1) / n_models
            out_to_loss = out_to_loss + np.asarray(weights[rows], dtype=np.float64)[:, 0] / n_models
        result[rows] = leverage * out_to_loss
    return result


def ensemble_margin(out: Path, cfg: Any, split: str, n_models: int) -> np.ndarray:
    """(n,) the CLIP margin (the attributed model output) averaged over checkpoints.

    Each checkpoint uses the simulated batches of the build: training pairs their own,
    validation pairs the shared target batch.
    """
    n_train = store.load_npy(store.checkpoint_embeddings_path(out, "train", "image", 0)).shape[0]
    sim = SimulatedBatch(n_train, cfg.sim_batch_size, seed=cfg.seed)
    total = 0.0
    for m in range(n_models):
        emb = {
            (s, mod): store.load_npy(store.checkpoint_embeddings_path(out, s, mod, m))
            for s in {"train", split}
            for mod in ("image", "text")
        }
        n = emb[(split, "image")].shape[0]
        parts = []
        for s in range(0, n, 4096):  # bounded memory: (chunk, S, d) batch embeddings at a time
            rows = range(s, min(n, s + 4096))
            idx = sim.for_train(rows, m) if split == "train" else sim.for_targets(len(rows), m)
            idx = idx.numpy()
            parts.append(
                embed.clip_margin(
                    emb[(split, "image")][rows.start : rows.stop],
                    emb[(split, "text")][rows.start : rows.stop],
                    emb[("train", "image")][idx],
                    emb[("train", "text")][idx],
                )
            )
        total = total + np.concatenate(parts)
    return (total / n_models).astype(np.float32)


def finish_run(out: Path, cfg: Any, n_models: int) -> None:
    """Writes the derived arrays of a run (stages topk, ensemble, diagnose)."""
    if not store.stage_done(out, "topk"):
        scores = store.load_npy(store.scores_path(out))
        pos, neg = topk_indices(scores, cfg.topk)
        store.save_npy(out / "topk_pos.npy", pos)
        store.save_npy(out / "topk_neg.npy", neg)
        store.mark_stage(out, "topk", {"k": cfg.topk})
    if not store.stage_done(out, "ensemble"):
        for split in ("train", "val"):
            for modality in ("image", "text"):
                per_ckpt = [
                    store.load_npy(store.checkpoint_embeddings_path(out, split, modality, m))
                    for m in range(n_models)
                ]
                store.save_npy(
                    store.embeddings_path(out, split, modality), embed.ensemble(per_ckpt)
                )
            img = store.load_npy(store.embeddings_path(out, split, "image"))
            txt = store.load_npy(store.embeddings_path(out, split, "text"))
            store.save_npy(out / f"{split}_clip_sim.npy", (img * txt).sum(1).astype(np.float32))
            store.save_npy(out / f"{split}_margin.npy", ensemble_margin(out, cfg, split, n_models))
            store.save_npy(out / f"{split}_caption_rank.npy", embed.caption_ranks(img, txt))
        store.mark_stage(out, "ensemble", {})
    if not store.stage_done(out, "diagnose"):
        si = self_influence(out, n_models)
        store.save_npy(out / "train_self_influence.npy", si)
        store.save_npy(out / "suspect_mislabeled.npy", si)
        store.mark_stage(out, "diagnose", {"suspect_method": "self-influence"})
