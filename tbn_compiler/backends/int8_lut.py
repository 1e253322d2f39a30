"""Table-lookup form of int8 linears at a batch of a few rows (``precision="int8"``, AVX-512BW).

The result is bit for bit the one of the other int8 forms (:mod:`.int8_kernels`): the
same int8 rows ``q``, the same exact int32 product ``q_i . s_r``, the same rescaling.
Only the way the product is summed differs (T-MAC's method, exact here):

* **Tables.** For every group ``g`` of :data:`GROUP` inputs, the 16 signed sums
  ``t[g, v] = sum_j (q[4g + j] if bit j of v else -q[4g + j])`` (int16, ``|t| <= 508``)
  are computed once per input row and stored as two byte tables, low bytes ``tl`` and
  high bytes ``th`` (16 bytes per group, groups in order).
* **Lookups.** The product of tile row ``r`` is ``sum_g t[g, nibble(r, g)]``, with
  ``nibble(r, g)`` the 4 tile bits of row ``r`` at inputs ``4g .. 4g + 3``. ``vpshufb``
  looks up 16 bytes of one table per 128-bit lane, so one 512-bit lookup serves 16 tile
  rows x 4 groups; the low and high bytes are interleaved back into int16 (``vpunpck``)
  and summed in int16, flushed to int32 every :data:`FLUSH_UNITS` units at most (``32 x 2
  x 508 < 2^15``: nothing overflows).

Tile layout (:func:`lut_tile_words`): the tile words are re-laid out at build time, same
bytes: for each block ``rb`` of :data:`ROW_BLOCK` tile rows and each unit ``u`` of
:data:`UNIT_INPUTS` inputs (8 groups), 64 bytes in which byte ``16 L + b`` (lane ``L`` in
0..3) holds in its low nibble ``nibble(16 rb + b, 8u + L)`` and in its high nibble
``nibble(16 rb + b, 8u + 4 + L)``. :func:`relayout_lut_tiles` rewrites the calls of
int8 kernels to that layout (same bytes: the module holds only this copy) and gives
them the kernel of :func:`int8_lut_primfunc` (scheduled as built: explicit vectors, one
parallel loop; a symbolic batch is a loop over rows) at a static batch, or for a
symbolic batch one function running it below :data:`LUT_MAX_ROWS` rows and, from
there, the tile restored to words in a workspace (:func:`restore_columns_primfunc`,
parallel) for the panel form.

Applies (:func:`lut_applies`) to a ``linear_aligned`` kernel asked for int8, with a
symbolic batch or a static one below :data:`LUT_MAX_ROWS`, ``in % 32 == 0`` and tile
rows a multiple of 16, on a CPU with AVX-512BW. Linear 4096x4096 p=8 at batch 1 on Zen
4, the kernel alone: 8-9 us on two threads (13.5 on one) against 22 for the bits form.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T
from tvm.target import Target

from ..tiling import n_words
from .int8_kernels import PRECISION_ATTR, int8_applies, quantized_value
from .kernels import FORM_ATTR, kernel_spec

__all__ = [
    "BLOCKS_PER_TASK",
    "FLUSH_UNITS",
    "GROUP",
    "INT8_LUT_FORM",
    "LUT_MAX_ROWS",
    "MAX_TILE_BYTES",
    "ROW_BLOCK",
    "TASK_UNITS",
    "UNIT_INPUTS",
    "int8_lut_primfunc",
    "lut_applies",
    "lut_tile_words",
    "relayout_lut_tiles",
    "restore_columns_primfunc",
]

INT8_LUT_FORM = "int8-lut"
""":data:`.kernels.FORM_ATTR` of a kernel built by :func:`int8_lut_primfunc`."""

GROUP = 4
"""Inputs per table (16 entries: every sign pattern)."""

ROW_BLOCK = 16
"""Tile rows per 512-bit lookup (the bytes of one 128-bit lane)."""

UNIT_INPUTS = 2 * 4 * GROUP
"""Inputs per 64 bytes of the layout: two nibbles x 4 lanes x one group each."""

FLUSH_UNITS = 32
"""Units summed in int16 before a flush to int32: each adds at most ``2 x 508`` per lane."""

LUT_MAX_ROWS = 32
"""Input rows below which an int8 linear runs in this form, in place of the bits form
(the panel form takes over from there). Each row costs its own tables and lookups;
Linear 4096x4096 p=8 on Zen 4, two threads, a call: 0.013 ms at 1 row (bits form
0.018), 0.107 at 15 (0.130), 0.212 at 31 (0.257)."""

BLOCKS_PER_TASK = 8
"""Row blocks per register block at most (2 int16 accumulators each: 16 of the 32
vector registers)."""

TASK_UNITS = 32
"""Units per parallel task at least (the tasks split the inputs)."""

MAX_TILE_BYTES = 1 << 31
"""Tiles from this size on keep the other forms: the kernel indexes tile bytes in int32."""

_PSHUFB = "llvm.x86.avx512.pshuf.b.512"


def lut_applies(func: tirx.PrimFunc, target: Target | None) -> bool:
    """True for a ``linear_aligned`` kernel marked int8 that the int8 forms take
    (:func:`.int8_kernels.int8_applies`), with a symbolic batch or a static one below
    :data:`LUT_MAX_ROWS`, tile rows a multiple of :data:`ROW_BLOCK` and a tile under
    :data:`MAX_TILE_BYTES`, for an LLVM target with AVX-512BW."""
    if target is None or target.kind.name != "llvm":
        return False
    attrs = func.attrs
    if attrs is None or str(attrs.get(PRECISION_ATTR, "")) != "int8" or not int8_applies(func):
        return False
    batch = func.params[0].shape[0]
    if isinstance(batch, tirx.IntImm) and not 0 < int(batch) < LUT_MAX_ROWS:
        return False
    spec = kernel_spec(func)
    rows = int(spec["out_features"]) // int(spec["p"])
    if rows % ROW_BLOCK or rows * int(spec["in_features"]) // 8 >= MAX_TILE_BYTES:
        return False
    return tvm.target.codegen.target_has_features("avx512bw", target)


def lut_tile_words(words: np.ndarray, rows: int, k: int) -> np.ndarray:
    """The packed tile ``words`` (uint32, ``rows x k`` bits row-major, bit ``j`` of word
    ``w`` = element ``32 w + j``) in the LUT layout of the module docstring: a uint32
    array of the same length (little-endian bytes)."""
    if rows % ROW_BLOCK or k % UNIT_INPUTS:
        raise ValueError(
            f"LUT layout needs tile rows % {ROW_BLOCK} == 0 and inputs % {UNIT_INPUTS} == 0, "
            f"got {rows} x {k}"
        )
    words = np.ascontiguousarray(words, dtype="<u4")
    if words.size != n_words(rows * k):
        raise ValueError(f"tile of {words.size} words, expected {n_words(rows * k)}")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: rows * k]
    nibbles = bits.reshape(rows, k // GROUP, GROUP) @ (1 << np.arange(GROUP))
    # (row block, row in block, unit, nibble half, lane) -> (row block, unit, lane, row)
    nibbles = nibbles.reshape(rows // ROW_BLOCK, ROW_BLOCK, k // UNIT_INPUTS, 2, 4)
    byte = (nibbles[:, :, :, 0, :] | (nibbles[:, :, :, 1, :] << 4)).astype(np.uint8)
    return np.ascontiguousarray(byte.transpose(0, 2, 3, 1)).reshape(-1).view("<u4").copy()


# ------------------------------------------------------------------------- the kernel


def _sign(v: int, j: int) -> int:
    """The sign of input ``j`` in table entry ``v``: ``+1`` where bit ``j`` of ``v`` is set."""
    return 1 if (v >> j) & 1 else -1


def _constant(dtype: str, values: list[int]) -> tirx.Expr:
    """A constant vector of ``values`` (``dtype`` the lane type)."""
    lanes = [tirx.IntImm(dtype, v) for v in values]
    return tirx.Shuffle(lanes, [tirx.IntImm("int32", i) for i in range(len(values))])


_BIAS_BYTES = -0x7F7F7F80  # 0x80808080 as int32: flips the sign bit of 4 int8 values
_SIGNS = _constant("int8", [_sign(v, j) for v in range(16) for j in range(GROUP)])
_OFFSET = _constant("int32", [-128 * sum(_sign(v, j) for j in range(GROUP)) for v in range(16)])


def _group_table(q, base) -> tirx.Expr:
    """int32x16: the 16 entries ``t[v] = sum_j +-q[base + j]`` of one group's table.
    The 4 inputs as unsigned bytes ``q + 128`` times the sign bytes of each entry,
    summed in pairs (``vpmaddubsw``) then fours (``vpmaddwd``); minus ``128 sum_j
    s_j[v]`` for the offset. AVX-512BW."""
    word = tirx.reinterpret("int32", q[tirx.Ramp(base, 1, GROUP)]) ^ tirx.IntImm(
        "int32", _BIAS_BYTES
    )
    biased = tirx.reinterpret("int8x64", tirx.Broadcast(word, 16))
    pairs = tirx.call_llvm_pure_intrin("int16x32", "llvm.x86.avx512.pmaddubs.w.512", biased, _SIGNS)
    ones = tirx.Broadcast(tirx.IntImm("int16", 1), 32)
    fours = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.pmaddw.d.512", pairs, ones)
    return fours + _OFFSET


def _max16(buf) -> tirx.Expr:
    value = buf[0]
    for lane in range(1, 16):
        value = tirx.max(value, buf[lane])
    return value


def _interleaved(lo, hi, upper: bool) -> tirx.Expr:
    """int16x32: the low (``upper`` False: bytes 0..7 of each lane) or high half of
    each 128-bit lane of ``lo`` and ``hi`` interleaved, i.e. the int16 table values of
    tile rows 0..7 (8..15) of the 4 lanes (``vpunpcklbw`` / ``vpunpckhbw``)."""
    indices = []
    for word in range(32):
        lane, row = divmod(word, 8)
        src = 16 * lane + row + (8 if upper else 0)
        indices += [src, 64 + src]
    pair = tirx.Shuffle([lo, hi], [tirx.IntImm("int32", i) for i in indices])
    return tirx.reinterpret("int16x32", pair)


def _lookup(table, index) -> tirx.Expr:
    return tirx.call_llvm_pure_intrin("int8x64", _PSHUFB, table, index)


def _row_dot(acc32, block, half, j) -> tirx.Expr:
    """The int32 product of tile row ``8 half + j`` of register block ``block``: the sum
    of its 4 lanes."""
    at = block * 64 + half * 32 + j
    return acc32[at] + acc32[at + 8] + acc32[at + 16] + acc32[at + 24]


def _output(value, bias, col) -> tirx.Expr:
    """``value + bias[col]`` (``value`` without a bias): the same float32 operations as
    the other int8 forms."""
    return value if bias is None else value + bias[tirx.Cast("int64", col)]


def _without_param(func: tirx.PrimFunc, index: int) -> tirx.PrimFunc:
    """``func`` without its parameter ``index`` (a buffer its body never reads)."""
    params = [param for at, param in enumerate(func.params) if at != index]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def _task_sum(partial, tasks: int, stride: int, at) -> tirx.Expr:
    """The int32 sum over the tasks of ``partial[task * stride + at]``."""
    total = partial[at]
    for task in range(1, tasks):
        total = total + partial[task * stride + at]
    return total


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def int8_lut_primfunc(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` (a ``linear_aligned`` kernel for which :func:`lut_applies`) in LUT form:
    same buffers, but ``tile`` in the layout of :func:`lut_tile_words`; attribute
    :data:`.kernels.FORM_ATTR` :data:`INT8_LUT_FORM` and every attribute of ``func``.

    Schedule: the row maxima first; then parallel tasks over slices of the inputs
    (:data:`TASK_UNITS` units each at least), each quantizing its slice, building its
    tables (so they stay in its core's cache) and summing its slice for every tile row,
    register blocks of up to :data:`BLOCKS_PER_TASK` x 16 tile rows; then the partial
    sums of the tasks added in int32 and rescaled."""
    spec = kernel_spec(func, "linear_aligned")
    i64 = T.int64
    batch = func.params[0].shape[0]  # a symbolic batch stays one: the kernel loops over rows
    m = int(batch) if isinstance(batch, tirx.IntImm) else tirx.Cast("int32", batch)
    m_dim = batch if isinstance(batch, tirx.Var) else i64(m)
    k, n, p = int(spec["in_features"]), int(spec["out_features"]), int(spec["p"])
    rows = n // p
    units, blocks = k // UNIT_INPUTS, rows // ROW_BLOCK
    tasks = _largest_divisor(units, max(1, units // TASK_UNITS))
    t_units = units // tasks  # units per task
    t_inputs, t_groups = t_units * UNIT_INPUTS, t_units * UNIT_INPUTS // GROUP
    reg = _largest_divisor(blocks, BLOCKS_PER_TASK)  # row blocks per register block
    flush = _largest_divisor(t_units, FLUSH_UNITS)
    words = n_words(k * rows)
    has_bias = bool(spec["has_bias"])

    @T.prim_func(s_tir=False)
    def kernel(
        x_in: T.Buffer((m_dim, i64(k)), "float32"),
        tile_in: T.Buffer((i64(words),), "uint32"),
        alphas: T.Buffer((i64(p),), "float32"),
        bias_in: T.Buffer((i64(n),), "float32"),
        out_in: T.Buffer((m_dim, i64(n)), "float32"),
    ):
        # Expressions inside vectorized loops come from helper functions, not local
        # names: TVMScript binds a local name with a Let, which TVM's vectorizer then
        # evaluates for one lane only (seen in this TVM: every table entry was entry 15).
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((m * k,), "float32", data=x_in.data)
        tile = T.decl_buffer((words * 4,), "uint8", data=tile_in.data)
        out = T.decl_buffer((m * n,), "float32", data=out_in.data)
        amax_lanes = T.alloc_buffer((16,), "float32")
        amax = T.alloc_buffer((m,), "float32")
        partial = T.alloc_buffer((tasks * m * rows,), "int32")
        for i in range(m):
            for lane in T.vectorized(16):
                amax_lanes[lane] = T.float32(0)
            for ko in range(k // 16):
                for lane in T.vectorized(16):
                    amax_lanes[lane] = T.max(amax_lanes[lane], T.abs(x[i * k + ko * 16 + lane]))
            amax[i] = _max16(amax_lanes)
        for task in T.parallel(tasks):
            q = T.alloc_buffer((m * t_inputs,), "int8")
            tl = T.alloc_buffer((m * t_groups * 16,), "uint8")
            th = T.alloc_buffer((m * t_groups * 16,), "int8")
            acc32 = T.alloc_buffer((reg * 64,), "int32")
            acc16 = T.alloc_buffer((reg * 64,), "int16")
            for i in range(m):
                for ko in range(t_inputs // 16):
                    for lane in T.vectorized(16):
                        q[i * t_inputs + ko * 16 + lane] = quantized_value(
                            x[i * k + task * t_inputs + ko * 16 + lane], amax[i]
                        )
                for g in range(t_groups):
                    tl[T.ramp((i * t_groups + g) * 16, 1, 16)] = T.Cast(
                        "uint8x16", _group_table(q, i * t_inputs + g * GROUP)
                    )
                    th[T.ramp((i * t_groups + g) * 16, 1, 16)] = T.Cast(
                        "int8x16",
                        _group_table(q, i * t_inputs + g * GROUP) >> T.broadcast(T.int32(8), 16),
                    )
            for rb, i in T.grid(blocks // reg, m):
                for eo in range(reg * 4):
                    for e in T.vectorized(16):
                        acc32[eo * 16 + e] = 0
                for c in range(t_units // flush):
                    for eo in range(reg * 2):
                        for e in T.vectorized(32):
                            acc16[eo * 32 + e] = T.int16(0)
                    for u in range(flush):
                        t0: T.int32 = (i * t_units + c * flush + u) * 128
                        tla: T.int8x64 = T.reinterpret(tl[T.ramp(t0, 1, 64)], dtype="int8x64")
                        tha: T.int8x64 = th[T.ramp(t0, 1, 64)]
                        tlb: T.int8x64 = T.reinterpret(tl[T.ramp(t0 + 64, 1, 64)], dtype="int8x64")
                        thb: T.int8x64 = th[T.ramp(t0 + 64, 1, 64)]
                        for b in T.unroll(reg):
                            bytes_: T.uint8x64 = tile[
                                T.ramp(
                                    ((rb * reg + b) * units + task * t_units + c * flush + u) * 64,
                                    1,
                                    64,
                                )
                            ]
                            lo: T.int8x64 = T.reinterpret(
                                bytes_ & T.broadcast(T.uint8(15), 64), dtype="int8x64"
                            )
                            hi: T.int8x64 = T.reinterpret(
                                (bytes_ >> T.broadcast(T.uint8(4), 64))
                                & T.broadcast(T.uint8(15), 64),
                                dtype="int8x64",
                            )
                            alo: T.int8x64 = _lookup(tla, lo)
                            ahi: T.int8x64 = _lookup(tha, lo)
                            blo: T.int8x64 = _lookup(tlb, hi)
                            bhi: T.int8x64 = _lookup(thb, hi)
                            acc16[T.ramp(b * 64, 1, 32)] = (
                                acc16[T.ramp(b * 64, 1, 32)]
                                + _interleaved(alo, ahi, False)
                                + _interleaved(blo, bhi, False)
                            )
                            acc16[T.ramp(b * 64 + 32, 1, 32)] = (
                                acc16[T.ramp(b * 64 + 32, 1, 32)]
                                + _interleaved(alo, ahi, True)
                                + _interleaved(blo, bhi, True)
                            )
                    for eo in range(reg * 4):
                        for e in T.vectorized(16):
                            acc32[eo * 16 + e] = acc32[eo * 16 + e] + T.Cast(
                                "int32", acc16[eo * 16 + e]
                            )
                for b, half in T.grid(reg, 2):
                    for j in T.vectorized(8):
                        partial[(task * m + i) * rows + (rb * reg + b) * 16 + half * 8 + j] = (
                            _row_dot(acc32, b, half, j)
                        )
        for i in range(m):
            for c, ro in T.grid(p, rows // 16):
                for r in T.vectorized(16):
                    out[i * n + c * rows + ro * 16 + r] = _output(
                        alphas[c]
                        * (
                            (amax[i] / T.float32(127))
                            * T.Cast(
                                "float32",
                                _task_sum(partial, tasks, m * rows, i * rows + ro * 16 + r),
                            )
                        ),
                        bias_in if has_bias else None,
                        c * rows + ro * 16 + r,
                    )

    new = kernel if has_bias else _without_param(kernel, 3)
    for key, value in (func.attrs or {}).items():
        new = new.with_attr(key, value)
    return new.with_attr(FORM_ATTR, INT8_LUT_FORM)


def _row_word(lut, base, j) -> tirx.Expr:
    """The bit-row tile word whose 8 nibbles are at bytes ``base + 16 L + j`` (uint32)."""
    word = None
    for lane in range(4):
        byte = tirx.Cast("uint32", lut[base + 16 * lane + j])
        part = ((byte & tirx.IntImm("uint32", 15)) << tirx.IntImm("uint32", 4 * lane)) | (
            (byte >> tirx.IntImm("uint32", 4)) << tirx.IntImm("uint32", 16 + 4 * lane)
        )
        word = part if word is None else word | part
    return word


def restore_columns_primfunc(rows: int, k: int) -> tirx.PrimFunc:
    """A kernel ``(lut (words,) uint32, tile (words,) uint32)`` writing into ``tile`` the
    LUT-layout tile ``lut`` in the column layout of :data:`.int8_kernels.COLUMNS` (word
    ``w`` of tile row ``r`` at ``w * rows + r``; the words are those of
    :func:`.tiling.pack_bits`), parallel over blocks of 16 tile rows: 16 words from 4
    loads of 16 bytes, one contiguous store."""
    words, kw, blocks = n_words(k * rows), k // UNIT_INPUTS, rows // ROW_BLOCK
    i64 = T.int64

    @T.prim_func(s_tir=False)
    def restore(lut_in: T.Buffer((i64(words),), "uint32"), tile: T.Buffer((i64(words),), "uint32")):
        T.func_attr({"tirx.noalias": True})
        lut = T.decl_buffer((words * 4,), "uint8", data=lut_in.data)
        flat = T.decl_buffer((words,), "uint32", data=tile.data)
        for rb in T.parallel(blocks):
            for w in range(kw):
                for j in T.vectorized(ROW_BLOCK):
                    flat[w * rows + rb * ROW_BLOCK + j] = _row_word(lut, (rb * kw + w) * 64, j)

    return restore


# ------------------------------------------------------------------------- the relax pass

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def relayout_lut_tiles(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """``mod`` with every ``call_tir`` of a kernel for which :func:`lut_applies` and
    whose tile is a constant rewritten: the tile in LUT layout (:func:`lut_tile_words`,
    one new constant per tile constant) and, one per kernel, the kernel of
    :func:`int8_lut_primfunc` (static batch) or of
    :func:`.schedule_rules.int8_cpu.lut_batch_dispatch` (symbolic batch). Other calls, and
    ``mod`` without such calls, are unchanged."""
    if not any(
        isinstance(f, tirx.PrimFunc) and lut_applies(f, target) for f in mod.functions.values()
    ):
        return mod
    mutator = _LutTiles(mod, target)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    new = mutator.builder_.get()
    for name in mutator.kernels:  # the float-layout kernels, unless something still calls them
        if not _called(new, name):
            new = _without_function(new, name)
    return new


def _called(mod: tvm.IRModule, name: str) -> bool:
    """True when a Relax function of ``mod`` refers to the global ``name``."""
    gv = mod.get_global_var(name)
    return any(
        isinstance(func, relax.Function) and gv in relax.analysis.all_global_vars(func)
        for func in mod.functions.values()
    )


def _without_function(mod: tvm.IRModule, name: str) -> tvm.IRModule:
    functions = {gv: f for gv, f in mod.functions.items() if gv.name_hint != name}
    return tvm.IRModule(functions, attrs=mod.attrs)


@relax.expr_functor.mutator
class _LutTiles(relax.PyExprMutator):
    """The rewrite of :func:`relayout_lut_tiles`."""

    def __init__(self, mod: tvm.IRModule, target: Target) -> None:
        super().__init__(mod)
        self.source = mod
        self.target = target
        self.kernels: dict[str, relax.GlobalVar] = {}
        self.tiles: list[tuple[tvm.ir.Constant, relax.Expr]] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != _CALL_TIR or not isinstance(call.args[1], relax.Tuple):
            return call
        gv, args = call.args[0], list(call.args[1].fields)
        func = self.source[gv] if gv in self.source.functions else None
        if not isinstance(func, tirx.PrimFunc) or not lut_applies(func, self.target):
            return call
        if not isinstance(args[1], tvm.ir.Constant):
            return call
        args[1] = self._lut_tile(args[1], func)
        new_args = [self._lut_kernel(gv, func), relax.Tuple(args), *call.args[2:]]
        return relax.Call(call.op, new_args, call.attrs, call.ty_args, call.span)

    def _lut_kernel(self, gv: relax.GlobalVar, func: tirx.PrimFunc) -> relax.GlobalVar:
        if gv.name_hint not in self.kernels:
            if isinstance(func.params[0].shape[0], tirx.IntImm):
                lut = int8_lut_primfunc(func)
            else:  # the int8 schedule rules (a later step of the pipeline) build the cases
                from .schedule_rules.int8_cpu import lut_batch_dispatch

                lut = lut_batch_dispatch(func, self.target)
            self.kernels[gv.name_hint] = self.builder_.add_func(lut, f"{gv.name_hint}_lut")
        return self.kernels[gv.name_hint]

    def _lut_tile(self, tile: tvm.ir.Constant, func: tirx.PrimFunc) -> relax.Expr:
        """The LUT-layout constant of ``tile`` (one per tile: a tile that several calls
        share, tied weights, stays one constant)."""
        for seen, laid_out in self.tiles:
            if seen.same_as(tile) or seen.value.same_as(tile.value):
                return laid_out
        spec = kernel_spec(func)
        rows = int(spec["out_features"]) // int(spec["p"])
        words = lut_tile_words(tile.value.numpy(), rows, int(spec["in_features"]))
        laid_out = relax.const(words, "uint32")
        self.tiles.append((tile, laid_out))
        return laid_out
