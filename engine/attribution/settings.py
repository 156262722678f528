"""The settings of an attribution run (``BuildConfig``), recorded in its manifest.

They sit below both the build and the query engine: a new query reproduces the build's model
output, parameters and projection from the settings the manifest holds.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, replace

from engine.errors import ConfigError, DeviceError

# Checks the conditioning of X^T X + lambda I; beyond this float32 scores are dominated by noise.
MAX_CONDITION = 1e7

DEFAULT_SHARD_SIZE = 20_000  # pairs per unit; traker's score computer works in blocks of 20,000
# --projector choices for the dense parameters (token rows always use keyed Gaussian blocks):
PROJECTORS = {
    "gaussian": "dense Gaussian JL matrix, float32 (traker's CudaProjector on CUDA with fast_jl)",
    "gaussian-bf16": "the same matrix, multiplied in bfloat16 (about 2x faster on CPUs with BF16)",
    "sketch": "count sketch to 4 x proj_dim buckets, then a Gaussian: O(D) per pair (default)",
    "factored": "LoGra: Kronecker projections of the linear layers' gradients from one pass, "
    "never the per-sample gradient, then sketched with the rest (large models)",
    "factored-bf16": "factored, its forward and backward pass in bfloat16 (autocast)",
}


# --estimator: how a training pair's projected gradient becomes its features (score = features .
# target gradient). Measured against retrained models in BENCHMARKS.md (bench_estimators).
ESTIMATORS = {
    "trak": "TRAK (Park et al. 2023): one X^T X over every attributed parameter (default)",
    "modules": "TRAK with a separate X^T X per module (block-diagonal): each module's gradient "
    "projected to its own --module-dim dimensions, solved alone (bergson's per-module TRAK)",
}
# --output: the training side's gradient (targets always use the CLIP margin they attribute)
OUTPUTS = {
    "margin": "the TRAK paper's CLIP margin, weighted by 1 - p (the out-to-loss term), as the "
    "targets' (default)",
    "loss": "the pair's own contrastive loss over its simulated batch at the model's "
    "temperature: the gradient training follows (no out-to-loss weight)",
    "batch-loss": "the loss with the pair's second role: its own loss plus its part as a "
    "negative in the losses of its simulated batch's pairs (ECIF), the whole gradient a batch "
    "takes through it",
}
# --normalize: what is done to each training pair's features after the solve
NORMALIZATIONS = {
    "none": "TRAK's features as solved (default)",
    "unit": "each training pair's features divided by the length of its whitened gradient "
    "(TrackStar's unit normalisation): large-gradient pairs no longer lead every list",
}
DEFAULT_MODULE_DIM = 256  # --module-dim: each module's dimensions under --estimator modules


@dataclass
class BuildConfig:
    """Settings of an attribution run (all recorded in the manifest)."""

    model: str = "trakview-tiny"  # open_clip architecture of the checkpoints
    checkpoints: list[str] = field(default_factory=list)  # one path per ensemble member
    proj_dim: int = 0  # JL projection dimension; 0 = from the data (n_train/4, 64..1024)
    grad_params: str = (
        "auto"  # attributed parameters; auto = no-token-embedding on CPU, all on CUDA
    )
    lambda_reg: float | None = None  # ridge term of X^T X; None = lambda_rel * mean eigenvalue
    lambda_rel: float = 1e-3  # relative ridge term used when lambda_reg is None
    sim_batch_size: int = 256  # simulated batch of the CLIP margin (capped at n_train - 1)
    batch_size: int = 50  # pairs per per-sample-gradient batch
    seed: int = 0  # seeds the simulated batches and the projection
    device: str = "cpu"  # "cpu" or "cuda"
    half: bool = False  # float16 TRAK features (CUDA only: on CPU it ruins the scores)
    projector: str = "auto"  # JL projection of the dense parameters' gradients, see PROJECTORS
    topk: int = 100  # influencers stored per validation pair and sign (with their scores)
    scores: str = "auto"  # the scores kept: dense, topk or auto (see SCORE_FORMS)
    pretrained: str | None = None  # open_clip pretrained tag: its preprocessing and activation
    workers: int = -1  # DataLoader workers reading images; -1 = 0 below 1000 images, else <= 4
    shard_size: int = 0  # pairs per unit of work (embed, featurize, targets); 0 = 20,000
    estimator: str = "trak"  # how projected gradients become features, see ESTIMATORS
    output: str = "margin"  # the training side's model output, see OUTPUTS
    module_dim: int = 0  # --estimator modules: dimensions per module; 0 = DEFAULT_MODULE_DIM
    normalize: str = "none"  # the training pairs' features after the solve, see NORMALIZATIONS


# What a run keeps of its (n_train, n_val) scores; both keep the top-k of every validation
# pair, the histograms and the per-training-pair totals, and recompute any column exactly.
SCORE_FORMS = {
    "dense": "scores.npy, every score: n_train x n_val x 4 bytes",
    "topk": "no scores.npy: memory and disk linear in n_train + n_val",
}
# auto: dense up to this many scores (a 1 GiB scores.npy: 30,000 x 8,900), top-k past it
DENSE_MAX_SCORES = 2**28


def estimator_label(cfg: BuildConfig) -> str:
    """How a run's scores were estimated, in a few words: ``trak``, ``modules (256 per module),
    output loss``, ``trak, unit-normalised``."""
    name = cfg.estimator + (f" ({cfg.module_dim} per module)" if cfg.estimator == "modules" else "")
    name += f", output {cfg.output}" if cfg.output != "margin" else ""
    return name + (f", {cfg.normalize}-normalised" if cfg.normalize != "none" else "")


# Settings that do not change a run's results: a resume may change them.
NOT_IDENTITY = ("workers", "checkpoints")  # checkpoints are compared by content hash instead


def resolve(
    cfg: BuildConfig, n_train: int, check_device: bool = True, n_val: int = 0
) -> BuildConfig:
    """Fills in the data-dependent defaults and checks the settings (``check_device``: that
    this machine has the device; a cluster's driver may have none)."""
    if not cfg.checkpoints:
        raise ConfigError("no checkpoints given: pass --checkpoint PATH (repeatable)")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if check_device and cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    if cfg.half and cfg.device == "cpu":
        raise ConfigError(
            "--half needs --device cuda: on CPU float16 X^T X loses the inverse "
            "(scores near random) and float16 matmul is ~100x slower"
        )
    proj_dim = cfg.proj_dim or int(min(1024, max(64, 2 ** math.floor(math.log2(n_train / 4)))))
    grad_params = cfg.grad_params
    if grad_params == "auto":
        grad_params = "no-token-embedding" if cfg.device == "cpu" else "all"
    topk = min(cfg.topk, n_train)
    projector = cfg.projector
    if projector == "auto":
        # The dense Gaussian only pays off on CUDA with fast_jl: without it, a ViT-B/32's matrix
        # (hundreds of GiB) is regenerated every batch (measured on an H100, BENCHMARKS.md).
        fast_jl = importlib.util.find_spec("fast_jl") is not None
        projector = "gaussian" if cfg.device != "cpu" and fast_jl else "sketch"
    if projector not in PROJECTORS:
        raise ConfigError(
            f"--projector must be one of {', '.join(PROJECTORS)} or auto, got {projector!r}"
        )
    scores = cfg.scores
    if scores == "auto":
        scores = "dense" if n_train * n_val <= DENSE_MAX_SCORES else "topk"
    if scores not in SCORE_FORMS:
        raise ConfigError(
            f"--scores must be one of {', '.join(SCORE_FORMS)} or auto, got {cfg.scores!r}"
        )
    if cfg.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {cfg.topk}")
    if cfg.estimator not in ESTIMATORS:
        raise ConfigError(
            f"--estimator must be one of {', '.join(ESTIMATORS)}, got {cfg.estimator!r}"
        )
    if cfg.output not in OUTPUTS:
        raise ConfigError(f"--output must be one of {', '.join(OUTPUTS)}, got {cfg.output!r}")
    if cfg.normalize not in NORMALIZATIONS:
        raise ConfigError(
            f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {cfg.normalize!r}"
        )
    if cfg.module_dim < 0 or (cfg.module_dim and cfg.estimator != "modules"):
        raise ConfigError(
            f"--module-dim is the dimensions per module of --estimator modules (0: "
            f"{DEFAULT_MODULE_DIM}), got {cfg.module_dim} with --estimator {cfg.estimator}"
        )
    if cfg.shard_size < 0:
        raise ConfigError(
            f"--shard-size must be 0 (auto) or a number of pairs, got {cfg.shard_size}"
        )
    return replace(
        cfg,
        shard_size=cfg.shard_size or DEFAULT_SHARD_SIZE,
        proj_dim=proj_dim,
        grad_params=grad_params,
        topk=topk,
        projector=projector,
        scores=scores,
        module_dim=(cfg.module_dim or DEFAULT_MODULE_DIM) if cfg.estimator == "modules" else 0,
    )
