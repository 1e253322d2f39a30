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
