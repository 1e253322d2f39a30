"""TE/TIR kernel builders for the tile ops (no scheduling here; see :mod:`.schedule_rules`).

Every builder returns an unscheduled, schedulable ``tvm.tirx.PrimFunc`` (made with
``te.create_prim_func``, int64 shapes, no ``global_symbol`` so it can be added to a
Relax module). The batch extent may be symbolic (any int64 ``PrimExpr``, e.g. the
Relax import's ``batch``): the kernel then takes a ``tirx.Var`` of its own there (``m``
rows of a linear, ``n`` images of a conv, ``n0, n1, ...`` in the indexing kernels),
bound from its buffers' shapes when called, so one kernel serves every batch size. Buffers, in order: ``x``, ``tile``, ``alphas``, ``[bias]``, ``out``:

* ``tile``: packed ``uint32[ceil(L / 32)]`` words; tile element ``j`` is bit ``j % 32``
  of word ``j // 32``; bit 1 means ``+1`` (see :mod:`tbn_compiler.tiling`).
* ``alphas``: ``float32[p]``; weight element ``e`` (flat, row-major, stored layout) is
  ``alphas[e // L] * (+1 if bit(e % L) else -1)`` with ``L = numel / p``.

Bits are read from the packed words at run time; no float weight is ever built.
The binary part never multiplies: ``+-x`` is ``x`` with its sign bit flipped
(``reinterpret(x) ^ mask``), where ``mask`` is ``0`` for a ``+1`` bit and
``0x80000000`` for a ``-1`` bit.

Kernel kinds (``func.attrs["tbn_kernel"]``, read by the rules of :mod:`.schedule_rules`):

``linear_aligned``
    ``(out, in)`` weight, ``L % in == 0``: ``small (m, N/p) = x T^T`` for the tile rows
    once (block ``small``), then ``out = alpha * small + bias`` (block ``out``).
    With ``in % 8 == 0`` the reduction is split ``(word, byte, bit)`` (``(byte, bit)``
    when rows are not whole words) and the sign masks come from a 256 x 8 lookup table
    (block ``sign_lut``): one table load gives the masks of 8 consecutive weights.
``linear_in_out_aligned``
    ``(in, out)`` weight, ``in % p == 0``: ``xs = sum_i alpha_i x[:, chunk_i]``
    (block ``xs``), then one binary product with the ``(in/p, out)`` tile (block
    ``small``; with ``out % 32 == 0`` shaped ``(m, out/32, 4, 8)`` for table masks),
    then ``out = small + bias``.
``conv_aligned``
    ``groups == 1`` and whole filters per chunk: ``Cout/p`` binary filters applied once,
    then ``alpha`` scaling and bias (block ``out``). With ``Cin*prod(k) % 8 == 0`` it is
    the ``linear_aligned`` product over im2col rows (blocks ``patches``, ``small
    (positions, Cout/p)``); otherwise a direct conv (block ``small (n, Cout/p, ...)``).
``linear_general`` / ``conv_general``
    Unaligned layers and grouped convs: weight ``e`` is ``alpha[e // L] * bit(e % L)``.
    When a stored row is whole words and a chunk holds a row and a word, each 32
    weights of a row come from one *realigned word* (funnel shift of two tile words,
    wrap to the tile start) with table masks, and the divisions by ``L`` only touch
    the row start (blocks ``small``/``acc``/``out``; convs over ``patches``).
    Otherwise a plain modulo-indexed reduction (block ``acc``, or ``out`` without bias).

Panel form (:func:`panel_primfunc`, for ``linear_aligned`` and ``conv_aligned``): the
same kernel with the tile rows unpacked into ``+-1`` numbers (block ``panel``, tile
rows innermost) and a multiply-add product over them (a conv reads its padded input
directly, no im2col rows); the CPU rules rebuild a kernel in it when many rows share
the tile (builders record their arguments in :data:`SPEC_ATTR` for that).

``gather``
    Not a tile op: the checked indexing kernels, described by an :class:`IndexMap`.
    :func:`gather_primfunc` reads (``embedding``, ``index_select``, ``x[ids]``,
    ``x[i, j]``, ``torch.gather``); :func:`scatter_primfunc` writes (``scatter``,
    ``scatter_add``, ``index_put`` and what decomposes to it), one column of the output
    per block instance. One block ``gather``, spatial axes only, any schedule of them
    exact. Both assert every id is in range (the exception torch raises, where the
    target can raise from a kernel) and never read or write out of bounds where it
    cannot (reads and writes at clamped positions; values of bad ids NaN, writes of bad
    ids dropped).

Two TE computes (not kernels: no kind, fused and scheduled like TVM's own ops) keep
torch's NaN semantics where TVM's ``max``/``min`` lose it: :func:`clamp_te` and
:func:`max_pool_te`.

Every reduction block is named ``small`` or ``acc`` (or ``out`` when it is the last
stage); ``xpad`` is the zero-padded conv input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import tvm_ffi
from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as IRT

from ..tiling import WORD_BITS, is_aligned, n_words, row_length

__all__ = [
    "tiled_linear_primfunc",
    "tiled_conv_primfunc",
    "IdTensor",
    "IndexMap",
    "gather_primfunc",
    "scatter_primfunc",
    "clamp_te",
    "max_pool_te",
    "pool_output_size",
    "kernel_kind",
    "kernel_spec",
    "is_static",
    "KERNEL_ATTR",
    "FORM_ATTR",
    "PANEL_KINDS",
    "PANEL_ROW_BLOCK",
    "PANEL_TILE_ROWS",
    "SPEC_ATTR",
    "padded_tile_rows",
    "panel_primfunc",
    "words_primfunc",
]

KERNEL_ATTR = "tbn_kernel"
"""PrimFunc attribute naming the kernel kind (see the module docstring)."""

FORM_ATTR = "tbn_form"
"""PrimFunc attribute naming the form of a rebuilt kernel: ``"panel"``
(:func:`panel_primfunc`) or ``"words"`` (:func:`words_primfunc`)."""

SPEC_ATTR = "tbn_spec"
"""PrimFunc attribute holding the builder's arguments but the batch (a JSON object), so
that :func:`panel_primfunc` can build the same kernel in another form."""

_SIGN_BIT = 0x80000000
_UINT = {"float32": "uint32", "float16": "uint16", "float64": "uint64"}
_SIGN_BITS = {"float32": 31, "float16": 15, "float64": 63}


# --------------------------------------------------------------------------- helpers


def _i64(v: int) -> tirx.IntImm:
    return tirx.IntImm("int64", int(v))


Extent = int | tirx.Expr
"""A static extent, or a symbolic one (an int64 expression)."""


def is_static(v: Extent) -> bool:
    """True for a Python int or an integer constant."""
    return isinstance(v, (int, tirx.IntImm))


def _dim(v: Extent) -> tirx.Expr:
    """An extent as an int64 expression."""
    if isinstance(v, tirx.Expr):
        return v if str(v.ty) == "int64" else v.astype("int64")
    return _i64(v)


def _shape(dims: Sequence[Extent]) -> list[tirx.Expr]:
    return [_dim(d) for d in dims]


def _own_extent(v: Extent, name: str) -> Extent:
    """``v`` as a kernel extent: an int when static, else a new ``tirx.Var`` named
    ``name`` (a kernel binds it from its buffers' shapes; an expression would need the
    variables it is made of passed separately)."""
    return int(v) if is_static(v) else tirx.Var(name, "int64")


def _same(a: Extent, b: Extent) -> bool:
    """True when two extents are the same (equal ints, or structurally equal exprs)."""
    if is_static(a) and is_static(b):
        return int(a) == int(b)
    return not is_static(a) and not is_static(b) and tvm_ffi.structural_equal(a, b)


def _is_one(v: Extent) -> bool:
    return is_static(v) and int(v) == 1


def _u32(v: int) -> tirx.IntImm:
    return tirx.const(v, "uint32")


def _bit_mask(tile: te.Tensor, flat) -> tirx.Expr:
    """uint32 sign mask of tile element ``flat``: 0 for a ``+1`` bit, 0x80000000 for ``-1``."""
    word = tile[tirx.floordiv(flat, WORD_BITS)]
    bit = tirx.floormod(flat, WORD_BITS).astype("uint32")
    return (((word >> bit) & _u32(1)) ^ _u32(1)) << _u32(31)


def _flip(x: tirx.Expr, mask: tirx.Expr, dtype: str) -> tirx.Expr:
    """``x`` with its sign flipped where ``mask`` (uint32, 0 or 0x80000000) is set."""
    if dtype == "float32":
        return tirx.reinterpret(dtype, tirx.reinterpret("uint32", x) ^ mask)
    if dtype in _UINT:
        utype = _UINT[dtype]
        m = (mask >> _u32(31)).astype(utype) << tirx.const(_SIGN_BITS[dtype], utype)
        return tirx.reinterpret(dtype, tirx.reinterpret(utype, x) ^ m)
    return tirx.Select(mask == _u32(0), x, -x)


def _sign_lut() -> te.Tensor:
    """``uint32[256, 8]``: ``lut[b, j]`` is the sign mask of bit ``j`` of byte ``b``."""
    return te.compute(
        _shape((256, 8)),
        lambda b, j: tirx.Select(((b >> j) & _i64(1)) == _i64(1), _u32(0), _u32(_SIGN_BIT)),
        name="sign_lut",
    )


def _lut_mask(lut: te.Tensor, word: tirx.Expr, byte, bit) -> tirx.Expr:
    """Sign mask of bit ``8 * byte + bit`` of ``word`` via the lookup table."""
    b = (word >> (byte * 8).astype("uint32")) & _u32(255)
    return lut[b.astype("int64"), bit]


def _finish(args: list[te.Tensor], kind: str, spec: dict | None = None) -> tirx.PrimFunc:
    """The PrimFunc of ``args`` (inputs, then the output), tagged with its kernel kind
    and, when given, the builder arguments ``spec`` (:data:`SPEC_ATTR`)."""
    func = te.create_prim_func(args).without_attr("global_symbol")
    func = func.with_attr(KERNEL_ATTR, kind)
    return func if spec is None else func.with_attr(SPEC_ATTR, json.dumps(spec, sort_keys=True))


def _check(numel: int, p: int) -> int:
    if p < 1 or numel % p != 0:
        raise ValueError(f"weight of {numel} elements is not divisible by p={p}")
    return numel // p


def _inputs(
    x_shape: Sequence[Extent], length: int, p: int, out_ch: int, has_bias: bool, dtype: str
) -> tuple[te.Tensor, te.Tensor, te.Tensor, te.Tensor | None]:
    x = te.placeholder(_shape(x_shape), dtype, name="x")
    tile = te.placeholder(_shape((n_words(length),)), "uint32", name="tile")
    alphas = te.placeholder(_shape((p,)), dtype, name="alphas")
    bias = te.placeholder(_shape((out_ch,)), dtype, name="bias") if has_bias else None
    return x, tile, alphas, bias


def _add_bias(value: tirx.Expr, bias: te.Tensor | None, ch) -> tirx.Expr:
    return value if bias is None else value + bias[ch]


def kernel_kind(func: tirx.PrimFunc) -> str:
    """The ``tbn_kernel`` attribute of a PrimFunc built here (``""`` if absent)."""
    attrs = func.attrs
    if attrs is None or KERNEL_ATTR not in attrs:
        return ""
    return str(attrs[KERNEL_ATTR])


def kernel_spec(func: tirx.PrimFunc, *kinds: str) -> dict | None:
    """The builder arguments (:data:`SPEC_ATTR`) of a kernel built here whose kind is one
    of ``kinds`` (any kind when none is given); None for any other PrimFunc, or one that
    carries no spec."""
    attrs = func.attrs
    if attrs is None or SPEC_ATTR not in attrs or (kinds and kernel_kind(func) not in kinds):
        return None
    return json.loads(str(attrs[SPEC_ATTR]))


# --------------------------------------------------------------------------- linear


def tiled_linear_primfunc(
    m: Extent,
    in_features: int,
    out_features: int,
    p: int,
    weight_in_out: bool,
    has_bias: bool,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """Tiled linear ``out (m, out_features) = x (m, in_features) @ W^T + bias``.

    Buffers: ``x (m, in) dtype``, ``tile (ceil(L/32),) uint32``, ``alphas (p,) dtype``,
    ``[bias (out,) dtype]``, ``out (m, out) dtype``. ``weight_in_out=False``: ``W`` is
    stored ``(out, in)`` (``nn.Linear``); ``True``: stored ``(in, out)`` (GPT-2
    ``Conv1D``) and ``y = x @ W + b``; the tile covers the stored layout flat. A
    symbolic ``m`` gives a kernel for any number of rows (its own var ``m``).
    """
    m = _own_extent(m, "m")
    k, n = int(in_features), int(out_features)
    numel = k * n
    length = _check(numel, p)
    x, tile, alphas, bias = _inputs((m, k), length, p, n, has_bias, dtype)
    shape = (k, n) if weight_in_out else (n, k)
    aligned = is_aligned(numel, p, row_length(shape, weight_in_out))
    if aligned and weight_in_out:
        out = _linear_in_out_aligned(x, tile, alphas, bias, m, k, n, p)
        kind = "linear_in_out_aligned"
    elif aligned:
        out = _linear_aligned(x, tile, alphas, bias, m, k, n, p)
        kind = "linear_aligned"
    else:
        out = _linear_general(x, tile, alphas, bias, m, k, n, length, weight_in_out)
        kind = "linear_general"
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    spec = {
        "op": "linear",
        "in_features": k,
        "out_features": n,
        "p": p,
        "weight_in_out": bool(weight_in_out),
        "has_bias": bool(has_bias),
        "dtype": dtype,
    }
    return _finish(args, kind, spec)


class _RowTable:
    """Table-driven reduction over whole stored tile rows of ``row_len`` bits
    (``row_len % 8 == 0``, so every row starts on a byte). Reduction axes
    ``(kw, kb, kl)`` cover row position ``q = 32 kw + 8 kb + kl`` when rows are whole
    words, else ``q = 8 kw + kl`` (``kb`` has extent 1); ``kl`` indexes the table."""

    def __init__(self, row_len: int) -> None:
        self.row_len = row_len
        self.words = row_len % WORD_BITS == 0
        self.lut = _sign_lut()
        groups = row_len // WORD_BITS if self.words else row_len // 8
        self.kw = te.reduce_axis((_i64(0), _i64(groups)), name="kw")
        self.kb = te.reduce_axis((_i64(0), _i64(4 if self.words else 1)), name="kb")
        self.kl = te.reduce_axis((_i64(0), _i64(8)), name="kl")
        self.axes = [self.kw, self.kb, self.kl]

    @property
    def q(self) -> tirx.Expr:
        if self.words:
            return self.kw * WORD_BITS + self.kb * 8 + self.kl
        return self.kw * 8 + self.kl

    def mask(self, tile: te.Tensor, row) -> tirx.Expr:
        """Sign mask of tile row ``row`` at position :attr:`q`."""
        if self.words:
            word = tile[row * (self.row_len // WORD_BITS) + self.kw]
            return _lut_mask(self.lut, word, self.kb, self.kl)
        byte = row * (self.row_len // 8) + self.kw
        return _lut_mask(self.lut, tile[tirx.floordiv(byte, 4)], tirx.floormod(byte, 4), self.kl)


def _linear_aligned(x, tile, alphas, bias, m: Extent, k: int, n: int, p: int) -> te.Tensor:
    """``small (m, n/p) = x T^T`` once, then ``out[:, i*R + r] = alpha_i small[:, r] + b``."""
    rows = n // p
    dtype = x.dtype
    if k % 8 == 0:
        table = _RowTable(k)

        def body(i, r):
            return te.sum(_flip(x[i, table.q], table.mask(tile, r), dtype), axis=table.axes)
    else:
        kk = te.reduce_axis((_i64(0), _i64(k)), name="k")

        def body(i, r):
            return te.sum(_flip(x[i, kk], _bit_mask(tile, r * k + kk), dtype), axis=kk)

    small = te.compute(_shape((m, rows)), body, name="small")
    return _scaled_copies(small, alphas, bias, m, n, rows)


def _scaled_copies(
    small: te.Tensor, alphas: te.Tensor, bias: te.Tensor | None, m: Extent, n: int, rows: int
) -> te.Tensor:
    """``out (m, n)``: the ``p`` copies of the tile product ``small (m, rows)`` side by
    side, copy ``c`` scaled by ``alphas[c]``, plus ``bias`` (``out[i, j] =
    alphas[j // rows] * small[i, j % rows] + bias[j]``)."""
    return te.compute(
        _shape((m, n)),
        lambda i, j: _add_bias(
            alphas[tirx.floordiv(j, rows)] * small[i, tirx.floormod(j, rows)], bias, j
        ),
        name="out",
    )


def _linear_in_out_aligned(x, tile, alphas, bias, m: Extent, k: int, n: int, p: int) -> te.Tensor:
    """``xs (m, in/p) = sum_i alpha_i x[:, chunk_i]``; ``out = xs @ T + b``, ``T (in/p, out)``."""
    rows = k // p
    dtype = x.dtype
    ip = te.reduce_axis((_i64(0), _i64(p)), name="ip")
    xs = te.compute(
        _shape((m, rows)),
        lambda i, j: te.sum(alphas[ip] * x[i, ip * rows + j], axis=ip),
        name="xs",
    )
    jr = te.reduce_axis((_i64(0), _i64(rows)), name="j")
    if n % WORD_BITS == 0:
        # small[i, ow, ob, ol] is output column 32*ow + 8*ob + ol: masks from the table.
        lut = _sign_lut()
        words_per_row = n // WORD_BITS
        small = te.compute(
            _shape((m, words_per_row, 4, 8)),
            lambda i, ow, ob, ol: te.sum(
                _flip(xs[i, jr], _lut_mask(lut, tile[jr * words_per_row + ow], ob, ol), dtype),
                axis=jr,
            ),
            name="small",
        )

        def value(i, o):
            q = tirx.floormod(o, WORD_BITS)
            return small[i, tirx.floordiv(o, WORD_BITS), tirx.floordiv(q, 8), tirx.floormod(q, 8)]
    else:
        small = te.compute(
            _shape((m, n)),
            lambda i, o: te.sum(_flip(xs[i, jr], _bit_mask(tile, jr * n + o), dtype), axis=jr),
            name="small",
        )

        def value(i, o):
            return small[i, o]

    return te.compute(_shape((m, n)), lambda i, o: _add_bias(value(i, o), bias, o), name="out")


def _general_weight(
    tile, alphas, row_start, within, length: int, row_len: int, p: int
) -> tuple[tirx.Expr, tirx.Expr]:
    """``(alpha, sign mask)`` of flat weight ``row_start + within`` (``within < row_len``).

    When a chunk holds at least a row (``L >= row_len``) a row meets at most two chunks:
    the divisions by ``L`` only involve ``row_start`` (hoisted out of the inner loop)
    and the wrap into the next chunk is a compare and select."""
    if length < row_len:
        flat = row_start + within
        return alphas[tirx.floordiv(flat, length)], _bit_mask(tile, tirx.floormod(flat, length))
    j = tirx.floormod(row_start, length) + within
    chunk = tirx.floordiv(row_start, length)
    wrap = j >= length
    nxt = alphas[tirx.min(chunk + 1, p - 1)]
    alpha = tirx.Select(wrap, nxt, alphas[chunk])
    return alpha, _bit_mask(tile, tirx.Select(wrap, j - length, j))


def _linear_general(
    x, tile, alphas, bias, m: Extent, k: int, n: int, length: int, weight_in_out: bool
) -> te.Tensor:
    """Modulo-indexed: weight element ``e`` is ``alpha[e // L] * sign(bit e % L)``.

    When stored rows are whole words and a chunk holds at least a row (and a word),
    each 32 weights of a row come from one realigned word (two tile words, funnel
    shift, wrap into the next chunk) and table masks, as in the aligned kernels."""
    p = k * n // length
    row_len = n if weight_in_out else k
    if row_len % WORD_BITS == 0 and length >= max(row_len, WORD_BITS):
        if weight_in_out:
            return _linear_general_in_out_words(x, tile, alphas, bias, m, k, n, length, p)
        return _linear_general_words(x, tile, alphas, bias, m, k, n, length, p)
    dtype = x.dtype
    kk = te.reduce_axis((_i64(0), _i64(k)), name="k")

    def body(i, j):
        if weight_in_out:  # stored row kk, column j
            alpha, mask = _general_weight(tile, alphas, kk * n, j, length, n, p)
        else:  # stored row j, column kk
            alpha, mask = _general_weight(tile, alphas, j * k, kk, length, k, p)
        return te.sum(alpha * _flip(x[i, kk], mask, dtype), axis=kk)

    return _with_bias(
        te.compute(_shape((m, n)), body, name="acc" if bias is not None else "out"), bias
    )


def _with_bias(acc: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda i, j: acc[i, j] + bias[j], name="out")


def _realigned_word(tile: te.Tensor, row_start, q0, length: int) -> tirx.Expr:
    """uint32 whose bit ``b`` is the tile bit of flat weight ``row_start + q0 + b``.

    Needs ``L >= 32`` (at most one wrap to the tile start inside a word)."""
    u32 = "uint32"
    j = tirx.floormod(row_start, length) + q0
    j0 = tirx.Select(j >= length, j - length, j)
    wi = tirx.floordiv(j0, WORD_BITS)
    sh = tirx.floormod(j0, WORD_BITS).astype(u32)
    last = n_words(length) - 1
    lo = tile[wi] >> sh
    hi = (tile[tirx.min(wi + 1, last)] << _u32(1)) << (_u32(31) - sh)
    word = lo | hi
    rem = length - j0  # bits of this word before the wrap
    safe = tirx.max(tirx.min(rem, WORD_BITS - 1), 0).astype(u32)  # bounds stay >= 0
    wrapped = (word & ((_u32(1) << safe) - _u32(1))) | (tile[0] << safe)
    return tirx.Select(rem < WORD_BITS, wrapped, word)


def _row_alpha(alphas, row_start, q, length: int, p: int) -> tirx.Expr:
    """Alpha of flat weight ``row_start + q`` when a row meets at most two chunks."""
    chunk = tirx.floordiv(row_start, length)
    nxt = alphas[tirx.min(chunk + 1, p - 1)]
    return tirx.Select(tirx.floormod(row_start, length) + q >= length, nxt, alphas[chunk])


def _linear_general_words(
    x, tile, alphas, bias, m: Extent, k: int, n: int, length: int, p: int
) -> te.Tensor:
    """``(out, in)`` weight, ``in % 32 == 0``: reduction split ``(word, byte, bit)``."""
    dtype = x.dtype
    lut = _sign_lut()
    kw = te.reduce_axis((_i64(0), _i64(k // WORD_BITS)), name="kw")
    kb = te.reduce_axis((_i64(0), _i64(4)), name="kb")
    kl = te.reduce_axis((_i64(0), _i64(8)), name="kl")

    def body(i, j):
        q = kw * WORD_BITS + kb * 8 + kl
        word = _realigned_word(tile, j * k, kw * WORD_BITS, length)
        term = _flip(x[i, q], _lut_mask(lut, word, kb, kl), dtype)
        return te.sum(_row_alpha(alphas, j * k, q, length, p) * term, axis=[kw, kb, kl])

    name = "acc" if bias is not None else "out"
    return _with_bias(te.compute(_shape((m, n)), body, name=name), bias)


def _linear_general_in_out_words(
    x, tile, alphas, bias, m: Extent, k: int, n: int, length: int, p: int
) -> te.Tensor:
    """``(in, out)`` weight, ``out % 32 == 0``: ``small[i, ow, ob, ol]`` is column
    ``32 ow + 8 ob + ol``, one realigned word per (stored row, ``ow``)."""
    dtype = x.dtype
    lut = _sign_lut()
    words_per_row = n // WORD_BITS
    kk = te.reduce_axis((_i64(0), _i64(k)), name="k")

    def body(i, ow, ob, ol):
        q = ow * WORD_BITS + ob * 8 + ol
        word = _realigned_word(tile, kk * n, ow * WORD_BITS, length)
        term = _flip(x[i, kk], _lut_mask(lut, word, ob, ol), dtype)
        return te.sum(_row_alpha(alphas, kk * n, q, length, p) * term, axis=kk)

    small = te.compute(_shape((m, words_per_row, 4, 8)), body, name="small")

    def out(i, o):
        r = tirx.floormod(o, WORD_BITS)
        v = small[i, tirx.floordiv(o, WORD_BITS), tirx.floordiv(r, 8), tirx.floormod(r, 8)]
        return _add_bias(v, bias, o)

    return te.compute(_shape((m, n)), out, name="out")


# --------------------------------------------------------------------------- conv


def _as_tuple(v: int | Sequence[int], nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(t) for t in v)
    return v * nd if len(v) == 1 else v


def _pad(x: te.Tensor, padding: tuple[int, ...]) -> te.Tensor:
    """Zero padding of the spatial dims of ``x (n, c, *spatial)`` (identity if no padding)."""
    if not any(padding):
        return x
    dims = [int(d) if i > 0 else d for i, d in enumerate(x.shape)]  # batch may be symbolic
    nd = len(padding)
    out_shape = dims[:2] + [d + 2 * q for d, q in zip(dims[2:], padding, strict=True)]
    zero = tirx.const(0, x.dtype)

    def body(*idx):
        conds = []
        src = list(idx[:2])
        for a in range(nd):
            v, q, d = idx[2 + a], padding[a], dims[2 + a]
            if q:
                conds += [v >= q, v < d + q]
            src.append(v - q)
        return tirx.if_then_else(tirx.all(*conds), x[tuple(src)], zero)

    return te.compute(_shape(out_shape), body, name="xpad")


def tiled_conv_primfunc(
    x_shape: Sequence[Extent],
    weight_shape: tuple[int, ...],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    p: int,
    has_bias: bool,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """Tiled ``conv{n}d`` for any number ``n >= 1`` of spatial dims (same semantics as
    ``F.conv{n}d``).

    Buffers: ``x (batch, c, *spatial) dtype``, ``tile (ceil(L/32),) uint32``,
    ``alphas (p,) dtype``, ``[bias (cout,) dtype]``, ``out (batch, cout, *out_spatial)
    dtype``, with ``weight_shape = (cout, c / groups, *kernel)`` and symmetric integer
    padding. A symbolic ``batch`` gives a kernel for any batch (its own var ``n``).
    """
    nd = len(weight_shape) - 2
    if nd < 1 or len(x_shape) != nd + 2:
        raise ValueError(
            f"conv needs a weight of 3 or more dims and an input of as many, got x "
            f"{x_shape}, weight {weight_shape}"
        )
    stride, padding, dilation = (_as_tuple(v, nd) for v in (stride, padding, dilation))
    cout, cg, *ksize = (int(d) for d in weight_shape)
    batch = _own_extent(x_shape[0], "n")
    cin, *in_sp = (int(d) for d in x_shape[1:])
    if cin != cg * groups or cout % groups:
        raise ValueError(
            f"x channels {cin} do not match weight {weight_shape} with groups={groups}"
        )
    numel = cout * cg
    for d in ksize:
        numel *= d
    length = _check(numel, p)
    out_sp = [
        (in_sp[a] + 2 * padding[a] - dilation[a] * (ksize[a] - 1) - 1) // stride[a] + 1
        for a in range(nd)
    ]
    if any(d <= 0 for d in out_sp):
        raise ValueError(f"conv output would be empty: {out_sp}")
    x, tile, alphas, bias = _inputs((batch, cin, *in_sp), length, p, cout, has_bias, dtype)
    xp = _pad(x, padding)
    geom = _ConvGeom(cg, tuple(ksize), stride, dilation)
    aligned = groups == 1 and is_aligned(numel, p, numel // cout)
    out_shape = [batch, cout, *out_sp]
    if aligned:
        out = _conv_aligned(xp, tile, alphas, bias, geom, out_shape, p)
        kind = "conv_aligned"
    else:
        out = _conv_general(xp, tile, alphas, bias, geom, out_shape, groups, length)
        kind = "conv_general"
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    spec = {
        "op": "conv",
        "weight_shape": [cout, cg, *ksize],
        "stride": list(stride),
        "padding": list(padding),
        "dilation": list(dilation),
        "groups": int(groups),
        "p": int(p),
        "has_bias": bool(has_bias),
        "dtype": dtype,
    }
    return _finish(args, kind, spec)


class _ConvGeom:
    """Filter geometry: channels per group, kernel size, stride, dilation."""

    def __init__(
        self, cg: int, ksize: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
    ) -> None:
        self.cg, self.ksize, self.stride, self.dilation = cg, ksize, stride, dilation

    def reduce_axes(self) -> tuple[tirx.IterVar, list[tirx.IterVar]]:
        rc = te.reduce_axis((_i64(0), _i64(self.cg)), name="rc")
        taps = [te.reduce_axis((_i64(0), _i64(k)), name=f"r{a}") for a, k in enumerate(self.ksize)]
        return rc, taps

    def flat(self, filt, rc, taps) -> tirx.Expr:
        """Flat weight index of ``(filt, rc, *taps)`` in the ``(cout, cg, *k)`` layout."""
        e = filt * self.cg + rc
        for t, k in zip(taps, self.ksize, strict=True):
            e = e * k + t
        return e

    def src(self, sp: Sequence, taps: Sequence) -> list:
        return [
            o * s + t * d for o, t, s, d in zip(sp, taps, self.stride, self.dilation, strict=True)
        ]


def _conv_aligned(
    xp, tile, alphas, bias, geom: _ConvGeom, out_shape: list[Extent], p: int
) -> te.Tensor:
    """``small``: the ``cout/p`` binary filters once; ``out = alpha * small + b``.

    When a filter has a multiple of 8 weights the product is a tiled linear over
    im2col ``patches (n * prod(out_sp), cg * prod(k))`` (table-driven, like
    ``linear_aligned``); otherwise a direct conv ``small (n, cout/p, *out_sp)``.
    """
    dtype = xp.dtype
    filters = out_shape[1] // p
    row = geom.cg
    for k in geom.ksize:
        row *= k
    if row % 8 == 0:
        return _conv_aligned_im2col(xp, tile, alphas, bias, geom, out_shape, filters, row)
    rc, taps = geom.reduce_axes()

    def body(b, f, *sp):
        xv = xp[(b, rc, *geom.src(sp, taps))]
        return te.sum(_flip(xv, _bit_mask(tile, geom.flat(f, rc, taps)), dtype), axis=[rc, *taps])

    small = te.compute(_shape([out_shape[0], filters, *out_shape[2:]]), body, name="small")

    def out(b, co, *sp):
        v = alphas[tirx.floordiv(co, filters)] * small[(b, tirx.floormod(co, filters), *sp)]
        return _add_bias(v, bias, co)

    return te.compute(_shape(out_shape), out, name="out")


def _unflatten(index, dims: Sequence[int]) -> list:
    """Row-major multi-index of a flat ``index`` into ``dims``."""
    idx = []
    for d in reversed(dims[1:]):
        idx.append(tirx.floormod(index, d))
        index = tirx.floordiv(index, d)
    return [index, *reversed(idx)]


def _im2col(xp, geom: _ConvGeom, out_shape: list[Extent], groups: int) -> te.Tensor:
    """``patches (n * prod(out_sp), groups * cg * prod(k))``: row ``i`` is output position
    ``i`` (batch-major), column ``g * R + t`` is tap ``t`` of group ``g`` (``R = cg*prod(k)``)."""
    out_sp = out_shape[2:]
    positions = out_shape[0]
    for d in out_sp:
        positions *= d

    def patch(i, t):
        b, *sp = _unflatten(i, [out_shape[0], *out_sp])
        c, *taps = _unflatten(t, [groups * geom.cg, *geom.ksize])
        return xp[(b, c, *geom.src(sp, taps))]

    cols = groups * geom.cg
    for k in geom.ksize:
        cols *= k
    return te.compute(
        _shape((positions, cols)),
        patch,
        name="patches",
        attrs={"tbn_row_dims": [groups * geom.cg, *geom.ksize]},
    )


def _positions_to_nchw(small: te.Tensor, out_shape: list[Extent], value) -> te.Tensor:
    """``out (n, cout, *sp)`` from ``small (positions, ...)`` via ``value(small, i, co)``."""
    out_sp = out_shape[2:]

    def out(b, co, *sp):
        i = b
        for v, d in zip(sp, out_sp, strict=True):
            i = i * d + v
        return value(small, i, co)

    return te.compute(_shape(out_shape), out, name="out")


def _lut_axes(words: int) -> tuple[tirx.IterVar, tirx.IterVar, tirx.IterVar]:
    return (
        te.reduce_axis((_i64(0), _i64(words)), name="kw"),
        te.reduce_axis((_i64(0), _i64(4)), name="kb"),
        te.reduce_axis((_i64(0), _i64(8)), name="kl"),
    )


def _conv_aligned_im2col(
    xp, tile, alphas, bias, geom: _ConvGeom, out_shape: list[Extent], filters: int, row: int
) -> te.Tensor:
    dtype = xp.dtype
    patches = _im2col(xp, geom, out_shape, 1)
    table = _RowTable(row)

    def body(i, f):
        xv = patches[i, table.q]
        return te.sum(_flip(xv, table.mask(tile, f), dtype), axis=table.axes)

    small = te.compute(_shape((patches.shape[0], filters)), body, name="small")

    def value(sm, i, co):
        v = alphas[tirx.floordiv(co, filters)] * sm[i, tirx.floormod(co, filters)]
        return _add_bias(v, bias, co)

    return _positions_to_nchw(small, out_shape, value)


def _conv_general_im2col(
    xp,
    tile,
    alphas,
    bias,
    geom: _ConvGeom,
    out_shape: list[Extent],
    groups: int,
    row: int,
    length: int,
    p: int,
) -> te.Tensor:
    """General conv with ``row % 32 == 0`` and ``L >= row``: realigned words over im2col."""
    dtype = xp.dtype
    patches = _im2col(xp, geom, out_shape, groups)
    lut = _sign_lut()
    per_group = out_shape[1] // groups
    kw, kb, kl = _lut_axes(row // WORD_BITS)

    def body(i, co):
        q = kw * WORD_BITS + kb * 8 + kl
        word = _realigned_word(tile, co * row, kw * WORD_BITS, length)
        xv = patches[i, tirx.floordiv(co, per_group) * row + q]
        term = _flip(xv, _lut_mask(lut, word, kb, kl), dtype)
        return te.sum(_row_alpha(alphas, co * row, q, length, p) * term, axis=[kw, kb, kl])

    small = te.compute(_shape((patches.shape[0], out_shape[1])), body, name="small")
    return _positions_to_nchw(small, out_shape, lambda sm, i, co: _add_bias(sm[i, co], bias, co))


def _conv_general(
    xp, tile, alphas, bias, geom: _ConvGeom, out_shape: list[Extent], groups: int, length: int
) -> te.Tensor:
    """Modulo-indexed conv (grouped or unaligned)."""
    dtype = xp.dtype
    per_group = out_shape[1] // groups
    row_len = geom.cg
    for k in geom.ksize:
        row_len *= k
    p = out_shape[1] * row_len // length
    if row_len % WORD_BITS == 0 and length >= max(row_len, WORD_BITS):
        return _conv_general_im2col(
            xp, tile, alphas, bias, geom, out_shape, groups, row_len, length, p
        )
    rc, taps = geom.reduce_axes()

    def body(b, co, *sp):
        alpha, mask = _general_weight(
            tile, alphas, co * row_len, geom.flat(0, rc, taps), length, row_len, p
        )
        ch = tirx.floordiv(co, per_group) * geom.cg + rc
        xv = xp[(b, ch, *geom.src(sp, taps))]
        return te.sum(alpha * _flip(xv, mask, dtype), axis=[rc, *taps])

    if bias is None:
        return te.compute(_shape(out_shape), body, name="out")
    acc = te.compute(_shape(out_shape), body, name="acc")
    return te.compute(
        _shape(out_shape), lambda b, co, *sp: acc[(b, co, *sp)] + bias[co], name="out"
    )


# --------------------------------------------------------------------------- panel form


PANEL_KINDS = ("linear_aligned", "conv_aligned")
"""Kinds that have a *panel* form (:func:`panel_primfunc`)."""


def _sign_value(tile: te.Tensor, flat, dtype: str) -> tirx.Expr:
    """``+1`` or ``-1`` in ``dtype``: tile element ``flat`` as a number."""
    return _flip(tirx.const(1.0, dtype), _bit_mask(tile, flat), dtype)


def panel_primfunc(func: tirx.PrimFunc, row_block: int = 0) -> tirx.PrimFunc | None:
    """``func`` (a kernel built here) in *panel* form, or None when its kind has none
    (:data:`PANEL_KINDS`) or it carries no :data:`SPEC_ATTR`.

    Same buffers, same kind, same results up to the order of the sums; the batch extent
    is ``func``'s (the first dim of ``x``; a symbolic one becomes the new kernel's own
    var). The tile rows are first unpacked into a block ``panel`` of ``+-1`` numbers,
    stored reduction-major with the tile rows innermost (``(in, rows)`` for a linear,
    ``(cg, *kernel, filters)`` for a conv), then the product ``small`` multiplies and
    adds them (``x * +-1`` is exact: the sums are those of the sign flips, as fused
    multiply-adds): tile rows are contiguous, so a vector of them takes one broadcast
    input value, and a conv reads its (padded) input directly, without im2col rows.
    ``small`` is ``(m, rows)`` for a linear, ``(n, *out_spatial, filters)`` (channels
    last) for a conv; block ``out`` scales, adds the bias and, for a conv, goes back to
    channels first. Unpacking costs one step per tile weight: the form pays for itself
    when many rows (input rows, output positions) share the panel. ``row_block``: a
    linear's input rows are computed in whole blocks of that many (default
    :data:`PANEL_ROW_BLOCK`)."""
    kind = kernel_kind(func)
    spec = kernel_spec(func, *PANEL_KINDS)
    if spec is None:
        return None
    x_shape = list(func.params[0].shape)
    batch = x_shape[0] if not isinstance(x_shape[0], tirx.IntImm) else int(x_shape[0])
    if kind == "linear_aligned":
        return _linear_panel(batch, spec, row_block or PANEL_ROW_BLOCK)
    return _conv_panel([batch, *(int(d) for d in x_shape[1:])], spec)


PANEL_ROW_BLOCK = 16
"""A linear's panel form computes its input rows in whole blocks of this many by default
(``row_block`` of :func:`panel_primfunc`; rows past the input repeat its last row, never
written out): register blocks of rows and input-row tasks then always divide them
(ViT's 197 tokens ran one row at a time)."""

PANEL_TILE_ROWS = 16
"""A linear's panel form with more tile rows than this computes them in whole multiples
of it (pad rows repeat the last tile row, never written out): whole AVX-512 vectors."""


def padded_tile_rows(rows: int) -> int:
    """Tile rows a linear's panel form computes for ``rows`` (:data:`PANEL_TILE_ROWS`)."""
    return _round_up(rows, PANEL_TILE_ROWS) if rows > PANEL_TILE_ROWS else rows


def _round_up(v: Extent, block: int) -> Extent:
    """``v`` rounded up to a multiple of ``block`` (an expression when symbolic)."""
    if is_static(v):
        return -(-int(v) // block) * block
    return tirx.floordiv(v + block - 1, block) * block


def _linear_panel(m: Extent, spec: dict, row_block: int) -> tirx.PrimFunc:
    """Panel form of ``linear_aligned`` (see :func:`panel_primfunc`): ``small`` is
    ``(m, rows)`` rounded up to ``row_block`` input rows and (past 16 tile
    rows) :data:`PANEL_TILE_ROWS` tile rows. With whole-word tile rows the tile words
    are first copied tile-row innermost (block ``words``), so a vector of tile rows
    unpacks from one vector of words (a shift and a sign flip per 16 weights)."""
    m = _own_extent(m, "m")
    k, n, p = int(spec["in_features"]), int(spec["out_features"]), int(spec["p"])
    dtype, has_bias = str(spec["dtype"]), bool(spec["has_bias"])
    rows = n // p
    x, tile, alphas, bias = _inputs((m, k), k * rows, p, n, has_bias, dtype)
    m_pad = _round_up(m, row_block)
    rows_pad = padded_tile_rows(rows)
    panel = _linear_panel_signs(tile, k, rows, rows_pad, dtype)
    whole = is_static(m) and m == m_pad

    def row(i):  # rows past the input repeat its last one (never written out)
        return i if whole else tirx.min(i, m - 1)

    kk = te.reduce_axis((_i64(0), _i64(k)), name="k")
    small = te.compute(
        _shape((m_pad, rows_pad)),
        lambda i, r: te.sum(x[row(i), kk] * panel[kk, r], axis=kk),
        name="small",
    )
    out = _scaled_copies(small, alphas, bias, m, n, rows)
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    return _finish(args, "linear_aligned", spec).with_attr(FORM_ATTR, "panel")


def _linear_panel_signs(tile: te.Tensor, k: int, rows: int, rows_pad: int, dtype: str):
    """``panel (k, rows_pad)``: tile row ``r`` (``min(r, rows - 1)`` past the tile) as
    ``+-1`` numbers, one column per tile row."""
    last = tirx.const(rows - 1, "int64")
    if k % WORD_BITS:
        return te.compute(
            _shape((k, rows_pad)),
            lambda q, r: _sign_value(tile, tirx.min(r, last) * k + q, dtype),
            name="panel",
        )
    kw = k // WORD_BITS
    words = te.compute(
        _shape((kw, rows_pad)), lambda w, r: tile[tirx.min(r, last) * kw + w], name="words"
    )

    def sign(q, r):
        bit = tirx.floormod(q, WORD_BITS).astype("uint32")
        mask = (((words[tirx.floordiv(q, WORD_BITS), r] >> bit) & _u32(1)) ^ _u32(1)) << _u32(31)
        return _flip(tirx.const(1.0, dtype), mask, dtype)

    return te.compute(_shape((k, rows_pad)), sign, name="panel")


def words_primfunc(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` (a ``linear_aligned`` kernel built here, ``in % 32 == 0``) in *words*
    form, or None for any other kernel (or one without :data:`SPEC_ATTR`).

    Same buffers, kind and results (the same signed sums, in another order): the
    reduction is split ``(word, bit)`` with ``small[i, r] = sum select(bit, x, -x)``, so
    that a vector of bits of one tile word becomes a vector of lanes by a compare with
    per-lane bit masks, and ``-x`` is shared by every tile row (a blend per weight, no
    table). Meant for few rows (batch 1 matrix-vector products). Attribute
    :data:`FORM_ATTR` ``"words"``."""
    spec = kernel_spec(func, "linear_aligned")
    if spec is None:
        return None
    k, n, p = int(spec["in_features"]), int(spec["out_features"]), int(spec["p"])
    if k % WORD_BITS:
        return None
    dtype, has_bias = str(spec["dtype"]), bool(spec["has_bias"])
    m = func.params[0].shape[0]
    m = _own_extent(m if not isinstance(m, tirx.IntImm) else int(m), "m")
    rows, words = n // p, k // WORD_BITS
    x, tile, alphas, bias = _inputs((m, k), k * rows, p, n, has_bias, dtype)
    kw = te.reduce_axis((_i64(0), _i64(words)), name="kw")
    kl = te.reduce_axis((_i64(0), _i64(WORD_BITS)), name="kl")

    def body(i, r):
        word = tile[r * words + kw]
        bit = (word >> kl.var.astype("uint32")) & _u32(1)
        xv = x[i, kw * WORD_BITS + kl]
        return te.sum(tirx.Select(bit == _u32(1), xv, -xv), axis=[kw, kl])

    small = te.compute(_shape((m, rows)), body, name="small")
    out = _scaled_copies(small, alphas, bias, m, n, rows)
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [out]
    return _finish(args, "linear_aligned", spec).with_attr(FORM_ATTR, "words")


def _conv_panel(x_shape: list[Extent], spec: dict) -> tirx.PrimFunc:
    """Panel form of ``conv_aligned`` (see :func:`panel_primfunc`)."""
    cout, cg, *ksize = (int(d) for d in spec["weight_shape"])
    stride, padding, dilation = (
        tuple(int(v) for v in spec[a]) for a in ("stride", "padding", "dilation")
    )
    p, dtype, has_bias = int(spec["p"]), str(spec["dtype"]), bool(spec["has_bias"])
    nd = len(ksize)
    batch = _own_extent(x_shape[0], "n")
    in_sp = [int(d) for d in x_shape[2:]]
    out_sp = [
        (in_sp[a] + 2 * padding[a] - dilation[a] * (ksize[a] - 1) - 1) // stride[a] + 1
        for a in range(nd)
    ]
    filters = cout // p
    x, tile, alphas, bias = _inputs(
        (batch, cg, *in_sp), filters * cg * math.prod(ksize), p, cout, has_bias, dtype
    )
    xp = _pad(x, padding)
    geom = _ConvGeom(cg, tuple(ksize), stride, dilation)

    def unpack(c, *rest):
        *taps, f = rest
        return _sign_value(tile, geom.flat(f, c, taps), dtype)

    panel = te.compute(_shape([cg, *ksize, filters]), unpack, name="panel")
    rc, taps = geom.reduce_axes()

    def body(b, *rest):
        *sp, f = rest
        xv = xp[(b, rc, *geom.src(sp, taps))]
        return te.sum(xv * panel[(rc, *taps, f)], axis=[rc, *taps])

    small = te.compute(_shape([batch, *out_sp, filters]), body, name="small")

    def out(b, co, *sp):
        v = alphas[tirx.floordiv(co, filters)] * small[(b, *sp, tirx.floormod(co, filters))]
        return _add_bias(v, bias, co)

    result = te.compute(_shape([batch, cout, *out_sp]), out, name="out")
    args = [x, tile, alphas] + ([bias] if bias is not None else []) + [result]
    return _finish(args, "conv_aligned", spec).with_attr(FORM_ATTR, "panel")


# --------------------------------------------------------------------------- checked indexing


@dataclass(frozen=True)
class IdTensor:
    """An integer id tensor that picks positions along one data dim of :class:`IndexMap`.

    ``shape`` / ``dtype``: its buffer. ``axes[k]``: the source axis id dim ``k`` runs
    along; an id dim of size 1 is broadcast (always read at 0). Valid ids are
    ``[0, size)``, or ``[-size, size)`` with ``wrap`` (``-1`` is the last position, as
    in torch indexing). A bad id fails an assert of error kind ``error`` (the Python
    exception host targets raise) with text ``message``. ``shape`` and ``size`` may be
    symbolic (the batch)."""

    shape: tuple[Extent, ...]
    dtype: str
    axes: tuple[int, ...]
    size: Extent
    wrap: bool
    message: str
    error: str = "IndexError"

    @property
    def low(self) -> Extent:
        """The smallest valid id."""
        return -self.size if self.wrap else 0


@dataclass(frozen=True)
class IndexMap:
    """Where each element of a *source* space sits in a *data* tensor: its coordinate along
    data dim ``d`` is source axis ``dims[d]`` (an int) or the id tensor ``dims[d]`` read at
    that source element. A gather reads data at those places into a source-shaped output;
    a scatter writes source-shaped values there. A source axis named by no data dim is
    *free* (a scatter loops over it in order). Tied axes are no longer than their data dim.
    Extents may be symbolic (the batch; checked where static)."""

    data: tuple[Extent, ...]
    source: tuple[Extent, ...]
    dims: tuple[int | IdTensor, ...]

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(
                f"bad index map (data {self.data}, source {self.source}): {'; '.join(problems)}"
            )

    def _problems(self) -> list[str]:
        static = [int(d) for d in (*self.data, *self.source) if is_static(d)]
        if not self.data or not self.source or min(static, default=1) < 1:
            return ["empty shapes (kernels need at least one axis and one element)"]
        if len(self.dims) != len(self.data):
            return [f"{len(self.dims)} dims for data of rank {len(self.data)}"]
        rank = len(self.source)
        problems = [
            f"source axis {a} tied to data dim {d}"
            for d, a in enumerate(self.dims)
            if isinstance(a, int) and not (0 <= a < rank and _fits(self.source[a], self.data[d]))
        ]
        for t in self.ids:
            along = zip(t.shape, t.axes, strict=False)
            if len(t.axes) != len(t.shape) or any(
                not _is_one(n) and not (0 <= a < rank and _same(self.source[a], n))
                for n, a in along
            ):
                problems.append(f"ids of shape {t.shape} along source axes {t.axes}")
        return problems

    @property
    def ids(self) -> list[IdTensor]:
        """The id tensors, in data-dim order (the order of their kernel buffers)."""
        return [t for t in self.dims if isinstance(t, IdTensor)]

    @property
    def indexed_dims(self) -> list[int]:
        """The data dims id tensors index, in order."""
        return [d for d, t in enumerate(self.dims) if isinstance(t, IdTensor)]

    @property
    def free_axes(self) -> list[int]:
        """Source axes no data dim is tied to."""
        tied = {a for a in self.dims if isinstance(a, int)}
        return [a for a in range(len(self.source)) if a not in tied]

    def with_own_extents(self) -> IndexMap:
        """This map with every symbolic extent replaced by a kernel var of its own
        (``n0``, ``n1``, ...; one per distinct expression, so equal extents stay equal)."""
        own: list[tuple[tirx.Expr, tirx.Var]] = []

        def extent(v: Extent) -> Extent:
            if is_static(v):
                return int(v)
            for expr, var in own:
                if tvm_ffi.structural_equal(expr, v):
                    return var
            own.append((v, tirx.Var(f"n{len(own)}", "int64")))
            return own[-1][1]

        dims = tuple(
            d
            if isinstance(d, int)
            else dataclasses.replace(
                d, shape=tuple(extent(n) for n in d.shape), size=extent(d.size)
            )
            for d in self.dims
        )
        data, source = tuple(extent(d) for d in self.data), tuple(extent(d) for d in self.source)
        return self if not own else IndexMap(data, source, dims)


def _fits(length: Extent, within: Extent) -> bool:
    """False only when both extents are static and ``length`` exceeds ``within``."""
    return not (is_static(length) and is_static(within)) or int(length) <= int(within)


def _shorter(length: Extent, than: Extent) -> bool:
    """True unless ``length`` is known not to be shorter than ``than`` (equal, or static
    and not less): where True, a kernel guards the difference."""
    if is_static(length) and is_static(than):
        return int(length) < int(than)
    return not _same(length, than)


def _read_ids(
    bufs: Sequence[tirx.Buffer], index: IndexMap, s: Sequence[tirx.Expr]
) -> list[tuple[tirx.Expr, IdTensor]]:
    """``(id as int64, id tensor)`` of every id tensor at source element ``s`` (size-1
    id dims broadcast)."""
    found = []
    for buf, t in zip(bufs, index.ids, strict=True):
        at = tuple(_i64(0) if _is_one(n) else s[a] for n, a in zip(t.shape, t.axes, strict=True))
        found.append((buf[at].astype("int64"), t))
    return found


def _valid_id(i: tirx.Expr, t: IdTensor) -> tirx.Expr:
    return tirx.all(_dim(t.low) <= i, i < _dim(t.size))


def _position(i: tirx.Expr, t: IdTensor) -> tirx.Expr:
    """Position ``i`` names (negative ids counted from the end with ``wrap``); bad ids give
    a value outside ``[0, size)``."""
    return tirx.Select(i < _i64(0), i + _dim(t.size), i) if t.wrap else i


def _clamped(i: tirx.Expr, t: IdTensor) -> tirx.Expr:
    """Position of ``i`` clamped into ``[0, size)``: a read there never leaves the data. The
    clamp is outside any select on the range test, so the simplifier cannot drop it."""
    return tirx.max(tirx.min(_position(i, t), _dim(t.size) - _i64(1)), _i64(0))


def _asserts(checks: Sequence[tuple[tirx.Expr, IdTensor]]) -> contextlib.ExitStack:
    """One ``T.Assert`` frame per ``(id, id tensor)``: entered, they check every id."""
    stack = contextlib.ExitStack()
    for i, t in checks:
        stack.enter_context(IRT.Assert(_valid_id(i, t), [t.message], t.error))
    return stack


def _block_vars(loops: object, kinds: str) -> list[tirx.Var]:
    """Block vars bound to ``loops`` (``kinds``: one ``S``/``R`` per loop), as a list."""
    found = IRT.axis.remap(kinds, [loops] if isinstance(loops, tirx.Var) else list(loops))
    return [found] if isinstance(found, tirx.Var) else list(found)


def _kernel_args(
    index: IndexMap, dtype: str, values: bool
) -> tuple[tirx.Buffer, list[tirx.Buffer], tirx.Buffer | None, tirx.Buffer]:
    """Declare the buffers ``data, ids..., [values], out`` of a checked indexing kernel."""
    data = IRT.arg("data", IRT.buffer(_shape(index.data), dtype))
    ids = [
        IRT.arg(f"ids{k}", IRT.buffer(_shape(t.shape), t.dtype)) for k, t in enumerate(index.ids)
    ]
    vals = IRT.arg("values", IRT.buffer(_shape(index.source), dtype)) if values else None
    out_shape = index.data if values else index.source
    return data, ids, vals, IRT.arg("out", IRT.buffer(_shape(out_shape), dtype))


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def gather_primfunc(index: IndexMap, dtype: str) -> tirx.PrimFunc:
    """Checked gather: ``out[s] = data[where s sits]`` for every source element ``s``
    (``embedding``, ``index_select``, ``x[ids]``, ``x[i, j]``, ``torch.gather``).

    Buffers: ``data (index.data) dtype``, one per id tensor (:attr:`IndexMap.ids` order),
    ``out (index.source) dtype``. Each element first asserts its ids are valid (host
    targets raise the id tensor's error). The read itself never leaves ``data`` whatever
    the ids: it uses the positions clamped into range, and for float data an element
    with a bad id is NaN (``value + NaN``; ``+ 0.0`` otherwise), so code built without
    asserts (CUDA kernels, bare-metal C) yields visibly invalid values instead of
    reading out of bounds. Kind ``gather``; a single block ``gather``.
    """
    index = index.with_own_extents()
    with IRBuilder() as builder, IRT.prim_func(is_private=True, s_tir=True):
        data, bufs, _, out = _kernel_args(index, dtype, values=False)
        with IRT.grid(*_shape(index.source)) as loops, IRT.sblock("gather"):
            s = _block_vars(loops, "S" * len(index.source))
            checks = _read_ids(bufs, index, s)
            pos = iter(_clamped(i, t) for i, t in checks)
            value = data[tuple(s[d] if isinstance(d, int) else next(pos) for d in index.dims)]
            if _is_float(dtype):
                ok = tirx.all(*(_valid_id(i, t) for i, t in checks))
                value = value + tirx.Select(ok, tirx.const(0.0, dtype), tirx.const(math.nan, dtype))
            with _asserts(checks):
                IRT.buffer_store(out, value, s)
    return builder.get().with_attr(KERNEL_ATTR, "gather")


def scatter_primfunc(index: IndexMap, dtype: str, accumulate: bool) -> tirx.PrimFunc:
    """Checked scatter: ``out`` is ``data`` with ``values[s]`` written (``accumulate``:
    added) where each source element ``s`` sits (``scatter``, ``index_put``,
    ``index_add``, ``index_copy``, ``index_fill``, ``x[ids] = v``). Where several
    elements sit at one place, the last in row-major order of the free source axes wins
    (torch on CPU); with ``accumulate`` all of them add up, in that order.

    Buffers: ``data (index.data)``, one per id tensor, ``values (index.source)``, ``out
    (index.data)``, all ``dtype`` but the ids. One block ``gather`` per *column* (a
    point of the tied data dims; a unit axis when every dim is indexed) owns that column
    of ``out``: it copies it from ``data``, then, in order over the free source axes,
    writes the column's source elements (``numel(data) + numel(source)`` steps). Each
    element asserts its ids are valid (host targets raise the id tensor's error) and
    writes only when they are, at its position clamped into range: without asserts a bad
    id's value is dropped, and no write ever leaves ``out``. Columns never share a
    write, so any schedule of the block's spatial axes (one column per thread on CUDA)
    is exact. Kind ``gather``.
    """
    if accumulate and dtype == "bool":
        raise ValueError("an accumulating scatter needs numbers, got bool")
    index = index.with_own_extents()
    tied = [d for d, a in enumerate(index.dims) if isinstance(a, int)]
    with IRBuilder() as builder, IRT.prim_func(is_private=True, s_tir=True):
        data, bufs, values, out = _kernel_args(index, dtype, values=True)
        extents = [index.data[d] for d in tied] or [1]
        with IRT.grid(*_shape(extents)) as loops, IRT.sblock("gather"):
            # (the unit axis of an all-indexed scatter names no column)
            column = dict(zip(tied, _block_vars(loops, "S" * len(extents)), strict=False))
            whole = tuple(column.get(d, slice(0, n)) for d, n in enumerate(index.data))
            IRT.reads(
                data[whole], *(b[tuple(slice(0, n) for n in b.shape)] for b in [*bufs, values])
            )
            IRT.writes(out[whole])
            with _serial(index.data[d] for d in index.indexed_dims) as rows:
                at = _fill(index.data, column, dict(zip(index.indexed_dims, rows, strict=True)))
                IRT.buffer_store(out, data[at], at)
            _scatter_column(index, column, bufs, values, out, accumulate)
    return builder.get().with_attr(KERNEL_ATTR, "gather")


@contextlib.contextmanager
def _serial(extents: Iterable[Extent]) -> Iterator[list[tirx.Var]]:
    """Nested serial loops over ``extents`` (none for no extents); yields their vars."""
    extents = list(extents)
    if not extents:
        yield []
        return
    with IRT.grid(*_shape(extents)) as loops:
        yield [loops] if isinstance(loops, tirx.Var) else list(loops)


def _fill(shape: Sequence[Extent], *coords: dict[int, tirx.Expr]) -> tuple[tirx.Expr, ...]:
    """An index into a tensor of rank ``len(shape)`` from per-dim coordinate maps."""
    merged = {d: v for c in coords for d, v in c.items()}
    return tuple(merged[d] for d in range(len(shape)))


def _scatter_column(
    index: IndexMap,
    column: dict[int, tirx.Var],
    bufs: Sequence[tirx.Buffer],
    values: tirx.Buffer,
    out: tirx.Buffer,
    accumulate: bool,
) -> None:
    """Write the source elements of ``column`` (tied data dim -> coordinate) in order
    over the free source axes; nothing when the column lies beyond a tied source axis."""
    inside = [
        v < _dim(index.source[index.dims[d]])
        for d, v in column.items()
        if _shorter(index.source[index.dims[d]], index.data[d])
    ]
    with contextlib.ExitStack() as stack:
        if inside:
            stack.enter_context(IRT.If(tirx.all(*inside)))
            stack.enter_context(IRT.Then())
        free = index.free_axes
        with _serial(index.source[a] for a in free) as loops:
            s: list[tirx.Expr] = [_i64(0)] * len(index.source)
            for d, v in column.items():  # clamped too: values and ids never read outside
                s[index.dims[d]] = tirx.min(v, _dim(index.source[index.dims[d]]) - _i64(1))
            for a, v in zip(free, loops, strict=True):
                s[a] = v
            checks = _read_ids(bufs, index, s)
            places = dict(zip(index.indexed_dims, (_clamped(i, t) for i, t in checks), strict=True))
            at = _fill(index.data, column, places)
            value = values[tuple(s)]
            ok = tirx.all(*(_valid_id(i, t) for i, t in checks))
            with _asserts(checks), IRT.If(ok), IRT.Then():
                IRT.buffer_store(out, out[at] + value if accumulate else value, at)


# --------------------------------------------------------------------------- NaN-keeping ops


def clamp_te(x: te.Tensor, low: float | None, high: float | None) -> te.Tensor:
    """``torch.clamp(x, low, high)`` elementwise (``None``: unbounded side), NaN kept:
    ``v < low ? low : v`` then ``v > high ? high : v`` (comparisons with NaN are false;
    TVM's ``max``/``min`` compile to selects that drop it)."""

    def value(*i: tirx.Expr) -> tirx.Expr:
        v = x[i]
        if low is not None:
            lo = tirx.const(low, x.dtype)
            v = tirx.Select(v < lo, lo, v)
        if high is not None:
            hi = tirx.const(high, x.dtype)
            v = tirx.Select(v > hi, hi, v)
        return v

    return te.compute(x.shape, value, name="clamp")


def pool_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """Output length of a pooling window walk, as torch computes it."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _nan_max(acc: tirx.Expr, v: tirx.Expr) -> tirx.Expr:
    """Max that keeps a NaN of either side (commutative, associative)."""
    return tirx.Select(tirx.Or(acc > v, tirx.isnan(acc)), acc, v)


def max_pool_te(
    x: te.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
) -> te.Tensor:
    """``max_pool{1,2,3}d`` over the last ``len(kernel)`` dims of ``x`` (any leading
    dims), torch's semantics: ``-inf`` padding, ``ceil_mode`` windows, and a window
    holding a NaN gives NaN. Stage ``pad`` (the padded input) then reduction ``pool``."""
    nd = len(kernel)
    lead = list(x.shape[: len(x.shape) - nd])  # the batch may be symbolic
    size = [int(d) for d in x.shape[len(x.shape) - nd :]]
    out = [
        pool_output_size(size[a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode)
        for a in range(nd)
    ]
    if any(d <= 0 for d in out):
        raise ValueError(f"max pooling output would be empty: {out}")
    # right padding also covers the windows that ceil_mode adds
    padded = [
        max(size[a] + 2 * padding[a], (out[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1)
        for a in range(nd)
    ]
    low = tirx.const(-math.inf, x.dtype)

    def pad(*idx: tirx.Expr) -> tirx.Expr:
        src = [v - padding[a] for a, v in enumerate(idx[len(lead) :])]
        inside = tirx.all(*[tirx.all(v >= 0, v < size[a]) for a, v in enumerate(src)])
        return tirx.if_then_else(inside, x[(*idx[: len(lead)], *src)], low)

    xp = te.compute(_shape(lead + padded), pad, name="pad")
    reducer = te.comm_reducer(_nan_max, lambda dtype: tirx.const(-math.inf, dtype), "nan_max")
    taps = [te.reduce_axis((_i64(0), _i64(k)), name=f"k{a}") for a, k in enumerate(kernel)]

    def window(*idx: tirx.Expr) -> tirx.Expr:
        pos = [o * stride[a] + taps[a] * dilation[a] for a, o in enumerate(idx[len(lead) :])]
        return reducer(xp[(*idx[: len(lead)], *pos)], axis=taps)

    return te.compute(_shape(lead + out), window, name="pool")
