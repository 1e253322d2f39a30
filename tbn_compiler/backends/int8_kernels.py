"""Int8 form of ``linear_aligned`` kernels (the opt-in ``precision="int8"`` of CPU builds).

:func:`int8_linear_primfunc` rebuilds a ``linear_aligned`` kernel (see
:mod:`.kernels`) from its :data:`.kernels.SPEC_ATTR` with the same buffers ``x (m, in)
float32``, ``tile``, ``alphas (p,)``, ``[bias (out,)]``, ``out (m, out) float32``, but
approximate activations:

* each input row ``i`` is quantized on its own, symmetric, to int8: ``amax_i =
  max |x[i, :]|``, ``q[i, k] = rint(x[i, k] * (127 / amax_i))`` in ``[-127, 127]``
  (round half to even; a row of zeros gives ``q = 0``), stored as int8 (block ``xq``;
  the row scales ``amax_i`` in block ``amax``, the row sums ``sum_k q`` in ``qsum``);
* the binary product is exact in int32: with bits ``b = (s + 1) / 2`` of the tile,
  ``q_i . s_r = 2 acc[i, r] - qsum[i]`` where ``acc[i, r] = sum_k b[r, k] q[i, k]``
  (block ``acc``), a sum of products of an unsigned byte (the bit) and a signed one (the
  input): AVX-512 VNNI ``vpdpbusd``. Panel form: the tile rows unpacked into bytes 0 or
  1, four inputs of a tile row per int32 (block ``panel``, shape ``(in / 4,
  rows_pad)``: 16 tile rows x 4 inputs are the 64 bytes of one ``vpdpbusd`` operand,
  one broadcast int32 of inputs the other). Bits form (``bits=True``, for few rows): the
  bits come from the tile words themselves, 8 int32 lanes of partial sums per (row,
  tile row) over the 32 inputs of a word (block ``acc_lanes``, summed into ``acc``);
* ``out[i, c rows + r] = alphas[c] * ((amax_i / 127) * float(2 acc[i, r] - qsum[i]))
  + bias[c rows + r]`` (block ``out``).

So the result is exactly ``alphas * (scale_i * (q_i . s_r)) + bias`` up to float32
rounding of the last two products: the only approximation is the int8 rounding of the
inputs (an error of at most ``amax_i / 254`` per input).

The rows of ``acc`` are padded to whole blocks of :data:`ROW_BLOCK` input rows in panel
form (past the input they repeat its last row, never written out) and
:data:`TILE_ROW_BLOCK` tile rows (pad tile rows repeat the last one). Needs ``in % 32 ==
0`` (:func:`int8_applies`).
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from ..tiling import WORD_BITS, n_words
from .kernels import FORM_ATTR, kernel_kind, kernel_spec

__all__ = [
    "BITS_LANES",
    "COLUMNS",
    "INT8_BITS_FORM",
    "INT8_FORM",
    "PRECISION_ATTR",
    "PRECISIONS",
    "ROW_BLOCK",
    "TILE_LAYOUT_ATTR",
    "TILE_ROW_BLOCK",
    "check_precision",
    "int8_applies",
    "int8_linear_primfunc",
    "mark_precision",
    "quantized_value",
]

PRECISION_ATTR = "tbn_precision"
"""PrimFunc attribute: the precision a tile kernel was asked for (``"int8"``); absent
means float32. Set at conversion time, read by :class:`.schedule_rules.int8_cpu.Int8Product`."""

PRECISIONS = ("float32", "int8")
"""The values of ``precision`` that ``compile`` accepts."""

TILE_LAYOUT_ATTR = "tbn_tile_layout"
"""PrimFunc attribute: the layout of the tile words when not bit rows. :data:`COLUMNS`:
word ``w`` of tile row ``r`` at ``w * rows + r`` (what :mod:`.int8_lut` restores its
layout to for the batches it does not take)."""

COLUMNS = "columns"

INT8_FORM = "int8"
""":data:`.kernels.FORM_ATTR` of a kernel built by :func:`int8_linear_primfunc`."""

INT8_BITS_FORM = "int8-bits"
""":data:`.kernels.FORM_ATTR` of the form without a panel (``bits=True``)."""

BITS_LANES = WORD_BITS // 4
"""int32 lanes of the bits form's partial sums: 4 inputs each, one tile word in all."""

ROW_BLOCK = 4
"""``acc`` holds the input rows in whole blocks of this many (a register block)."""

TILE_ROW_BLOCK = 16
"""``acc`` holds the tile rows in whole blocks of this many (one vector of int32 lanes)."""

LANES = 16
"""Partial row maxima and popcounts per row (one vector), reduced at the end."""

VNNI_DEPTH = 4
"""Inputs summed per int32 lane by one ``vpdpbusd``."""


def _i64(v: int) -> tirx.IntImm:
    return tirx.IntImm("int64", int(v))


def _round_up(v: int | tirx.Expr, block: int) -> int | tirx.Expr:
    if isinstance(v, int):
        return -(-v // block) * block
    return tirx.floordiv(v + block - 1, block) * block


def check_precision(precision: object, target_kind: str) -> str:
    """``precision`` if ``compile`` can build it for a target of ``target_kind``, else a
    ValueError naming the option and what is allowed."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}"
        )
    if precision == "int8" and target_kind != "llvm":
        raise ValueError(
            f"precision='int8' is available for host CPU ('llvm') targets only, not for "
            f"{target_kind!r} targets; use precision='float32' there"
        )
    return precision


def mark_precision(mod: tvm.IRModule, precision: str) -> tvm.IRModule:
    """``mod`` with every ``linear_aligned`` kernel tagged :data:`PRECISION_ATTR`
    ``precision`` (``mod`` itself for ``"float32"``, the default of untagged kernels)."""
    if precision == "float32":
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and kernel_kind(func) == "linear_aligned":
            mod[gv] = func.with_attr(PRECISION_ATTR, precision)
    return mod


def int8_applies(func: tirx.PrimFunc) -> bool:
    """True for a float32 ``linear_aligned`` kernel with a :data:`SPEC_ATTR` and
    whole-word tile rows (``in % 32 == 0``)."""
    spec = kernel_spec(func, "linear_aligned")
    if spec is None:
        return False
    return spec["dtype"] == "float32" and int(spec["in_features"]) % WORD_BITS == 0


def int8_linear_primfunc(
    func: tirx.PrimFunc, bits: bool = False, row_block: int | None = None
) -> tirx.PrimFunc | None:
    """``func`` (a ``linear_aligned`` kernel of :mod:`.kernels`) in int8 form (see the
    module docstring), or None where :func:`int8_applies` is False. Same buffers and
    batch extent (a symbolic batch becomes the new kernel's own var ``m``); attribute
    :data:`.kernels.FORM_ATTR` :data:`INT8_FORM`, or :data:`INT8_BITS_FORM` with
    ``bits``: the product reads the signs from the tile words directly (no panel), 32
    inputs of a tile row at a time (:func:`_bits_product`). ``row_block``: the input
    rows are computed in whole blocks of that many (default: 1 in bits form, else
    :data:`ROW_BLOCK`)."""
    if not int8_applies(func):
        return None
    spec = kernel_spec(func)
    batch = func.params[0].shape[0]
    m = int(batch) if isinstance(batch, tirx.IntImm) else tirx.Var("m", "int64")
    k, n, p = int(spec["in_features"]), int(spec["out_features"]), int(spec["p"])
    rows = n // p
    x = te.placeholder((_dim(m), _i64(k)), "float32", name="x")
    tile = te.placeholder((_i64(n_words(k * rows)),), "uint32", name="tile")
    alphas = te.placeholder((_i64(p),), "float32", name="alphas")
    bias = te.placeholder((_i64(n),), "float32", name="bias") if spec["has_bias"] else None
    if row_block is None:
        row_block = 1 if bits else ROW_BLOCK
    columns = str((func.attrs or {}).get(TILE_LAYOUT_ATTR, "")) == COLUMNS
    amax, xq = _quantized_rows(x, m, k, row_block)
    rows_pad = _round_up(rows, TILE_ROW_BLOCK)
    if bits:
        acc = _bits_product(xq, tile, k, rows, rows_pad, columns)
    else:
        acc = _int_product(xq, _int8_panel(tile, k, rows, rows_pad, columns), k, rows_pad)
    qsum = _lane_sums(xq, k, "qsum")
    out = _rescaled(acc, qsum, amax, alphas, bias, m, n, rows)
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    new = te.create_prim_func(args).without_attr("global_symbol")
    for key, value in (func.attrs or {}).items():
        new = new.with_attr(key, value)
    return new.with_attr(FORM_ATTR, INT8_BITS_FORM if bits else INT8_FORM)


def _dim(v: int | tirx.Expr) -> tirx.Expr:
    return _i64(v) if isinstance(v, int) else v


def _quantized_rows(x: te.Tensor, m, k: int, row_block: int) -> tuple[te.Tensor, te.Tensor]:
    """``amax (m,)`` (from :data:`LANES` partial maxima per row) and ``xq (m_pad, k)
    int8 = q`` (``m`` rounded up to whole ``row_block`` rows; rows past ``m`` repeat row
    ``m - 1``)."""
    lanes = LANES if k % LANES == 0 else 1
    ko = te.reduce_axis((_i64(0), _i64(k // lanes)), name="ko")
    part = te.compute(
        (_dim(m), _i64(lanes)),
        lambda i, v: te.max(tirx.abs(x[i, ko * lanes + v]), axis=ko),
        name="amax_lanes",
    )
    lane = te.reduce_axis((_i64(0), _i64(lanes)), name="lane")
    amax = te.compute((_dim(m),), lambda i: te.max(part[i, lane], axis=lane), name="amax")
    m_pad = _round_up(m, row_block)
    whole = isinstance(m, int) and m == m_pad

    def quantize(row, q):
        i = row if whole else tirx.min(row, _dim(m) - 1)
        return quantized_value(x[i, q], amax[i])

    xq = te.compute((_dim(m_pad), _i64(k)), quantize, name="xq")
    return amax, xq


def quantized_value(value: tirx.Expr, amax: tirx.Expr) -> tirx.Expr:
    """``rint(value * 127 / amax)`` as int8 (0 when ``amax`` is 0): the quantization of
    every int8 form, so that they all compute the same integers."""
    zero = tirx.const(0, "float32")
    inv = tirx.Select(amax > zero, tirx.const(127, "float32") / amax, zero)
    return tirx.round(value * inv).astype("int32").astype("int8")


def _lane_sums(xq: te.Tensor, k: int, name: str) -> te.Tensor:
    """``name (m_pad,) int32``: the row sums of ``xq``, from :data:`LANES` partial sums
    per row (block ``name_lanes``)."""
    lanes = LANES if k % LANES == 0 else 1
    ko = te.reduce_axis((_i64(0), _i64(k // lanes)), name="ko")
    part = te.compute(
        (xq.shape[0], _i64(lanes)),
        lambda i, v: te.sum(xq[i, ko * lanes + v].astype("int32"), axis=ko),
        name=f"{name}_lanes",
    )
    lane = te.reduce_axis((_i64(0), _i64(lanes)), name="lane")
    return te.compute((xq.shape[0],), lambda i: te.sum(part[i, lane], axis=lane), name=name)


def _bit(tile: te.Tensor, flat) -> tirx.Expr:
    """Bit ``flat`` of the packed tile as a uint32 0 or 1."""
    word = tile[tirx.floordiv(flat, WORD_BITS)]
    return (word >> tirx.floormod(flat, WORD_BITS).astype("uint32")) & tirx.const(1, "uint32")


def _tile_word(tile: te.Tensor, row, w, kw: int, rows: int, columns: bool) -> tirx.Expr:
    """Tile word ``w`` of tile row ``row``: ``tile[row * kw + w]`` (bit rows), or
    ``tile[w * rows + row]`` in the column layout (:data:`TILE_LAYOUT_ATTR`)."""
    return tile[w * rows + row] if columns else tile[row * kw + w]


def _int8_panel(
    tile: te.Tensor, k: int, rows: int, rows_pad: int, columns: bool = False
) -> te.Tensor:
    """``panel (k / 4, rows_pad) int32``: the 4 bits of tile row ``min(r, rows - 1)`` at
    inputs ``4 g .. 4 g + 3`` as bytes 0 or 1 (byte ``j`` for input ``4 g + j``), from
    the tile words copied tile-row innermost (block ``words``). A nibble ``b`` spreads to
    one bit per byte as ``(b * 0x204081) & 0x01010101`` (the four shifted copies of
    ``b`` do not overlap, so nothing carries)."""
    last = _i64(rows - 1)
    kw = k // WORD_BITS
    words = te.compute(
        (_i64(kw), _i64(rows_pad)),
        lambda w, r: _tile_word(tile, tirx.min(r, last), w, kw, rows, columns),
        name="words",
    )
    per_word = WORD_BITS // VNNI_DEPTH

    def bits(g, r):
        shift = (tirx.floormod(g, per_word) * VNNI_DEPTH).astype("uint32")
        nibble = (words[tirx.floordiv(g, per_word), r] >> shift) & _u32(15)
        return tirx.reinterpret("int32", (nibble * _u32(0x204081)) & _u32(0x01010101))

    return te.compute((_i64(k // VNNI_DEPTH), _i64(rows_pad)), bits, name="panel")


def _u32(v: int) -> tirx.Expr:
    return tirx.const(v, "uint32")


def panel_bit(word: tirx.Expr, j: tirx.Expr) -> tirx.Expr:
    """Bit ``j`` (int32 0 or 1) of a :func:`_int8_panel` entry ``word`` (int32): its
    byte ``j``. The panel product's kernel and its tensor intrinsic share this form."""
    return (word >> (j * 8).astype("int32")).astype("int8").astype("int32")


def _int_product(xq: te.Tensor, panel: te.Tensor, k: int, rows_pad: int) -> te.Tensor:
    """``acc (m_pad, rows_pad) int32 = sum over set bits of q``, from the panel."""
    g = te.reduce_axis((_i64(0), _i64(k // VNNI_DEPTH)), name="g")
    j = te.reduce_axis((_i64(0), _i64(VNNI_DEPTH)), name="j")

    def dot(i, r):
        q = xq[i, g * VNNI_DEPTH + j].astype("int32")
        return te.sum(panel_bit(panel[g, r], j) * q, axis=[g, j])

    return te.compute((xq.shape[0], _i64(rows_pad)), dot, name="acc")


def word_bit(word: tirx.Expr, bit: tirx.Expr) -> tirx.Expr:
    """Bit ``bit`` (int64) of the uint32 ``word`` as an int32 0 or 1. The bits form's
    kernel and its tensor intrinsic share this form."""
    return ((word >> bit.astype("uint32")) & _u32(1)).astype("int32")


def _bits_product(
    xq: te.Tensor, tile: te.Tensor, k: int, rows: int, rows_pad: int, columns: bool = False
):
    """``acc (m_pad, rows_pad) int32 = sum over set bits of q`` (``xq`` signed), the
    bits read from the tile words: :data:`BITS_LANES` partial sums per (row, tile row),
    each over inputs ``32 w + 4 l + j`` (``l`` the lane), block ``acc_lanes``; ``acc``
    sums the lanes."""
    words, last = k // WORD_BITS, _i64(rows - 1)
    w = te.reduce_axis((_i64(0), _i64(words)), name="w")
    j = te.reduce_axis((_i64(0), _i64(VNNI_DEPTH)), name="j")

    def dot(i, r, lane):
        word = _tile_word(tile, tirx.min(r, last), w, words, rows, columns)
        q = xq[i, w * WORD_BITS + lane * VNNI_DEPTH + j].astype("int32")
        return te.sum(word_bit(word, lane * VNNI_DEPTH + j) * q, axis=[w, j])

    shape = (xq.shape[0], _i64(rows_pad), _i64(BITS_LANES))
    lanes = te.compute(shape, dot, name="acc_lanes")
    lane = te.reduce_axis((_i64(0), _i64(BITS_LANES)), name="lane")
    return te.compute(
        (xq.shape[0], _i64(rows_pad)), lambda i, r: te.sum(lanes[i, r, lane], axis=lane), name="acc"
    )


def _rescaled(acc, qsum, amax, alphas, bias, m, n: int, rows: int) -> te.Tensor:
    """``out (m, n) float32``: ``alphas[c] * (amax_i / 127) * (2 acc - qsum) + bias``
    (``2 acc[i, r] - qsum[i]`` is the int32 product ``q_i . s_r``)."""

    def value(i, col):
        r = tirx.floormod(col, rows)
        scale = amax[i] / tirx.const(127, "float32")
        product = (acc[i, r] * 2 - qsum[i]).astype("float32")
        v = alphas[tirx.floordiv(col, rows)] * (scale * product)
        return v if bias is None else v + bias[col]

    return te.compute((_dim(m), _i64(n)), value, name="out")
