"""What a run derives from its units' files: ensemble embeddings, per-pair CLIP statistics,
self-influence and the "suspected mislabeled" ranking of training pairs (stages ``ensemble`` and
``diagnose``).

Self-influence is the TRAK score of a training pair for itself, x_i (X^T X + lambda I)^-1 x_i
times its out-to-loss weight, averaged over checkpoints; suspected mislabeled pairs are ranked by
the signals of ``engine.attribution.suspects``.
"""

from __future__ import annotations

import numpy as np

from engine import files
from engine.attribution.margin import SimulatedBatch
from engine.attribution.scoring import self_influence
from engine.attribution.settings import BuildConfig
from engine.attribution.suspects import SHIPPED, suspect_signals
from engine.models import embed
from engine.run.health import health
from engine.run.layout import MODALITIES, SPLITS, RunLayout
from engine.search.faiss_ops import exact_search


def ensemble_margin(
    layout: RunLayout, cfg: BuildConfig, split: str, n_models: int, chunk: int = 4096
) -> np.ndarray:
    """(n,) the CLIP margin (the attributed model output) averaged over checkpoints.

    Each checkpoint uses the simulated batches of the build: training pairs their own,
    validation pairs the shared target batch.
    """
    n_train = files.load_npy(layout.checkpoint_embeddings("train", "image", 0)).shape[0]
    sim = SimulatedBatch(n_train, cfg.sim_batch_size, seed=cfg.seed)
    total = 0.0
    for m in range(n_models):
        emb = {
            (s, mod): files.load_npy(layout.checkpoint_embeddings(s, mod, m))
            for s in {"train", split}
            for mod in MODALITIES
        }
        n = emb[(split, "image")].shape[0]
        parts = []
        for s in range(0, n, chunk):  # bounded memory: (chunk, S, d) batch embeddings at a time
            rows = range(s, min(n, s + chunk))
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


def run_self_influence(layout: RunLayout, n_models: int) -> np.ndarray:
    """(n_train,) self-influence of every training pair, from the run's ``trak/`` store."""
    arrays = [
        [files.load_npy(path(m), mmap=True) for m in range(n_models)]
        for path in (layout.trak_grads, layout.trak_features, layout.trak_out_to_loss)
    ]
    return self_influence(*arrays)


def write_similar(layout: RunLayout, k: int, block: int = 1024) -> None:
    """Per validation pair, the k training images of the highest mean cosine similarity to its
    image (ensemble embeddings), exact, ``block`` validation pairs at a time."""
    train = files.load_npy(layout.embeddings("train", "image"), mmap=True)  # (n_train, M*d)
    val = files.load_npy(layout.embeddings("val", "image"), mmap=True)
    k = min(k, train.shape[0])
    rows, sims = [], []
    for s in range(0, val.shape[0], block):
        found, ids = exact_search(train, np.asarray(val[s : s + block]), k)
        rows.append(ids.astype(np.int32))
        sims.append(found.astype(np.float32))
    files.save_npy(layout.similar, np.concatenate(rows))
    files.save_npy(layout.similar_scores, np.concatenate(sims))


def finish_run(layout: RunLayout, cfg: BuildConfig, n_models: int) -> None:
    """Writes the derived arrays of a run (stages ensemble, similar, diagnose, health)."""
    if not layout.stage_done("ensemble"):
        for split in SPLITS:
            for modality in MODALITIES:
                per_ckpt = [
                    files.load_npy(layout.checkpoint_embeddings(split, modality, m))
                    for m in range(n_models)
                ]
                files.save_npy(layout.embeddings(split, modality), embed.ensemble(per_ckpt))
            img = files.load_npy(layout.embeddings(split, "image"))
            txt = files.load_npy(layout.embeddings(split, "text"))
            files.save_npy(layout.clip_sim(split), (img * txt).sum(1).astype(np.float32))
            files.save_npy(layout.margin(split), ensemble_margin(layout, cfg, split, n_models))
            files.save_npy(layout.caption_rank(split), embed.caption_ranks(img, txt))
        layout.mark_stage("ensemble", {})
    if not layout.stage_done("similar"):
        write_similar(layout, cfg.topk)
        layout.mark_stage("similar", {"k": cfg.topk})
    if not layout.stage_done("diagnose"):
        si = run_self_influence(layout, n_models)
        files.save_npy(layout.self_influence, si)
        signals = suspect_signals(
            si,
            files.load_npy(layout.clip_sim("train")),
            files.load_npy(layout.caption_rank("train")),
        )
        files.save_npy(layout.suspect, signals[SHIPPED].astype(np.float32))
        layout.mark_stage("diagnose", {"suspect_method": SHIPPED})
    if not layout.stage_done("health"):
        layout.mark_stage("health", {"retrieval": health(layout, n_models, cfg.seed)})
