"""CLIP embeddings of images and captions, per checkpoint and for the ensemble."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def encode(
    model: torch.nn.Module,
    images: torch.Tensor | None,
    tokens: torch.Tensor | None,
    batch_size: int = 256,
    device: str = "cpu",
    desc: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised image and text embeddings, (n, d) float32 each (None where no input).

    Args:
        model: an open_clip model.
        images: (n, 3, H, W) preprocessed images, or None.
        tokens: (n, context_length) token ids, or None.
    """
    model.eval()
    out = []
    for x, fn in ((images, model.encode_image), (tokens, model.encode_text)):
        if x is None:
            out.append(None)
            continue
        chunks = range(0, x.shape[0], batch_size)
        if desc:
            chunks = tqdm(chunks, desc=desc, leave=False)
        out.append(
            torch.cat([fn(x[s : s + batch_size].to(device), normalize=True).cpu() for s in chunks])
        )
    return out[0], out[1]


def ensemble(per_checkpoint: list[np.ndarray]) -> np.ndarray:
    """Concatenates M checkpoints' normalised embeddings, each scaled by 1/sqrt(M).

    The result has unit norm, and the inner product of two rows is the mean cosine similarity
    over the checkpoints: one vector space for search across the whole ensemble.
    """
    m = len(per_checkpoint)
    return (np.concatenate(per_checkpoint, axis=1) / np.sqrt(m)).astype(np.float32)  # (n, M*d)


def margins(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per pair, the CLIP margin over all pairs of the split: S_ii minus the largest other S_ij.

    A positive margin means the image's own caption beats every other caption of the split.
    """
    sim = image_emb @ text_emb.T  # (n, n)
    diag = np.diag(sim).copy()
    np.fill_diagonal(sim, -np.inf)
    return (diag - sim.max(axis=1)).astype(np.float32)


def caption_ranks(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per pair, the rank (1 = best) of its own caption among all captions of the split."""
    sim = image_emb @ text_emb.T  # (n, n)
    return (1 + (sim > np.diag(sim)[:, None]).sum(axis=1)).astype(np.int32)
