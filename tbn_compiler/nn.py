"""Trainable tiled layers (quantization-aware training) and the layer facts the passes
share (conv geometry, weight owners, layer names). ``prepare`` puts these layers in a
model (:mod:`tbn_compiler.passes.prepare`), following the tile-op records.

``TiledLinear`` / ``TiledConv1d`` / ``TiledConv2d`` follow the paper exactly:

* ``scores`` and ``weight`` are float tensors of the full weight shape, both initialized
  from the float weight;
* the tile is ``sign(sum of the p flat chunks of scores)`` (0 -> -1), with a
  straight-through estimator: each score receives the gradient of its own weight
  position, unchanged;
* ``alphas`` (``p``, or one in "single" mode) are mean ``|chunk|`` of ``weight``, and
  gradients reach ``weight`` through them by ordinary autograd;
* the bias stays full precision.

They subclass the torch layers they replace, so every attribute (stride, padding,
groups, ...) and ``state_dict`` key of those layers is still there, plus ``scores``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tiling

__all__ = [
    "TiledLayer",
    "TiledConvNd",
    "TiledLinear",
    "TiledConv1d",
    "TiledConv2d",
    "TiledMultiheadAttention",
    "mha_unsupported",
    "ConvGeometry",
    "conv_geometry",
    "module_conv_geometry",
    "layer_name",
    "WeightOwners",
    "weight_owners",
]


class _TileSTE(torch.autograd.Function):
    """Forward: the ``{-1,+1}`` tile repeated p times, in the weight's shape.
    Backward: the weight gradient passed to ``scores`` unchanged (straight through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, p: int) -> torch.Tensor:
        tile = tiling.binarize(tiling.fold(scores, p))
        return tile.repeat(p).reshape(scores.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class TiledLayer:
    """Base of the trainable tiled layers: the host torch layer provides ``weight`` and
    its geometry; this adds ``scores``, ``p`` and ``alpha_mode``."""

    p: int
    alpha_mode: str
    scores: nn.Parameter
    weight: nn.Parameter

    def _init_tiling(self, p: int, alpha_mode: str) -> None:
        tiling.check_divisible(self.weight.numel(), p, what=f"{type(self).__name__} weight")
        if alpha_mode not in tiling.ALPHA_MODES:
            raise ValueError(f"unknown alpha mode {alpha_mode!r}; expected {tiling.ALPHA_MODES}")
        self.p = p
        self.alpha_mode = alpha_mode
        self.scores = nn.Parameter(self.weight.detach().clone())

    def binary_weight(self) -> torch.Tensor:
        """The ``{-1,+1}`` weight (tile repeated p times), with the STE for ``scores``."""
        return _TileSTE.apply(self.scores, self.p)

    def alphas(self) -> torch.Tensor:
        """``float[p]`` scales from ``weight`` (differentiable)."""
        return tiling.compute_alphas(self.weight, self.p, self.alpha_mode)

    def tiled_weight(self) -> torch.Tensor:
        """``W_hat[e] = alpha[e // L] * tile[e % L]`` in the weight's shape."""
        binary = self.binary_weight()
        scale = self.alphas().repeat_interleave(binary.numel() // self.p)
        return (scale * binary.reshape(-1)).reshape(binary.shape)

    def packed(self) -> tiling.PackedTile:
        """The inference representation of the learned tile (exactly what forward uses)."""
        with torch.no_grad():
            signs = tiling.binarize(tiling.fold(self.scores.float(), self.p))
            alphas = self.alphas().float().contiguous().clone()
        return tiling.PackedTile(tiling.pack_bits(signs), alphas, signs.numel())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, alpha={self.alpha_mode!r}"  # type: ignore[misc]


class TiledLinear(TiledLayer, nn.Linear):
    """``nn.Linear`` whose weight is a learned binary tile reused ``p`` times."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: int = 4,
        alpha_mode: str = "per_tile",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_tiling(p, alpha_mode)

    @classmethod
    def from_float(cls, layer: nn.Linear, p: int, alpha_mode: str = "per_tile") -> TiledLinear:
        new = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            p,
            alpha_mode,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        _copy_float_params(layer, new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.tiled_weight(), self.bias)


class TiledConvNd(TiledLayer):
    """Base of the tiled convs: ``class TiledConv3d(TiledConvNd, nn.Conv3d)`` is a tiled
    ``nn.Conv3d`` (stride, padding, dilation, groups preserved)."""

    def __init__(self, *args, p: int = 4, alpha_mode: str = "per_tile", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tiling(p, alpha_mode)

    @classmethod
    def from_float(cls, layer: nn.Module, p: int, alpha_mode: str = "per_tile"):
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
            p=p,
            alpha_mode=alpha_mode,
        )
        _copy_float_params(layer, new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.tiled_weight(), self.bias)  # type: ignore[attr-defined]


class TiledConv1d(TiledConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a tiled weight (stride, padding, dilation, groups preserved)."""


class TiledConv2d(TiledConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a tiled weight (stride, padding, dilation, groups preserved)."""


def _copy_float_params(src: nn.Module, dst: TiledLayer) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.scores.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)  # type: ignore[union-attr]


def layer_name(weight_path: str) -> str:
    """Layer name of a weight attribute path: the module path for a ``.weight``
    (``"encoder.fc.weight"`` -> ``"encoder.fc"``), else the full path (``"w1"``)."""
    owner, _, leaf = weight_path.rpartition(".")
    return owner if leaf == "weight" and owner else weight_path


@dataclass(frozen=True)
class WeightOwners:
    """Every attribute path under which one weight tensor is stored in the model (tied
    weights have several, in registration order), the type of the module that owns
    its first path, and the types of the modules that own any of its paths."""

    paths: tuple[str, ...]
    module_type: type | None
    module_types: tuple[type, ...] = ()

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layer_name(p) for p in self.paths))


def weight_owners(model: nn.Module) -> dict[str, WeightOwners]:
    """Attribute path -> :class:`WeightOwners` for every parameter and buffer of
    ``model``. Taken from the user's model before capture: ``torch.export`` keeps one
    name per shared tensor, and its modules are not the user's classes."""
    by_tensor: dict[int, list[str]] = {}
    for path, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        by_tensor.setdefault(id(tensor), []).append(path)
    owners: dict[str, WeightOwners] = {}
    for paths in by_tensor.values():
        types = tuple(dict.fromkeys(type(model.get_submodule(p.rpartition(".")[0])) for p in paths))
        info = WeightOwners(tuple(paths), types[0], types)
        owners.update(dict.fromkeys(paths, info))
    return owners


@dataclass(frozen=True)
class ConvGeometry:
    """Integer geometry of a conv as the tile ops take it: one value per spatial dim,
    symmetric zero padding."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }


def conv_geometry(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None,
    padding: str | int | Sequence[int] | None,
    dilation: int | Sequence[int] | None,
    groups: int | None,
    padding_mode: str = "zeros",
) -> tuple[ConvGeometry | None, str | None]:
    """The one check of whether the tile ops can compute a conv: ``(geometry, None)``, or
    ``(None, reason)`` when they cannot (padding modes other than zeros; ``padding="same"``
    with an even effective kernel, which needs asymmetric padding, or with a stride).
    Arguments as ``nn.Conv*d`` / ``F.conv*d`` take them; ints apply to every dim."""
    spatial = len(kernel_size)

    def per_dim(value, default: int) -> list[int]:
        value = default if value is None else value
        return [int(value)] * spatial if isinstance(value, int) else [int(v) for v in value]

    strides, dilations = per_dim(stride, 1), per_dim(dilation, 1)
    if padding_mode != "zeros":
        return None, (
            f"padding_mode={padding_mode!r} is not supported by the tile ops; kept dense "
            "(use padding_mode='zeros')"
        )
    if padding == "valid":
        pads = [0] * spatial
    elif padding == "same":
        if any(s != 1 for s in strides):
            return None, "padding='same' with stride > 1 is not supported; kept dense"
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilations, strict=True)]
        if any(t % 2 for t in totals):
            return None, "padding='same' with an even kernel needs asymmetric padding; kept dense"
        pads = [t // 2 for t in totals]
    else:
        pads = per_dim(padding, 0)
    return ConvGeometry(strides, pads, dilations, int(groups or 1)), None


def module_conv_geometry(module: nn.Module) -> tuple[ConvGeometry | None, str | None]:
    """:func:`conv_geometry` of an ``nn.Conv{n}d`` (or tiled) module."""
    return conv_geometry(
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
    )


class TiledMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections are ordinary submodules, so they can
    be tiled like any linear layer.

    torch's layer keeps its input projection as one ``(3E, E)`` parameter read by
    ``F.multi_head_attention_forward``, and reads ``out_proj.weight`` without calling
    ``out_proj``; replacing those modules would change nothing. Here ``in_proj`` is one
    ``nn.Linear(E, 3E)`` (one tile over the whole ``(3E, E)`` weight, the bias with it)
    and ``out_proj`` an ``nn.Linear(E, E)``, both *called* by ``forward``. ``prepare``
    swaps every supported attention layer for this one (same parameters, same outputs),
    then tiles ``in_proj`` / ``out_proj`` as it tiles any ``nn.Linear``; ``convert``
    turns them into packed layers that call ``tbn::tiled_linear``, and this forward runs
    unchanged on either.

    ``forward`` is torch's math: scaled dot-product attention per head, torch's mask
    semantics (boolean masks: True = not allowed; float masks added), dropout on the
    attention weights in training, ``need_weights`` / ``average_attn_weights``,
    unbatched inputs, ``batch_first`` both ways. Only ``kdim == vdim == embed_dim``
    without ``add_bias_kv`` / ``add_zero_attn`` is supported (:func:`mha_unsupported`).

    ``_qkv_same_embed_dim`` is False and ``in_proj_weight`` / ``in_proj_bias`` are None:
    that turns off the fast paths of ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention``, which read those fused parameters directly and would
    bypass the projections.
    """

    in_proj: nn.Module

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, name: str = "") -> TiledMultiheadAttention:
        """The same layer with projection submodules holding ``mha``'s own parameter
        objects (not copies: weights tied elsewhere stay tied). ValueError naming
        ``name`` when :func:`mha_unsupported`."""
        reason = mha_unsupported(mha)
        if reason is not None:
            raise ValueError(f"{name or 'nn.MultiheadAttention'}: {reason}")
        weight = mha.in_proj_weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.in_proj.weight, new.in_proj.bias = weight, mha.in_proj_bias
        new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        new.train(mha.training)
        return new

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout, bias, batch_first=batch_first, device=device, dtype=dtype
        )
        kw = {"device": device, "dtype": dtype}
        out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        del self.in_proj_weight, self.in_proj_bias, self.out_proj
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        self._qkv_same_embed_dim = False  # see the class docstring
        # in_proj before out_proj: registration order is what keep_first/keep_last read
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **kw)
        self.out_proj = out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``. ``is_causal`` is a hint, as in torch:
        ``attn_mask`` must be given with it and is what is applied."""
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "TiledMultiheadAttention: is_causal=True needs attn_mask (as in "
                "nn.MultiheadAttention); pass the causal mask"
            )
        batched = query.dim() == 3
        self_attention = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self_attention:
            key = value = query
        out, weights = self._attend(
            query, key, value, key_padding_mask, attn_mask, need_weights, average_attn_weights
        )
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each (N, L, E), through the one ``in_proj`` (run once for
        self-attention; per input otherwise, keeping the part of it that input uses)."""
        if query is key and key is value:
            return tuple(self.in_proj(query).chunk(3, dim=-1))  # type: ignore[return-value]
        e = self.embed_dim
        q = self.in_proj(query)[..., :e]
        k = self.in_proj(key)[..., e : 2 * e]
        v = self.in_proj(value)[..., 2 * e :]
        return q, k, v

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        need_weights: bool,
        average_attn_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of batch-first inputs: (output (N, L, E), weights or None)."""
        n, tgt, e = query.shape
        src = key.shape[1]
        h = self.num_heads
        q, k, v = (
            t.reshape(n, t.shape[1], h, e // h).transpose(1, 2)
            for t in self._project_qkv(query, key, value)
        )
        mask = self._merged_mask(key_padding_mask, attn_mask, n, tgt, src, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (e // h) ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, e))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def _merged_mask(
        self,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        n: int,
        tgt: int,
        src: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """torch's masks as one additive float mask broadcastable to (N, heads, L, S)."""
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=dtype,
            check_other=False,
        )
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                mask = attn_mask.reshape(1, 1, tgt, src)
            else:
                mask = attn_mask.reshape(n, self.num_heads, tgt, src)
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        return mask


def mha_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why :class:`TiledMultiheadAttention` cannot stand for ``mha``, or None."""
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        return (
            f"kdim/vdim ({mha.kdim}, {mha.vdim}) differ from embed_dim {mha.embed_dim}: "
            "separate q/k/v projections are not supported; kept float"
        )
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported; kept float"
    return None
