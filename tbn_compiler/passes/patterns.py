"""Pattern table: which graph nodes are tileable layers, and their operands.

One entry per node target (modelled on the pattern tables of
``torch.ao.quantization.fx``). Each matcher reads a node of one form (an ``nn.Module``
call, a ``torch.nn.functional`` call, an ATen op from ``torch.export``, or a
linear-like matmul whose weight operand is a 2-D parameter) and returns a
:class:`LayerMatch`, or None when the node does not fit (for example its weight is
an activation, not a parameter).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..nn import TILED_TYPES, conv_geometry, layer_name, module_conv_geometry

aten = torch.ops.aten


@dataclass
class LayerMatch:
    """A tileable layer found in the graph.

    weight: qualified attribute path of the stored weight tensor.
    bias: graph node, attribute path (module calls), or None.
    weight_in_out: the weight is stored (in, out) and used as ``x @ W``.
    conv: for convs, dict with stride, padding (ints), dilation, groups.
    unsupported: when set, the layer is reported as skipped with this reason.
    """

    node: fx.Node
    op: str  # "linear" | "conv1d" | "conv2d"
    input: Any
    weight: str
    bias: fx.Node | str | None = None
    weight_in_out: bool = False
    conv: dict[str, Any] | None = None
    module_type: type | None = None
    unsupported: str | None = None
    weight_nodes: list[fx.Node] = field(default_factory=list)  # get_attr/transpose feeding it

    @property
    def name(self) -> str:
        """Layer name: the module path for a ``.weight``, else the full attribute path."""
        return layer_name(self.weight)


def get_attr_tensor(gm: fx.GraphModule, path: str) -> torch.Tensor | None:
    """The tensor stored at a dotted attribute path of ``gm``, or None."""
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _weight_operand(gm: fx.GraphModule, value: Any, ndim: int) -> tuple[str, bool, list] | None:
    """Resolve a weight operand to (attribute path, transposed, nodes on the way).

    ``transposed`` is True when a 2-D parameter is used through ``.t()``/transpose."""
    if not isinstance(value, fx.Node):
        return None
    if value.op == "get_attr":
        tensor = get_attr_tensor(gm, value.target)
        if tensor is not None and tensor.is_floating_point() and tensor.dim() == ndim:
            return value.target, False, [value]
        return None
    is_t = (
        (value.op == "call_function" and value.target in (aten.t.default, torch.t))
        or (value.op == "call_method" and value.target == "t")
        or (
            value.op == "call_function"
            and value.target is aten.transpose.int
            and sorted(a % 2 for a in value.args[1:3]) == [0, 1]
        )
        or (
            value.op == "call_function"
            and value.target is aten.permute.default
            and list(value.args[1]) == [1, 0]
        )
    )
    if ndim == 2 and is_t:
        inner = _weight_operand(gm, value.args[0], ndim)
        if inner is not None and not inner[1]:
            return inner[0], True, [*inner[2], value]
    return None


def _bias_operand(bias: Any) -> fx.Node | None:
    return bias if isinstance(bias, fx.Node) else None


# --------------------------------------------------------------------------- matchers


def match_linear_call(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """``F.linear`` / ``aten.linear``: (input, weight (out, in), bias)."""
    found = _weight_operand(gm, _arg(node, 1, "weight"), 2)
    if found is None or found[1]:
        return None
    return LayerMatch(
        node,
        "linear",
        _arg(node, 0, "input"),
        found[0],
        _bias_operand(_arg(node, 2, "bias")),
        weight_nodes=found[2],
    )


def _conv_geometry(spatial: int, stride, padding, dilation, groups, weight: torch.Tensor):
    """``(geometry dict, reason or None)`` of a functional/ATen conv (see
    :func:`~tbn_compiler.nn.conv_geometry`); a refused conv still gets its per-dim
    stride/dilation/groups for the report."""
    geometry, reason = conv_geometry(list(weight.shape[2:]), stride, padding, dilation, groups)
    if geometry is None:
        return {"groups": int(groups or 1)}, reason
    return geometry.as_dict(), None


def _make_conv_matcher(spatial: int, aten_convolution: bool = False):
    def match(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
        found = _weight_operand(gm, _arg(node, 1, "weight"), spatial + 2)
        if found is None or found[1]:
            return None
        if aten_convolution:
            if _arg(node, 6, "transposed", False):
                return None
            groups = _arg(node, 8, "groups", 1)
        else:
            groups = _arg(node, 6, "groups", 1)
        weight = get_attr_tensor(gm, found[0])
        geometry, reason = _conv_geometry(
            spatial,
            _arg(node, 3, "stride", 1),
            _arg(node, 4, "padding", 0),
            _arg(node, 5, "dilation", 1),
            groups,
            weight,
        )
        return LayerMatch(
            node,
            f"conv{spatial}d",
            _arg(node, 0, "input"),
            found[0],
            _bias_operand(_arg(node, 2, "bias")),
            conv=geometry,
            unsupported=reason,
            weight_nodes=found[2],
        )

    return match


def match_aten_convolution(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """``aten.convolution``: the spatial rank comes from the weight."""
    weight = _arg(node, 1, "weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    tensor = get_attr_tensor(gm, weight.target)
    if tensor is None or tensor.dim() not in (3, 4):
        return None
    return _make_conv_matcher(tensor.dim() - 2, aten_convolution=True)(gm, node)


def _make_matmul_matcher(with_bias: bool):
    """``x @ W`` (mm/matmul) or ``addmm(b, x, W)`` with a 2-D parameter ``W``."""

    def match(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
        offset = 1 if with_bias else 0
        found = _weight_operand(gm, _arg(node, offset + 1, "mat2" if with_bias else "other"), 2)
        if found is None:
            return None
        path, transposed, nodes = found
        x = _arg(node, offset, "mat1" if with_bias else "input")
        if not isinstance(x, fx.Node):
            return None
        bias = _bias_operand(_arg(node, 0, "input")) if with_bias else None
        unsupported = None
        if with_bias and (_arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1):
            unsupported = "addmm with beta/alpha != 1 is not supported; kept dense"
        return LayerMatch(
            node,
            "linear",
            x,
            path,
            bias,
            weight_in_out=not transposed,
            unsupported=unsupported,
            weight_nodes=nodes,
        )

    return match


def match_module_call(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """A call of an ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` submodule."""
    module = gm.get_submodule(node.target)
    base = next((t for t in TILED_TYPES if isinstance(module, t)), None)
    if base is None or isinstance(module, tuple(TILED_TYPES.values())):
        return None
    bias = f"{node.target}.bias" if module.bias is not None else None
    weight_path = f"{node.target}.weight"
    if parametrize.is_parametrized(module, "weight"):
        return LayerMatch(
            node,
            base.__name__.lower(),
            node.args[0],
            weight_path,
            bias,
            module_type=type(module),
            unsupported=_COMPUTED_WEIGHT,
        )
    if base is nn.Linear:
        return LayerMatch(node, "linear", node.args[0], weight_path, bias, module_type=type(module))
    spatial = 1 if base is nn.Conv1d else 2
    geometry, reason = module_conv_geometry(module)
    return LayerMatch(
        node,
        f"conv{spatial}d",
        node.args[0],
        weight_path,
        bias,
        conv=None if geometry is None else geometry.as_dict(),
        module_type=type(module),
        unsupported=reason,
    )


Matcher = Callable[[fx.GraphModule, fx.Node], "LayerMatch | None"]

FUNCTION_PATTERNS: dict[Any, Matcher] = {
    aten.linear.default: match_linear_call,
    F.linear: match_linear_call,
    torch._C._nn.linear: match_linear_call,
    aten.conv1d.default: _make_conv_matcher(1),
    aten.conv1d.padding: _make_conv_matcher(1),
    torch.conv1d: _make_conv_matcher(1),
    aten.conv2d.default: _make_conv_matcher(2),
    aten.conv2d.padding: _make_conv_matcher(2),
    torch.conv2d: _make_conv_matcher(2),
    aten.convolution.default: match_aten_convolution,
    aten.addmm.default: _make_matmul_matcher(with_bias=True),
    torch.addmm: _make_matmul_matcher(with_bias=True),
    aten.mm.default: _make_matmul_matcher(with_bias=False),
    aten.matmul.default: _make_matmul_matcher(with_bias=False),
    torch.mm: _make_matmul_matcher(with_bias=False),
    torch.matmul: _make_matmul_matcher(with_bias=False),
    operator.matmul: _make_matmul_matcher(with_bias=False),
}
"""call_function target -> matcher."""


def match_node(gm: fx.GraphModule, node: fx.Node) -> LayerMatch | None:
    """The :class:`LayerMatch` for a node, or None if it is not a tileable layer."""
    if node.op == "call_module":
        return match_module_call(gm, node)
    if node.op == "call_function":
        try:
            matcher = FUNCTION_PATTERNS.get(node.target)
        except TypeError:
            return None
        return matcher(gm, node) if matcher else None
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
        if isinstance(module, _NO_TILE_MODULES):
            op = type(module).__name__.lower()
            return DenseLayer(node, node.target, op, tuple(module.weight.shape), _no_tile_op(op))
        return None
    if node.op != "call_function":
        return None
    try:
        op = _NO_TILE_OP.get(node.target)
        known = node.target in FUNCTION_PATTERNS
    except TypeError:  # unhashable target
        return None
    if op is None and node.target is aten.convolution.default:
        if _arg(node, 6, "transposed", False):
            op = "conv_transpose"
        elif _rank(_arg(node, 1, "weight")) == 5:
            op = "conv3d"
    weight = _arg(node, _WEIGHT_INDEX.get(node.target, 1), "weight")
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
