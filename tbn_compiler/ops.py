"""torch.library ops for tile-reuse layers: ``tbn::tiled_linear``, ``tbn::tiled_conv1d``,
``tbn::tiled_conv2d``, each defined by one :func:`define_tile_op` call.

They are the graph-level contract between the rewrite passes and every backend (which
find the rest of an op's declaration in its :mod:`tbn_compiler.tile_ops` record).
All take ``(input, tile, alphas, bias, <geometry>)``:

* ``tile``: packed ``uint32`` words (see :mod:`tbn_compiler.tiling`), ``L = numel / p``.
* ``alphas``: ``float32[p]``; ``p`` is ``alphas.numel()``.
* ``bias``: ``float32[out]`` or ``None``.

``tiled_linear(x, tile, alphas, bias, out_features, in_features, weight_in_out)``
    ``weight_in_out=False``: the weight is stored ``(out, in)`` as in ``nn.Linear`` and
    ``y = x @ W.T + b``. ``weight_in_out=True``: stored ``(in, out)`` as in GPT-2's
    ``Conv1D`` and ``y = x @ W + b``. Either way the tile covers the weight flat and
    row-major *as stored*.
``tiled_conv{n}d(x, tile, alphas, bias, weight_shape, stride, padding, dilation, groups)``
    Same as ``F.conv{n}d`` with ``weight_shape = (Cout, Cin/groups, *kernel)`` and
    integer padding.

The CPU implementations here are the numerical reference. When a layer is aligned
(every chunk is whole stored rows) they compute the tile product ONCE on ``N/p``
rows and scale ``p`` copies, never building the full weight; otherwise they
rebuild the weight with modulo indexing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import tiling

__all__ = [
    "TILE_OPS",
    "conv_op_functions",
    "define_tile_op",
    "tile_op_name",
    "tiled_conv1d",
    "tiled_conv2d",
    "tiled_linear",
]

TILE_OPS: dict[object, str] = {}
"""OpOverloadPacket -> short op name of every op :func:`define_tile_op` defined, for
passes and backends that look tile ops up."""


def define_tile_op(
    name: str,
    reference: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
) -> torch.library.CustomOpDef:
    """Define ``torch.ops.tbn.<name>``: ``reference`` is its CPU implementation (its type
    hints give the schema, its first four parameters are ``x, tile, alphas, bias``) and
    ``fake`` computes the output's shape and dtype for tracing. Returns the op."""
    op = torch.library.custom_op(f"tbn::{name}", reference, mutates_args=())
    op.register_fake(fake)
    TILE_OPS[getattr(torch.ops.tbn, name)] = name
    return op


def _signs(tile: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    return tiling.unpack_bits(tile, length, dtype)


def _check_common(
    name: str,
    x: torch.Tensor,
    tile: torch.Tensor,
    alphas: torch.Tensor,
    bias: torch.Tensor | None,
    numel: int,
    out_channels: int,
) -> int:
    """Validate operands shared by all tile ops; return ``L``."""
    p = alphas.numel()
    if alphas.dim() != 1:
        raise ValueError(
            f"tbn::{name}: alphas must be 1-D float[p], got shape {tuple(alphas.shape)}"
        )
    length = tiling.check_divisible(numel, p, what=f"tbn::{name} weight")
    n_words = tiling.n_words(length)
    if tile.dim() != 1 or tile.numel() != n_words:
        raise ValueError(
            f"tbn::{name}: tile must be {n_words} packed uint32 words for L={length}, "
            f"got shape {tuple(tile.shape)}"
        )
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(
            f"tbn::{name}: bias must have shape ({out_channels},), got {tuple(bias.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"tbn::{name}: input must be floating point, got {x.dtype}")
    return length


# --------------------------------------------------------------------------- linear


def _tiled_linear(
    x: torch.Tensor,
    tile: torch.Tensor,
    alphas: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    weight_in_out: bool = False,
) -> torch.Tensor:
    """``x (..., in_features) -> (..., out_features)`` with the tiled weight."""
    numel = out_features * in_features
    length = _check_common("tiled_linear", x, tile, alphas, bias, numel, out_features)
    if x.shape[-1] != in_features:
        raise ValueError(
            f"tbn::tiled_linear: input has {x.shape[-1]} features, layer expects {in_features}"
        )
    p = alphas.numel()
    signs = _signs(tile, length, x.dtype)
    a = alphas.to(x.dtype)
    stored_rows, row_len = (
        (in_features, out_features) if weight_in_out else (out_features, in_features)
    )
    if tiling.is_aligned(numel, p, row_len):
        rows = stored_rows // p
        t = signs.reshape(rows, row_len)
        if weight_in_out:
            # W = [a_0 T; a_1 T; ...] stacked along `in`: sum the scaled input chunks, then one product.
            xs = (x.reshape(*x.shape[:-1], p, rows) * a[:, None]).sum(dim=-2)
            y = xs @ t
        else:
            small = x @ t.T  # (..., N/p): the single binary product
            y = (small.unsqueeze(-2) * a[:, None]).reshape(*x.shape[:-1], out_features)
    else:
        w = tiling.reconstruct(signs, a, (stored_rows, row_len))
        y = x @ w if weight_in_out else x @ w.T
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def _fake_linear(x, tile, alphas, bias, out_features, in_features, weight_in_out=False):
    return x.new_empty((*x.shape[:-1], out_features))


tiled_linear = define_tile_op("tiled_linear", _tiled_linear, _fake_linear)


# --------------------------------------------------------------------------- conv


def _conv_fn(spatial: int) -> Callable[..., torch.Tensor]:
    return getattr(F, f"conv{spatial}d")


def _tiled_conv(
    spatial: int,
    x: torch.Tensor,
    tile: torch.Tensor,
    alphas: torch.Tensor,
    bias: torch.Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    name = f"tiled_conv{spatial}d"
    if len(weight_shape) != spatial + 2:
        raise ValueError(
            f"tbn::{name}: weight_shape must have {spatial + 2} dims, got {weight_shape}"
        )
    cout = int(weight_shape[0])
    numel = 1
    for d in weight_shape:
        numel *= int(d)
    length = _check_common(name, x, tile, alphas, bias, numel, cout)
    if x.dim() not in (spatial + 1, spatial + 2):
        raise ValueError(
            f"tbn::{name}: input must be {spatial + 2}-D (or unbatched), got {x.dim()}-D"
        )
    if x.shape[-spatial - 1] != int(weight_shape[1]) * groups:
        raise ValueError(
            f"tbn::{name}: input has {x.shape[-spatial - 1]} channels, "
            f"layer expects {int(weight_shape[1]) * groups}"
        )
    p = alphas.numel()
    signs = _signs(tile, length, x.dtype)
    a = alphas.to(x.dtype)
    conv = _conv_fn(spatial)
    geom = dict(stride=list(stride), padding=list(padding), dilation=list(dilation))
    row_len = numel // cout
    if groups == 1 and tiling.is_aligned(numel, p, row_len):
        # Cout/p binary filters applied once; copy i of the output is alpha_i times it.
        t = signs.reshape(cout // p, *weight_shape[1:])
        small = conv(x, t, None, groups=1, **geom)
        chan = -spatial - 1
        shape = list(small.shape)
        y = small.unsqueeze(chan - 1) * a.reshape(p, 1, *([1] * spatial))
        shape[chan] = cout
        y = y.reshape(shape)
    else:
        # Grouped convs apply each copy to different input groups: no product to share.
        w = tiling.reconstruct(signs, a, weight_shape)
        y = conv(x, w, None, groups=groups, **geom)
    if bias is not None:
        y = y + bias.to(x.dtype).reshape(-1, *([1] * spatial))
    return y


def _fake_conv(spatial, x, tile, alphas, bias, weight_shape, stride, padding, dilation, groups):
    w = x.new_empty(tuple(weight_shape))
    return _conv_fn(spatial)(
        x,
        w,
        None,
        stride=list(stride),
        padding=list(padding),
        dilation=list(dilation),
        groups=groups,
    )


def conv_op_functions(
    spatial: int,
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """The reference and fake implementations of ``tiled_conv{spatial}d`` for
    :func:`define_tile_op`: ``F.conv{spatial}d`` with the tiled weight of
    ``weight_shape = (Cout, Cin/groups, *kernel)`` and integer padding."""

    def reference(
        x: torch.Tensor,
        tile: torch.Tensor,
        alphas: torch.Tensor,
        bias: torch.Tensor | None,
        weight_shape: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> torch.Tensor:
        return _tiled_conv(
            spatial, x, tile, alphas, bias, weight_shape, stride, padding, dilation, groups
        )

    def fake(x, tile, alphas, bias, weight_shape, stride, padding, dilation, groups):
        return _fake_conv(
            spatial, x, tile, alphas, bias, weight_shape, stride, padding, dilation, groups
        )

    return reference, fake


tiled_conv1d = define_tile_op("tiled_conv1d", *conv_op_functions(1))
tiled_conv2d = define_tile_op("tiled_conv2d", *conv_op_functions(2))


def tile_op_name(target: object) -> str | None:
    """Short name (``"tiled_linear"``, ...) of a graph node target that is a tbn tile op
    (as an OpOverload from torch.export or an OpOverloadPacket from symbolic_trace)."""
    packet = getattr(target, "overloadpacket", target)
    try:
        return TILE_OPS.get(packet)
    except TypeError:  # unhashable targets
        return None
