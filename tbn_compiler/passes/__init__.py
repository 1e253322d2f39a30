"""fx passes: find tileable layers, plan p per layer, rewrite them into tile ops."""

from .convert import PackedConv, PackedLinear, convert, packed_from_tiled
from .patterns import FUNCTION_PATTERNS, LayerMatch, match_node
from .rewrite import SkippedLayer, rewrite, tile_layers, tile_op_layer_name

__all__ = [
    "FUNCTION_PATTERNS",
    "LayerMatch",
    "PackedConv",
    "PackedLinear",
    "SkippedLayer",
    "convert",
    "match_node",
    "packed_from_tiled",
    "rewrite",
    "tile_layers",
    "tile_op_layer_name",
]
