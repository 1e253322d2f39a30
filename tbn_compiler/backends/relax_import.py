"""Import a rewritten fx graph (with ``tbn::tiled_*`` ops) into a Relax IRModule.

Contract of :func:`import_graph`:

* The graph is re-exported with ``torch.export`` using the example inputs (static shapes;
  with ``dynamic_batch`` the batch symbolic where the graph allows it, see
  :func:`~tbn_compiler.capture.export_dynamic_batch`: ``main`` then takes any batch, its
  specs naming the dim :data:`~tbn_compiler.capture.BATCH`, and the tile and indexing
  kernels a batch var of their own), with its output leaves as a flat tuple (the output
  structure is the :class:`~tbn_compiler.capture.OutputTree`'s), decomposed to core ATen,
  and handed to TVM's ``from_exported_program``. Before that, operands that add nothing
  to a ``cat`` (an empty key/value cache) are dropped (:func:`drop_empty_cat_operands`),
  a slice's negative dim is counted from the start (:func:`positive_slice_dims`), an
  attention mask that hides nothing whatever the input values is dropped
  (:func:`drop_attend_all_masks`: Hugging Face ViT's), boolean
  attention masks become additive float masks (:func:`float_attention_masks`), the
  boolean operands of ops TVM mishandles become integers (:func:`integer_bool_operands`),
  and scans sum in the dtype torch does (:func:`scan_operand_dtypes`: int32 -> int64).
* The tile ops (``tbn::tiled_linear``, ``tbn::tiled_conv1d``, ... : every registered
  :class:`~tbn_compiler.tile_ops.TileOpRecord`) go through their records' converters
  (:func:`converters`: op name -> converter, like TVM's own convert map; they live in
  :mod:`.tile_converters`): each emits a ``relax.call_tir`` to the PrimFunc of its
  record's kernel builder, tagged with the attribute :data:`KERNEL_ATTR` so later steps
  can find and schedule it.
* Ops whose TVM converters break torch's semantics go through :func:`converters` too
  (:data:`SEMANTIC_CONVERTERS`):

  - NaN propagates, as in torch, through ``relu``/``relu6``/``hardtanh``/``clamp*``,
    elementwise ``maximum``/``minimum``, the reductions ``amax``/``amin``/``max``/``min``
    (with ``dim``: values and indices) and max pooling. TVM lowers these to ``max``/
    ``min``, which compile to NaN-dropping selects (LLVM) or ``fmaxf`` (CUDA); ours are
    compare-and-select forms that keep a NaN operand (:func:`.kernels.clamp_te`,
    :func:`.kernels.max_pool_te`) or add a NaN flag reduction.
  - Indexing by id tensors is checked (:func:`convert_indexing`): ``embedding``,
    ``index_select``, ``x[...]`` with any index tensors (``torch.take`` too) and
    ``torch.gather`` read through :func:`.kernels.gather_primfunc`; ``scatter``,
    ``scatter_add`` and ``index_put`` (``x[ids] = v``; ``index_add``, ``index_copy``,
    ``index_fill`` decompose to it, keeping their id rules) write through
    :func:`.kernels.scatter_primfunc`. A bad id raises the exception torch raises
    (``IndexError``; ``RuntimeError`` for ``gather``/``scatter*``/``index_add``) naming
    the node on host targets, and nothing is ever read or written out of bounds.
    ``embedding_bag`` and ``scatter_reduce`` have no TVM converter and are refused.
  - ``scaled_dot_product_attention`` honours ``scale``, ``is_causal``, ``enable_gqa``,
    float masks of any broadcastable rank and 2-D/3-D/4-D inputs, and returns zeros for
    the query rows its mask hides entirely (:func:`zero_fully_masked_rows`).
  - ``select`` (``x[:, i]``) counts a negative ``i`` from the end (TVM's converter reads
    out of bounds), and ``x ** n`` for a whole ``n`` in 2..8 multiplies (as torch does
    for 2 and 3; TVM's ``pow`` warns on stderr at every build).
  - Randomness is refused, never frozen: ``dropout`` that drops (``train=True``,
    ``p > 0``; TVM returns the input) and the ops that draw random numbers (``rand*``,
    ``randn*`` (TVM bakes one draw into a constant), ``randint*``, ``bernoulli``, ...).
  - Refused with :class:`UnsupportedOpError` naming the node: attention with
    ``dropout_p > 0`` and the index output of ``max_pool*_with_indices``.
* Every other op goes through TVM's frontend. An op it cannot import raises
  :class:`UnsupportedOpError` naming the fx node and the op.
* Packed tiles (uint32), alphas and biases are buffers of the graph and end up bound as
  constants (params are not kept as inputs); the Relax ``main`` takes the user inputs only.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import tvm
import tvm_ffi
from torch import fx
from tvm import relax, tirx
from tvm.relax.frontend.torch import exported_program_translator as ept

from ..capture import (
    BATCH,
    example_batch,
    example_tensors,
    export_dynamic_batch,
    graph_with_outputs,
)
from . import kernels
from .specs import TensorSpec, check_index_inputs
from .tile_ops import relax_converters

__all__ = [
    "KERNEL_ATTR",
    "converters",
    "SEMANTIC_CONVERTERS",
    "TensorSpec",
    "ImportResult",
    "GraphImportError",
    "UnsupportedOpError",
    "import_graph",
    "export_graph",
    "index_input_checks",
    "check_index_inputs",
]

KERNEL_ATTR = kernels.KERNEL_ATTR
"""PrimFunc attribute that marks (and names the kind of) our tile kernels."""


class GraphImportError(RuntimeError):
    """The rewritten graph could not be turned into Relax."""


class UnsupportedOpError(GraphImportError):
    """TVM's frontend cannot import an op of the graph."""


@dataclass
class ImportResult:
    """The Relax module plus the user-facing signature of its ``main``.

    ``index_checks`` (JSON-friendly, see :func:`index_input_checks`) lets a caller
    check id inputs before running the module, for targets whose kernels cannot raise
    (CUDA): :func:`check_index_inputs` raises the kernel's exception and message.
    ``static_batch``: None when ``main`` takes any batch (the dims named
    :data:`~tbn_compiler.capture.BATCH` in the specs), else why the batch is static."""

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    index_checks: list[dict[str, Any]] = field(default_factory=list)
    static_batch: str | None = None


# --------------------------------------------------------------------------- converters

Converter = Callable[[fx.Node, Any], relax.Expr]


Extent = kernels.Extent
"""A static extent (int) or a symbolic one (an int64 ``tirx.Expr`` of the batch)."""


def _static_shape(expr: relax.Expr, what: str, node: fx.Node) -> tuple[int, ...]:
    shape = expr.ty.shape
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise GraphImportError(
            f"node {node.name!r}: {what} needs a static shape, got {shape}"
        ) from exc


def _dims(expr: relax.Expr) -> tuple[Extent, ...]:
    """Shape of a Relax tensor: ints where static, expressions where symbolic."""
    return tuple(int(d) if isinstance(d, tirx.IntImm) else d for d in expr.ty.shape)


def _static_dim(value: Extent, what: str, node: fx.Node) -> int:
    """``value`` as an int; GraphImportError naming ``node`` when it is symbolic."""
    if not kernels.is_static(value):
        raise GraphImportError(f"node {node.name!r}: {what} must be static, got {value}")
    return int(value)


def _same_dims(a: Sequence[Extent], b: Sequence[Extent]) -> bool:
    """True when two shapes are the same (ints equal, expressions structurally equal)."""
    return len(a) == len(b) and all(
        int(x) == int(y) if kernels.is_static(x) and kernels.is_static(y) else _same_expr(x, y)
        for x, y in zip(a, b, strict=True)
    )


def _same_expr(x: Any, y: Any) -> bool:
    if kernels.is_static(x) or kernels.is_static(y):
        return False
    return bool(tvm_ffi.structural_equal(x, y))


def _product(dims: Sequence[Extent]) -> Extent:
    """Product of extents: an int when all are static."""
    result: Extent = 1
    for d in dims:
        if kernels.is_static(d):
            result = result * int(d)
        else:
            result = d if isinstance(result, int) and result == 1 else result * d
    return result


Symbols = dict[str, tirx.Var]
"""torch's size symbol (``s77``) -> the Relax variable of that dimension."""


def _symbols(importer: Any) -> Symbols:
    """The size symbols of the graph's inputs and their Relax variables (cached)."""
    found = getattr(importer, "_tbn_symbols", None)
    if found is None:
        found = {}
        for node, var in list(importer.env.items()):
            val = node.meta.get("val") if isinstance(node, fx.Node) else None
            if node.op != "placeholder" or not isinstance(val, torch.Tensor):
                continue
            if not isinstance(getattr(var, "ty", None), relax.TensorType):
                continue
            for size, dim in zip(val.shape, var.ty.shape, strict=False):
                if isinstance(size, torch.SymInt) and isinstance(dim, tirx.Var):
                    found.setdefault(str(size.node.expr), dim)
        importer._tbn_symbols = found
    return found


def _tir_of(expr: Any, symbols: Symbols) -> Extent:
    """A sympy size expression of torch's shapes as an int or a TIR expression."""
    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if str(expr) not in symbols:
            symbols[str(expr)] = tirx.Var(str(expr), "int64")
        return symbols[str(expr)]
    args = [_tir_of(a, symbols) for a in expr.args]
    if expr.is_Add:
        return functools.reduce(operator.add, args)
    if expr.is_Mul:
        return functools.reduce(operator.mul, args)
    if isinstance(expr, FloorDiv):
        return tirx.floordiv(_as_expr(args[0]), _as_expr(args[1]))
    if isinstance(expr, (Mod, PythonMod)):
        return tirx.floormod(_as_expr(args[0]), _as_expr(args[1]))
    raise GraphImportError(f"size {expr} of a symbolic shape cannot be expressed in TIR")


def _as_expr(value: Extent) -> tirx.Expr:
    return tirx.IntImm("int64", value) if isinstance(value, int) else value


def _shape_of(node: Any, symbols: Symbols | None = None) -> tuple[Extent, ...]:
    """The shape torch traced for ``node``; a symbolic size as a TIR expression of the
    variables in ``symbols`` (a new variable per unknown symbol, added to it)."""
    dims = []
    for size in node.meta["val"].shape:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            table = {} if symbols is None else symbols
            dims.append(int(expr) if expr.is_number else _tir_of(expr, table))
        else:
            dims.append(int(size))
    return tuple(dims)


def _add_kernel(importer: Any, func: tvm.tirx.PrimFunc, op: str) -> relax.GlobalVar:
    if not (func.attrs and KERNEL_ATTR in func.attrs):
        raise GraphImportError(
            f"kernel builder for {op} returned a PrimFunc without {KERNEL_ATTR!r}"
        )
    return importer.block_builder.add_func(func, f"tbn_{op}")


# --------------------------------------------------------------------------- torch semantics


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (or keyword ``name``) of ``node`` as written in the graph."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _refuse(node: fx.Node, what: str) -> UnsupportedOpError:
    """The error for an argument of ``node`` that the import cannot honour."""
    return UnsupportedOpError(f"node {node.name!r}{_node_origin(node)} ({_op_name(node)}): {what}")


def _value(importer: Any, arg: Any) -> Any:
    """A graph argument as a Relax expression (fx nodes) or a Python value."""
    return importer.env[arg] if isinstance(arg, fx.Node) else arg


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _is_float(expr: Any) -> bool:
    return isinstance(expr, relax.Expr) and _dtype(expr).startswith(("float", "bfloat"))


def _scalar(value: float, like: relax.Expr) -> tvm.ir.Constant:
    return relax.const(value, _dtype(like))


def _nan_maximum(a: relax.Expr, b: relax.Expr) -> relax.Expr:
    """``torch.maximum``: NaN if either operand is NaN."""
    return relax.op.where(relax.op.logical_or(relax.op.greater(a, b), relax.op.isnan(a)), a, b)


def _nan_minimum(a: relax.Expr, b: relax.Expr) -> relax.Expr:
    """``torch.minimum``: NaN if either operand is NaN."""
    return relax.op.where(relax.op.logical_or(relax.op.less(a, b), relax.op.isnan(a)), a, b)


def _clamp_scalars(bb: Any, x: relax.Expr, low: Any, high: Any) -> relax.Expr:
    """``torch.clamp(x, low, high)`` with number bounds (None: unbounded), NaN kept."""
    if not _is_float(x) and any(isinstance(b, float) for b in (low, high)):
        x = bb.emit(relax.op.astype(x, "float32"))  # torch: an int tensor, float bounds: float
    if not _is_float(x):
        for bound, extreme in ((low, relax.op.maximum), (high, relax.op.minimum)):
            if bound is not None:  # clip would cast an infinite missing bound to an int
                x = bb.emit(extreme(x, relax.const(int(bound), _dtype(x))))
        return x
    if any(b is not None and math.isnan(b) for b in (low, high)):
        return bb.emit(relax.op.add(x, _scalar(math.nan, x)))  # torch: all NaN
    low, high = (None if b is None else float(b) for b in (low, high))
    return bb.emit_te(kernels.clamp_te, x, low, high, primfunc_name_hint="clamp")


def convert_relu(node: fx.Node, importer: Any) -> relax.Expr:
    """``relu``: ``x < 0 ? 0 : x`` (one compare and select, NaN kept)."""
    return _clamp_scalars(importer.block_builder, importer.env[node.args[0]], 0.0, None)


def convert_relu6(node: fx.Node, importer: Any) -> relax.Expr:
    return _clamp_scalars(importer.block_builder, importer.env[node.args[0]], 0.0, 6.0)


def convert_hardtanh(node: fx.Node, importer: Any) -> relax.Expr:
    low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    return _clamp_scalars(importer.block_builder, importer.env[node.args[0]], low, high)


def convert_clamp(node: fx.Node, importer: Any) -> relax.Expr:
    """``clamp`` / ``clamp_min`` / ``clamp_max`` with number or tensor bounds."""
    name = _op_name(node)
    x, bb = importer.env[node.args[0]], importer.block_builder
    if name.startswith("clamp_min"):
        low, high = _value(importer, node.args[1]), None
    elif name.startswith("clamp_max"):
        low, high = None, _value(importer, node.args[1])
    else:
        low, high = (_value(importer, _arg(node, i, k)) for i, k in ((1, "min"), (2, "max")))
    if not any(isinstance(b, relax.Expr) for b in (low, high)):
        return _clamp_scalars(bb, x, low, high)
    if not _is_float(x):
        raise GraphImportError(f"node {node.name!r}: clamp with tensor bounds needs floats")
    for bound, combine in ((low, _nan_maximum), (high, _nan_minimum)):
        if bound is not None:
            b = bound if isinstance(bound, relax.Expr) else _scalar(bound, x)
            x = bb.emit(combine(x, relax.op.astype(b, _dtype(x))))
    return x


def _convert_binary_extreme(largest: bool) -> Converter:
    """``maximum`` / ``minimum`` / ``max.other`` / ``min.other``: NaN-propagating."""
    combine, stock = (
        (_nan_maximum, relax.op.maximum) if largest else (_nan_minimum, relax.op.minimum)
    )

    def convert(node: fx.Node, importer: Any) -> relax.Expr:
        a, b = (_value(importer, v) for v in node.args[:2])
        if not (_is_float(a) and _is_float(b) and _dtype(a) == _dtype(b)):
            fn = torch.maximum if largest else torch.minimum
            return importer._binary_op(stock, fn)(node)
        return importer.block_builder.emit(combine(a, b))

    return convert


def _reduce_axes(dim: Any) -> list[int] | None:
    """Torch ``dim`` (int, list, empty list or None) as Relax reduction axes."""
    if dim is None:
        return None
    dims = [int(dim)] if isinstance(dim, int) else [int(d) for d in dim]
    return dims or None


def _nan_flag(x: relax.Expr, axis: list[int] | None, keepdims: bool) -> relax.Expr:
    """NaN where the reduced slice of ``x`` holds a NaN, else 0 (sum of the NaNs)."""
    nans = relax.op.where(relax.op.isnan(x), x, _scalar(0.0, x))
    return relax.op.sum(nans, axis, keepdims)


def _extreme(bb: Any, x: relax.Expr, axis: Any, keepdims: bool, largest: bool) -> relax.Expr:
    """``amax`` / ``amin`` over ``axis``: NaN when the slice holds a NaN, as in torch."""
    reduce = relax.op.max if largest else relax.op.min
    y = bb.emit(reduce(x, axis, keepdims))
    if not _is_float(x):
        return y
    return bb.emit(relax.op.add(y, _nan_flag(x, axis, keepdims)))


def _convert_reduce_extreme(largest: bool) -> Converter:
    """``amax`` / ``amin`` (``dim``, ``keepdim``) and ``max()`` / ``min()`` (all)."""

    def convert(node: fx.Node, importer: Any) -> relax.Expr:
        x = importer.env[node.args[0]]
        axis = _reduce_axes(_arg(node, 1, "dim"))
        keepdims = bool(_arg(node, 2, "keepdim", False))
        return _extreme(importer.block_builder, x, axis, keepdims, largest)

    return convert


def _convert_extreme_dim(largest: bool) -> Converter:
    """``max.dim`` / ``min.dim``: (values, indices); a NaN wins (its first index), else
    the first extreme, as torch on CPU."""
    arg = relax.op.argmax if largest else relax.op.argmin

    def convert(node: fx.Node, importer: Any) -> relax.Expr:
        x, bb = importer.env[node.args[0]], importer.block_builder
        dim, keepdims = int(node.args[1]), bool(_arg(node, 2, "keepdim", False))
        values = _extreme(bb, x, [dim], keepdims, largest)
        index = bb.emit(arg(x, dim, keepdims))
        if _is_float(x):
            first_nan = relax.op.argmax(relax.op.astype(relax.op.isnan(x), "int32"), dim, keepdims)
            index = bb.emit(relax.op.where(relax.op.isnan(values), first_nan, index))
        return bb.emit(relax.Tuple([values, index]))

    return convert


def _uses_only_first_output(node: fx.Node) -> bool:
    return all(
        u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
        for u in node.users
    )


def _pool_params(node: fx.Node, nd: int) -> tuple[list[int], ...]:
    """(kernel, stride, padding, dilation) of a ``max_pool*`` node, ``nd`` values each
    (torch allows one value for all dims; an empty stride means the kernel size)."""

    def ints(value: Any, default: list[int]) -> list[int]:
        values = [int(value)] if isinstance(value, int) else [int(v) for v in value or []]
        values = values or default
        return values * nd if len(values) == 1 else values

    kernel = ints(node.args[1], [1])
    stride = ints(_arg(node, 2, "stride", []), kernel)
    return (
        kernel,
        stride,
        ints(_arg(node, 3, "padding", 0), [0]),
        ints(_arg(node, 4, "dilation", 1), [1]),
    )


def _convert_max_pool(nd: int, with_indices: bool) -> Converter:
    """``max_pool{nd}d[_with_indices]`` by :func:`.kernels.max_pool_te` (a window holding
    a NaN gives NaN, as in torch). The indices of ``with_indices`` are not computed: a
    graph that uses them is refused."""

    def convert(node: fx.Node, importer: Any) -> relax.Expr:
        if with_indices and not _uses_only_first_output(node):
            raise _refuse(node, "the indices output is not supported (only the pooled values)")
        x, bb = importer.env[node.args[0]], importer.block_builder
        if not _is_float(x):
            raise _refuse(node, f"max pooling of {_dtype(x)} tensors")
        kernel, stride, padding, dilation = _pool_params(node, nd)
        ceil_mode = bool(_arg(node, 5, "ceil_mode", False))
        out = bb.emit_te(
            kernels.max_pool_te,
            x,
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
            primfunc_name_hint=f"max_pool{nd}d",
        )
        if not with_indices:
            return out
        return bb.emit(relax.Tuple([out, relax.op.zeros_like(out, "int64")]))

    return convert


@dataclass(frozen=True)
class _Indexing:
    """A checked gather or scatter of the graph: ``data`` indexed as ``index`` says, by
    the id tensors ``ids`` (in :attr:`.kernels.IndexMap.ids` order). A scatter
    (``write``) writes ``values`` (see :func:`_scatter_values`), adding with
    ``accumulate``."""

    data: fx.Node
    ids: tuple[fx.Node, ...]
    index: kernels.IndexMap
    write: bool = False
    accumulate: bool = False


def _id_tensor(
    node: fx.Node,
    ids: Any,
    axes: Sequence[int],
    what: str,
    dim: int,
    size: Extent,
    wrap: bool,
    symbols: Symbols,
    error: str = "IndexError",
) -> kernels.IdTensor:
    """The :class:`.kernels.IdTensor` for the fx node ``ids`` that indexes data dim ``dim``
    (``size`` long) in ``node``; ``what`` starts the message. Integer ids only."""
    val = ids.meta.get("val") if isinstance(ids, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.int64, torch.int32):
        kind = getattr(val, "dtype", type(ids).__name__)
        raise _refuse(node, f"ids of type {kind} (expected int64 or int32 tensors)")
    low = -size if wrap else 0
    where = f"{node.name!r}{_node_origin(node)}"
    if what == "embedding":
        text = f"index out of range in self: embedding {where} has {size} rows"
    elif what == "index_select":
        text = f"index out of range in self: index_select {where} along dim {dim} of size {size}"
    else:
        text = f"index out of bounds: {what} {where} along dim {dim} of size {size}"
    message = f"{text}, every id must be in [{low}, {size - 1}]"
    dtype = str(val.dtype).removeprefix("torch.")
    shape = _shape_of(ids, symbols)
    return kernels.IdTensor(shape, dtype, tuple(axes), size, wrap, message, error)


def _embedding_indexing(node: fx.Node, symbols: Symbols) -> _Indexing:
    """``embedding(weight, ids, ...)``: ``out[*i, e] = weight[ids[*i], e]`` (the other
    arguments only concern gradients)."""
    weight, ids = node.args[0], node.args[1]
    (rows, width), id_shape = _shape_of(weight, symbols), _shape_of(ids, symbols)
    t = _id_tensor(node, ids, range(len(id_shape)), "embedding", 0, rows, False, symbols)
    index = kernels.IndexMap((rows, width), (*id_shape, width), (t, len(id_shape)))
    return _Indexing(weight, (ids,), index)


def _along_dim(data_shape: tuple[int, ...], dim: int, ids: kernels.IdTensor) -> tuple:
    """Index-map dims that tie every data dim but ``dim`` to the same source axis."""
    return tuple(ids if d == dim else d for d in range(len(data_shape)))


def _index_select_indexing(node: fx.Node, symbols: Symbols) -> _Indexing:
    """``index_select(data, dim, ids)``: ids (1-D or 0-D) pick slices along ``dim``."""
    data, ids = node.args[0], node.args[2]
    shape, id_shape = _shape_of(data, symbols), _shape_of(ids, symbols)
    dim = int(node.args[1]) % len(shape)
    axes = (dim,) * len(id_shape)
    t = _id_tensor(node, ids, axes, "index_select", dim, shape[dim], False, symbols)
    picked = _product(id_shape)
    picked = max(1, picked) if isinstance(picked, int) else picked
    source = (*shape[:dim], picked, *shape[dim + 1 :])
    return _Indexing(data, (ids,), kernels.IndexMap(shape, source, _along_dim(shape, dim, t)))


def _elementwise_indexing(
    node: fx.Node, symbols: Symbols, op: str, write: bool, accumulate: bool
) -> _Indexing:
    """``gather`` / ``scatter*`` ``(data, dim, index, ...)``: element ``i`` of ``index``
    sits at ``i`` with ``i[dim]`` replaced by ``index[i]`` (no negative ids: torch raises
    ``RuntimeError``)."""
    data, ids = node.args[0], node.args[2]
    shape, id_shape = _shape_of(data, symbols), _shape_of(ids, symbols)
    if not shape or len(id_shape) != len(shape):
        raise _refuse(node, f"{op} of a {len(shape)}-D tensor by a {len(id_shape)}-D index")
    dim = int(node.args[1]) % len(shape)
    axes = range(len(shape))
    t = _id_tensor(node, ids, axes, op, dim, shape[dim], False, symbols, "RuntimeError")
    index = kernels.IndexMap(shape, id_shape, _along_dim(shape, dim, t))
    return _Indexing(data, (ids,), index, write, accumulate)


def _advanced_indexing(
    node: fx.Node,
    data: fx.Node,
    indices: Sequence[Any],
    op: str,
    wrap: bool,
    error: str,
    symbols: Symbols,
) -> tuple[tuple[Extent, ...], tuple, tuple[fx.Node, ...]]:
    """``(source shape, index-map dims, id nodes)`` of torch's ``data[indices]`` (``None``
    entries and missing trailing entries take whole dims). The index tensors broadcast
    together to ``B``; ``B`` replaces the indexed dims where they are adjacent, else it
    comes first, followed by the other dims (NumPy's rule)."""
    shape = _shape_of(data, symbols)
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    if not given:
        raise _refuse(node, "indexing without an index tensor")
    bcast = _broadcast(node, [_shape_of(i, symbols) for _, i in given])
    indexed = [d for d, _ in given]
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    start = indexed[0] if adjacent else 0
    rest = [d for d in range(len(shape)) if d not in indexed]
    before = [d for d in rest if adjacent and d < start]
    after = [d for d in rest if d not in before]
    # a scalar result (0-D ids indexing every dim) gets a unit axis: kernels need one
    source = (*(shape[d] for d in before), *bcast, *(shape[d] for d in after)) or (1,)
    dims: list[Any] = [None] * len(shape)
    for d in before:
        dims[d] = d
    for k, d in enumerate(after):
        dims[d] = len(before) + len(bcast) + k
    for d, ids in given:
        rank = len(_shape_of(ids, symbols))
        axes = range(start + len(bcast) - rank, start + len(bcast))
        dims[d] = _id_tensor(node, ids, axes, op, d, shape[d], wrap, symbols, error)
    return source, tuple(dims), tuple(i for _, i in given)


def _broadcast(node: fx.Node, shapes: Sequence[tuple[Extent, ...]]) -> tuple[Extent, ...]:
    """The shape ``shapes`` broadcast to (torch's rule; symbolic sizes must match)."""
    if all(kernels.is_static(d) for shape in shapes for d in shape):
        return tuple(torch.broadcast_shapes(*shapes))
    rank = max(len(shape) for shape in shapes)
    out: list[Extent] = []
    for k in range(rank):
        sizes = [shape[len(shape) - rank + k] for shape in shapes if len(shape) - rank + k >= 0]
        wide = [d for d in sizes if not (kernels.is_static(d) and int(d) == 1)] or [1]
        if not all(_same_dims([wide[0]], [d]) for d in wide):
            raise GraphImportError(f"node {node.name!r}: index shapes {shapes} do not broadcast")
        out.append(wide[0])
    return tuple(out)


def _index_indexing(node: fx.Node, symbols: Symbols) -> _Indexing:
    """``data[indices]`` (``aten.index.Tensor``): negative ids count from the end."""
    data = node.args[0]
    source, dims, ids = _advanced_indexing(
        node, data, node.args[1], "indexing", True, "IndexError", symbols
    )
    return _Indexing(data, ids, kernels.IndexMap(_shape_of(data, symbols), source, dims))


# op that decomposed to ``index_put`` -> (negative ids wrap, exception torch raises)
_INDEX_PUT_ORIGINS = {
    "index_add": (False, "RuntimeError"),
    "index_copy": (False, "IndexError"),
}


def _index_put_indexing(node: fx.Node, symbols: Symbols) -> _Indexing:
    """``index_put(data, indices, values, accumulate)`` (``x[ids] = v``, and ``index_add``
    / ``index_copy`` / ``index_fill`` decomposed to it, whose id rules it keeps)."""
    data = node.args[0]
    origin = getattr(node.meta.get("original_aten"), "_opname", "index_put")
    wrap, error = _INDEX_PUT_ORIGINS.get(origin, (True, "IndexError"))
    source, dims, ids = _advanced_indexing(node, data, node.args[1], origin, wrap, error, symbols)
    index = kernels.IndexMap(_shape_of(data, symbols), source, dims)
    return _Indexing(data, ids, index, write=True, accumulate=bool(_arg(node, 3, "accumulate")))


_aten = torch.ops.aten
_INDEXING: dict[Any, Callable[[fx.Node, Symbols], _Indexing]] = {
    _aten.embedding.default: _embedding_indexing,
    _aten.index_select.default: _index_select_indexing,
    _aten.index.Tensor: _index_indexing,
    _aten.gather.default: lambda n, s: _elementwise_indexing(n, s, "gather", False, False),
    _aten.scatter.src: lambda n, s: _elementwise_indexing(n, s, "scatter", True, False),
    _aten.scatter.value: lambda n, s: _elementwise_indexing(n, s, "scatter", True, False),
    _aten.scatter_add.default: lambda n, s: _elementwise_indexing(n, s, "scatter_add", True, True),
    _aten.index_put.default: _index_put_indexing,
}
"""fx op -> the checked gather/scatter it is (:func:`convert_indexing`)."""


def _indexing_of(node: fx.Node, symbols: Symbols) -> _Indexing | None:
    """The checked gather or scatter ``node`` performs, or None for any other node
    (symbolic sizes in terms of ``symbols``)."""
    describe = _INDEXING.get(node.target) if node.op == "call_function" else None
    return None if describe is None else describe(node, symbols)


def _scatter_values(node: fx.Node, importer: Any, index: kernels.IndexMap) -> relax.Expr:
    """The values a scatter writes, shaped as ``index.source``: ``index_put``'s values
    broadcast to the indexed shape, ``scatter``'s ``value`` filled in, or its ``src`` cut
    to the index's shape (torch uses only that part)."""
    bb, dtype, source = importer.block_builder, _dtype(importer.env[node.args[0]]), index.source
    if node.target is _aten.scatter.value:
        return bb.emit(relax.op.full(source, relax.const(node.args[3], dtype), dtype))
    put = node.target is _aten.index_put.default
    values = importer.env[node.args[2] if put else node.args[3]]
    if _dtype(values) != dtype:
        values = bb.emit(relax.op.astype(values, dtype))
    if put:
        return bb.emit(relax.op.broadcast_to(values, source))
    if not _same_dims(_dims(values), source):
        axes = list(range(len(source)))
        values = bb.emit(relax.op.strided_slice(values, axes, [0] * len(axes), list(source)))
    return values


def convert_indexing(node: fx.Node, importer: Any) -> relax.Expr:
    """``embedding`` / ``index_select`` / ``x[...]`` / ``gather`` as the checked gather of
    :func:`.kernels.gather_primfunc`; ``scatter`` / ``scatter_add`` / ``index_put`` as
    the checked scatter of :func:`.kernels.scatter_primfunc` (see :data:`_INDEXING`)."""
    symbols = _symbols(importer)
    g = _indexing_of(node, symbols)
    bb, data = importer.block_builder, importer.env[node.args[0]]
    dtype, index = _dtype(data), g.index
    ids = [importer.env[i] for i in g.ids]
    if g.write and g.accumulate and dtype == "bool":
        raise _refuse(node, "accumulating into a bool tensor")
    if g.write:
        values = _scatter_values(node, importer, index)
        func = kernels.scatter_primfunc(index, dtype, g.accumulate)
        args, out_shape = [data, *ids, values], index.data
    else:
        func = kernels.gather_primfunc(index, dtype)
        args, out_shape = [data, *ids], index.source
    gv = _add_kernel(importer, func, "scatter" if g.write else "gather")
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, dtype)))
    wanted = _shape_of(node, symbols)
    return y if _same_dims(out_shape, wanted) else bb.emit(relax.op.reshape(y, wanted))


def convert_select(node: fx.Node, importer: Any) -> relax.Expr:
    """``x.select(dim, i)`` (``x[:, i]``): a negative ``i`` counts from the end, as in
    torch (TVM's converter reads out of bounds for it, and warns at every build)."""
    x = importer.env[node.args[0]]
    dim, index = int(node.args[1]), int(node.args[2])
    return importer.block_builder.emit(
        relax.op.take(x, relax.const(index, "int64"), axis=dim, mode="wrap")
    )


_MAX_MULTIPLIED_POWER = 8


def convert_pow_scalar(node: fx.Node, importer: Any) -> relax.Expr:
    """``x ** n`` for a whole ``n`` in 2..8 of a float tensor: products of ``x`` (torch
    computes 2 and 3 so; TVM's ``pow`` warns at every build for exponents of 3 and more,
    GPT-2's GELU has one). Other exponents and dtypes: TVM's converter."""
    x, exponent = importer.env[node.args[0]], node.args[1]
    whole = isinstance(exponent, (int, float)) and float(exponent).is_integer()
    if not (_is_float(x) and whole and 2 <= exponent <= _MAX_MULTIPLIED_POWER):
        return importer.stock_convert_map[_op_name(node)](node)
    bb, n = importer.block_builder, int(exponent)
    result, square = None, x
    while n:  # binary exponentiation: x**3 = x * (x * x), as torch
        if n & 1:
            result = square if result is None else bb.emit(relax.op.multiply(result, square))
        n >>= 1
        if n:
            square = bb.emit(relax.op.multiply(square, square))
    return result


def convert_dropout(node: fx.Node, importer: Any) -> relax.Expr:
    """``dropout`` / ``native_dropout``: the identity when it does not drop (``train``
    false or ``p == 0``); refused when it does (TVM's converter returns the input)."""
    p = float(_arg(node, 1, "p", 0.5))
    train = _arg(node, 2, "train", True)
    if train and p > 0.0:
        raise _refuse(
            node,
            f"drops at random (p={p}, train=True) and a compiled module draws no random "
            "numbers; call model.eval(), or pass training=False to F.dropout",
        )
    x = importer.env[node.args[0]]
    if "native_dropout" not in _op_name(node):
        return x
    keep = relax.op.ones(x.ty.shape, "bool")  # native_dropout also returns its mask
    return importer.block_builder.emit(relax.Tuple([x, importer.block_builder.emit(keep)]))


def refuse_random(node: fx.Node, importer: Any) -> relax.Expr:
    """Ops that draw random numbers at every call: refused (TVM's converters freeze one
    draw into a constant, or return the input)."""
    raise _refuse(
        node,
        "draws random numbers at every call, and a compiled module draws none; "
        "pass the random tensor as an input instead",
    )


# --------------------------------------------------------------------------- attention


def _as_4d(bb: Any, x: relax.Expr, rank: int) -> relax.Expr:
    """An attention operand of rank 2 ``(L, E)`` / 3 ``(N, L, E)`` / 4 as ``(B, H, L, E)``."""
    if rank == 4:
        return x
    return bb.emit(relax.op.expand_dims(x, [1] if rank == 3 else [0, 1]))


def _attention_bias(bb: Any, node: fx.Node, mask: relax.Expr, rank: int, dtype: str) -> relax.Expr:
    """A float mask broadcastable to the scores ``(..., L, S)`` of rank ``rank``, as 4-D."""
    shape = _dims(mask)
    if len(shape) > rank:
        raise _refuse(node, f"mask of rank {len(shape)} for inputs of rank {rank}")
    if not _is_float(mask):
        raise _refuse(node, f"mask of dtype {_dtype(mask)} (expected bool or float)")
    if len(shape) < rank:
        mask = bb.emit(relax.op.reshape(mask, (1,) * (rank - len(shape)) + shape))
    if _dtype(mask) != dtype:
        mask = bb.emit(relax.op.astype(mask, dtype))
    return _as_4d(bb, mask, rank)


def _causal_bias(length: int, source: int, dtype: str) -> tvm.ir.Constant:
    """``(1, 1, L, S)``: 0 where key ``j <= i`` (torch's top-left ``tril``), -inf above."""
    allowed = np.tril(np.ones((length, source), dtype=bool))
    return relax.const(np.where(allowed, 0.0, -np.inf).astype(dtype)[None, None], dtype)


def _match_kv_heads(bb: Any, node: fx.Node, k: relax.Expr, heads: int, gqa: bool) -> relax.Expr:
    """``k`` / ``v`` with ``heads`` heads: repeated per group when ``enable_gqa``."""
    kv_heads = int(k.ty.shape[1])
    if kv_heads == heads:
        return k
    if not gqa or heads % kv_heads:
        raise _refuse(
            node, f"{heads} query heads and {kv_heads} key/value heads (enable_gqa={gqa})"
        )
    return bb.emit(relax.op.repeat(k, heads // kv_heads, axis=1))


def convert_sdpa(node: fx.Node, importer: Any) -> relax.Expr:
    """``scaled_dot_product_attention`` with all of torch's arguments honoured or refused:
    ``softmax(q k^T * scale + mask [+ causal]) v``, ``scale`` default ``1/sqrt(E)``."""
    bb = importer.block_builder
    q, k, v = (importer.env[a] for a in node.args[:3])
    mask = _value(importer, _arg(node, 3, "attn_mask"))
    dropout_p = float(_arg(node, 4, "dropout_p", 0.0))
    is_causal = bool(_arg(node, 5, "is_causal", False))
    scale = _arg(node, 6, "scale")
    gqa = bool(_arg(node, 7, "enable_gqa", False))
    if dropout_p != 0.0:
        raise _refuse(
            node,
            f"dropout_p={dropout_p} drops at random (torch does so even in eval mode); "
            "pass dropout_p=0.0 for inference",
        )
    shapes = [_dims(t) for t in (q, k, v)]
    rank = len(shapes[0])
    if rank not in (2, 3, 4) or any(len(s) != rank for s in shapes):
        raise _refuse(node, f"inputs of shapes {shapes} (expected equal ranks 2, 3 or 4)")
    q4, k4, v4 = (_as_4d(bb, t, rank) for t in (q, k, v))
    (b, h, length, e), (bk, _, source, ek), (bv, _, sv, ev) = (_dims(t) for t in (q4, k4, v4))
    if not _same_dims((b, e, source), (bk, ek, sv)) or not _same_dims((b,), (bv,)):
        raise _refuse(node, f"query/key/value shapes {shapes} do not match")
    h = _static_dim(h, "the number of heads", node)
    k4, v4 = (_match_kv_heads(bb, node, t, h, gqa) for t in (k4, v4))
    dtype = _dtype(q)
    bias = None if mask is None else _attention_bias(bb, node, mask, rank, dtype)
    if is_causal:
        lengths = (_static_dim(d, "a causal attention length", node) for d in (length, source))
        causal = _causal_bias(*lengths, dtype)
        bias = causal if bias is None else bb.emit(relax.op.add(bias, causal))
    bsnh = [bb.emit(relax.op.permute_dims(t, [0, 2, 1, 3])) for t in (q4, k4, v4)]
    out = bb.emit(
        relax.op.nn.attention(*bsnh, bias=bias, scale=None if scale is None else float(scale))
    )
    out = bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))  # (B, H, L, Ev)
    return bb.emit(relax.op.reshape(out, (*shapes[0][:-2], length, ev)))


SEMANTIC_CONVERTERS: dict[str, Converter] = {
    "relu.default": convert_relu,
    "relu_.default": convert_relu,
    "relu6.default": convert_relu6,
    "relu6_.default": convert_relu6,
    "hardtanh.default": convert_hardtanh,
    "hardtanh_.default": convert_hardtanh,
    "clamp.default": convert_clamp,
    "clamp.Tensor": convert_clamp,
    "clamp_min.default": convert_clamp,
    "clamp_max.default": convert_clamp,
    "maximum.default": _convert_binary_extreme(True),
    "minimum.default": _convert_binary_extreme(False),
    "max.other": _convert_binary_extreme(True),
    "min.other": _convert_binary_extreme(False),
    "amax.default": _convert_reduce_extreme(True),
    "amin.default": _convert_reduce_extreme(False),
    "max.default": _convert_reduce_extreme(True),
    "min.default": _convert_reduce_extreme(False),
    "max.dim": _convert_extreme_dim(True),
    "min.dim": _convert_extreme_dim(False),
    "max_pool1d.default": _convert_max_pool(1, False),
    "max_pool2d.default": _convert_max_pool(2, False),
    "max_pool3d.default": _convert_max_pool(3, False),
    "max_pool2d_with_indices.default": _convert_max_pool(2, True),
    "max_pool3d_with_indices.default": _convert_max_pool(3, True),
    "embedding.default": convert_indexing,
    "index_select.default": convert_indexing,
    "index.Tensor": convert_indexing,
    "gather.default": convert_indexing,
    "scatter.src": convert_indexing,
    "scatter.value": convert_indexing,
    "scatter_add.default": convert_indexing,
    "index_put.default": convert_indexing,
    "select.int": convert_select,
    "pow.Tensor_Scalar": convert_pow_scalar,
    "dropout.default": convert_dropout,
    "dropout_.default": convert_dropout,
    "native_dropout.default": convert_dropout,
    "bernoulli.default": refuse_random,
    "bernoulli.p": refuse_random,
    "rand.default": refuse_random,
    "rand_like.default": refuse_random,
    "randn.default": refuse_random,
    "randn_like.default": refuse_random,
    "randint.default": refuse_random,
    "randint.low": refuse_random,
    "randint_like.default": refuse_random,
    "normal.Tensor_Tensor": refuse_random,
    "uniform.default": refuse_random,
    "multinomial.default": refuse_random,
    "randperm.default": refuse_random,
    "scaled_dot_product_attention.default": convert_sdpa,
}
"""Ops whose TVM converters break torch's semantics (see the module docstring)."""


def converters() -> dict[str, Converter]:
    """Op name as ``from_exported_program`` sees it (``target.__name__``) -> converter:
    every registered tile op's (its record's ``relax_converter``), then
    :data:`SEMANTIC_CONVERTERS`."""
    return {**relax_converters(), **SEMANTIC_CONVERTERS}


# --------------------------------------------------------------------------- importer


def _node_origin(node: fx.Node) -> str:
    """A short "where does this come from" for error messages (module path if known)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return f" in module {path!r}"
    return ""


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


class _Importer(ept.ExportedProgramImporter):
    """TVM's importer whose converters report the fx node they failed on."""

    def update_convert_map(self, custom_convert_map: dict[str, Callable]) -> None:
        self.stock_convert_map = dict(self.convert_map)  # TVM's own, for fallbacks
        super().update_convert_map(custom_convert_map)
        self.convert_map = {k: _guarded(k, fn, self) for k, fn in self.convert_map.items()}


def _guarded(op: Any, fn: Callable, importer: Any) -> Callable:
    """``fn`` with its errors naming the fx node, and its float result cast to the float
    dtype torch gives the node (see :func:`_with_torch_float_dtype`)."""

    def convert(node: fx.Node, *rest: Any) -> Any:
        try:
            result = fn(node, *rest)
        except GraphImportError:
            raise
        except Exception as exc:
            raise UnsupportedOpError(
                f"TVM could not import fx node {node.name!r}{_node_origin(node)} "
                f"(op {op}): {type(exc).__name__}: {exc}"
            ) from exc
        return _with_torch_float_dtype(importer.block_builder, node, result)

    return convert


def _with_torch_float_dtype(bb: Any, node: fx.Node, result: Any) -> Any:
    """``result`` cast to the node's float dtype where TVM's converter promoted otherwise.

    TVM promotes like numpy: float32 * a 0-d float64 tensor gives float64, where torch
    keeps float32 (a 0-d tensor does not raise the dtype within its category). Only a
    float result of a node whose traced value is a float tensor is cast."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
        return result
    if not isinstance(result, relax.Expr) or not isinstance(result.ty, relax.TensorType):
        return result
    want = str(val.dtype).removeprefix("torch.")
    if _dtype(result) == want or not _is_float(result):
        return result
    return bb.emit(relax.op.astype(result, want))


def _close_open_blocks(importer: Any) -> None:
    """End the binding blocks an import left open when a converter raised: TVM's function
    scope does not, and its block builder then prints "BlockBuilder destroyed with
    remaining blocks!" when it is freed."""
    bb = getattr(importer, "block_builder", None)
    for _ in range(8):  # a function scope opens at most a few nested blocks
        try:
            bb._end_block()
        except Exception:  # no block left open (or no builder)
            return


def _check_supported(ep: torch.export.ExportedProgram, convert_map: dict) -> None:
    missing = [
        n for n in ep.graph.nodes if n.op == "call_function" and _op_name(n) not in convert_map
    ]
    if missing:
        lines = [f"  node {n.name!r}{_node_origin(n)}: op {_op_name(n)}" for n in missing]
        raise UnsupportedOpError(
            "TVM's PyTorch frontend has no converter for these ops of the graph:\n"
            + "\n".join(lines)
        )


_LEAF_SPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def export_graph(
    gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` of the graph's tensor code, decomposed to core ATen (tile ops
    kept): a GraphModule is exported with its outputs as a flat tuple
    (:func:`~tbn_compiler.capture.graph_with_outputs`; the output structure is the
    :class:`~tbn_compiler.capture.OutputTree`'s business). Rebuilding a Hugging Face
    ``DynamicCache`` inside the traced code would add tensor constants that the
    decomposition loses. Shapes are static, or with ``dynamic_batch`` the batch is
    symbolic where the graph allows it (:func:`_export_graph` says why not).

    ``scaled_dot_product_attention`` is kept whole: TVM imports it directly, and its
    decomposition gives fake strides on which a following ``transpose/reshape/view``
    chain (GPT-2 attention) fails to retrace."""
    return _export_graph(gm, example_inputs, dynamic_batch)[0]


def _export_graph(
    gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool
) -> tuple[torch.export.ExportedProgram, str | None]:
    """:func:`export_graph` and None, or with why the batch is static."""
    if isinstance(gm, fx.GraphModule):
        gm = graph_with_outputs(gm)
    program, why_static = None, "compiled with dynamic_batch=False"
    if dynamic_batch:
        program, why_static = export_dynamic_batch(gm, tuple(example_inputs))
    try:
        ep = program if program is not None else torch.export.export(gm, tuple(example_inputs))
        table = torch.export.default_decompositions()
        table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
        with warnings.catch_warnings():
            # torch deep-copies the module call graph, whose leaf specs warn when copied
            warnings.filterwarnings("ignore", _LEAF_SPEC_WARNING, FutureWarning)
            return ep.run_decompositions(table), why_static
    except Exception as exc:
        raise GraphImportError(
            f"torch.export failed on the rewritten graph: {type(exc).__name__}: {exc}"
        ) from exc


def _output_specs(ep: torch.export.ExportedProgram, batch: int | None) -> list[TensorSpec]:
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    user = {
        s.arg.name
        for s in ep.graph_signature.output_specs
        if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT
    }
    specs = []
    for arg in torch.utils._pytree.tree_leaves(out_node.args[0]):
        if isinstance(arg, fx.Node) and arg.name in user:
            val = arg.meta["val"]
            specs.append(_traced_spec(f"output{len(specs)}", val, _batch_symbols(ep), batch))
    return specs


def _batch_symbols(ep: torch.export.ExportedProgram) -> set[Any]:
    """torch's size symbols of the user inputs' dims (the batch, when it is symbolic)."""
    users = {str(n) for n in ep.graph_signature.user_inputs}
    found = set()
    for node in ep.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.name in users and isinstance(val, torch.Tensor):
            found |= {d.node.expr for d in val.shape if isinstance(d, torch.SymInt)}
    return {s for s in found if s.is_Symbol}


def _traced_spec(name: str, val: torch.Tensor, batch_symbols: set[Any], batch: int | None):
    """The :class:`TensorSpec` of a traced tensor: ``shape`` at the example's ``batch``,
    ``dims`` naming the batch :data:`~tbn_compiler.capture.BATCH` (``"4*batch"``)."""
    import sympy

    named = {s: sympy.Symbol(BATCH, integer=True, positive=True) for s in batch_symbols}
    at_example = {s: batch for s in batch_symbols}
    shape, dims = [], []
    for size in val.shape:
        expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
        if expr.free_symbols - set(named):
            raise GraphImportError(f"{name}: size {expr} is symbolic in more than the batch")
        shape.append(int(expr.subs(at_example)))
        dims.append(int(expr) if expr.is_number else str(expr.subs(named)))
    dtype = str(val.dtype).removeprefix("torch.")
    return TensorSpec(name, tuple(shape), dtype, tuple(dims))


_MASKED_SCORE = -3.0e38  # added to attention scores where a boolean mask says "masked"


def _insert_before(
    graph: fx.Graph, node: fx.Node, target: Any, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``node``, with its fake ``val`` meta."""
    kwargs = kwargs or {}
    vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    fake_mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor))
    with graph.inserting_before(node), fake_mode:
        new = graph.call_function(target, args, kwargs)
        new.meta["val"] = target(*vals, **kwargs)
    return new


def _is_bool(value: Any) -> bool:
    return (
        isinstance(value, fx.Node) and getattr(value.meta.get("val"), "dtype", None) == torch.bool
    )


def _sdpa_mask(node: fx.Node) -> Any:
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def drop_attend_all_masks(ep: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor]) -> None:
    """Drop the mask of every ``scaled_dot_product_attention`` whose mask lets every query
    attend to every key (boolean all True, float all zero) whatever the input values, in
    place: Hugging Face models (ViT, ...) build such a mask from ``arange`` and the
    shapes. Without it the attention runs as a plain one (a faster kernel, and no
    hidden-row handling). A mask counts as constant when it depends on the inputs only
    through their sizes; it is evaluated at ``inputs`` (the example inputs). Any other
    mask is kept."""
    graph = ep.graph_module.graph
    sources = _placeholder_values(ep, inputs)
    changed = False
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        mask = _sdpa_mask(node)
        if not isinstance(mask, fx.Node):
            continue
        # at the example's sizes and one more batch: the batch must not change it
        values = [_value_from_sizes(mask, sources, more) for more in (0, 1)]
        if not all(v is not None and _attends_everywhere(v) for v in values):
            continue
        if len(node.args) > 3:
            node.args = (*node.args[:3], None, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": None}
        changed = True
    if changed:
        graph.eliminate_dead_code()
        ep.graph_module.recompile()


def _placeholder_values(
    ep: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor]
) -> dict[str, tuple[bool, Any]]:
    """Per placeholder name: (is a user input, its value): the example input, or the
    parameter, buffer or constant tensor it stands for."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    lifted.update(sig.inputs_to_lifted_tensor_constants)
    values: dict[str, tuple[bool, Any]] = {}
    for name, target in lifted.items():
        value = ep.state_dict.get(target, ep.constants.get(target))
        if value is not None:
            values[name] = (False, value)
    for name, value in zip(sig.user_inputs, inputs, strict=False):
        values[str(name)] = (True, value)
    return values


_SIZE_READS = (torch.ops.aten.sym_size.int,)


def _value_from_sizes(
    node: fx.Node, sources: dict[str, tuple[bool, Any]], more_batch: int = 0
) -> Any:
    """The value of ``node`` computed with real tensors, the batch (size 0 of a user
    input) read as ``more_batch`` more than the example's; None when it reads a user
    input other than through its sizes, draws random numbers, or fails to evaluate."""
    env: dict[fx.Node, Any] = {}

    def value(n: fx.Node) -> Any:
        if n in env:
            return env[n]
        if n.op == "placeholder":
            user, v = sources.get(n.name, (True, None))
            if user or v is None:
                raise LookupError(n.name)
            env[n] = v
            return v
        if n.op != "call_function" or _draws_random(n.target):
            raise LookupError(n.name)
        if n.target in _SIZE_READS:
            tensor, dim = n.args[0], n.args[1]
            user, v = sources.get(getattr(tensor, "name", ""), (False, None))
            if v is None:
                v = value(tensor)
            env[n] = v.shape[dim] + (more_batch if user and dim == 0 else 0)
            return env[n]
        args = fx.node.map_arg(n.args, value)
        kwargs = fx.node.map_arg(n.kwargs, value)
        env[n] = n.target(*args, **kwargs)
        return env[n]

    try:
        with torch.no_grad():
            return value(node)
    except Exception:  # noqa: BLE001 (any failure: the mask is kept as it is)
        return None


def _draws_random(target: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def _attends_everywhere(mask: Any) -> bool:
    if not isinstance(mask, torch.Tensor):
        return False
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool(mask.is_floating_point() and (mask == 0).all())


def zero_fully_masked_rows(ep: torch.export.ExportedProgram) -> None:
    """Make every ``scaled_dot_product_attention`` with a mask return zeros for the query
    rows the mask hides entirely, as torch does, in place: TVM softmaxes the masked scores
    into an average of the values (a boolean mask, made finite by
    :func:`float_attention_masks`) or NaN (-inf). A row is hidden when its boolean mask
    holds no True, or its float mask only -inf (left padding under a causal mask: the
    first query rows)."""
    graph = ep.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        mask = _sdpa_mask(node)
        if not isinstance(mask, fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        hidden = _rows_hidden(graph, node, mask)
        zeroed = _insert_before(graph, node.next, aten.masked_fill.Scalar, (node, hidden, 0.0))
        node.replace_all_uses_with(zeroed, delete_user_cb=lambda user, new=zeroed: user is not new)
        for spec in ep.graph_signature.output_specs:  # the attention may be a model output
            if getattr(spec.arg, "name", None) == node.name:
                spec.arg = type(spec.arg)(name=zeroed.name)
    ep.graph_module.recompile()


def _rows_hidden(graph: fx.Graph, sdpa: fx.Node, mask: fx.Node) -> fx.Node:
    """True for the rows of ``sdpa``'s scores that attend nowhere (the mask's shape, its
    last dim 1), inserted before ``sdpa``."""
    aten = torch.ops.aten
    if _is_bool(mask):
        as_float = _insert_before(
            graph, sdpa, aten._to_copy.default, (mask,), {"dtype": torch.float32}
        )
        largest = _insert_before(graph, sdpa, aten.amax.default, (as_float, [-1], True))
        return _insert_before(graph, sdpa, aten.le.Scalar, (largest, 0.0))
    # all -inf: the smallest of (mask == -inf) is 1 (TVM's max of a row of -inf is the
    # lowest finite float, not -inf, so the row's max cannot tell)
    is_inf = _insert_before(graph, sdpa, aten.eq.Scalar, (mask, -math.inf))
    as_float = _insert_before(
        graph, sdpa, aten._to_copy.default, (is_inf,), {"dtype": torch.float32}
    )
    smallest = _insert_before(graph, sdpa, aten.amin.default, (as_float, [-1], True))
    return _insert_before(graph, sdpa, aten.gt.Scalar, (smallest, 0.0))


def float_attention_masks(ep: torch.export.ExportedProgram) -> None:
    """Give every ``scaled_dot_product_attention`` a float mask, in place: TVM's
    converter takes only additive float masks, while PyTorch models (Hugging Face
    GPT-2, ...) often pass boolean ones (True = attend)."""
    graph = ep.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if not _is_bool(mask):
            continue
        masked = _insert_before(graph, node, aten.logical_not.default, (mask,))
        as_float = _insert_before(
            graph, node, aten._to_copy.default, (masked,), {"dtype": torch.float32}
        )
        additive = _insert_before(graph, node, aten.mul.Tensor, (as_float, _MASKED_SCORE))
        if len(node.args) > 3:
            node.args = (*node.args[:3], additive, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": additive}
    ep.graph_module.recompile()


# ops whose boolean operands TVM 0.27 mishandles (cumsum stays bool instead of
# int64; equality of bools is emitted as a float compare), with the integer type
# that keeps torch's result
_BOOL_OPERAND_CASTS = {
    torch.ops.aten.cumsum.default: torch.int64,
    torch.ops.aten.eq.Tensor: torch.int32,
    torch.ops.aten.ne.Tensor: torch.int32,
}


_SCANS = (torch.ops.aten.cumsum.default, torch.ops.aten.cumprod.default)


def scan_operand_dtypes(ep: torch.export.ExportedProgram) -> None:
    """Cast the operand of every ``cumsum``/``cumprod`` to the dtype torch gives its
    result, in place: torch sums small integers (int32 attention masks, ...) in int64,
    TVM's converter keeps the operand's dtype."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.target not in _SCANS or not isinstance(node.args[0], fx.Node):
            continue
        x, out = node.args[0].meta.get("val"), node.meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dtype != out.dtype:
            cast = _insert_before(
                graph, node, torch.ops.aten._to_copy.default, (node.args[0],), {"dtype": out.dtype}
            )
            node.args = (cast, *node.args[1:])
    ep.graph_module.recompile()


def integer_bool_operands(ep: torch.export.ExportedProgram) -> None:
    """Cast the boolean tensor operands of :data:`_BOOL_OPERAND_CASTS` ops to integers,
    in place (same results in torch; correct code from TVM)."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        dtype = _BOOL_OPERAND_CASTS.get(node.target)
        if dtype is None or not any(_is_bool(a) for a in node.args):
            continue
        node.args = tuple(
            _insert_before(graph, node, torch.ops.aten._to_copy.default, (a,), {"dtype": dtype})
            if _is_bool(a)
            else a
            for a in node.args
        )
    ep.graph_module.recompile()


def _is_empty_operand(node: Any, rank: int, dim: int) -> bool:
    """Whether a ``cat`` operand adds nothing: a 1-D tensor of size 0 (torch skips those
    whatever the other operands' rank) or an operand of the same rank empty along ``dim``."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.numel() != 0:
        return False
    return tuple(val.shape) == (0,) or (val.dim() == rank and val.shape[dim] == 0)


def positive_slice_dims(ep: torch.export.ExportedProgram) -> None:
    """Count the ``dim`` of every ``slice`` from the start, in place: TVM's converter
    keeps a negative one, which its legalization of a slice of a symbolic shape (the
    batch) refuses."""
    for node in ep.graph.nodes:
        if node.target is not torch.ops.aten.slice.Tensor:
            continue
        dim, val = _arg(node, 1, "dim", 0), node.args[0].meta.get("val")
        if isinstance(dim, int) and dim < 0 and isinstance(val, torch.Tensor):
            if len(node.args) > 1:
                node.args = (node.args[0], dim % val.dim(), *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "dim": dim % val.dim()}
    ep.graph_module.recompile()


def drop_empty_cat_operands(ep: torch.export.ExportedProgram) -> None:
    """Remove the operands of every ``cat`` that add nothing, in place: an empty
    key/value cache (Hugging Face's ``DynamicCache`` starts each layer as a 1-D empty
    tensor) is concatenated to the new keys; torch skips it, TVM refuses operands of
    another rank. The constants dropped stay in the graph, unused."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.cat.default:
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            continue
        dim = int(_arg(node, 1, "dim", 0)) % out.dim()
        operands = list(node.args[0])
        kept = [t for t in operands if not _is_empty_operand(t, out.dim(), dim)]
        if kept and len(kept) < len(operands):
            node.args = (kept, *node.args[1:])
    ep.graph_module.recompile()


# ops that only move or repeat values: every id an embedding sees is an input element
_VALUE_PRESERVING = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.dims,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.expand.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.alias.default,
}


def _source_input(node: Any, user_inputs: set[str]) -> str | None:
    """The user input whose elements are exactly the values of ``node``, if any."""
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node.name if node.name in user_inputs else None
        if node.op != "call_function" or node.target not in _VALUE_PRESERVING:
            return None
        node = node.args[0]
    return None


def index_input_checks(ep: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    """``{"input", "low", "high", "message", "error"}`` for each id tensor of a checked
    gather or scatter (:func:`convert_indexing`) that is a user input (possibly
    reshaped): every element of that input must be in ``[low, high)``, else torch raises
    ``error`` (``IndexError`` or ``RuntimeError``). Ids into a dim of symbolic size (the
    batch) get none: the kernel itself reads and writes in bounds whatever the ids."""
    user_inputs = {str(n) for n in ep.graph_signature.user_inputs}
    checks: list[dict[str, Any]] = []
    symbols: Symbols = {}
    for node in ep.graph.nodes:
        g = _indexing_of(node, symbols)
        for ids, t in zip(
            () if g is None else g.ids, () if g is None else g.index.ids, strict=True
        ):
            source = _source_input(ids, user_inputs)
            if source is not None and kernels.is_static(t.size):
                checks.append(
                    {
                        "input": source,
                        "low": int(t.low),
                        "high": int(t.size),
                        "message": t.message,
                        "error": t.error,
                    }
                )
    return checks


def import_graph(
    gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = False
) -> ImportResult:
    """Relax module for ``gm`` at the shapes of ``example_inputs`` (see module docstring).

    ``dynamic_batch``: ``main`` takes any batch (dim 0 of the batched inputs, named
    :data:`~tbn_compiler.capture.BATCH` in the specs) where the graph allows it; where it
    does not, or a converter needs the batch static, the import is static and
    ``static_batch`` says why (an error a static import raises too is raised)."""
    inputs = list(example_tensors(example_inputs))
    if not dynamic_batch:
        return _import(gm, inputs, False)
    try:
        return _import(gm, inputs, True)
    except Exception as exc:  # raised again by the static import unless the batch is the cause
        result = _import(gm, inputs, False)
        result.static_batch = f"the import of a symbolic batch failed ({_first_line(exc)})"
        return result


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0] if text else type(error).__name__


def _import(gm: torch.nn.Module, inputs: list[torch.Tensor], dynamic_batch: bool) -> ImportResult:
    ep, static_batch = _export_graph(gm, inputs, dynamic_batch)
    drop_empty_cat_operands(ep)
    positive_slice_dims(ep)
    drop_attend_all_masks(ep, inputs)
    zero_fully_masked_rows(ep)
    float_attention_masks(ep)
    integer_bool_operands(ep)
    scan_operand_dtypes(ep)
    importer = _Importer()
    convert_map = converters()
    _check_supported(ep, {**importer.convert_map, **convert_map})
    try:
        mod = importer.from_exported_program(
            ep,
            keep_params_as_input=False,
            unwrap_unit_return_tuple=True,
            no_bind_return_tuple=False,
            custom_convert_map=convert_map,
        )
    except GraphImportError:
        _close_open_blocks(importer)
        raise
    except Exception as exc:
        _close_open_blocks(importer)
        raise GraphImportError(
            f"TVM could not import the graph: {type(exc).__name__}: {exc}"
        ) from exc
    batch = example_batch(inputs)
    symbols = _batch_symbols(ep)
    placeholders = {n.name: n for n in ep.graph.find_nodes(op="placeholder")}
    in_specs = [
        _traced_spec(str(n), placeholders[str(n)].meta["val"], symbols, batch)
        for n in ep.graph_signature.user_inputs
    ]
    in_specs = [
        TensorSpec(s.name, tuple(t.shape), s.dtype, s.dims)
        for s, t in zip(in_specs, inputs, strict=True)
    ]
    outputs = _output_specs(ep, batch)
    return ImportResult(mod, in_specs, outputs, index_input_checks(ep), static_batch)
