"""Kronecker-factored (LoGra) projections of weight gradients, applied inside the forward pass.

For a weight W seen as an (r, c) matrix (a linear layer's (out, in), a matrix ``x @ W``'s
(in, out), a convolution's (out, in * kh * kw)) and seeded Gaussian factors P_r (k_r, r) and
P_c (k_c, c), the margin f evaluated at W + P_r^T Z P_c with a zero (k_r, k_c) "tap" Z has

    d f / d Z = P_r (d f / d W) P_c^T = (P_r kron P_c) vec(d f / d W),

the Kronecker projection of the per-sample gradient (LoGra: Choe et al. 2024, arXiv 2405.13954,
Section 3: the projection as a LoRA-like bottleneck initialised with P_in, P_out and a zero
middle). The tap is added to the op's output (P_r^T Z P_c x = ((x P_c^T) Z^T) P_r for a linear
layer): per pair and token O(k (r + c)) work, and no (r, c) per-sample gradient exists at all.

- ``KroneckerFactors``: the factors of every factored weight, generated from (seed, name).
- ``TapMode``: a ``TorchFunctionMode`` that adds the taps wherever a factored weight is used by
  ``F.linear``, ``F.conv2d`` (groups 1), ``x @ W``, ``F.embedding`` (a linear layer over
  one-hot rows) or ``F.multi_head_attention_forward``
  (re-implemented here in plain ops, so that its packed in-projection and out-projection, which
  no module hook sees, get their taps).
- ``UseRecorder``: which weights are used only in those ways (the ones that can be factored).
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
_MHA = inspect.signature(F.multi_head_attention_forward)
_CONV2D = (
    ("input", None),
    ("weight", None),
    ("bias", None),
    ("stride", 1),
    ("padding", 0),
    ("dilation", 1),
    ("groups", 1),
)
_MHA_WEIGHTS = (
    "in_proj_weight",
    "out_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
)


@dataclass(frozen=True)
class Block:
    """A factored weight seen as an (rows, cols) matrix, projected to (k_rows, k_cols)."""

    rows: int
    cols: int
    k_rows: int
    k_cols: int


class KroneckerFactors:
    """The seeded Kronecker factors P_r (k_r, r) and P_c (k_c, c) of every factored weight,
    entries N(0, 1/k) so that E|P_r G P_c^T|^2 = |G|^2. Generated on the CPU from
    ``(seed, name)`` (the same on every device and in every process), once, on first use."""

    def __init__(self, blocks: dict[str, Block], seed: int, device: str) -> None:
        self.blocks = blocks
        self.seed = seed
        self.device = device
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}

    def _gaussian(self, k: int, n: int, *key: Any) -> Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, "kron", *key)).encode()))
        return torch.randn(k, n, generator=gen) / math.sqrt(k)

    def pair(self, name: str) -> tuple[Tensor, Tensor]:
        """(P_r, P_c) of one factored weight, on the device."""
        if name not in self._factors:
            b = self.blocks[name]
            p_r = self._gaussian(b.k_rows, b.rows, name, "rows").to(self.device)
            p_c = self._gaussian(b.k_cols, b.cols, name, "cols").to(self.device)
            self._factors[name] = (p_r, p_c)
        return self._factors[name]

    def project(self, name: str, grad: Tensor) -> Tensor:
        """P_r G P_c^T of per-sample gradients (B, *weight shape): (B, k_r, k_c)."""
        p_r, p_c = self.pair(name)
        b = self.blocks[name]
        return p_r @ grad.reshape(-1, b.rows, b.cols) @ p_c.T

    def zeros(self, batch: int) -> dict[str, Tensor]:
        """The taps: a zero (batch, k_r, k_c) per factored weight (and every factor generated,
        outside the vmap that will use them: no random op may run inside it)."""
        for name in self.blocks:
            self.pair(name)
        return {
            n: torch.zeros(batch, b.k_rows, b.k_cols, device=self.device)
            for n, b in self.blocks.items()
        }


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _mha_arguments(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``F.multi_head_attention_forward``'s arguments by name, or None when the call uses
    something ``multi_head_attention`` does not implement (added k/v biases, zero attention,
    static keys, dropout in training)."""
    bound = _MHA.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    plain = a["bias_k"] is None and a["bias_v"] is None and not a["add_zero_attn"]
    static = a["static_k"] is not None or a["static_v"] is not None
    dropout = a["training"] and a["dropout_p"] > 0
    return dict(a) if plain and not static and not dropout else None


def _plain_embedding(args: tuple, kwargs: dict) -> bool:
    """An embedding lookup that is linear in its weight (no padding row, no max-norm)."""
    return (
        _arg(args, kwargs, 2, "padding_idx") is None and _arg(args, kwargs, 3, "max_norm") is None
    )


def _weights_used(func: Callable, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors this call uses as a weight that a tap can perturb."""
    if func is F.linear:
        return [_arg(args, kwargs, 1, "weight")]
    if func is F.conv2d and _arg(args, kwargs, 6, "groups", 1) == 1:
        return [_arg(args, kwargs, 1, "weight")]
    if func in MATMULS and len(args) == 2 and isinstance(args[1], Tensor) and args[1].dim() == 2:
        return [args[1]]
    if func is F.embedding and _plain_embedding(args, kwargs):
        return [_arg(args, kwargs, 1, "weight")]
    if func is F.multi_head_attention_forward:
        a = _mha_arguments(args, kwargs)
        if a is not None:
            return [a[k] for k in _MHA_WEIGHTS if a[k] is not None]
    return []


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class UseRecorder(TorchFunctionMode):
    """Records, for the watched weights (``{id(tensor): name}``), which are used as the weight
    of an op a tap can perturb (``tapped``) and which are used otherwise (``other``: an op that
    returns a tensor computed from them; reading ``.dtype`` or ``.shape`` does not count)."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.tapped: set[str] = set()
        self.other: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tappable = {id(t) for t in _weights_used(func, args, kwargs)}
        for t in _tensors(args) + _tensors(kwargs):
            name = self.watched.get(id(t))
            if name is None:
                continue
            if id(t) in tappable:
                self.tapped.add(name)
            elif _tensors(out):
                self.other.add(name)
        return out


class TapMode(TorchFunctionMode):
    """Inside it, every use of a factored weight W (``weights``: ``{id(tensor): name}``) acts as
    W + P_r^T Z P_c with Z = ``taps[name]``, so that the gradient of the output with respect to
    Z is the Kronecker projection of its gradient with respect to W. The tap's input is detached:
    at Z = 0 the tap's derivative with respect to it is zero."""

    def __init__(
        self, weights: dict[int, str], taps: dict[str, Tensor], factors: KroneckerFactors
    ) -> None:
        super().__init__()
        self.weights = weights
        self.taps = taps
        self.factors = factors

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            return self.linear(x, w, b)
        if func is F.conv2d and id(_arg(args, kwargs, 1, "weight")) in self.weights:
            conv = [_arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(_CONV2D)]
            return self.conv2d(*conv)
        if func in MATMULS and len(args) == 2 and id(args[1]) in self.weights:
            return self.matmul(args[0], args[1])
        if func is F.embedding and id(_arg(args, kwargs, 1, "weight")) in self.weights:
            return self.embedding(func(*args, **kwargs), args[0], args[1])
        if func is F.layer_norm and args[0].dtype != getattr(
            _arg(args, kwargs, 2, "weight"), "dtype", args[0].dtype
        ):
            # autocast's low-precision activations, float32 weights: normalise in float32
            # (the vmap rule of the mixed-dtype backward fails)
            return func(args[0].float(), *args[1:], **kwargs).to(args[0].dtype)
        if func is F.multi_head_attention_forward:
            a = _mha_arguments(args, kwargs)
            if a is not None and any(id(a[k]) in self.weights for k in _MHA_WEIGHTS):
                return multi_head_attention(self.linear, **a)
        return func(*args, **kwargs)

    def _tap(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        name = self.weights.get(id(w))
        if name is None:
            return None
        return (*self.factors.pair(name), self.taps[name])

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None, rows: slice | None = None) -> Tensor:
        """F.linear(x, W[rows], b[rows]) with W's tap (rows: a part of a packed projection)."""
        y = F.linear(x, w if rows is None else w[rows], b if b is None or rows is None else b[rows])
        tap = self._tap(w)
        if tap is None:
            return y
        p_r, p_c, z = tap  # (k_r, out), (k_c, in), (k_r, k_c)
        if rows is not None:
            p_r = p_r[:, rows]
        return y + ((x.detach() @ p_c.T) @ z.T) @ p_r  # (..., in) -> (..., k_c) -> (..., out)

    def matmul(self, x: Tensor, w: Tensor) -> Tensor:
        """x @ W, W (in, out) = (rows, cols), with W's tap."""
        p_r, p_c, z = self._tap(w)  # type: ignore[misc]
        return x @ w + ((x.detach() @ p_r.T) @ z) @ p_c

    def embedding(self, y: Tensor, ids: Tensor, w: Tensor) -> Tensor:
        """A lookup of rows ``ids`` of W (vocab, width) with W's tap: row t of P_r^T Z P_c is
        P_r[:, t]^T Z P_c (the lookup is a linear layer over one-hot rows)."""
        p_r, p_c, z = self._tap(w)  # type: ignore[misc]
        return y + (p_r.T[ids] @ z) @ p_c  # (..., k_r) -> (..., k_c) -> (..., width)

    def conv2d(
        self,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
    ) -> Tensor:
        """F.conv2d with W's tap, W (out, in, kh, kw) = (rows, cols = in * kh * kw): the
        convolution is linear in its patches, so P_c becomes a convolution with k_c filters."""
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        if groups != 1:
            return y
        p_r, p_c, z = self._tap(w)  # type: ignore[misc]
        u = F.conv2d(x.detach(), p_c.reshape(-1, *w.shape[1:]), None, stride, padding, dilation)
        v = torch.einsum("rc,...chw->...rhw", z, u)  # (..., k_r, H', W')
        return y + torch.einsum("ro,...rhw->...ohw", p_r, v)


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def multi_head_attention(linear: Callable[..., Tensor], **a: Any) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` in plain ops, its projections through ``linear``
    (``TapMode.linear``). Inputs (L, N, E) or unbatched (L, E), as there; the attention is the
    explicit softmax (torch's math kernel: the fused ones have no vmap batching rule)."""
    query, key, value = a["query"], a["key"], a["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
    tgt, bsz, embed = query.shape
    heads = a["num_heads"]
    w, bias = a["in_proj_weight"], a["in_proj_bias"]
    if a["use_separate_proj_weight"]:
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        q = linear(query, a["q_proj_weight"], b_q)
        k = linear(key, a["k_proj_weight"], b_k)
        v = linear(value, a["v_proj_weight"], b_v)
    elif a["query"] is a["key"] and a["key"] is a["value"]:
        q, k, v = linear(query, w, bias).chunk(3, dim=-1)
    else:
        q, k, v = (
            linear(x, w, bias, rows=slice(i * embed, (i + 1) * embed))
            for i, x in enumerate((query, key, value))
        )
    src = k.shape[0]
    q, k, v = (t.reshape(t.shape[0], bsz * heads, -1).transpose(0, 1) for t in (q, k, v))
    mask = _additive_mask(a["attn_mask"], q.dtype)  # (L, S) or (N * heads, L, S)
    if mask is None and a["is_causal"]:
        mask = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
        mask = _additive_mask(mask, q.dtype)
    padding = _additive_mask(a["key_padding_mask"], q.dtype)  # (N, S)
    if padding is not None:
        padding = padding.reshape(bsz, 1, 1, src).expand(-1, heads, -1, -1).reshape(-1, 1, src)
        mask = padding if mask is None else mask + padding
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(1, 2)  # (N * heads, L, S)
    if mask is not None:
        scores = scores + mask
    attn = scores.softmax(dim=-1)
    out = (attn @ v).transpose(0, 1).reshape(tgt * bsz, embed)
    out = linear(out, a["out_proj_weight"], a["out_proj_bias"]).reshape(tgt, bsz, -1)
    weights = None
    if a["need_weights"]:
        weights = attn.reshape(bsz, heads, tgt, src)
        weights = weights.mean(dim=1) if a["average_attn_weights"] else weights
        weights = weights.squeeze(0) if unbatched else weights
    return (out.squeeze(1) if unbatched else out), weights
