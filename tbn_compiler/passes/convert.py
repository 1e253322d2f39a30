"""convert: trainable tiled layers -> frozen packed layers that call the tbn ops.

The second half of the prepare/convert split (:mod:`.prepare` is the first). Each
layer's :class:`~tbn_compiler.tile_ops.TileOpRecord` (found by its QAT type) gives the
frozen layer: a :class:`~tbn_compiler.tile_ops.PackedTileLayer` that stores only the
inference representation and calls ``torch.ops.tbn.tiled_*`` in ``forward``, so
capturing a converted model puts the tile ops straight into the graph.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from ..tile_ops import PackedConv, PackedLinear, PackedTileLayer, tile_op_for_layer
from ..tiling import PackedTile

__all__ = ["PackedConv", "PackedLinear", "PackedTileLayer", "convert", "packed_from_tiled"]


def packed_from_tiled(layer: nn.Module, packed: PackedTile | None = None) -> PackedTileLayer:
    """The frozen equivalent of a ``Tiled*`` layer (uses its learned tile exactly, or
    ``packed``). TypeError for other modules; ValueError when the tile op cannot
    compute the layer."""
    record = tile_op_for_layer(layer)
    if record is None:
        raise TypeError(f"not a tiled layer: {type(layer).__name__}")
    attrs, reason = record.module_attrs(layer)
    if reason is not None:
        raise ValueError(f"{type(layer).__name__} cannot be converted: {reason}")
    return record.packed_type(
        record.name, tuple(layer.weight.shape), attrs, packed or layer.packed(), layer.bias
    )


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ``Tiled*`` layer of a prepared model by its packed form.

    In eval mode the result computes exactly what the prepared model computes. Layers
    that share ``scores`` share one packed tile."""
    if not inplace:
        model = copy.deepcopy(model)
    if tile_op_for_layer(model) is not None:
        return packed_from_tiled(model)
    by_scores: dict[int, PackedTile] = {}
    for name, module in list(model.named_modules()):
        if tile_op_for_layer(module) is None:
            continue
        packed = by_scores.setdefault(id(module.scores), module.packed())
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, packed_from_tiled(module, packed))
    return model
