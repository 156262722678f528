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
    """

    def __init__(
        self,
        dtype: torch.dtype,
        device: str,
        lambda_reg: float | None = None,
        lambda_rel: float = 1e-3,
        logging_level: int = logging.INFO,
    ) -> None:
        super().__init__(dtype, device)
        self.lambda_reg = lambda_reg
        self.lambda_rel = lambda_rel
        self.diagnostics: list[dict[str, float]] = []

    def get_xtx(self, grads: Tensor) -> Tensor:
        xtx = torch.zeros(grads.shape[1], grads.shape[1], dtype=torch.float64, device=self.device)
        for block in torch.split(grads, 20_000):
            block = block.to(self.device, torch.float64)
            xtx += block.T @ block
        return xtx  # (k, k)

    def get_x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
        k = xtx.shape[0]
        eig = torch.linalg.eigvalsh(xtx).clamp_min(0)
        lam = self.lambda_reg
        if lam is None:
            lam = self.lambda_rel * float(eig.sum()) / k
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
