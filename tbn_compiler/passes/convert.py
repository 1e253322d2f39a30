"""convert: trainable tiled layers -> frozen packed layers that call the tbn ops.

The second half of the prepare/convert split. A ``Packed*`` module stores only the
inference representation (``tile`` uint32 words, ``alphas`` float32[p], ``bias``)
as buffers and calls ``torch.ops.tbn.tiled_*`` in ``forward``, so capturing a
converted model puts the tile ops straight into the graph. The rewrite pass uses the
same classes to hold the buffers of layers it tiles from float.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .. import ops  # noqa: F401  (registers torch.ops.tbn.*)
from ..nn import TiledConv1d, TiledConv2d, TiledLinear, module_conv_geometry
from ..tiling import PackedTile, reconstruct, unpack_bits

__all__ = ["PackedLinear", "PackedConv", "convert", "packed_from_tiled"]


class _PackedBase(nn.Module):
    tile: torch.Tensor
    alphas: torch.Tensor
    bias: torch.Tensor | None

    def _register(self, packed: PackedTile, bias: torch.Tensor | None) -> None:
        self.register_buffer("tile", packed.words)
        self.register_buffer("alphas", packed.alphas)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def p(self) -> int:
        return self.alphas.numel()

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``W_hat``, rebuilt on each access and never stored: only for code
        that reads ``layer.weight`` directly (for example shape/device checks in
        ``nn.TransformerEncoderLayer``); ``forward`` never uses it."""
        length = self._numel() // self.p
        signs = unpack_bits(self.tile, length, self.alphas.dtype)
        return reconstruct(signs, self.alphas, self._weight_shape())


class PackedLinear(_PackedBase):
    """Frozen tiled linear: ``y = x @ W_hat.T + b`` (or ``x @ W_hat + b`` when the
    weight is stored (in, out))."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: PackedTile,
        bias: torch.Tensor | None,
        weight_in_out: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_in_out = weight_in_out
        self._register(packed, bias)

    def _weight_shape(self) -> list[int]:
        if self.weight_in_out:
            return [self.in_features, self.out_features]
        return [self.out_features, self.in_features]

    def _numel(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tbn.tiled_linear.default(
            x,
            self.tile,
            self.alphas,
            self.bias,
            self.out_features,
            self.in_features,
            self.weight_in_out,
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, p={self.p}"


class PackedConv(_PackedBase):
    """Frozen tiled conv1d/conv2d with integer symmetric zero padding."""

    def __init__(
        self,
        weight_shape: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        packed: PackedTile,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.weight_shape = [int(d) for d in weight_shape]
        self.stride, self.padding = list(stride), list(padding)
        self.dilation, self.groups = list(dilation), int(groups)
        self._register(packed, bias)

    def _weight_shape(self) -> list[int]:
        return self.weight_shape

    def _numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def spatial(self) -> int:
        return len(self.weight_shape) - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = torch.ops.tbn.tiled_conv1d if self.spatial == 1 else torch.ops.tbn.tiled_conv2d
        return op.default(
            x,
            self.tile,
            self.alphas,
            self.bias,
            self.weight_shape,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, stride={self.stride}, p={self.p}"


def packed_from_tiled(layer: nn.Module, packed: PackedTile | None = None) -> _PackedBase:
    """The frozen equivalent of a ``Tiled*`` layer (uses its learned tile exactly)."""
    packed = packed or layer.packed()
    if isinstance(layer, TiledLinear):
        return PackedLinear(layer.in_features, layer.out_features, packed, layer.bias)
    if isinstance(layer, (TiledConv1d, TiledConv2d)):
        geometry, reason = module_conv_geometry(layer)
        if geometry is None:
            raise ValueError(f"{type(layer).__name__} cannot be converted: {reason}")
        return PackedConv(
            list(layer.weight.shape),
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            geometry.groups,
            packed,
            layer.bias,
        )
    raise TypeError(f"not a tiled layer: {type(layer).__name__}")


_TILED = (TiledLinear, TiledConv1d, TiledConv2d)


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ``Tiled*`` layer of a prepared model by its ``Packed*`` form.

    In eval mode the result computes exactly what the prepared model computes. Layers
    that share ``scores`` share one packed tile."""
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, _TILED):
        return packed_from_tiled(model)
    by_scores: dict[int, PackedTile] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, _TILED):
            continue
        packed = by_scores.setdefault(id(module.scores), module.packed())
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, packed_from_tiled(module, packed))
    return model
