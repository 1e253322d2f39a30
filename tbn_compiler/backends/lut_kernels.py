"""Lookup-table (T-MAC) tile products: one table load per 4 weight bits instead of 4 adds.

For every group of :data:`GROUP` consecutive activations ``x[4g : 4g + 4]`` of an input row
the 16 signed partial sums are tabulated once (block ``table``, each entry the sum of the
signed sums of the group's two pairs, block ``pair``)::

    table[..., g, v] = sum_b (x[..., 4g + b] if bit b of v else -x[..., 4g + b])

and shared by every tile row: the product of tile row ``r`` is the sum over groups of
``table[..., g, nibble(r, g)]``, where ``nibble(r, g)`` is the 4 tile bits of row ``r`` at
row positions ``4g .. 4g + 3`` (block ``small``). A row whose length ``k`` is not a
multiple of 4 gets zero activations up to one: the bits the last nibble reads past the
row end (the next row's, or the tile's padding) then add ``+-0``. Tile rows are read a
*chunk* of ``per_chunk`` nibbles at a time (:class:`Chunking`): straight from a tile word
when rows are whole words, else from the word that holds the chunk, shifted, or from two
words (a funnel shift) when a chunk can straddle them.

Numerics: the same signed sum as the kernels of :mod:`.kernels`, added in another order
(pairs, then groups of four, then groups): equal to them within fp32 rounding (``rtol
1e-4``); infinities and NaNs propagate as there (no entry subtracts an input from itself).

Kernels (kinds ``linear_lut`` / ``conv_lut``: the buffers and semantics of
``linear_aligned`` / ``conv_aligned``, which :func:`lut_variant` replaces on Cortex-M):

* :func:`tiled_linear_lut_primfunc`: aligned ``(out, in)`` weight: ``small (m, N/p)``
  once, then ``out = alpha * small + bias`` (block ``out``).
* :func:`tiled_conv_lut_primfunc`: ungrouped conv with whole filters per chunk: the same
  product over the im2col rows ``patches (n, *out_sp, cin * prod(k))`` (after ``xpad``
  when padded), ``small (n, *out_sp, cout/p)``, then scaling and bias in NCHW (``out``).

The blocks are unscheduled; :func:`.schedule_rules.mcu.schedule_mcu` builds the tables
of a block of chunks under the loop over blocks, shared by all rows (``LUT_ATTR`` tells it
the chunking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import te, tirx
from tvm.s_tir import Schedule
from tvm.sym import Analyzer

from ..tiling import WORD_BITS, is_aligned
from . import kernels
from .kernels import _i64, _inputs, _shape, _u32

__all__ = [
    "ENTRIES",
    "GROUP",
    "LUT_ATTR",
    "LUT_KINDS",
    "MAX_TABLE_BYTES",
    "Chunking",
    "ConvGeometry",
    "chunking",
    "lut_chunking",
    "lut_product",
    "lut_tables",
    "lut_variant",
    "tiled_conv_lut_primfunc",
    "tiled_linear_lut_primfunc",
]

GROUP = 4
"""Activations per table (``g``)."""

ENTRIES = 1 << GROUP
"""Entries per table: every sign pattern of a group."""

LUT_KINDS = ("linear_lut", "conv_lut")
"""Kernel kinds built here (``tbn_kernel`` attribute)."""

LUT_ATTR = "tbn_lut"
"""PrimFunc attribute of a LUT kernel: its :class:`Chunking` fields and, for convs,
``filter_dims`` (``(cin, *kernel)``, the dims of an im2col row); the schedule reads it."""

MAX_TABLE_BYTES = 512
"""Largest table block (the tables built for one pass over the rows), in bytes. Blocks
stay on the stack (TVM moves buffers of 1 KiB and more to the arena) and small next to
the arena; a block of at least one chunk is always allowed."""

_WORD_COST = {"word": 1, "shift": 4, "funnel": 11}  # instructions to read one chunk
_LOOKUP_COST = 4  # instructions per nibble: extract, address, load, add
_ROW_COST = 6  # per row and table block: accumulator load and store, loop


# --------------------------------------------------------------------------- chunking


@dataclass(frozen=True)
class Chunking:
    """How tile rows of ``row_len`` bits (the tile holds row ``r`` at bits ``r * row_len``
    on) are read: ``per_chunk`` nibbles at a time, ``block`` chunks per table block (the
    tables of ``block * per_chunk`` groups are built once and used by every row before
    the next block). ``mode``: ``"word"`` (rows are whole words: chunk ``c`` of row ``r``
    is word ``r * row_len / 32 + c``), ``"shift"`` (a chunk never straddles two words:
    one word, shifted) or ``"funnel"`` (two words)."""

    row_len: int
    per_chunk: int
    mode: str
    block: int = 1

    @property
    def groups(self) -> int:
        """Groups of 4 activations per row (the last one zero-padded if need be)."""
        return -(-self.row_len // GROUP)

    @property
    def chunks(self) -> int:
        return self.groups // self.per_chunk

    @property
    def table_bytes(self) -> int:
        """Bytes of one table block (float32 entries)."""
        return self.block * self.per_chunk * ENTRIES * 4

    @property
    def cost_per_nibble(self) -> float:
        """Estimated instructions per row and nibble of the lookups."""
        chunk = _WORD_COST[self.mode] + _LOOKUP_COST * self.per_chunk
        return (_ROW_COST + self.block * chunk) / (self.block * self.per_chunk)


def _candidates(row_len: int) -> list[tuple[str, int]]:
    """``(mode, per_chunk)`` ways to read rows of ``row_len`` bits."""
    if row_len % WORD_BITS == 0:
        return [("word", WORD_BITS // GROUP)]
    groups = -(-row_len // GROUP)
    shift = [("shift", gn) for gn in (1, 2, 4) if row_len % (GROUP * gn) == 0]
    return shift + [("funnel", gn) for gn in range(1, 9) if groups % gn == 0]


def chunking(row_len: int, max_table_bytes: int = MAX_TABLE_BYTES) -> Chunking:
    """The cheapest way (by :attr:`Chunking.cost_per_nibble`) to read rows of
    ``row_len`` bits with table blocks of at most ``max_table_bytes``."""
    if row_len <= 0:
        raise ValueError(f"LUT rows need at least one bit, got {row_len}")
    options = []
    for mode, gn in _candidates(row_len):
        chunks = -(-row_len // GROUP) // gn
        for block in range(1, chunks + 1):
            ch = Chunking(row_len, gn, mode, block)
            if chunks % block == 0 and (block == 1 or ch.table_bytes <= max_table_bytes):
                options.append(ch)
    return min(options, key=lambda c: (c.cost_per_nibble, c.table_bytes))


def _chunk_word(tile: te.Tensor, ch: Chunking, row, chunk) -> tirx.Expr:
    """uint32 whose low ``4 * per_chunk`` bits are the bits of ``chunk`` of tile ``row``
    (bits past the tile's last word read as its last word's: they meet zero inputs)."""
    if ch.mode == "word":
        return tile[row * (ch.row_len // WORD_BITS) + chunk]
    start = row * ch.row_len + chunk * (GROUP * ch.per_chunk)
    index = tirx.floordiv(start, WORD_BITS)
    sh = tirx.floormod(start, WORD_BITS).astype("uint32")
    low = tile[index] >> sh
    if ch.mode == "shift":
        return low
    last = int(tile.shape[0]) - 1
    # (hi << 1) << (31 - sh): no shift by 32 when sh == 0
    high = (tile[tirx.min(index + 1, _i64(last))] << _u32(1)) << (_u32(31) - sh)
    return low | high


# --------------------------------------------------------------------------- tables


def _signed(value: tirx.Expr, bit: tirx.Expr) -> tirx.Expr:
    """``value`` if ``bit`` (an int64 0/1) is 1 else ``-value``."""
    return tirx.Select(bit == _i64(1), value, -value)


def lut_tables(x: te.Tensor, groups: int) -> te.Tensor:
    """``table (*lead, groups, 16)`` of ``x (*lead, k)`` (``groups = ceil(k / 4)``):
    ``table[..., g, v]`` is the signed sum of group ``g`` for sign pattern ``v`` (bit ``b``
    of ``v`` set: ``+x[..., 4g+b]``, else ``-x[..., 4g+b]``; zero past ``k``), the sum of
    the signed sums of its two pairs (block ``pair (*lead, 2 * groups, 4)``)."""
    *lead, k = (int(d) for d in x.shape)

    def value(at, q) -> tirx.Expr:
        if k % GROUP == 0:
            return x[(*at, q)]
        inside = tirx.LT(q, _i64(k))
        return tirx.if_then_else(inside, x[(*at, tirx.min(q, _i64(k - 1)))], tirx.const(0, x.dtype))

    def pair_sum(*idx):
        *at, h, u = idx
        low = _signed(value(at, 2 * h), tirx.floormod(u, 2))
        return low + _signed(value(at, 2 * h + 1), tirx.floordiv(u, 2))

    pair = te.compute(_shape((*lead, 2 * groups, 4)), pair_sum, name="pair")

    def entry(*idx):
        *at, g, v = idx
        return pair[(*at, 2 * g, tirx.floormod(v, 4))] + pair[(*at, 2 * g + 1, tirx.floordiv(v, 4))]

    return te.compute(_shape((*lead, groups, ENTRIES)), entry, name="table")


def lut_product(x: te.Tensor, tile: te.Tensor, rows: int, ch: Chunking) -> te.Tensor:
    """``small (*lead, rows)``: ``small[..., r] = sum_q x[..., q] * (+1 if bit(r * k + q)
    else -1)`` for ``x (*lead, k)`` (``k == ch.row_len``), through the tables of
    :func:`lut_tables`. Reduction axes ``kc`` (chunk) and ``kg`` (nibble in the chunk)."""
    lead = [int(d) for d in x.shape[:-1]]
    table = lut_tables(x, ch.groups)
    kc = te.reduce_axis((_i64(0), _i64(ch.chunks)), name="kc")
    kg = te.reduce_axis((_i64(0), _i64(ch.per_chunk)), name="kg")

    def body(*idx):
        *at, r = idx
        word = _chunk_word(tile, ch, r, kc)
        nibble = (word >> (kg * GROUP).astype("uint32")) & _u32(ENTRIES - 1)
        group = kc * ch.per_chunk + kg
        return te.sum(table[(*at, group, nibble.astype("int64"))], axis=[kc, kg])

    return te.compute(_shape((*lead, rows)), body, name="small")


def lut_chunking(func: tirx.PrimFunc) -> Chunking | None:
    """The :class:`Chunking` a LUT kernel was built with (None for other functions)."""
    attrs = func.attrs
    if attrs is None or LUT_ATTR not in attrs:
        return None
    a = attrs[LUT_ATTR]
    return Chunking(int(a["row_len"]), int(a["per_chunk"]), str(a["mode"]), int(a["block"]))


# --------------------------------------------------------------------------- kernels


def _finish(
    args: list[te.Tensor], kind: str, ch: Chunking, filter_dims: Sequence[int] = ()
) -> tirx.PrimFunc:
    plan = {
        "row_len": ch.row_len,
        "per_chunk": ch.per_chunk,
        "mode": ch.mode,
        "block": ch.block,
        "filter_dims": [int(d) for d in filter_dims],
    }
    return kernels._finish(args, kind).with_attr(LUT_ATTR, plan)


def _scaled(alphas, small_value, bias, rows: int, ch) -> tirx.Expr:
    return kernels._add_bias(alphas[tirx.floordiv(ch, rows)] * small_value, bias, ch)


def tiled_linear_lut_primfunc(
    m: int,
    in_features: int,
    out_features: int,
    p: int,
    has_bias: bool,
    dtype: str = "float32",
    max_table_bytes: int = MAX_TABLE_BYTES,
) -> tirx.PrimFunc:
    """``out (m, out) = x (m, in) @ W^T + bias`` for an aligned ``(out, in)`` weight
    (``L % in == 0``; buffers as ``linear_aligned``: ``x, tile, alphas, [bias], out``).
    Kind ``linear_lut``; blocks ``pair``, ``table``, ``small``, ``out``."""
    k, n = int(in_features), int(out_features)
    if p < 1 or n % p or not is_aligned(k * n, p, k):
        raise ValueError(f"no LUT linear for in={k}, out={n}, p={p}: chunks must be whole rows")
    rows = n // p
    ch = chunking(k, max_table_bytes)
    x, tile, alphas, bias = _inputs((m, k), rows * k, p, n, has_bias, dtype)
    small = lut_product(x, tile, rows, ch)
    out = te.compute(
        _shape((m, n)),
        lambda i, j: _scaled(alphas, small[i, tirx.floormod(j, rows)], bias, rows, j),
        name="out",
    )
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    return _finish(args, "linear_lut", ch)


@dataclass(frozen=True)
class ConvGeometry:
    """An ungrouped conv: input and weight shapes, stride, symmetric padding, dilation
    (one per spatial dim)."""

    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def out_spatial(self) -> list[int]:
        return [
            (n + 2 * q - d * (k - 1) - 1) // s + 1
            for n, k, s, q, d in zip(
                self.x_shape[2:],
                self.weight_shape[2:],
                self.stride,
                self.padding,
                self.dilation,
                strict=True,
            )
        ]

    @property
    def out_shape(self) -> list[int]:
        return [self.x_shape[0], self.weight_shape[0], *self.out_spatial]

    @property
    def row_len(self) -> int:
        """Weights per filter (``cin * prod(kernel)``)."""
        return math.prod(self.weight_shape[1:])


def _patches(xp: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """``patches (n, *out_sp, cin * prod(k))``: the im2col row of every output position;
    column ``t`` is tap ``(c, *k)`` of the flat filter."""

    def patch(b, *idx):
        *sp, t = idx
        c, *taps = kernels._unflatten(t, list(geo.weight_shape[1:]))
        at = [o * s + k * d for o, k, s, d in zip(sp, taps, geo.stride, geo.dilation, strict=True)]
        return xp[(b, c, *at)]

    shape = (geo.x_shape[0], *geo.out_spatial, geo.row_len)
    return te.compute(_shape(shape), patch, name="patches")


def tiled_conv_lut_primfunc(
    geo: ConvGeometry,
    p: int,
    has_bias: bool,
    dtype: str = "float32",
    max_table_bytes: int = MAX_TABLE_BYTES,
) -> tirx.PrimFunc:
    """Ungrouped tiled conv whose chunks are whole filters (``cout % p == 0``; buffers as
    ``conv_aligned``: ``x, tile, alphas, [bias], out``): the LUT product of the ``cout /
    p`` filters over the im2col rows, then ``out[b, co, *sp] = alpha[co // (cout/p)] *
    small[b, *sp, co % (cout/p)] + bias[co]``. Kind ``conv_lut``; blocks ``xpad`` (when
    padded), ``patches``, ``pair``, ``table``, ``small``, ``out``."""
    cout, cin = geo.weight_shape[:2]
    if p < 1 or cout % p or cin != geo.x_shape[1] or min(geo.out_spatial) < 1:
        raise ValueError(f"no LUT conv for x {geo.x_shape}, weight {geo.weight_shape}, p={p}")
    filters, row = cout // p, geo.row_len
    ch = chunking(row, max_table_bytes)
    x, tile, alphas, bias = _inputs(geo.x_shape, filters * row, p, cout, has_bias, dtype)
    small = lut_product(_patches(kernels._pad(x, tuple(geo.padding)), geo), tile, filters, ch)

    def value(b, co, *sp):
        return _scaled(alphas, small[(b, *sp, tirx.floormod(co, filters))], bias, filters, co)

    out = te.compute(_shape(geo.out_shape), value, name="out")
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    return _finish(args, "conv_lut", ch, geo.weight_shape[1:])


# --------------------------------------------------------------------------- variants


def _buffer_shapes(func: tirx.PrimFunc) -> list[tuple[list[int], str]]:
    """(shape, dtype) of each buffer parameter of ``func``, in order."""
    return [([int(d) for d in p.ty.shape], str(p.ty.dtype)) for p in func.params]


def _same_kernel(func: tirx.PrimFunc, rebuilt: tirx.PrimFunc) -> bool:
    return bool(tvm_ffi.structural_equal(func.body, rebuilt.body))


def _linear_variant(func: tirx.PrimFunc, shapes) -> tirx.PrimFunc | None:
    (x_shape, _), (alpha_shape, _), (out_shape, _) = shapes[0], shapes[2], shapes[-1]
    (m, k), n, p, has_bias = x_shape, out_shape[1], alpha_shape[0], len(shapes) == 5
    if n // p < 2:  # one row shares no table
        return None
    if not _same_kernel(func, kernels.tiled_linear_primfunc(m, k, n, p, False, has_bias)):
        return None
    return tiled_linear_lut_primfunc(m, k, n, p, has_bias)


def _load_of(block: object, source_rank: int) -> object:
    """The read in ``block``'s body of a tensor of rank ``source_rank`` that the block does
    not write (the conv input)."""
    reads: list = []
    tvm_ffi.structural_walk(block.body, [(tvm.ir.TensorLoad, reads.append)])
    written = [w.source for w in block.writes]
    return next(
        r
        for r in reads
        if len(r.indices) == source_rank and not any(r.source.same_as(w) for w in written)
    )


def _conv_geometry(func: tirx.PrimFunc, shapes) -> ConvGeometry | None:
    """The geometry of a ``conv_aligned`` kernel of :mod:`.kernels`, read from the block
    that reads its (padded) input: ``patches`` (im2col: iterators position and flat tap)
    or ``small`` (direct: batch, filter, positions, channel, taps). Filter dims come from
    ``tbn_row_dims`` or the reduction extents, padding from the padded input's shape,
    stride and dilation from the input position that output position 1 and tap 1 of each
    spatial dim read (the index expressions evaluated)."""
    x_shape, out_shape = shapes[0][0], shapes[-1][0]
    nd = len(x_shape) - 2
    sch = Schedule(tvm.IRModule({"main": func}))
    names = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "patches" in names:
        block = sch.get(names["patches"])
        dims = [int(d) for d in block.annotations["tbn_row_dims"]]
        pos, tap = (iv.var for iv in block.iter_vars)
        out_vars, tap_vars = [pos] * nd, [tap] * nd
        out_steps = [math.prod(out_shape[3 + a :]) for a in range(nd)]
        tap_steps = [math.prod(dims[2 + a :]) for a in range(nd)]
    elif "small" in names:
        block = sch.get(names["small"])
        ivs = [iv.var for iv in block.iter_vars]
        dims = [int(iv.dom.extent) for iv in block.iter_vars[2 + nd :]]
        out_vars, tap_vars = ivs[2 : 2 + nd], ivs[3 + nd :]
        out_steps = tap_steps = [1] * nd
    else:
        return None
    load = _load_of(block, nd + 2)
    padded = [int(d) for d in load.source.ty.shape]

    def read_at(var: tirx.Var | None, step: int) -> list[int]:
        an = Analyzer()
        for iv in block.iter_vars:
            value = step if iv.var.same_as(var) else 0
            an.bind(iv.var, tirx.IntImm(str(iv.var.ty.dtype), value))
        return [int(an.simplify(e)) for e in load.indices[2:]]

    base = read_at(None, 0)
    stride = [read_at(out_vars[a], out_steps[a])[a] - base[a] for a in range(nd)]
    # a filter dim of 1 shows no dilation (every dilation gives the same kernel)
    dilation = [
        read_at(tap_vars[a], tap_steps[a])[a] - base[a] if dims[1 + a] > 1 else 1 for a in range(nd)
    ]
    padding = [(padded[2 + a] - x_shape[2 + a]) // 2 for a in range(nd)]
    return ConvGeometry(
        tuple(x_shape), (out_shape[1], *dims), tuple(stride), tuple(padding), tuple(dilation)
    )


def _conv_variant(func: tirx.PrimFunc, shapes) -> tirx.PrimFunc | None:
    geo = _conv_geometry(func, shapes)
    p, has_bias = shapes[2][0][0], len(shapes) == 5
    if geo is None or min(geo.stride + geo.dilation) < 1 or geo.weight_shape[0] // p < 2:
        return None
    rebuilt = kernels.tiled_conv_primfunc(
        geo.x_shape, geo.weight_shape, geo.stride, geo.padding, geo.dilation, 1, p, has_bias
    )
    if not _same_kernel(func, rebuilt):
        return None
    return tiled_conv_lut_primfunc(geo, p, has_bias)


def lut_variant(func: tirx.PrimFunc, kind: str) -> tirx.PrimFunc | None:
    """The LUT kernel computing what ``func`` (a kernel of ``kind`` from :mod:`.kernels`)
    computes, with the same buffers; None when there is none: kinds other than
    ``linear_aligned`` / ``conv_aligned``, float types other than float32, a single tile
    row (no table to share). The parameters are read from ``func`` and checked by
    building the kernel of :mod:`.kernels` from them again: it must be ``func`` itself,
    else (a kernel this module does not know) there is no variant."""
    if kind not in ("linear_aligned", "conv_aligned"):
        return None
    shapes = _buffer_shapes(func)
    if shapes[0][1] != "float32":
        return None
    try:
        if kind == "linear_aligned":
            return _linear_variant(func, shapes)
        return _conv_variant(func, shapes)
    except (ValueError, StopIteration, KeyError):  # not the kernel it claims to be
        return None
