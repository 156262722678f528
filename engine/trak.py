"""trakview's implementations of traker's extension points for CLIP.

traker 0.3.2's stock CLIP pipeline has defects on CPU and for CLIP in general (see README,
"Why not traker's stock CLIP pipeline"); rather than fork it, trakview plugs its own classes into
``trak.TRAKer``:

- ``ClipMargin`` (``AbstractModelOutput``): the CLIP margin of the TRAK paper (Section 5.1.1; seed
  tutorial "Applying TRAK to a custom task #3: CLIP") over a seeded, uniform simulated batch that
  excludes the pair itself. Embeddings are instance state, set per checkpoint.
- ``SimulatedBatch``: which training pairs form each pair's simulated batch.
- ``SelectiveGradientComputer`` (``AbstractGradientComputer``): per-sample gradients (torch.func)
  of the attributed parameters only. The token embedding, when attributed, is differentiated
  through its looked-up rows: its per-sample gradient touches only the caption's tokens.
- ``KeyedProjector`` (``AbstractProjector``): a Gaussian JL projection whose blocks are keyed by
  parameter name (and token id for the token embedding), generated once and kept in memory.
- ``RegularizedScoreComputer`` (``AbstractScoreComputer``): X (X^T X + lambda I)^-1 in float64,
  lambda chosen from the data when not given, with the conditioning recorded and warned about.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from trak.gradient_computers import AbstractGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import AbstractProjector, ProjectionType
from trak.score_computers import AbstractScoreComputer

log = logging.getLogger(__name__)

TOKEN_EMBEDDING_SUFFIX = "token_embedding.weight"
# Checks the conditioning of X^T X + lambda I; beyond this float32 scores are dominated by noise.
MAX_CONDITION = 1e7


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
            raise ValueError(f"the simulated batch needs at least 2 training pairs, got {n_train}")
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

    def _sim(self, sim_idx: Tensor) -> tuple[Tensor, Tensor]:
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
        img, txt, _ = torch.func.functional_call(
            model, (weights, buffers), args=(image.unsqueeze(0), text.unsqueeze(0))
        )[:3]  # (1, d) each; SigLIP-style models return a logit bias too
        s_ii = (img * txt).sum()
        s_ij = (img @ sim_text.T).squeeze(0)  # (S,) this image against the batch's captions
        s_ji = (txt @ sim_image.T).squeeze(0)  # (S,) this caption against the batch's images
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
            img, txt, scale = out[0], out[1], out[2]  # (B, d), (B, d), ()
            sim_image, sim_text = self._sim(sim_idx)  # (B, S, d)
            s_ii = (img * txt).sum(-1, keepdim=True)  # (B, 1)
            row = torch.cat([s_ii, torch.einsum("bd,bsd->bs", img, sim_text)], 1) * scale
            col = torch.cat([s_ii, torch.einsum("bd,bsd->bs", txt, sim_image)], 1) * scale
            p = (row.softmax(1)[:, 0] + col.softmax(1)[:, 0]) / 2
        return (1 - p).unsqueeze(1)


def select_parameters(model: torch.nn.Module, grad_params: str) -> list[str]:
    """Names of the parameters that are attributed.

    Args:
        grad_params: ``all``; ``no-token-embedding`` (every parameter but the token embedding);
            ``visual`` / ``text`` (one tower plus the shared logit scale); or a comma-separated
            list of name prefixes, e.g. ``visual.transformer,text_projection``.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    visual = [n for n in names if n.startswith("visual.")]
    if grad_params == "all":
        chosen = names
    elif grad_params == "no-token-embedding":
        chosen = [n for n in names if not n.endswith(TOKEN_EMBEDDING_SUFFIX)]
    elif grad_params == "visual":
        chosen = visual
    elif grad_params == "text":
        chosen = [n for n in names if n not in visual and not n.endswith(TOKEN_EMBEDDING_SUFFIX)]
    else:
        prefixes = [p.strip() for p in grad_params.split(",") if p.strip()]
        chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
        unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unknown:
            raise ValueError(
                f"--grad-params prefixes {unknown} match no parameter; expected 'all', "
                f"'no-token-embedding', 'visual', 'text' or prefixes of names such as {names[:4]}"
            )
    if not chosen:
        raise ValueError(f"--grad-params {grad_params!r} selects no parameter")
    return chosen


def _key(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


class SelectiveGradientComputer(AbstractGradientComputer):
    """Per-sample gradients of ``ClipMargin`` for the attributed parameters only.

    ``grad_wrt`` names the attributed parameters; only those are differentiated (traker's
    FunctionalGradientComputer computes every gradient, then drops some). A token embedding in
    ``grad_wrt`` is differentiated through its looked-up rows (a zero offset added to the lookup's
    output), which gives the same gradient as the dense (vocab, width) one without forming it.

    ``compute_per_sample_grad`` returns a dict for ``KeyedProjector``:
    ``{"dense": {name: (B, *shape)}, "token": (B, L, width) or None, "ids": (B, L)}``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: ClipMargin,
        grad_dim: int,
        dtype: torch.dtype,
        device: str,
        grad_wrt: Iterable[str] | None = None,
    ) -> None:
        super().__init__(model, task, grad_dim, dtype, device)
        names = list(grad_wrt) if grad_wrt is not None else [n for n, _ in model.named_parameters()]
        self.token_name = next((n for n in names if n.endswith(TOKEN_EMBEDDING_SUFFIX)), None)
        self.dense_names = [n for n in names if n != self.token_name]
        self.token_module = (
            model.get_submodule(self.token_name.rsplit(".", 1)[0]) if self.token_name else None
        )
        self._offset: Tensor | None = None
        self.load_model_params(model)

    def load_model_params(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}

    @contextlib.contextmanager
    def _token_offset_hook(self) -> Iterator[None]:
        if self.token_module is None:
            yield
            return

        def add_offset(module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
            return output if self._offset is None else output + self._offset

        handle = self.token_module.register_forward_hook(add_offset)
        try:
            yield
        finally:
            handle.remove()
            self._offset = None

    def _per_sample_output(
        self,
        dense: dict[str, Tensor],
        offset: Tensor | None,
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> Tensor:
        return self.output_with(
            dense, offset, self.params, self.buffers, image, text, sim_image, sim_text
        )

    def output_with(
        self,
        dense: dict[str, Tensor],
        offset: Tensor | None,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> Tensor:
        """The margin with the attributed weights ``dense`` (and the token-embedding ``offset``)
        over the other ``params`` and ``buffers``: the function both gradients differentiate."""
        self._offset = offset
        return self.modelout_fn.get_output(
            self.model, {**params, **dense}, buffers, image, text, sim_image, sim_text
        )

    def _on_device(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The batch on the model's device (the build passes CPU tensors to ``featurize``)."""
        image, text, sim_idx = (t.to(self.device, non_blocking=True) for t in batch)
        return image, text, sim_idx

    def compute_per_sample_grad(self, batch: tuple[Tensor, Tensor, Tensor]) -> dict[str, Any]:  # type: ignore[override]
        image, text, sim_idx = self._on_device(batch)
        sim_image, sim_text = self.modelout_fn._sim(sim_idx)  # (B, S, d)
        dense = {n: self.params[n] for n in self.dense_names}
        offset = None
        if self.token_name is not None:
            width = self.params[self.token_name].shape[1]
            offset = torch.zeros(text.shape[0], text.shape[1], width, device=text.device)
        argnums = (0, 1) if offset is not None else 0
        grad_fn = torch.func.grad(self._per_sample_output, argnums=argnums)
        in_dims = (None, 0 if offset is not None else None, 0, 0, 0, 0)
        # Math attention: the fused kernels have no vmap batching rule and fall back to a loop.
        with self._token_offset_hook(), sdpa_kernel(SDPBackend.MATH):
            grads = torch.func.vmap(grad_fn, in_dims=in_dims)(
                dense, offset, image, text, sim_image, sim_text
            )
        if offset is None:
            return {"dense": grads, "token": None, "ids": text}
        return {"dense": grads[0], "token": grads[1], "ids": text}

    def compute_loss_grad(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:  # type: ignore[override]
        return self.modelout_fn.get_out_to_loss_grad(
            self.model, self.params, self.buffers, self._on_device(batch)
        )


class CheckpointStack:
    """The weights of M checkpoints of one architecture stacked along a first dimension, to
    compute one pair's margin gradient at every checkpoint in one ``vmap`` (a new query): for a
    small model the per-call overhead, not the arithmetic, dominates a gradient of one pair.

    ``computer`` is the ``SelectiveGradientComputer`` of any of the checkpoints (its model,
    attributed parameters and margin function are used, not its weights).
    """

    def __init__(self, computers: list[SelectiveGradientComputer]) -> None:
        self.computer = computers[0]
        self.params = {
            n: torch.stack([c.params[n] for c in computers]) for n in computers[0].params
        }
        self.buffers = {
            n: torch.stack([c.buffers[n] for c in computers]) for n in computers[0].buffers
        }
        self.n_models = len(computers)

    @staticmethod
    def elements(model: torch.nn.Module, n_models: int) -> int:
        """Numbers a stack of ``n_models`` checkpoints of ``model`` holds."""
        return n_models * sum(p.numel() for p in model.parameters())

    def margin_grads(
        self, image: Tensor, text: Tensor, sim_image: Tensor, sim_text: Tensor
    ) -> dict[str, Any]:
        """Gradients of one pair's margin at every checkpoint.

        Args:
            image: (3, H, W); text: (L,) token ids; sim_image, sim_text: (M, S, d) the
                simulated batch's embeddings at each checkpoint.

        Returns:
            ``SelectiveGradientComputer.compute_per_sample_grad``'s dict with the M checkpoints
            as its batch: ``{"dense": {name: (M, *shape)}, "token": (M, L, width) or None,
            "ids": (M, L)}``.
        """
        c = self.computer
        dense = {n: self.params[n] for n in c.dense_names}
        rest = {n: p for n, p in self.params.items() if n not in dense}
        offset = None
        if c.token_name is not None:
            width = self.params[c.token_name].shape[-1]
            offset = torch.zeros(self.n_models, text.shape[0], width, device=text.device)
        grad_fn = torch.func.grad(c.output_with, argnums=(0, 1) if offset is not None else 0)
        in_dims = (0, 0 if offset is not None else None, 0, 0, None, None, 0, 0)
        with c._token_offset_hook(), sdpa_kernel(SDPBackend.MATH):
            grads = torch.func.vmap(grad_fn, in_dims=in_dims)(
                dense, offset, rest, self.buffers, image, text, sim_image, sim_text
            )
        ids = text.unsqueeze(0).expand(self.n_models, -1)
        if offset is None:
            return {"dense": grads, "token": None, "ids": ids}
        return {"dense": grads[0], "token": grads[1], "ids": ids}

    @torch.no_grad()
    def embeddings(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """(M, d) unit image and text embeddings of one pair ((3, H, W), (L,)) per checkpoint."""
        model = self.computer.model

        def forward(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out = torch.func.functional_call(
                model, (params, buffers), args=(image.unsqueeze(0), text.unsqueeze(0))
            )
            return out[0][0], out[1][0]

        # nn.MultiheadAttention's inference fast path has no vmap batching rule (a slow loop)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.vmap(forward)(self.params, self.buffers)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


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
