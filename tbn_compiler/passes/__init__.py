"""Model and fx passes: prepare/convert (module swaps following the tile-op records),
find tileable layers, plan p per weight, rewrite them into tile ops."""

from .convert import PackedConv, PackedLinear, PackedTileLayer, convert, packed_from_tiled
from .patterns import LayerMatch, match_node
from .plan import plan_weight
from .prepare import prepare
from .rewrite import SkippedLayer, rewrite, tile_layers, tile_op_layer_name

__all__ = [
    "LayerMatch",
    "PackedConv",
    "PackedLinear",
    "PackedTileLayer",
    "SkippedLayer",
    "convert",
    "match_node",
    "packed_from_tiled",
    "plan_weight",
    "prepare",
    "rewrite",
    "tile_layers",
    "tile_op_layer_name",
]
