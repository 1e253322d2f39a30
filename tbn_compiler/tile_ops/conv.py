"""The ``tiled_conv1d`` and ``tiled_conv2d`` records, and the conv pieces any
``tiled_conv{n}d`` record is made of: :class:`PackedConv`, :func:`conv_patterns`,
:func:`conv_module_attrs`, :func:`conv_args`. Every conv the tile ops compute has
integer symmetric zero padding (:func:`~tbn_compiler.nn.conv_geometry` says which)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..nn import TiledConv1d, TiledConv2d, conv_geometry, module_conv_geometry
from .operands import bias_operand, get_attr_tensor, node_arg, weight_operand
from .record import LayerMatch, Matcher, PackedTileLayer, TileOpRecord

__all__ = [
    "CONV1D",
    "CONV2D",
    "PackedConv",
    "conv_args",
    "conv_module_attrs",
    "conv_patterns",
    "conv_record",
]

aten = torch.ops.aten

CONVERTER = "tbn_compiler.backends.tile_converters:convert_tiled_conv"
"""The Relax converter of every ``tiled_conv{n}d`` op (the rank comes from the node)."""
KERNEL = "tbn_compiler.backends.kernels:tiled_conv_primfunc"
"""The TIR kernel builder of every ``tiled_conv{n}d`` op (any number of spatial dims)."""


class PackedConv(PackedTileLayer):
    """Frozen tiled conv with integer symmetric zero padding."""

    @property
    def spatial(self) -> int:
        return len(self.weight_shape) - 2

    @property
    def stride(self) -> list[int]:
        return self.attrs["stride"]

    @property
    def padding(self) -> list[int]:
        return self.attrs["padding"]

    @property
    def dilation(self) -> list[int]:
        return self.attrs["dilation"]

    @property
    def groups(self) -> int:
        return self.attrs["groups"]

    def extra_repr(self) -> str:
        return f"weight_shape={list(self.weight_shape)}, stride={self.stride}, p={self.p}"


def conv_module_attrs(module: nn.Module) -> tuple[dict[str, Any], str | None]:
    """Geometry of an ``nn.Conv{n}d`` (or tiled) module, or why the tile ops cannot
    compute it (then only its groups)."""
    geometry, reason = module_conv_geometry(module)
    if geometry is None:
        return {"groups": int(module.groups)}, reason
    return geometry.as_dict(), None


def conv_args(weight_shape: tuple[int, ...], attrs: Mapping[str, Any]) -> tuple:
    """``(weight_shape, stride, padding, dilation, groups)`` of ``tbn::tiled_conv{n}d``."""
    return (
        list(weight_shape),
        attrs["stride"],
        attrs["padding"],
        attrs["dilation"],
        attrs["groups"],
    )


def _conv_matcher(spatial: int, aten_convolution: bool = False) -> Matcher:
    """``F.conv{n}d`` / ``aten.conv{n}d`` (or ``aten.convolution`` whose weight has
    ``spatial + 2`` dims): (input, weight, bias, stride, padding, dilation, groups)."""

    def match(record: TileOpRecord, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
        found = weight_operand(gm, node_arg(node, 1, "weight"), spatial + 2)
        if found is None or found[1]:
            return None
        if aten_convolution:
            if node_arg(node, 6, "transposed", False):
                return None
            groups = node_arg(node, 8, "groups", 1)
        else:
            groups = node_arg(node, 6, "groups", 1)
        weight = get_attr_tensor(gm, found[0])
        geometry, reason = conv_geometry(
            list(weight.shape[2:]),
            node_arg(node, 3, "stride", 1),
            node_arg(node, 4, "padding", 0),
            node_arg(node, 5, "dilation", 1),
            groups,
        )
        return LayerMatch(
            node,
            record,
            node_arg(node, 0, "input"),
            found[0],
            bias_operand(node_arg(node, 2, "bias")),
            attrs={"groups": int(groups or 1)} if geometry is None else geometry.as_dict(),
            unsupported=reason,
            weight_nodes=found[2],
        )

    return match


def conv_patterns(spatial: int) -> dict[Any, Matcher]:
    """The call_function patterns of ``conv{spatial}d``: ``aten.conv{n}d`` (both
    overloads), ``torch.conv{n}d`` and ``aten.convolution`` with a ``spatial + 2``-D
    weight."""
    direct = _conv_matcher(spatial)
    aten_conv = getattr(aten, f"conv{spatial}d")
    return {
        aten_conv.default: direct,
        aten_conv.padding: direct,
        getattr(torch, f"conv{spatial}d"): direct,
        aten.convolution.default: _conv_matcher(spatial, aten_convolution=True),
    }


def conv_record(
    spatial: int, float_type: type[nn.Module], qat_type: type[nn.Module]
) -> TileOpRecord:
    """The record of ``tbn::tiled_conv{spatial}d``: every rank shares the packed layer,
    patterns, argument builder, converter and kernel builder."""
    return TileOpRecord(
        name=f"tiled_conv{spatial}d",
        float_types=(float_type,),
        qat_type=qat_type,
        packed_type=PackedConv,
        function_patterns=conv_patterns(spatial),
        module_attrs=conv_module_attrs,
        op_args=conv_args,
        relax_converter=CONVERTER,
        kernel_builder=KERNEL,
    )


CONV1D = conv_record(1, nn.Conv1d, TiledConv1d)
"""``tbn::tiled_conv1d``."""

CONV2D = conv_record(2, nn.Conv2d, TiledConv2d)
"""``tbn::tiled_conv2d``."""
