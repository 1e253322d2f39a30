"""The tile-op record, the registry of records, and the two shapes records share.

A :class:`TileOpRecord` declares one tile op once, in the spirit of torch.ao's
``BackendPatternConfig`` and TVM's converter maps: the float layers it replaces, the
trainable (QAT) layer ``prepare`` puts in their place, the frozen layer ``convert``
makes of that, the ``torch.ops.tbn`` op, the graph patterns it matches, how the op's
arguments are built, and, as ``"module:function"`` paths resolved only by the
backends (so nothing here imports TVM), its Relax converter and TIR kernel builder.
``prepare``, ``convert``, the pattern matcher, the rewrite and the Relax import all
iterate over the registered records; a new tile op is :func:`register_tile_op` of one
record (plus its ``torch.library`` op, :func:`tbn_compiler.ops.define_tile_op`, and its
kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .. import ops
from ..nn import layer_name
from ..tiling import PackedTile, reconstruct, unpack_bits

__all__ = [
    "ArgBuilder",
    "LayerMatch",
    "Matcher",
    "ModuleAttrs",
    "PackedTileLayer",
    "TileOpRecord",
    "float_layer_types",
    "function_matchers",
    "register_tile_op",
    "tile_op",
    "tile_op_for_layer",
    "tile_op_for_module",
    "tile_op_records",
]


@dataclass
class LayerMatch:
    """A layer found in the graph that the tile op of ``record`` can replace.

    weight: qualified attribute path of the stored weight tensor.
    bias: graph node, attribute path (module calls), or None.
    attrs: the op's own attributes (``weight_in_out`` for linear; stride, padding,
        dilation, groups for convs), as :attr:`TileOpRecord.op_args` takes them.
    unsupported: when set, the layer is reported as skipped with this reason.
    weight_nodes: the get_attr/transpose nodes that feed the weight to the layer.
    """

    node: fx.Node
    record: TileOpRecord
    input: Any
    weight: str
    bias: fx.Node | str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    module_type: type | None = None
    unsupported: str | None = None
    weight_nodes: list[fx.Node] = field(default_factory=list)

    @property
    def op(self) -> str:
        """The layer kind shown in reports: ``"linear"``, ``"conv1d"``, ..."""
        return self.record.label

    @property
    def weight_in_out(self) -> bool:
        """The weight is stored (in, out) and used as ``x @ W``."""
        return bool(self.attrs.get("weight_in_out", False))

    @property
    def name(self) -> str:
        """Layer name: the module path for a ``.weight``, else the full attribute path."""
        return layer_name(self.weight)


Matcher = Callable[["TileOpRecord", fx.GraphModule, fx.Node], "LayerMatch | None"]
"""Reads one ``call_function`` node: its :class:`LayerMatch`, or None when the node does
not fit (for example its weight is an activation, not a parameter)."""
ModuleAttrs = Callable[[nn.Module], "tuple[dict[str, Any], str | None]"]
"""Of a float or QAT layer module: ``(op attributes, None)``, or ``(what is known,
reason)`` when the tile op cannot compute the layer."""
ArgBuilder = Callable[[tuple[int, ...], Mapping[str, Any]], tuple]
"""``(stored weight shape, op attributes)`` -> the op's arguments after ``(x, tile,
alphas, bias)``."""


@dataclass(frozen=True, eq=False)
class TileOpRecord:
    """Everything the compiler knows about one tile op (see the module docstring).

    name: the op is ``torch.ops.tbn.<name>`` (defined by ``ops.define_tile_op``).
    float_types: the float layer modules it replaces (subclasses too).
    qat_type: the trainable layer ``prepare`` makes of one (subclasses a float type;
        ``from_float(layer, p, alpha_mode)``, ``packed()``).
    packed_type: the frozen :class:`PackedTileLayer` subclass ``convert`` makes.
    function_patterns: ``call_function`` target -> :data:`Matcher`.
    module_attrs: :data:`ModuleAttrs` of a layer module; its reason, if any, is the
        one check of whether the op can compute that layer.
    op_args: :data:`ArgBuilder`, shared by the rewrite and the packed layer.
    relax_converter: ``"module:function"``, ``function(node, importer)`` emits the
        Relax for one op node.
    kernel_builder: ``"module:function"`` returning the op's TIR PrimFunc.
    """

    name: str
    float_types: tuple[type[nn.Module], ...]
    qat_type: type[nn.Module]
    packed_type: type[PackedTileLayer]
    function_patterns: Mapping[Any, Matcher]
    module_attrs: ModuleAttrs
    op_args: ArgBuilder
    relax_converter: str
    kernel_builder: str

    @property
    def label(self) -> str:
        """The layer kind in reports: the name without ``tiled_``."""
        return self.name.removeprefix("tiled_")

    @property
    def op(self) -> torch._ops.OpOverloadPacket:
        """``torch.ops.tbn.<name>``."""
        return getattr(torch.ops.tbn, self.name)


_RECORDS: dict[str, TileOpRecord] = {}


def register_tile_op(record: TileOpRecord) -> TileOpRecord:
    """Add one tile op; every pass and backend then handles it. ValueError when the
    record is incomplete or its name is taken by another record."""
    _check_record(record)
    known = _RECORDS.get(record.name)
    if known is not None and known is not record:
        raise ValueError(f"a tile op named {record.name!r} is already registered")
    _RECORDS[record.name] = record
    return record


def _check_record(record: TileOpRecord) -> None:
    if record.name not in ops.TILE_OPS.values():
        raise ValueError(
            f"tile op {record.name!r}: torch.ops.tbn.{record.name} is not defined; define "
            "it first with tbn_compiler.ops.define_tile_op"
        )
    if not any(issubclass(record.qat_type, t) for t in record.float_types):
        raise ValueError(
            f"tile op {record.name!r}: its QAT type {record.qat_type.__name__} must subclass "
            f"one of its float types {[t.__name__ for t in record.float_types]}"
        )
    if not issubclass(record.packed_type, PackedTileLayer):
        raise ValueError(f"tile op {record.name!r}: its packed type must subclass PackedTileLayer")
    for what in ("relax_converter", "kernel_builder"):
        module, sep, function = getattr(record, what).partition(":")
        if not (module and sep and function):
            raise ValueError(
                f"tile op {record.name!r}: {what} must be a 'module:function' path, "
                f"got {getattr(record, what)!r}"
            )


def tile_op_records() -> tuple[TileOpRecord, ...]:
    """Every registered record, in registration order."""
    return tuple(_RECORDS.values())


def tile_op(name: str) -> TileOpRecord:
    """The record of the tile op ``name`` (``"tiled_linear"``, ...); KeyError naming
    the registered ones."""
    try:
        return _RECORDS[name]
    except KeyError:
        raise KeyError(f"no tile op {name!r}; registered: {sorted(_RECORDS)}") from None


def tile_op_for_module(module: nn.Module) -> TileOpRecord | None:
    """The record whose float types ``module`` is an instance of, unless it is already
    a trainable tiled layer."""
    if isinstance(module, tuple(r.qat_type for r in _RECORDS.values())):
        return None
    return next((r for r in _RECORDS.values() if isinstance(module, r.float_types)), None)


def tile_op_for_layer(layer: nn.Module) -> TileOpRecord | None:
    """The record whose QAT type ``layer`` is an instance of."""
    return next((r for r in _RECORDS.values() if isinstance(layer, r.qat_type)), None)


def float_layer_types() -> tuple[type[nn.Module], ...]:
    """Every float layer type some tile op replaces."""
    return tuple(t for r in _RECORDS.values() for t in r.float_types)


def function_matchers(target: Any) -> Iterator[tuple[TileOpRecord, Matcher]]:
    """``(record, matcher)`` for every record with a pattern for the call_function
    ``target``, in registration order (several records may read one target, for
    example ``aten.convolution`` at different ranks)."""
    for record in _RECORDS.values():
        try:
            matcher = record.function_patterns.get(target)
        except TypeError:  # unhashable target
            return
        if matcher is not None:
            yield record, matcher


class PackedTileLayer(nn.Module):
    """A frozen tiled layer: only the inference representation, as buffers (``tile``
    uint32 words, ``alphas`` float32[p], ``bias``), and a ``forward`` that calls its tile
    op, so capturing a converted model puts the op straight into the graph.
    ``weight_shape`` is the stored weight's shape, ``attrs`` the op's attributes."""

    tile: torch.Tensor
    alphas: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        op_name: str,
        weight_shape: Sequence[int],
        attrs: Mapping[str, Any],
        packed: PackedTile,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.op_name = op_name
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.attrs = dict(attrs)
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
        numel = 1
        for d in self.weight_shape:
            numel *= d
        signs = unpack_bits(self.tile, numel // self.p, self.alphas.dtype)
        return reconstruct(signs, self.alphas, list(self.weight_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        record = tile_op(self.op_name)
        args = record.op_args(self.weight_shape, self.attrs)
        return record.op.default(x, self.tile, self.alphas, self.bias, *args)

    def extra_repr(self) -> str:
        return f"{self.op_name}, weight_shape={list(self.weight_shape)}, p={self.p}"
