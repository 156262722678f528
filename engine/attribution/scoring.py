"""TRAK's features and scores: X (X^T X + lambda I)^-1, target scores and top-k influencers.

``RegularizedScoreComputer`` (traker's ``AbstractScoreComputer``) solves in float64 with lambda
chosen from the data when not given, and records and warns about the conditioning (traker's
stock computer uses lambda = 0: a rank-deficient X^T X gives noise silently).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor
from trak.score_computers import AbstractScoreComputer

from engine.attribution.settings import MAX_CONDITION

log = logging.getLogger(__name__)


class RegularizedScoreComputer(AbstractScoreComputer):
    """X (X^T X + lambda I)^-1 in float64, with lambda chosen from the data when not given.

    ``lambda_reg=None`` sets lambda = ``lambda_rel`` * trace(X^T X) / proj_dim (the mean
    eigenvalue), which keeps a rank-deficient X^T X (proj_dim too large for the training set)
    invertible. The rank, condition number and lambda of each finalized checkpoint go into
    ``self.diagnostics``, and a warning with the numbers is logged when the conditioning is bad.

    ``blocks`` (``--estimator modules``: the dimensions of each module's block, in order) makes
    X^T X block-diagonal: ``get_xtx`` returns the diagonal blocks packed one after another
    ((sum k_b^2,) float64) and each block is solved alone, with its own lambda.

    ``normalize="unit"`` (``--normalize unit``) divides each training pair's features by
    sqrt(x_i^T (X^T X + lambda I)^-1 x_i), the length of its whitened gradient (TrackStar: Chang
    et al. 2024, arXiv 2410.17413): a pair no longer gains influence on every target by having a
    large gradient. The targets' side is left as it is (its length scales a validation pair's
    whole column: no ranking of influencers changes).
    """

    def __init__(
        self,
        dtype: torch.dtype,
        device: str,
        lambda_reg: float | None = None,
        lambda_rel: float = 1e-3,
        logging_level: int = logging.INFO,
        blocks: list[int] | None = None,
        normalize: str = "none",
    ) -> None:
        super().__init__(dtype, device)
        self.normalize = normalize
        self.lambda_reg = lambda_reg
        self.lambda_rel = lambda_rel
        self.blocks = list(blocks) if blocks else None
        self.diagnostics: list[dict[str, float]] = []

    def get_xtx(self, grads: Tensor) -> Tensor:
        if self.blocks:
            return self._block_xtx(grads)
        xtx = torch.zeros(grads.shape[1], grads.shape[1], dtype=torch.float64, device=self.device)
        for block in torch.split(grads, 20_000):
            block = block.to(self.device, torch.float64)
            xtx += block.T @ block
        return xtx  # (k, k)

    def _block_xtx(self, grads: Tensor) -> Tensor:
        """(sum k_b^2,) float64: each module's X_b^T X_b, flattened, one after another."""
        parts = []
        for cols in _column_slices(self.blocks):
            x = grads[:, cols]
            xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=self.device)
            for rows in torch.split(x, 20_000):
                rows = rows.to(self.device, torch.float64)
                xtx += rows.T @ rows
            parts.append(xtx.reshape(-1))
        return torch.cat(parts)

    def get_x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
        solve = self._block_x_xtx_inv if self.blocks else self._x_xtx_inv
        features = solve(grads, xtx)
        if self.normalize == "unit":
            features = unit_normalize(grads, features)
        return features

    def _block_x_xtx_inv(self, grads: Tensor, packed: Tensor) -> Tensor:
        """Each module's X_b (X_b^T X_b + lambda_b I)^-1; the diagnostics summarise the blocks
        (summed rank, largest condition number, mean lambda)."""
        out = torch.empty(grads.shape, dtype=self.dtype, device=self.device)
        infos, offset = [], 0
        for k, cols in zip(self.blocks, _column_slices(self.blocks), strict=True):
            xtx = packed[offset : offset + k * k].reshape(k, k)
            offset += k * k
            out[:, cols] = self._x_xtx_inv(grads[:, cols], xtx)
            infos.append(self.diagnostics.pop())
        self.diagnostics.append(
            {
                "rank": sum(i["rank"] for i in infos),
                "proj_dim": sum(self.blocks),
                "n_train": grads.shape[0],
                "lambda": float(np.mean([i["lambda"] for i in infos])),
                "condition": max(i["condition"] for i in infos),
                "blocks": len(self.blocks),
            }
        )
        return out

    def _x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
        k = xtx.shape[0]
        eig = torch.linalg.eigvalsh(xtx).clamp_min(0)
        lam = self.lambda_reg
        if lam is None:
            lam = self.lambda_rel * float(eig.sum()) / k
        if lam == 0 and float(eig.sum()) == 0:  # a module the output does not depend on
            self.diagnostics.append(
                {
                    "rank": 0,
                    "proj_dim": k,
                    "n_train": grads.shape[0],
                    "lambda": 0.0,
                    "condition": 1.0,
                }
            )
            return torch.zeros(grads.shape, dtype=self.dtype, device=self.device)
        rank = int((eig > eig.max() * k * torch.finfo(torch.float32).eps).sum())
        cond = float((eig.max() + lam) / (eig.min() + lam)) if eig.max() + lam > 0 else float("inf")
        info = {
            "rank": rank,
            "proj_dim": k,
            "n_train": grads.shape[0],
            "lambda": lam,
            "condition": cond,
        }
        self.diagnostics.append(info)
        if cond > MAX_CONDITION or (rank < k and lam == 0):
            log.warning(
                "X^T X is badly conditioned (rank %d of %d over %d training pairs, condition "
                "%.3g with lambda %.3g): scores may be noise. Lower --proj-dim (at most about "
                "n_train / 4) or raise --lambda-reg.",
                rank,
                k,
                grads.shape[0],
                cond,
                lam,
            )
        reg = xtx + lam * torch.eye(k, dtype=torch.float64, device=xtx.device)
        chol = torch.linalg.cholesky(reg)
        out = torch.empty(grads.shape, dtype=self.dtype, device=self.device)
        for start in range(0, grads.shape[0], 20_000):
            block = grads[start : start + 20_000].to(self.device, torch.float64)  # (b, k)
            out[start : start + block.shape[0]] = torch.cholesky_solve(block.T, chol).T.to(
                self.dtype
            )
        return out

    def get_scores(self, features: Tensor, target_grads: Tensor, accumulator: Tensor) -> None:
        accumulator += (features.to(self.device) @ target_grads.to(self.device).T).cpu()


def unit_normalize(grads: Tensor, features: Tensor) -> Tensor:
    """Features phi_i = (X^T X + lambda I)^-1 x_i divided by sqrt(x_i . phi_i), the length of
    the whitened gradient (float64 sums; a pair whose gradient is zero keeps zero features)."""
    out = torch.empty_like(features)
    for start in range(0, grads.shape[0], 20_000):
        rows = slice(start, start + 20_000)
        x = grads[rows].to(features.device, torch.float64)
        phi = features[rows].to(torch.float64)
        length = (x * phi).sum(1, keepdim=True).clamp_min(0).sqrt()
        out[rows] = torch.where(length > 0, phi / length.clamp_min(1e-300), 0).to(out.dtype)
    return out


def _column_slices(blocks: list[int]) -> list[slice]:
    edges = np.cumsum([0, *blocks])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def self_influence(
    grads: list[np.ndarray],
    features: list[np.ndarray],
    out_to_loss: list[np.ndarray],
    block: int = 65536,
) -> np.ndarray:
    """(n_train,) TRAK self-influence: mean over checkpoints of x_i . phi_i, times the mean
    out-to-loss weight (Koh & Liang 2017; Pruthi et al. 2020).

    Args:
        grads, features: per checkpoint, (n_train, k) projected gradients X_m and features
            phi_m = X_m (X_m^T X_m + lambda I)^-1 (memory maps work: ``block`` rows at a time).
        out_to_loss: per checkpoint, (n_train, 1) out-to-loss weights.
    """
    n_models = len(grads)
    n_train = grads[0].shape[0]
    result = np.empty(n_train, np.float32)
    for s in range(0, n_train, block):
        rows = slice(s, min(n_train, s + block))
        leverage = 0.0
        weight = 0.0
        for x_m, phi_m, q_m in zip(grads, features, out_to_loss, strict=True):
            x = np.asarray(x_m[rows], dtype=np.float64)  # (b, k)
            phi = np.asarray(phi_m[rows], dtype=np.float64)  # (b, k)
            leverage = leverage + (x * phi).sum(1) / n_models
            weight = weight + np.asarray(q_m[rows], dtype=np.float64)[:, 0] / n_models
        result[rows] = leverage * weight
    return result
