"""Which graph nodes are tileable layers, and which layers no tile op replaces.

:func:`match_node` asks the tile-op records (:mod:`tbn_compiler.tile_ops`) about a
node: a call of a module of a record's float types, or a ``call_function`` target in a
record's ``function_patterns`` (modelled on the pattern tables of
``torch.ao.quantization.fx``). :func:`dense_layer` names the linear/conv-like nodes
left over, so that every layer of the model shows up in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from ..nn import layer_name
from ..tile_ops import (
    LayerMatch,
    function_matchers,
    get_attr_tensor,
    node_arg,
    tile_op_for_module,
    tile_op_records,
)

__all__ = ["DenseLayer", "LayerMatch", "dense_layer", "get_attr_tensor", "match_node"]

aten = torch.ops.aten


def match_module_call(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """A call of a submodule of some record's float types (``nn.Linear``, ...)."""
    module = gm.get_submodule(node.target)
    record = tile_op_for_module(module)
    if record is None:
        return None
    bias = f"{node.target}.bias" if module.bias is not None else None
    weight = f"{node.target}.weight"
    if parametrize.is_parametrized(module, "weight"):
        return LayerMatch(
            node,
            record,
            node.args[0],
            weight,
            bias,
            module_type=type(module),
            unsupported=_COMPUTED_WEIGHT,
        )
    attrs, reason = record.module_attrs(module)
    return LayerMatch(
        node,
        record,
        node.args[0],
        weight,
        bias,
        attrs=attrs,
        module_type=type(module),
        unsupported=reason,
    )


def match_function_call(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """The first match of the records' patterns for the node's target."""
    for record, matcher in function_matchers(node.target):
        match = matcher(record, gm, node)
        if match is not None:
            return match
    return None


def match_node(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """The :class:`LayerMatch` for a node, or None if it is not a tileable layer."""
    if node.op == "call_module":
        return match_module_call(gm, node)
    if node.op == "call_function":
        return match_function_call(gm, node)
    return None


# --------------------------------------------------------------------------- layers we keep dense

_COMPUTED_WEIGHT = (
    "its weight is computed in the graph (a parametrization such as weight_norm), not "
    "stored; kept dense (remove the parametrization, e.g. "
    "torch.nn.utils.parametrize.remove_parametrizations, to tile it)"
)


@dataclass(frozen=True)
class DenseLayer:
    """A linear/conv-like node no tile op replaces, reported so that every layer of the
    model shows up: ``name`` (module or parameter path), ``op``, weight ``shape``, ``reason``."""

    node: fx.Node
    name: str
    op: str
    shape: tuple[int, ...]
    reason: str


# linear/conv-like targets without a tile op (transposed and 3-D convolutions)
_NO_TILE_OP: dict[Any, str] = {
    aten.conv3d.default: "conv3d",
    aten.conv3d.padding: "conv3d",
    torch.conv3d: "conv3d",
    aten.conv_transpose1d.default: "conv_transpose1d",
    aten.conv_transpose2d.input: "conv_transpose2d",
    aten.conv_transpose3d.input: "conv_transpose3d",
    torch.conv_transpose1d: "conv_transpose1d",
    torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
}
_NO_TILE_MODULES = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# position of the weight operand of the matched targets that read one
_WEIGHT_INDEX = {aten.addmm.default: 2, torch.addmm: 2}


def dense_layer(gm: fx.GraphModule, node: fx.Node) -> DenseLayer | None:
    """For a node that :func:`match_node` did not match: a :class:`DenseLayer` when it is
    still a layer of the model (a transposed/3-D conv, or a linear/conv/matmul whose
    weight is computed from parameters only), else None (e.g. a matmul of activations)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _NO_TILE_MODULES) and tile_op_for_module(module) is None:
            op = type(module).__name__.lower()
            return DenseLayer(node, node.target, op, tuple(module.weight.shape), _no_tile_op(op))
        return None
    if node.op != "call_function":
        return None
    try:
        op = _NO_TILE_OP.get(node.target)
        known = next(function_matchers(node.target), None) is not None
    except TypeError:  # unhashable target
        return None
    if op is None and node.target is aten.convolution.default:
        if node_arg(node, 6, "transposed", False):
            op = "conv_transpose"
        elif _rank(node_arg(node, 1, "weight")) == 5:
            op = "conv3d"
    if op in {r.label for r in tile_op_records()}:  # a registered op that did not match
        op, known = None, True
    weight = node_arg(node, _WEIGHT_INDEX.get(node.target, 1), "weight")
    if not isinstance(weight, fx.Node):
        return None
    params = _parameter_sources(weight)
    if params is None:  # the weight depends on a user input: not a layer
        return None
    name = _layer_name_of(params)
    shape = _shape_of(weight)
    if op is not None:
        return DenseLayer(node, name, op, shape, _no_tile_op(op))
    if known:
        return DenseLayer(node, name, _op_label(node), shape, _COMPUTED_WEIGHT)
    return None


def _no_tile_op(op: str) -> str:
    return f"no tile op for {op}; kept dense"


def _op_label(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return "conv" if "conv" in name else "linear"


def _rank(value: Any) -> int | None:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _shape_of(value: fx.Node) -> tuple[int, ...]:
    val = value.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()


def _parameter_sources(value: fx.Node) -> list[str] | None:
    """Attribute paths of the get_attr nodes ``value`` is computed from, or None when it
    depends on a graph input (placeholder) or reads none."""
    seen, stack, paths = set(), [value], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None
        if n.op == "get_attr":
            paths.append(str(n.target))
        stack.extend(n.all_input_nodes)
    return paths or None


def _layer_name_of(paths: list[str]) -> str:
    """Layer name for a computed weight: the module holding the parametrization."""
    first = sorted(paths)[0]
    if ".parametrizations." in first or first.startswith("parametrizations."):
        return first.split("parametrizations.")[0].rstrip(".") or first
    return layer_name(first)
