"""The attributed model output: the CLIP margin of the TRAK paper over a simulated batch.

- ``SimulatedBatch``: which training pairs form each pair's simulated batch (seeded, uniform,
  never the pair itself), so the margin depends neither on batching nor on the order of work.
- ``ClipMargin`` (traker's ``AbstractModelOutput``): the margin (Section 5.1.1; seed tutorial
  "Applying TRAK to a custom task #3: CLIP") and its out-to-loss term; the batch's embeddings are
  instance state, set per checkpoint (traker's stock class keeps them in class attributes).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from trak.modelout_functions import AbstractModelOutput

from engine.errors import DataError


class SimulatedBatch:
    """The simulated batch of the CLIP margin: which training pairs each pair is scored against.

    Training pair ``i`` of checkpoint ``m`` gets ``size`` distinct training pairs drawn uniformly
    from the other ``n - 1`` (never itself), from a generator seeded by ``(seed, m, i)``: the draw
    depends neither on batching nor on the order of work, so a resumed build repeats it exactly.
    Targets (validation pairs and new queries) share one draw per checkpoint from all ``n`` pairs,
    so a query of a validation pair's own image and caption reproduces that pair's scores.
    """

    def __init__(self, n_train: int, size: int, seed: int = 0) -> None:
        if n_train < 2:
            raise DataError(f"the simulated batch needs at least 2 training pairs, got {n_train}")
        self.n_train = n_train
        self.size = min(size, n_train - 1)
        self.seed = seed

    def for_train(self, indices: Iterable[int], model_id: int) -> Tensor:
        """(B, size) int64 training indices, row b never containing ``indices[b]``."""
        rows = []
        for i in indices:
            rng = np.random.default_rng([self.seed, model_id, int(i)])
            draw = rng.choice(self.n_train - 1, size=self.size, replace=False)
            rows.append(draw + (draw >= i))  # skip i itself
        return torch.as_tensor(np.stack(rows), dtype=torch.int64)

    def for_targets(self, count: int, model_id: int) -> Tensor:
        """(count, size) int64: the same draw for every target of checkpoint ``model_id``."""
        rng = np.random.default_rng([self.seed, model_id, 2**32 - 1])
        draw = torch.as_tensor(rng.choice(self.n_train, size=self.size, replace=False))
        return draw.to(torch.int64).expand(count, -1)


class ClipMargin(AbstractModelOutput):
    """The CLIP model output of the TRAK paper (Section 5.1.1) over a simulated batch B:

    f(x_i, y_i) = -logsumexp_{j in B}(S_ij - S_ii) - logsumexp_{j in B}(S_ji - S_ii),
    with S_ij the cosine similarity of image i and caption j. The embeddings of the batch B come
    from ``set_embeddings`` (one checkpoint's training-set embeddings) and are constants.
    """

    def __init__(self) -> None:
        super().__init__()
        self.image_emb: Tensor | None = None  # (n_train, d), L2-normalised
        self.text_emb: Tensor | None = None

    def set_embeddings(self, image_emb: Tensor, text_emb: Tensor) -> None:
        """Uses these training-set embeddings (of the checkpoint being featurized/scored)."""
        self.image_emb = image_emb.float()
        self.text_emb = text_emb.float()

    def batch_embeddings(self, sim_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, d) image and text embeddings of the training pairs ``sim_idx`` (B, S): each
        pair's simulated batch, on the device of ``sim_idx``."""
        if self.image_emb is None or self.text_emb is None:
            raise RuntimeError("ClipMargin.set_embeddings must be called before computing outputs")
        if self.image_emb.device != sim_idx.device:
            # The embeddings follow the computation: the build and the query engine set them from
            # numpy (CPU) and index them with the batch's indices, on the model's device.
            self.image_emb = self.image_emb.to(sim_idx.device)
            self.text_emb = self.text_emb.to(sim_idx.device)
        return self.image_emb[sim_idx], self.text_emb[sim_idx]

    def get_output(  # type: ignore[override]
        self,
        model: torch.nn.Module,
        weights: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> Tensor:
        """The margin of one pair (no batch dimension; vmapped by the gradient computer).

        Args:
            image: (3, H, W) preprocessed image.
            text: (context_length,) token ids.
            sim_image, sim_text: (S, d) embeddings of the pair's simulated batch.
        """
        return self.margin_and_embeddings(
            model, weights, buffers, image, text, sim_image, sim_text
        )[0]

    def margin_and_embeddings(
        self,
        model: torch.nn.Module,
        weights: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``get_output``'s margin, and the forward pass's (d,) unit image and text embeddings
        and logit scale (from which ``out_to_loss`` needs no second forward pass)."""
        img, txt, scale = torch.func.functional_call(
            model, (weights, buffers), args=(image.unsqueeze(0), text.unsqueeze(0))
        )[:3]  # (1, d) each; SigLIP-style models return a logit bias too
        s_ii = (img * txt).sum()
        s_ij = (img @ sim_text.T).squeeze(0)  # (S,) this image against the batch's captions
        s_ji = (txt @ sim_image.T).squeeze(0)  # (S,) this caption against the batch's images
        return self.output(s_ii, s_ij, s_ji, scale), (img[0], txt[0], scale)

    def output(self, s_ii: Tensor, s_ij: Tensor, s_ji: Tensor, scale: Tensor) -> Tensor:
        """The output from the pair's similarity and its batch's: the margin, at temperature 1."""
        return -torch.logsumexp(s_ij - s_ii, dim=0) - torch.logsumexp(s_ji - s_ii, dim=0)

    def get_out_to_loss_grad(  # type: ignore[override]
        self,
        model: torch.nn.Module,
        weights: dict[str, Tensor],
        buffers: dict[str, Tensor],
        batch: tuple[Tensor, Tensor, Tensor],
    ) -> Tensor:
        """1 - p_i, (B, 1): p_i the mean of the image->text and text->image probabilities of the
        correct match (TRAK paper, Section 5.1.1). Computed over the pair's own simulated batch at
        the model's temperature, so it does not depend on how pairs are batched.
        """
        image, text, sim_idx = batch
        with torch.no_grad():
            out = torch.func.functional_call(model, (weights, buffers), args=(image, text))
            return self.out_to_loss(out[0], out[1], out[2], sim_idx)

    @torch.no_grad()
    def out_to_loss(self, img: Tensor, txt: Tensor, scale: Tensor, sim_idx: Tensor) -> Tensor:
        """1 - p_i, (B, 1), from the pairs' (B, d) unit embeddings, their logit scale (a scalar
        or one per pair, (B,)) and simulated batches ``sim_idx`` (B, S)."""
        img, txt = img.float(), txt.float()
        scale = scale.float().reshape(-1, 1) if scale.dim() else scale.float()
        sim_image, sim_text = self.batch_embeddings(sim_idx)  # (B, S, d)
        s_ii = (img * txt).sum(-1, keepdim=True)  # (B, 1)
        row = torch.cat([s_ii, torch.einsum("bd,bsd->bs", img, sim_text)], 1) * scale
        col = torch.cat([s_ii, torch.einsum("bd,bsd->bs", txt, sim_image)], 1) * scale
        p = (row.softmax(1)[:, 0] + col.softmax(1)[:, 0]) / 2
        return (1 - p).unsqueeze(1)


class ClipLoss(ClipMargin):
    """The training side's output of ``--output loss``: minus the pair's own contrastive loss
    over its simulated batch B at the model's temperature tau (its logit scale),

    -(CE_row + CE_col) / 2,  CE_row = logsumexp(tau [S_ii, S_ij for j in B]) - tau S_ii,

    the batch's embeddings constant. Its gradient is what a training step on the pair follows
    (the margin's gradient weighted by 1 - p, each direction at tau, as TRAK's derivation has it
    for a binary model output): the out-to-loss weight is therefore 1. Targets keep
    ``ClipMargin``: it is the output their scores attribute.
    """

    def output(self, s_ii: Tensor, s_ij: Tensor, s_ji: Tensor, scale: Tensor) -> Tensor:
        row = torch.logsumexp(scale * torch.cat([s_ii[None], s_ij]), dim=0) - scale * s_ii
        col = torch.logsumexp(scale * torch.cat([s_ii[None], s_ji]), dim=0) - scale * s_ii
        return -(row + col) / 2

    @torch.no_grad()
    def out_to_loss(self, img: Tensor, txt: Tensor, scale: Tensor, sim_idx: Tensor) -> Tensor:
        """(B, 1) ones: the loss's gradient already carries the weight."""
        return torch.ones(img.shape[0], 1, dtype=torch.float32, device=img.device)


class ClipBatchLoss(ClipLoss):
    """The training side's output of ``--output batch-loss``: the pair's part in the whole
    contrastive loss of a batch made of it and its simulated batch B, the others' embeddings
    constant: its own loss (its role as a positive) plus, for every pair j of B, the part of j's
    loss that runs through the pair as one of j's negatives (ECIF's two roles of a CLIP pair,
    arXiv 2411.11667),

    -(CE_row_i + CE_col_i + sum_j [logsumexp_k tau S_jk + logsumexp_k tau S_kj]) / 2,

    k over B and the pair; the terms of j that do not involve the pair are constants and drop out
    of the gradient. Training on a batch moves the model along this gradient for the pair; the
    loss output follows only its own term.
    """

    def margin_and_embeddings(
        self,
        model: torch.nn.Module,
        weights: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        own, (img, txt, scale) = super().margin_and_embeddings(
            model, weights, buffers, image, text, sim_image, sim_text
        )
        tau = scale.detach()
        batch = tau * (sim_image @ sim_text.T)  # (S, S): B's images against B's captions, fixed
        row_rest = torch.logsumexp(batch, dim=1)  # (S,) pair j's image over B's captions
        col_rest = torch.logsumexp(batch, dim=0)  # (S,) pair j's caption over B's images
        as_row = torch.logaddexp(row_rest, scale * (sim_image @ txt))  # j's image vs our caption
        as_col = torch.logaddexp(col_rest, scale * (sim_text @ img))  # j's caption vs our image
        return own - (as_row.sum() + as_col.sum()) / 2, (img, txt, scale)


def training_output(output: str) -> ClipMargin:
    """The model output of the training side of ``--output`` (``settings.OUTPUTS``)."""
    return {"loss": ClipLoss, "batch-loss": ClipBatchLoss}.get(output, ClipMargin)()
