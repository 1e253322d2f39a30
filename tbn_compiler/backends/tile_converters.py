"""Relax converters of the tile ops, named by their records (``relax_converter``).

Each converter takes an fx node of ``torch.ops.tbn.tiled_*`` and the importer, builds
the op's TIR kernel with its record's ``kernel_builder`` (which must tag it with
:data:`.kernels.KERNEL_ATTR`, so later steps find and schedule it) and emits one
``relax.call_tir`` to it on the packed tile, alphas and bias constants. The batch (the
rows of a linear, the images of a conv) may be symbolic: the builders then get it as a
``PrimExpr`` and make a kernel for any batch; every other extent must be static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from tvm import relax

from ..ops import tile_op_name
from .relax_import import (
    GraphImportError,
    _add_kernel,
    _dims,
    _product,
    _static_dim,
    _static_shape,
)
from .tile_ops import kernel_builder

__all__ = ["convert_tiled_conv", "convert_tiled_linear"]


def _bound_args(node: fx.Node, importer: Any) -> dict[str, Any]:
    """Arguments of a tile op node by schema name (defaults filled in), as Relax values."""
    schema = node.target._schema
    args = importer._retrieve_args(tuple(node.args))
    kwargs = importer._retrieve_args(dict(node.kwargs))
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise GraphImportError(
                f"node {node.name!r}: missing argument {arg.name!r} of {schema.name}"
            )
    return bound


def _check_dtype(expr: relax.Expr, node: fx.Node) -> str:
    dtype = str(expr.ty.dtype)
    if dtype != "float32":
        raise GraphImportError(f"node {node.name!r}: tile kernels take float32 inputs, got {dtype}")
    return dtype


def _operands(a: dict[str, Any], x: relax.Expr) -> list[relax.Expr]:
    return [x, a["tile"], a["alphas"]] + ([a["bias"]] if a["bias"] is not None else [])


def _ints(values: Sequence[Any]) -> list[int]:
    return [int(v) for v in values]


def convert_tiled_linear(node: fx.Node, importer: Any) -> relax.Expr:
    """``tbn::tiled_linear``: flatten leading dims into ``m`` (symbolic with the batch),
    call the kernel, reshape back."""
    a = _bound_args(node, importer)
    x, bb = a["x"], importer.block_builder
    dtype = _check_dtype(x, node)
    shape = _dims(x)
    in_f, out_f = int(a["in_features"]), int(a["out_features"])
    _static_dim(shape[-1], "the number of input features", node)
    m = _product(shape[:-1])
    p = _static_shape(a["alphas"], "alphas", node)[0]
    build = kernel_builder(node.target)
    func = build(m, in_f, out_f, p, bool(a["weight_in_out"]), a["bias"] is not None, dtype)
    gv = _add_kernel(importer, func, tile_op_name(node.target))
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, (m, in_f)))
    y = bb.emit(relax.call_tir(gv, _operands(a, x2), relax.TensorType((m, out_f), dtype)))
    if len(shape) == 2:
        return y
    return bb.emit(relax.op.reshape(y, (*shape[:-1], out_f)))


def convert_tiled_conv(node: fx.Node, importer: Any) -> relax.Expr:
    """``tbn::tiled_conv{n}d`` (``n`` from ``weight_shape``): an unbatched input gets a
    batch dim of 1 around the kernel call; the batch may be symbolic, channels and
    spatial dims are static."""
    a = _bound_args(node, importer)
    x, bb = a["x"], importer.block_builder
    dtype = _check_dtype(x, node)
    shape = _dims(x)
    weight_shape = _ints(a["weight_shape"])
    unbatched = len(shape) == len(weight_shape) - 1
    if unbatched:
        x = bb.emit(relax.op.expand_dims(x, 0))
        shape = (1, *shape)
    for d in shape[1:]:
        _static_dim(d, "a channel or spatial size", node)
    p = _static_shape(a["alphas"], "alphas", node)[0]
    build = kernel_builder(node.target)
    func = build(
        shape,
        weight_shape,
        _ints(a["stride"]),
        _ints(a["padding"]),
        _ints(a["dilation"]),
        int(a["groups"]),
        p,
        a["bias"] is not None,
        dtype,
    )
    gv = _add_kernel(importer, func, tile_op_name(node.target))
    out_shape = [shape[0], *_expected_out_shape(node, unbatched)[1:]]
    y = bb.emit(relax.call_tir(gv, _operands(a, x), relax.TensorType(out_shape, dtype)))
    return bb.emit(relax.op.squeeze(y, [0])) if unbatched else y


def _expected_out_shape(node: fx.Node, unbatched: bool) -> list[int]:
    """Output shape from torch's fake tensor on the node (batched form); the batch dim
    (symbolic or not) as 1: only the others are read."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise GraphImportError(f"node {node.name!r}: no shape metadata from torch.export")
    shape = [_static_dim(d, "a conv output size", node) for d in val.shape[int(not unbatched) :]]
    return [1, *shape]
