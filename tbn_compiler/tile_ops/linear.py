"""The ``tiled_linear`` record: ``nn.Linear``, ``F.linear`` and linear-like matmuls of a
2-D parameter (``x @ W``, ``addmm(b, x, W)``, with ``W`` stored (in, out) or used
through ``.t()``)."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..nn import TiledLinear
from .operands import bias_operand, node_arg, weight_operand
from .record import LayerMatch, Matcher, PackedTileLayer, TileOpRecord

__all__ = ["LINEAR", "PackedLinear", "linear_args", "linear_module_attrs"]

aten = torch.ops.aten


class PackedLinear(PackedTileLayer):
    """Frozen tiled linear: ``y = x @ W_hat.T + b`` (or ``x @ W_hat + b`` when the
    weight is stored (in, out))."""

    @property
    def weight_in_out(self) -> bool:
        return bool(self.attrs.get("weight_in_out", False))

    @property
    def in_features(self) -> int:
        return self.weight_shape[0 if self.weight_in_out else 1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[1 if self.weight_in_out else 0]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, p={self.p}"


def linear_module_attrs(module: nn.Module) -> tuple[dict[str, Any], str | None]:
    """An ``nn.Linear`` stores its weight (out, in); every one can be tiled."""
    return {"weight_in_out": False}, None


def linear_args(weight_shape: tuple[int, ...], attrs: Mapping[str, Any]) -> tuple:
    """``(out_features, in_features, weight_in_out)`` of ``tbn::tiled_linear``."""
    in_out = bool(attrs.get("weight_in_out", False))
    in_f, out_f = weight_shape if in_out else weight_shape[::-1]
    return int(out_f), int(in_f), in_out


def match_linear_call(record: TileOpRecord, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """``F.linear`` / ``aten.linear``: (input, weight (out, in), bias)."""
    found = weight_operand(gm, node_arg(node, 1, "weight"), 2)
    if found is None or found[1]:
        return None
    return LayerMatch(
        node,
        record,
        node_arg(node, 0, "input"),
        found[0],
        bias_operand(node_arg(node, 2, "bias")),
        attrs={"weight_in_out": False},
        weight_nodes=found[2],
    )


def _matmul_matcher(with_bias: bool) -> Matcher:
    """``x @ W`` (mm/matmul) or ``addmm(b, x, W)`` with a 2-D parameter ``W``."""

    def match(record: TileOpRecord, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
        offset = 1 if with_bias else 0
        weight = node_arg(node, offset + 1, "mat2" if with_bias else "other")
        found = weight_operand(gm, weight, 2)
        if found is None:
            return None
        path, transposed, nodes = found
        x = node_arg(node, offset, "mat1" if with_bias else "input")
        if not isinstance(x, fx.Node):
            return None
        bias = bias_operand(node_arg(node, 0, "input")) if with_bias else None
        unsupported = None
        if with_bias and (node_arg(node, 3, "beta", 1) != 1 or node_arg(node, 4, "alpha", 1) != 1):
            unsupported = "addmm with beta/alpha != 1 is not supported; kept dense"
        return LayerMatch(
            node,
            record,
            x,
            path,
            bias,
            attrs={"weight_in_out": not transposed},
            unsupported=unsupported,
            weight_nodes=nodes,
        )

    return match


_ADDMM, _MATMUL = _matmul_matcher(with_bias=True), _matmul_matcher(with_bias=False)

LINEAR = TileOpRecord(
    name="tiled_linear",
    float_types=(nn.Linear,),
    qat_type=TiledLinear,
    packed_type=PackedLinear,
    function_patterns={
        aten.linear.default: match_linear_call,
        F.linear: match_linear_call,
        torch._C._nn.linear: match_linear_call,
        aten.addmm.default: _ADDMM,
        torch.addmm: _ADDMM,
        aten.mm.default: _MATMUL,
        aten.matmul.default: _MATMUL,
        torch.mm: _MATMUL,
        torch.matmul: _MATMUL,
        operator.matmul: _MATMUL,
    },
    module_attrs=linear_module_attrs,
    op_args=linear_args,
    relax_converter="tbn_compiler.backends.tile_converters:convert_tiled_linear",
    kernel_builder="tbn_compiler.backends.kernels:tiled_linear_primfunc",
)
"""``tbn::tiled_linear``."""
