"""The JL projection of per-sample gradients (traker's ``AbstractProjector``).

``KeyedProjector`` generates its Gaussian blocks from keys (parameter name, token id), once, and
keeps them in memory (traker's ``BasicProjector`` regenerates its matrix every batch on CPU);
``--projector sketch`` applies it in O(D) per pair. ``projector_for`` is the one place a run's
projection is made, so the build and every later query use exactly the same one.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor
from trak.projectors import AbstractProjector, ProjectionType

from engine.attribution.factored import BLOCK_SUFFIX, block_key, factored_layout, is_factored
from engine.attribution.gradients import TOKEN_EMBEDDING_SUFFIX
from engine.attribution.settings import BuildConfig

log = logging.getLogger(__name__)


def _key(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


class KeyedProjector(AbstractProjector):
    """Gaussian JL projection (entries N(0, 1/proj_dim)) in blocks keyed by parameter name.

    The block of a dense parameter is generated from ``(seed, name)`` and the block of token ``t``
    of the token embedding from ``(seed, name, t)``, so the projection of a gradient does not
    depend on batching, and the (vocab * width, proj_dim) token block is never formed: a caption
    touches only its own tokens' rows. Dense blocks are concatenated into one matrix kept in memory
    (up to ``max_dense_bytes``; past that they are regenerated per batch); token blocks are kept in
    an LRU cache of ``max_token_blocks`` entries and at most ``max_token_bytes`` (a ViT-B/32 block
    at proj_dim 2048 is 4 MiB: 8192 of them would take 32 GiB of GPU memory). Blocks missing from
    the cache are generated on CPU threads in parallel (the generator is the CPU's on every device,
    so a run built on CUDA is queried on CPU with the same projection). The same projection serves
    every checkpoint.
    ``matmul_dtype=torch.bfloat16`` rounds gradients and matrix to bfloat16 for the dense product
    (accumulating in float32): ~0.3% noise per projected coordinate, far below the JL distortion
    itself (~1/sqrt(proj_dim)), for about half the time on CPUs with bfloat16 instructions.
    ``sketch_dim=m`` replaces the dense Gaussian matrix of the dense parameters by a count sketch
    to m buckets (each entry added, with a random sign, to one random bucket) followed by an
    (m, proj_dim) Gaussian: the same kind of linear JL map (its rows are signed copies of the
    Gaussian's rows), O(D + m * proj_dim) work per pair instead of O(D * proj_dim). The count
    sketch adds an inner-product variance of order 1/m to the Gaussian's 1/proj_dim
    (Clarkson & Woodruff 2013), so m = 4 * proj_dim costs about a quarter more variance.
    ``dense_projector`` (traker's ``CudaProjector`` on CUDA, see ``cuda_dense_projector``)
    replaces the dense product; its projection differs per checkpoint (seeded by model id).
    """

    def __init__(
        self,
        param_shapes: dict[str, tuple[int, ...]],
        token_name: str | None,
        proj_dim: int,
        seed: int = 0,
        device: str = "cpu",
        max_dense_bytes: int = 2 << 30,
        max_token_blocks: int = 8192,
        max_token_bytes: int = 4 << 30,
        matmul_dtype: torch.dtype = torch.float32,
        dense_projector: AbstractProjector | None = None,
        sketch_dim: int = 0,
    ) -> None:
        dense_dim = sum(int(np.prod(s)) for n, s in param_shapes.items() if n != token_name)
        super().__init__(dense_dim, proj_dim, seed, ProjectionType.normal, device)
        self.dense_names = [n for n in param_shapes if n != token_name]
        self.param_shapes = param_shapes
        self.token_name = token_name
        self.max_dense_bytes = max_dense_bytes
        width = int(param_shapes[token_name][1]) if token_name else 1
        self.max_token_blocks = max(
            1, min(max_token_blocks, max_token_bytes // (4 * width * proj_dim))
        )
        self.matmul_dtype = matmul_dtype
        self.dense_projector = dense_projector
        self.sketch_dim = sketch_dim
        # per dense parameter: int32 buckets and signs; and the (m, k) matrix
        self._sketch: tuple[list[Tensor], list[Tensor], Tensor] | None = None
        self._dense: Tensor | None = None
        self._tokens: OrderedDict[int, Tensor] = OrderedDict()

    def _gaussian_cpu(self, rows: int, *key: Any) -> Tensor:
        gen = torch.Generator().manual_seed(_key(self.seed, *key))
        return torch.randn(rows, self.proj_dim, generator=gen) / self.proj_dim**0.5

    def _gaussian(self, rows: int, *key: Any) -> Tensor:
        return self._gaussian_cpu(rows, *key).to(self.device)

    def _sketch_of(self, name: str) -> tuple[Tensor, Tensor]:
        """Count-sketch bucket (in [0, sketch_dim)) and sign of every entry of one parameter."""
        gen = torch.Generator().manual_seed(_key(self.seed, "sketch", name))
        numel = int(np.prod(self.param_shapes[name]))
        buckets = torch.randint(0, self.sketch_dim, (numel,), generator=gen)
        signs = torch.randint(0, 2, (numel,), generator=gen).float() * 2 - 1
        return buckets.to(self.device), signs.to(self.device)

    def _sketch_matrix(self) -> Tensor:
        return self._gaussian(self.sketch_dim, "sketch-gaussian")  # (m, k)

    def dense_block(self, name: str) -> Tensor:
        """(numel, proj_dim) block of one dense parameter: the exact linear map applied to it."""
        if self.sketch_dim:
            buckets, signs = self._sketch_of(name)
            return signs[:, None] * self._sketch_matrix()[buckets]
        return self._gaussian(int(np.prod(self.param_shapes[name])), name)

    def token_block(self, token: int) -> Tensor:
        """(width, proj_dim) block of one row of the token embedding."""
        return self.token_blocks([token])[0]

    def token_blocks(self, tokens: list[int]) -> Tensor:
        """(len(tokens), width, proj_dim): the blocks of these rows of the token embedding.

        Blocks missing from the cache are generated together, on several CPU threads (a ViT-B/32
        block at proj_dim 2048 takes ~4 ms), and moved to the device in one copy.
        """
        found: dict[int, Tensor] = {}
        for t in tokens:
            block = self._tokens.get(t)
            if block is not None:
                self._tokens.move_to_end(t)
                found[t] = block
        missing = list(dict.fromkeys(t for t in tokens if t not in found))
        if missing:
            width = int(self.param_shapes[self.token_name][1])  # type: ignore[index]
            threads = min(len(missing), os.cpu_count() or 1, 16)
            if threads > 1:
                with ThreadPoolExecutor(threads) as pool:
                    made = list(
                        pool.map(lambda t: self._gaussian_cpu(width, self.token_name, t), missing)
                    )
            else:
                made = [self._gaussian_cpu(width, self.token_name, t) for t in missing]
            stacked = torch.stack(made).to(self.device)
            for t, block in zip(missing, stacked, strict=True):
                block = block.clone()  # a view would keep the whole batch of blocks alive
                found[t] = block
                self._tokens[t] = block
                if len(self._tokens) > self.max_token_blocks:
                    self._tokens.popitem(last=False)
        return torch.stack([found[t] for t in tokens])

    def _project_dense(self, grads: dict[str, Tensor]) -> Tensor:
        batch = next(iter(grads.values())).shape[0]
        flat = [grads[n].reshape(batch, -1) for n in self.dense_names]
        if self.sketch_dim:
            if self._sketch is None:
                parts = [self._sketch_of(n) for n in self.dense_names]
                self._sketch = (
                    [b.to(torch.int32) for b, _ in parts],
                    [s for _, s in parts],
                    self._sketch_matrix(),
                )
            buckets, signs, matrix = self._sketch
            # a scatter into a (B, m) buffer that stays in cache: ~3x faster than (B, D) @ (D, k).
            # ViT-B/32 on an H100: 2.3 ms per pair (more than its per-sample gradients); a CSR
            # sparse matrix product (cuSPARSE) in its place was slower there, 3.9 ms per pair.
            sketch = torch.zeros(batch, self.sketch_dim, device=matrix.device)  # (B, m)
            # one parameter at a time, in the same order as one scatter of the concatenation:
            # no (B, D) copies of the whole gradient (2 x 16 GiB for ViT-B/32 at batch 32)
            for g, b, s in zip(flat, buckets, signs, strict=True):
                sketch.index_add_(1, b, g * s)
            return sketch @ matrix  # (B, m) @ (m, k)
        dtype = self.matmul_dtype  # bfloat16 halves the cost on CPUs with AVX512-BF16 / AMX
        if self.grad_dim * self.proj_dim * dtype.itemsize <= self.max_dense_bytes:
            if self._dense is None:
                self._dense = torch.cat([self.dense_block(n) for n in self.dense_names]).to(dtype)
            return (torch.cat(flat, 1).to(dtype) @ self._dense).float()  # (B, D) @ (D, k)
        return sum(
            (g.to(dtype) @ self.dense_block(n).to(dtype)).float()
            for n, g in zip(self.dense_names, flat, strict=True)
        )

    def _project_tokens(self, token_grads: Tensor, ids: Tensor) -> Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)  # (U,), (B, L)
        batch, _, width = token_grads.shape
        per_token = torch.zeros(batch, len(unique), width, device=token_grads.device)
        per_token.scatter_add_(1, inverse.unsqueeze(-1).expand(-1, -1, width), token_grads)
        blocks = self.token_blocks(unique.tolist())  # (U, width, k)
        return per_token.reshape(batch, -1) @ blocks.reshape(-1, self.proj_dim)

    def project(self, grads: dict[str, Any], model_id: int) -> Tensor:  # type: ignore[override]
        """Projects the gradient computer's output to (B, proj_dim)."""
        out: Tensor | int = 0
        if self.dense_names and self.dense_projector is not None:
            dense = {n: grads["dense"][n] for n in self.dense_names}  # fixed order
            out = self.dense_projector.project(dense, model_id=model_id).float()
        elif self.dense_names:
            out = self._project_dense(grads["dense"])
        if grads.get("token") is not None:
            out = out + self._project_tokens(grads["token"], grads["ids"])
        return out

    def free_memory(self) -> None:
        self._dense = None
        self._sketch = None
        self._tokens.clear()


def cuda_dense_projector(
    grad_dim: int, proj_dim: int, seed: int, device: str, max_batch_size: int = 32
) -> AbstractProjector | None:
    """traker's fast CUDA projector (``fast_jl``) for the dense parameters, or None when the
    device is not CUDA or ``fast_jl`` is not installed (``pip install traker[fast]``)."""
    if not str(device).startswith("cuda"):
        return None
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        log.info("fast_jl is not installed: projecting with trakview's keyed Gaussian matrix")
        return None
    from trak.projectors import CudaProjector

    return CudaProjector(
        grad_dim, proj_dim, seed, ProjectionType.rademacher, device, max_batch_size
    )


def module_of(name: str) -> str:
    """The module a parameter (or a factored weight's block) belongs to: ``...attn.in_proj``
    for ``...attn.in_proj_weight`` / ``_bias``, ``a.b`` for ``a.b.weight`` / ``a.b.bias``, the
    name itself for a parameter of the model's root (``text_projection``, ``logit_scale``)."""
    name = name.removesuffix(BLOCK_SUFFIX)
    head, _, last = name.rpartition(".")
    if last.startswith("in_proj_"):
        return f"{head}.in_proj" if head else "in_proj"
    if last in ("weight", "bias") and head:
        return head
    return name


def module_groups(names: list[str]) -> dict[str, list[str]]:
    """Parameter names by module, modules and names in the order given."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(module_of(n), []).append(n)
    return groups


class ModuleProjector(AbstractProjector):
    """``--estimator modules``: each module's gradient projected to its own block of dimensions
    (``KeyedProjector`` per module, seeded by its name), the blocks concatenated, so that
    X^T X can be taken block by block (one per module: ``RegularizedScoreComputer`` with
    ``blocks``). A module of D parameters gets min(D, module_dim) dimensions."""

    def __init__(self, parts: dict[str, KeyedProjector], device: str = "cpu") -> None:
        self.parts = parts
        self.blocks = [p.proj_dim for p in parts.values()]
        total = sum(self.blocks)
        grad_dim = sum(p.grad_dim for p in parts.values())
        super().__init__(grad_dim, total, 0, ProjectionType.normal, device)
        self.dense_projector = None

    def project(self, grads: dict[str, Any], model_id: int) -> Tensor:  # type: ignore[override]
        out = []
        for part in self.parts.values():
            sub = {
                "dense": {n: grads["dense"][n] for n in part.dense_names},
                "token": grads.get("token") if part.token_name else None,
                "ids": grads.get("ids"),
            }
            out.append(part.project(sub, model_id))  # (B, k_m)
        return torch.cat(out, dim=1)

    def free_memory(self) -> None:
        for part in self.parts.values():
            part.free_memory()


def projector_for(
    model: torch.nn.Module, cfg: BuildConfig, names: list[str]
) -> KeyedProjector | ModuleProjector:
    """The run's projection of the gradients of parameters ``names`` (the build and every later
    query must use the same one): on CUDA with ``fast_jl`` installed, traker's CudaProjector for
    the dense parameters. With ``--projector factored`` its dense "parameters" are the factored
    weights' (k_r, k_c) blocks and the other attributed parameters, count-sketched together."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    token = next((n for n in names if n.endswith(TOKEN_EMBEDDING_SUFFIX)), None)
    if is_factored(cfg):
        blocks = factored_layout(model, names, cfg.proj_dim)
        shapes = {n: s for n, s in shapes.items() if n not in blocks}
        shapes.update({block_key(n): (b.k_rows, b.k_cols) for n, b in blocks.items()})
        token = None if token in blocks else token
    if cfg.estimator == "modules":
        return _module_projector(shapes, token, cfg)
    dense_dim = sum(math.prod(s) for n, s in shapes.items() if n != token)
    return KeyedProjector(
        shapes,
        token,
        cfg.proj_dim,
        seed=cfg.seed,
        device=cfg.device,
        matmul_dtype=torch.bfloat16 if cfg.projector == "gaussian-bf16" else torch.float32,
        sketch_dim=4 * cfg.proj_dim if cfg.projector == "sketch" or is_factored(cfg) else 0,
        dense_projector=(
            cuda_dense_projector(dense_dim, cfg.proj_dim, cfg.seed, cfg.device)
            if cfg.projector == "gaussian"
            else None
        ),
    )


def _module_projector(
    shapes: dict[str, tuple[int, ...]], token: str | None, cfg: BuildConfig
) -> ModuleProjector:
    """One ``KeyedProjector`` per module (sketched as ``--projector`` says; the token embedding,
    a module of its own, by keyed token blocks)."""
    parts = {}
    for module, members in module_groups(list(shapes)).items():
        sub = {n: shapes[n] for n in members}
        tok = token if token in sub else None
        numel = sum(math.prod(s) for n, s in sub.items() if n != tok)
        if tok is not None:
            numel += math.prod(shapes[tok])
        k = max(1, min(numel, cfg.module_dim))
        sketch = cfg.projector == "sketch" or is_factored(cfg)
        parts[module] = KeyedProjector(
            sub,
            tok,
            k,
            seed=zlib.crc32(repr((cfg.seed, "module", module)).encode()),
            device=cfg.device,
            matmul_dtype=torch.bfloat16 if cfg.projector == "gaussian-bf16" else torch.float32,
            sketch_dim=4 * k if sketch and numel > 4 * k else 0,
        )
    return ModuleProjector(parts, cfg.device)
