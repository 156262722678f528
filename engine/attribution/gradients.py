"""Per-sample gradients of the CLIP margin for the attributed parameters only.

- ``select_parameters``: which parameters are attributed (``--grad-params``).
- ``SelectiveGradientComputer`` (traker's ``AbstractGradientComputer``): per-sample gradients
  (torch.func) of the attributed parameters only (traker's FunctionalGradientComputer computes
  every gradient, then drops some); the token embedding, when attributed, is differentiated
  through its looked-up rows: its per-sample gradient touches only the caption's tokens.
- ``CheckpointStack``: one pair's gradient at every checkpoint in one ``vmap`` (new queries).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from trak.gradient_computers import AbstractGradientComputer

from engine.attribution.margin import ClipMargin
from engine.errors import ConfigError

TOKEN_EMBEDDING_SUFFIX = "token_embedding.weight"


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
            raise ConfigError(
                f"--grad-params prefixes {unknown} match no parameter; expected 'all', "
                f"'no-token-embedding', 'visual', 'text' or prefixes of names such as {names[:4]}"
            )
    if not chosen:
        raise ConfigError(f"--grad-params {grad_params!r} selects no parameter")
    return chosen


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
    def token_offset_hook(self) -> Iterator[None]:
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
        sim_image, sim_text = self.modelout_fn.batch_embeddings(sim_idx)  # (B, S, d)
        dense = {n: self.params[n] for n in self.dense_names}
        offset = None
        if self.token_name is not None:
            width = self.params[self.token_name].shape[1]
            offset = torch.zeros(text.shape[0], text.shape[1], width, device=text.device)
        argnums = (0, 1) if offset is not None else 0
        grad_fn = torch.func.grad(self._per_sample_output, argnums=argnums)
        in_dims = (None, 0 if offset is not None else None, 0, 0, 0, 0)
        # Math attention: the fused kernels have no vmap batching rule and fall back to a loop.
        with self.token_offset_hook(), sdpa_kernel(SDPBackend.MATH):
            grads = torch.func.vmap(grad_fn, in_dims=in_dims)(
                dense, offset, image, text, sim_image, sim_text
            )
        if offset is None:
            return {"dense": grads, "token": None, "ids": text}
        return {"dense": grads[0], "token": grads[1], "ids": text}

    def checkpoint_grads(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        image: Tensor,
        text: Tensor,
        sim_image: Tensor,
        sim_text: Tensor,
    ) -> dict[str, Any]:
        """One pair's margin gradient at M checkpoints whose weights ``params`` and ``buffers``
        are stacked along a first dimension (``CheckpointStack``); shapes as there."""
        n_models = sim_image.shape[0]
        dense = {n: params[n] for n in self.dense_names}
        rest = {n: p for n, p in params.items() if n not in dense}
        offset = None
        if self.token_name is not None:
            width = params[self.token_name].shape[-1]
            offset = torch.zeros(n_models, text.shape[0], width, device=text.device)
        grad_fn = torch.func.grad(self.output_with, argnums=(0, 1) if offset is not None else 0)
        in_dims = (0, 0 if offset is not None else None, 0, 0, None, None, 0, 0)
        with self.token_offset_hook(), sdpa_kernel(SDPBackend.MATH):
            grads = torch.func.vmap(grad_fn, in_dims=in_dims)(
                dense, offset, rest, buffers, image, text, sim_image, sim_text
            )
        ids = text.unsqueeze(0).expand(n_models, -1)
        if offset is None:
            return {"dense": grads, "token": None, "ids": ids}
        return {"dense": grads[0], "token": grads[1], "ids": ids}

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
        return self.computer.checkpoint_grads(
            self.params, self.buffers, image, text, sim_image, sim_text
        )

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
