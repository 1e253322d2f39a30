"""One declared record per tile op (see :mod:`.record`): ``tiled_linear``
(:mod:`.linear`), ``tiled_conv1d`` and ``tiled_conv2d`` (:mod:`.conv`), registered on
import, in that order. Between :mod:`tbn_compiler.ops` and the passes in the data path; no TVM here."""

from .conv import CONV1D, CONV2D, PackedConv, conv_args, conv_module_attrs, conv_patterns
from .linear import LINEAR, PackedLinear, linear_args, linear_module_attrs
from .operands import get_attr_tensor, node_arg, weight_operand
from .record import (
    ArgBuilder,
    LayerMatch,
    Matcher,
    ModuleAttrs,
    PackedTileLayer,
    TileOpRecord,
    float_layer_types,
    function_matchers,
    register_tile_op,
    tile_op,
    tile_op_for_layer,
    tile_op_for_module,
    tile_op_records,
)

__all__ = [
    "CONV1D",
    "CONV2D",
    "LINEAR",
    "ArgBuilder",
    "LayerMatch",
    "Matcher",
    "ModuleAttrs",
    "PackedConv",
    "PackedLinear",
    "PackedTileLayer",
    "TileOpRecord",
    "conv_args",
    "conv_module_attrs",
    "conv_patterns",
    "float_layer_types",
    "function_matchers",
    "get_attr_tensor",
    "linear_args",
    "linear_module_attrs",
    "node_arg",
    "register_tile_op",
    "tile_op",
    "tile_op_for_layer",
    "tile_op_for_module",
    "tile_op_records",
    "weight_operand",
]

for _record in (LINEAR, CONV1D, CONV2D):
    register_tile_op(_record)
