"""How well a CLIP model matches a split's images and captions: retrieval ranks and recall@k,
measured against chance for the split's size (the build's health check, README "Can the
attributions be trusted?")."""

from __future__ import annotations

from typing import Any

import numpy as np

KS = (1, 5, 10)


def retrieval_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the rank (1 = best) of its own caption among the split's captions for its image
    (image->text), and of its own image among the split's images for its caption (text->image).

    Ties count against the pair (a constant model ranks every pair last). Memory is (block, n).

    Args:
        image_emb, text_emb: (n, d) unit embeddings of the pairs.

    Returns:
        (n,) int32 image->text ranks and (n,) int32 text->image ranks.
    """
    n = image_emb.shape[0]
    i2t = np.empty(n, dtype=np.int32)
    t2i = np.empty(n, dtype=np.int32)
    for modality_a, modality_b, out in ((image_emb, text_emb, i2t), (text_emb, image_emb, t2i)):
        b_all = np.asarray(modality_b)
        for s in range(0, n, block):
            sim = np.asarray(modality_a[s : s + block]) @ b_all.T  # (b, n)
            rows = np.arange(sim.shape[0])
            own = sim[rows, s + rows]
            sim[rows, s + rows] = -np.inf  # the pair itself is not a competitor
            out[s : s + block] = 1 + (sim >= own[:, None]).sum(axis=1)
    return i2t, t2i


def summarize(ranks: np.ndarray) -> dict[str, float]:
    """Recall@k (share of pairs ranked k or better) and the median rank of one direction."""
    out = {f"r@{k}": float(np.mean(ranks <= k)) for k in KS}
    out["median_rank"] = float(np.median(ranks))
    return out


def chance(n: int) -> dict[str, float]:
    """What a model that matches at random gets on a split of ``n`` pairs."""
    out = {f"r@{k}": min(1.0, k / n) for k in KS}
    out["median_rank"] = (n + 1) / 2
    return out


def split_retrieval(per_checkpoint: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Retrieval of one split, mean over checkpoints.

    Args:
        per_checkpoint: each checkpoint's (image, text) unit embeddings of the same n pairs.

    Returns:
        ``{"n", "image_to_text": {r@1, r@5, r@10, median_rank}, "text_to_image": {...},
        "chance": {...}}``.
    """
    n = per_checkpoint[0][0].shape[0]
    sums: dict[str, dict[str, float]] = {"image_to_text": {}, "text_to_image": {}}
    for image_emb, text_emb in per_checkpoint:
        for name, ranks in zip(sums, retrieval_ranks(image_emb, text_emb), strict=True):
            for key, value in summarize(ranks).items():
                sums[name][key] = sums[name].get(key, 0.0) + value / len(per_checkpoint)
    return {
        "n": int(n),
        **{name: {k: round(v, 4) for k, v in values.items()} for name, values in sums.items()},
        "chance": {k: round(v, 4) for k, v in chance(n).items()},
    }
