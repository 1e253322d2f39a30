"""Reading a layer's operands off a graph node, for the matchers of the tile-op records."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["bias_operand", "get_attr_tensor", "node_arg", "weight_operand"]

aten = torch.ops.aten


def get_attr_tensor(gm: fx.GraphModule, path: str) -> torch.Tensor | None:
    """The tensor stored at a dotted attribute path of ``gm``, or None."""
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (or keyword ``name``) of ``node`` as written in the graph."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_transpose(value: fx.Node) -> bool:
    """``value`` swaps the two dims of a 2-D tensor (``.t()``, transpose, permute)."""
    return (
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


def weight_operand(gm: fx.GraphModule, value: Any, ndim: int) -> tuple[str, bool, list] | None:
    """Resolve a weight operand to (attribute path, transposed, nodes on the way), or
    None when it is not a stored ``ndim``-D float tensor.

    ``transposed`` is True when a 2-D parameter is used through ``.t()``/transpose."""
    if not isinstance(value, fx.Node):
        return None
    if value.op == "get_attr":
        tensor = get_attr_tensor(gm, value.target)
        if tensor is not None and tensor.is_floating_point() and tensor.dim() == ndim:
            return value.target, False, [value]
        return None
    if ndim == 2 and _is_transpose(value):
        inner = weight_operand(gm, value.args[0], ndim)
        if inner is not None and not inner[1]:
            return inner[0], True, [*inner[2], value]
    return None


def bias_operand(bias: Any) -> fx.Node | None:
    """The bias node of a functional call, or None when it has none."""
    return bias if isinstance(bias, fx.Node) else None
