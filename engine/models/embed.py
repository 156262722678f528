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


def clip_margin(
    image_emb: np.ndarray, text_emb: np.ndarray, sim_image: np.ndarray, sim_text: np.ndarray
) -> np.ndarray:
    """The TRAK paper's CLIP margin (Section 5.1.1) of each pair over its simulated batch:

    f_i = -logsumexp_j(S_ij - S_ii) - logsumexp_j(S_ji - S_ii), j over the batch. This is the
    model output that TRAK scores attribute; higher = the pair matches better than the batch.

    Args:
        image_emb, text_emb: (n, d) unit embeddings of the pairs.
        sim_image, sim_text: (n, S, d) unit embeddings of each pair's simulated batch.
    """
    s_ii = (image_emb * text_emb).sum(-1, keepdims=True)  # (n, 1)
    s_ij = np.einsum("nd,nsd->ns", image_emb, sim_text) - s_ii  # (n, S)
    s_ji = np.einsum("nd,nsd->ns", text_emb, sim_image) - s_ii
    return (-_logsumexp(s_ij) - _logsumexp(s_ji)).astype(np.float32)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def caption_ranks(image_emb: np.ndarray, text_emb: np.ndarray, block: int = 2048) -> np.ndarray:
    """Per pair, the rank (1 = best) of its own caption among all captions of the split.

    Computed in blocks of ``block`` rows: memory is (block, n), never (n, n).
    """
    n = image_emb.shape[0]
    ranks = np.empty(n, dtype=np.int32)
    for s in range(0, n, block):
        sim = np.asarray(image_emb[s : s + block]) @ np.asarray(text_emb).T  # (b, n)
        diag = sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])]
        ranks[s : s + block] = 1 + (sim > diag[:, None]).sum(axis=1)
    return ranks
