"""Import a rewritten fx graph (with ``tbn::tiled_*`` ops) into a Relax IRModule.

Contract of :func:`import_graph`:

* The graph is re-exported with ``torch.export`` using the example inputs (static shapes),
  decomposed to core ATen, and handed to TVM's ``from_exported_program``.
* ``tbn::tiled_linear`` / ``tbn::tiled_conv1d`` / ``tbn::tiled_conv2d`` go through
  :data:`CONVERTERS` (op name -> converter, like TVM's own convert map): each emits a
  ``relax.call_tir`` to the PrimFunc from :mod:`tbn_compiler.backends.kernels`, tagged
  with the attribute :data:`KERNEL_ATTR` (set by the kernel builders) so later steps
  can find and schedule it.
* Every other op goes through TVM's frontend. An op it cannot import raises
  :class:`UnsupportedOpError` naming the fx node and the op.
* Packed tiles (uint32), alphas and biases are buffers of the graph and end up bound as
  constants (params are not kept as inputs); the Relax ``main`` takes the user inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import tvm
from torch import fx
from tvm import relax
from tvm.relax.frontend.torch import exported_program_translator as ept

from . import kernels

__all__ = [
    "KERNEL_ATTR",
    "CONVERTERS",
    "TensorSpec",
    "ImportResult",
    "GraphImportError",
    "UnsupportedOpError",
    "import_graph",
    "export_graph",
]

KERNEL_ATTR = kernels.KERNEL_ATTR
"""PrimFunc attribute that marks (and names the kind of) our tile kernels."""


class GraphImportError(RuntimeError):
    """The rewritten graph could not be turned into Relax."""


class UnsupportedOpError(GraphImportError):
    """TVM's frontend cannot import an op of the graph."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one graph input or output (JSON-friendly)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(
            name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch.")
        )


@dataclass
class ImportResult:
    """The Relax module plus the user-facing signature of its ``main``."""

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kernels: list[str]  # names of the tbn kernel PrimFuncs in ``mod``


# --------------------------------------------------------------------------- converters

Converter = Callable[[fx.Node, Any], relax.Expr]


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


def _static_shape(expr: relax.Expr, what: str, node: fx.Node) -> tuple[int, ...]:
    shape = expr.ty.shape
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise GraphImportError(
            f"node {node.name!r}: {what} needs a static shape, got {shape}"
        ) from exc


def _check_dtype(expr: relax.Expr, node: fx.Node) -> str:
    dtype = str(expr.ty.dtype)
    if dtype != "float32":
        raise GraphImportError(f"node {node.name!r}: tile kernels take float32 inputs, got {dtype}")
    return dtype


def _add_kernel(importer: Any, func: tvm.tirx.PrimFunc, op: str) -> relax.GlobalVar:
    if not (func.attrs and KERNEL_ATTR in func.attrs):
        raise GraphImportError(
            f"kernel builder for {op} returned a PrimFunc without {KERNEL_ATTR!r}"
        )
    return importer.block_builder.add_func(func, f"tbn_{op}")


def convert_tiled_linear(node: fx.Node, importer: Any) -> relax.Expr:
    """``tbn::tiled_linear``: flatten leading dims into ``m``, call the kernel, reshape back."""
    a = _bound_args(node, importer)
    x, bb = a["x"], importer.block_builder
    dtype = _check_dtype(x, node)
    shape = _static_shape(x, "input", node)
    in_f, out_f = int(a["in_features"]), int(a["out_features"])
    m = math.prod(shape[:-1])
    p = _static_shape(a["alphas"], "alphas", node)[0]
    has_bias = a["bias"] is not None
    func = kernels.tiled_linear_primfunc(
        m, in_f, out_f, p, bool(a["weight_in_out"]), has_bias, dtype
    )
    gv = _add_kernel(importer, func, "tiled_linear")
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, (m, in_f)))
    args = [x2, a["tile"], a["alphas"]] + ([a["bias"]] if has_bias else [])
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((m, out_f), dtype)))
    if len(shape) == 2:
        return y
    return bb.emit(relax.op.reshape(y, (*shape[:-1], out_f)))


def _convert_tiled_conv(spatial: int) -> Converter:
    def convert(node: fx.Node, importer: Any) -> relax.Expr:
        a = _bound_args(node, importer)
        x, bb = a["x"], importer.block_builder
        dtype = _check_dtype(x, node)
        shape = _static_shape(x, "input", node)
        unbatched = len(shape) == spatial + 1
        if unbatched:
            x = bb.emit(relax.op.expand_dims(x, 0))
            shape = (1, *shape)
        p = _static_shape(a["alphas"], "alphas", node)[0]
        has_bias = a["bias"] is not None
        func = kernels.tiled_conv_primfunc(
            shape,
            _ints(a["weight_shape"]),
            _ints(a["stride"]),
            _ints(a["padding"]),
            _ints(a["dilation"]),
            int(a["groups"]),
            p,
            has_bias,
            dtype,
        )
        gv = _add_kernel(importer, func, f"tiled_conv{spatial}d")
        args = [x, a["tile"], a["alphas"]] + ([a["bias"]] if has_bias else [])
        out_shape = _expected_out_shape(node, unbatched)
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, dtype)))
        return bb.emit(relax.op.squeeze(y, [0])) if unbatched else y

    return convert


def _expected_out_shape(node: fx.Node, unbatched: bool) -> list[int]:
    """Output shape from torch's fake tensor on the node (batched form)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise GraphImportError(f"node {node.name!r}: no shape metadata from torch.export")
    shape = [int(d) for d in val.shape]
    return [1, *shape] if unbatched else shape


def _ints(values: Sequence[Any]) -> list[int]:
    return [int(v) for v in values]


CONVERTERS: dict[str, Converter] = {
    "tiled_linear.default": convert_tiled_linear,
    "tiled_conv1d.default": _convert_tiled_conv(1),
    "tiled_conv2d.default": _convert_tiled_conv(2),
}
"""Op name as ``from_exported_program`` sees it (``target.__name__``) -> converter."""


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
        super().update_convert_map(custom_convert_map)
        self.convert_map = {k: _guarded(k, fn) for k, fn in self.convert_map.items()}


def _guarded(op: Any, fn: Callable) -> Callable:
    def convert(node: fx.Node, *rest: Any) -> Any:
        try:
            return fn(node, *rest)
        except GraphImportError:
            raise
        except Exception as exc:
            raise UnsupportedOpError(
                f"TVM could not import fx node {node.name!r}{_node_origin(node)} "
                f"(op {op}): {type(exc).__name__}: {exc}"
            ) from exc

    return convert


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


def export_graph(
    gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """``torch.export`` with static shapes, decomposed to core ATen (tile ops kept).

    ``scaled_dot_product_attention`` is kept whole: TVM imports it directly, and its
    decomposition gives fake strides on which a following ``transpose/reshape/view``
    chain (GPT-2 attention) fails to retrace."""
    try:
        ep = torch.export.export(gm, tuple(example_inputs))
        table = torch.export.default_decompositions()
        table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
        return ep.run_decompositions(table)
    except Exception as exc:
        raise GraphImportError(
            f"torch.export failed on the rewritten graph: {type(exc).__name__}: {exc}"
        ) from exc


def _output_specs(ep: torch.export.ExportedProgram) -> list[TensorSpec]:
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
            specs.append(TensorSpec.of(f"output{len(specs)}", val))
    return specs


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


def import_graph(gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> ImportResult:
    """Relax module for ``gm`` at the shapes of ``example_inputs`` (see module docstring)."""
    inputs = list(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example input {i} must be a torch.Tensor, got {type(t).__name__}")
    ep = export_graph(gm, inputs)
    float_attention_masks(ep)
    integer_bool_operands(ep)
    importer = _Importer()
    _check_supported(ep, {**importer.convert_map, **CONVERTERS})
    try:
        mod = importer.from_exported_program(
            ep,
            keep_params_as_input=False,
            unwrap_unit_return_tuple=True,
            no_bind_return_tuple=False,
            custom_convert_map=CONVERTERS,
        )
    except GraphImportError:
        raise
    except Exception as exc:
        raise GraphImportError(
            f"TVM could not import the graph: {type(exc).__name__}: {exc}"
        ) from exc
    names = [gv.name_hint for gv, f in mod.functions.items() if f.attrs and KERNEL_ATTR in f.attrs]
    user_names = list(ep.graph_signature.user_inputs)
    in_specs = [TensorSpec.of(str(n), t) for n, t in zip(user_names, inputs, strict=True)]
    return ImportResult(mod, in_specs, _output_specs(ep), sorted(names))
