"""The backend half of the tile-op records (:mod:`tbn_compiler.tile_ops`): each
record's Relax converter and TIR kernel builder, resolved from their
``"module:function"`` paths on first use (as :class:`.protocol.Backend` resolves its
functions), so the front half never imports TVM."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..ops import tile_op_name
from ..tile_ops import tile_op, tile_op_records

__all__ = ["kernel_builder", "relax_converters", "resolve"]


def resolve(path: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` path names (its module imported now)."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot resolve {path!r}: {exc}") from exc


def relax_converters() -> dict[str, Callable[..., Any]]:
    """Op name as TVM's ``from_exported_program`` sees it (``"tiled_linear.default"``)
    -> converter, for every registered tile op."""
    return {f"{r.name}.default": resolve(r.relax_converter) for r in tile_op_records()}


def kernel_builder(target: object) -> Callable[..., Any]:
    """The kernel builder of the tile op a graph node ``target`` is (KeyError if none)."""
    name = tile_op_name(target)
    if name is None:
        raise KeyError(f"{target} is not a tile op")
    return resolve(tile_op(name).kernel_builder)
