"""``--projector factored``: per-sample gradients of real-size CLIP models without forming them.

A featurize batch is one ``vmap``-ed forward and backward pass. Every weight that acts as a
matrix on its inputs (the attention in- and out-projections, the MLPs, the patch embedding and
any convolution of groups 1, the image and text projections, and the token embedding when it is
attributed: a linear layer over one-hot rows) gets a Kronecker "tap"
(``engine.attribution.kronecker``): the pass returns the LoGra projection P_r G P_c^T of its
per-sample gradient G (Choe et al. 2024, arXiv 2405.13954) and never G itself. The remaining
attributed parameters (norms, biases, positional and class embeddings, layer scales, grouped
convolutions) get their exact per-sample gradients from the same pass, as
``SelectiveGradientComputer`` computes them. The projector
(``projection.projector_for``) then count-sketches the blocks and the remaining gradients
together to ``proj_dim`` and applies one Gaussian, as FactGraSS does after its factored stage
(dattri ``algorithm/factgrass.py``). The whole is one fixed linear map of the gradient, seeded,
the same in the build and in every query.

- ``factored_layout``: which attributed weights are factored, found by running the model once
  and recording how each weight is used; their (k_r, k_c) blocks (``side_dim``).
- ``FactoredGradientComputer``: traker's ``AbstractGradientComputer``; its output is
  ``SelectiveGradientComputer``'s dict with each factored weight's block under
  ``block_key(name)`` in place of its gradient. The pass's embeddings also give the out-to-loss
  term without a second forward pass.
- ``gradient_computer_for``: the gradient computer a run's settings call for.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.attribution.gradients import SelectiveGradientComputer
from engine.attribution.kronecker import Block, KroneckerFactors, TapMode, UseRecorder
from engine.attribution.margin import ClipMargin
from engine.attribution.settings import BuildConfig
from engine.errors import ConfigError

BLOCK_SUFFIX = "@kron"  # the projector's key of a factored weight's (k_r, k_c) block
AUTOCAST = {"factored": None, "factored-bf16": torch.bfloat16}


def is_factored(cfg: BuildConfig) -> bool:
    """The run's gradients go through ``FactoredGradientComputer``."""
    return cfg.projector in AUTOCAST


def block_key(name: str) -> str:
    return name + BLOCK_SUFFIX


def side_dim(proj_dim: int) -> int:
    """k, the largest side of a weight's block (k_r = min(rows, k), k_c = min(cols, k)): about
    4 x proj_dim numbers per weight, as FactGraSS sizes its factored stage (blow-up 4), so the
    sketch that follows, not the Kronecker stage, sets the precision; a multiple of 8."""
    return max(8, 8 * math.ceil(math.sqrt(4 * proj_dim) / 8))


def _probe_inputs(model: torch.nn.Module, device: torch.device) -> tuple[Tensor, Tensor]:
    size = getattr(model.visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    length = int(getattr(model, "context_length", 77))
    return torch.zeros(1, 3, h, w, device=device), torch.zeros(
        1, length, dtype=torch.long, device=device
    )


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """nn.MultiheadAttention without its fused inference path (which bypasses
    ``F.multi_head_attention_forward``, so no tap would see its weights; and has no vmap rule)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def factored_layout(
    model: torch.nn.Module, names: Iterable[str], proj_dim: int
) -> dict[str, Block]:
    """The attributed weights that are factored, in the model's order, with their blocks.

    A weight is factored when every use of it in a forward pass (on zero inputs) is as the weight
    of ``F.linear``, ``F.conv2d`` with groups 1, the right operand of a 2-D matmul or a projection
    of ``F.multi_head_attention_forward``; any other use (a grouped convolution, a tied embedding,
    a transpose) leaves it to the exact per-sample path. On open_clip's ViT CLIPs: every attention
    in/out projection, MLP layer, the patch embedding and both projections; ModifiedResNet: its
    convolutions and attention-pool projections (batch norms fall back); timm towers (ConvNeXt):
    the stem, downsampling and MLP layers and the head (depthwise convolutions fall back).
    """
    wanted = set(names)
    params = dict(model.named_parameters())
    watched = {id(p): n for n, p in params.items() if n in wanted}
    recorder = UseRecorder(watched)
    image, text = _probe_inputs(model, next(model.parameters()).device)
    try:
        with torch.no_grad(), _no_mha_fastpath(), recorder:
            model(image, text)
    except Exception as err:  # an architecture the probe's zero inputs do not fit
        raise ConfigError(
            f"--projector factored could not run {type(model).__name__} on a probe input "
            f"({tuple(image.shape)} image, {tuple(text.shape)} tokens): {err}; "
            "use --projector sketch"
        ) from err
    k = side_dim(proj_dim)
    blocks = {}
    for n, p in params.items():
        if n in recorder.tapped and n not in recorder.other and p.dim() >= 2:
            rows, cols = p.shape[0], p[0].numel()
            blocks[n] = Block(rows, cols, min(rows, k), min(cols, k))
    return blocks


class FactoredGradientComputer(SelectiveGradientComputer):
    """Per-sample gradients of ``ClipMargin`` with every factored weight's gradient replaced by
    its Kronecker projection (LoGra, Choe et al. 2024), all from one ``vmap``-ed pass.

    Output: ``{"dense": {name: (B, *shape)} for the other attributed parameters, and
    {block_key(name): (B, k_r, k_c)} for the factored ones; "token": (B, L, width) or None;
    "ids": (B, L)}``. ``autocast`` runs the pass's forward and backward in that dtype (bfloat16),
    taps and weights staying float32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: ClipMargin,
        grad_dim: int,
        dtype: torch.dtype,
        device: str,
        grad_wrt: Iterable[str] | None = None,
        *,
        factors: KroneckerFactors,
        autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__(model, task, grad_dim, dtype, device, grad_wrt)
        self.factors = factors
        self.dense_names = [n for n in self.dense_names if n not in factors.blocks]
        if self.token_name in factors.blocks:  # its lookup has a tap: no per-row gradient
            self.token_name, self.token_module = None, None
        self.autocast = autocast
        self._aux: tuple[Any, tuple[Tensor, Tensor, Tensor]] | None = None

    def tapped_output(
        self,
        rest: dict[str, Tensor],
        taps: dict[str, Tensor],
        offset: Tensor | None,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The margin of one pair with the attributed non-factored weights ``rest``, the taps
        ``taps`` ({name: (k_r, k_c)}, zero) on the factored ones and the token ``offset``, over
        ``params`` and ``buffers``; and its embeddings (``ClipMargin.margin_and_embeddings``)."""
        self._offset = offset
        weights = {**params, **rest}
        # the weights as the ops will see them (inside vmap: this call's batched wrappers)
        ids = {id(weights[n]): n for n in self.factors.blocks}
        with TapMode(ids, taps, self.factors), self._autocast():
            margin, aux = self.modelout_fn.margin_and_embeddings(
                self.model, weights, buffers, image, text, sim_image, sim_text
            )
        return margin.float(), aux  # the backward runs outside autocast, as it should

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        device = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device, dtype=self.autocast)

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        with self.token_offset_hook(), sdpa_kernel(SDPBackend.MATH), _no_mha_fastpath():
            yield

    def _grads(
        self,
        rest: dict[str, Tensor],
        fixed: dict[str, Tensor],
        buffers: dict[str, Tensor],
        inputs: tuple[Tensor, Tensor, Tensor, Tensor],
        over_checkpoints: bool,
    ) -> tuple[dict[str, Any], Tensor | None, tuple[Tensor, Tensor, Tensor]]:
        """One vmap of the tapped margin's gradient: over the pairs of a batch (weights shared)
        or, ``over_checkpoints``, over stacked checkpoints (one pair). Returns the dense dict,
        the token gradient (or None) and the embeddings (``margin_and_embeddings``)."""
        image, text, sim_image, sim_text = inputs
        batch = sim_image.shape[0]
        taps = self.factors.zeros(batch)  # {name: (batch, k_r, k_c)}
        offset = None
        if self.token_name is not None:
            width = self.params[self.token_name].shape[-1]
            offset = torch.zeros(batch, text.shape[-1], width, device=text.device)
        argnums = (0, 1, 2) if offset is not None else (0, 1)
        grad_fn = torch.func.grad(self.tapped_output, argnums=argnums, has_aux=True)
        weights, pair = (0, None) if over_checkpoints else (None, 0)
        in_dims = (
            weights,
            0,
            0 if offset is not None else None,
            weights,
            weights,
            pair,
            pair,
            0,
            0,
        )
        with self._pass():
            grads, aux = torch.func.vmap(grad_fn, in_dims=in_dims)(
                rest, taps, offset, fixed, buffers, image, text, sim_image, sim_text
            )
        dense = {n: g.float() for n, g in grads[0].items()}
        dense.update({block_key(n): g.float() for n, g in grads[1].items()})
        return dense, (grads[2].float() if offset is not None else None), aux

    def compute_per_sample_grad(self, batch: tuple[Tensor, Tensor, Tensor]) -> dict[str, Any]:  # type: ignore[override]
        image, text, sim_idx = self._on_device(batch)
        sim_image, sim_text = self.modelout_fn.batch_embeddings(sim_idx)  # (B, S, d)
        rest = {n: self.params[n] for n in self.dense_names}
        inputs = (image, text, sim_image, sim_text)
        dense, token, aux = self._grads(rest, self.params, self.buffers, inputs, False)
        self._aux = (batch, aux)  # compute_loss_grad of the same batch reuses the embeddings
        return {"dense": dense, "token": token, "ids": text}

    def compute_loss_grad(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:  # type: ignore[override]
        """1 - p_i (B, 1) from the embeddings of ``compute_per_sample_grad``'s pass when it was
        given this very batch (as ``TRAKer.featurize`` does), else from a forward pass."""
        if self._aux is None or self._aux[0] is not batch:
            return super().compute_loss_grad(batch)
        img, txt, scale = self._aux[1]  # (B, d), (B, d), (B,)
        self._aux = None
        sim_idx = batch[2].to(self.device)
        return self.modelout_fn.out_to_loss(img, txt, scale, sim_idx)

    def checkpoint_grads(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> dict[str, Any]:
        """One pair's factored gradients at M stacked checkpoints (``CheckpointStack``)."""
        rest = {n: params[n] for n in self.dense_names}
        fixed = {n: p for n, p in params.items() if n not in rest}
        inputs = (image, text, sim_image, sim_text)
        dense, token, _ = self._grads(rest, fixed, buffers, inputs, True)
        ids = text.unsqueeze(0).expand(sim_image.shape[0], -1)
        return {"dense": dense, "token": token, "ids": ids}


def gradient_computer_for(
    model: torch.nn.Module, cfg: BuildConfig, names: list[str]
) -> Callable[..., SelectiveGradientComputer]:
    """What makes the run's gradient computers, called as traker calls its
    ``gradient_computer`` (model, task, grad_dim, dtype, device, grad_wrt): for ``--projector
    factored`` a ``FactoredGradientComputer`` whose Kronecker factors every computer made by it
    shares (one per checkpoint in a query engine); else ``SelectiveGradientComputer``."""
    if not is_factored(cfg):
        return SelectiveGradientComputer
    factors = KroneckerFactors(factored_layout(model, names, cfg.proj_dim), cfg.seed, cfg.device)
    return functools.partial(
        FactoredGradientComputer, factors=factors, autocast=AUTOCAST[cfg.projector]
    )
