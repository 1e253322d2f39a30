"""CPU rule for the int8 form of aligned linears (the opt-in ``precision="int8"``).

:class:`Int8Product` (first in :data:`.cpu.CPU_RULES`) takes a ``linear_aligned``
kernel whose :data:`..int8_kernels.PRECISION_ATTR` is ``"int8"``, rebuilds it with
:func:`..int8_kernels.int8_linear_primfunc` and schedules it: from
:data:`BITS_MAX_ROWS` input rows on in panel form (:func:`schedule_int8_linear`), below
in bits form (:func:`schedule_int8_bits`) where the CPU has AVX-512 VNNI, else (below
:data:`INT8_MIN_ROWS`) as the exact float32 kernel of the next rules; a symbolic batch
gets both, in one function. It declines every other kernel (and one it cannot rebuild,
which then runs in float32 as the next rules schedule it). A kernel already in LUT form
(:data:`..int8_lut.INT8_LUT_FORM`: its tile re-laid out by
:func:`..int8_lut.relayout_lut_tiles`, which builds it with :func:`..int8_lut.int8_lut_primfunc`
at a static batch below 32 rows, or :func:`lut_batch_dispatch` for a symbolic one) is
returned as it is: the forms above would misread its tile.

The panel form's schedule: row maxima, the quantized rows (``xq``) and their sums once,
vectorized; the product in parallel tasks of :data:`TASK_ROWS` tile rows, each
unpacking its rows' panel of bit bytes a chunk of inputs at a time (cache-sized) and
running register blocks of :data:`..int8_kernels.ROW_BLOCK` input rows x
:data:`VECTORS` vectors of 16 tile rows over it, one ``vpdpbusd`` (AVX-512 VNNI: 64
unsigned x signed byte products summed in fours into 16 int32 lanes; the bits are the
unsigned bytes) per input row, vector and 4 inputs. Without VNNI the same block runs
``vpmaddubsw`` + ``vpmaddwd`` (AVX-512 BW; exact: a pair of products ``b q`` never
leaves int16), without AVX-512 as plain vector code. Then the rescaling epilogue,
vectorized over tile rows.

The bits form's schedule: no panel; per input row, tile row and tile word one
``vpmovswb`` with the word as its mask (32 bytes: 1 where a bit is set, else 0) and one
256-bit ``vpdpbusd`` with 32 quantized inputs (Linear 4096x4096 p=8 at batch 1: 0.034
ms against 0.05 for the float32 words form).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import Target

from ..int8_kernels import (
    COLUMNS,
    PRECISION_ATTR,
    ROW_BLOCK,
    TILE_LAYOUT_ATTR,
    int8_linear_primfunc,
)
from ..int8_lut import INT8_LUT_FORM, LUT_MAX_ROWS, int8_lut_primfunc, restore_columns_primfunc
from ..kernels import FORM_ATTR, kernel_kind, kernel_spec
from .base import (
    ScheduleRule,
    apply_first,
    case_body,
    dispatch,
    extent,
    factor,
    known_extent,
    shape_vars,
    vectorize_inner,
)

__all__ = [
    "BITS_BLOCK_ROWS",
    "BITS_MAX_ROWS",
    "INT8_MIN_ROWS",
    "Int8Product",
    "TASK_ROWS",
    "VECTORS",
    "kernel_form",
    "lut_batch_dispatch",
    "schedule_int8_bits",
    "schedule_int8_linear",
    "wants_int8",
]

TASK_ROWS = 64
"""Tile rows per parallel task of the product (fewer when the tile has fewer)."""

VECTORS = 4
"""Vectors of 16 tile rows per register block (x 4 input rows: 16 accumulators)."""

BITS_TILE_ROWS = 4
"""Tile rows per register block of the bits form (each a vector of 8 int32 lanes)."""

BITS_MAX_ROWS = 32
"""Input rows below which an int8 linear runs in bits form (where the CPU has VNNI):
measured on Zen 4 (4096x4096 p=8), the bits form (blocks of 4 rows) is 2x faster than
the panel form at 16 rows, as fast at 32, 0.85x at 64."""

BITS_BLOCK_ROWS = 4
"""Input rows per register block of the bits form from this many rows on (below, one:
the rows are padded to whole blocks)."""

CHUNK = 256
"""Inputs per chunk of a task's panel (64 tile rows x 256 inputs: 16 KiB, in L1)."""


# The 16 x 4 u8 x s8 -> s32 dot product of one register block step of the panel form:
# ``C[r] += sum_j byte_j(B[r]) A[j]``. TVM's own x86 intrinsics pass the operands of
# vpdpbusd as 16 x i32, which LLVM 22 rejects (it takes 64 x i8 now).


@T.prim_func(s_tir=True)
def _dot_desc_local(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16,), "int32", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], B[0:16], A[0:4])
        T.writes(C[0:16])
        for i, k in T.grid(T.int64(16), T.int64(4)):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast(
                    "int32", T.Cast("int8", B[vi] >> T.Cast("int32", vk * T.int64(8)))
                ) * T.Cast("int32", A[vk])


@T.prim_func(s_tir=True)
def _dot_vnni_local(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16,), "int32", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], B[0:16], A[0:4])
        T.writes(C[0:16])
        a = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(B.vload([0], dtype="int32x16"), dtype="int8x64"),
            T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_avx512_local(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16,), "int32", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], B[0:16], A[0:4])
        T.writes(C[0:16])
        a = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
            T.reinterpret(B.vload([0], dtype="int32x16"), dtype="int8x64"),
            T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
            dtype="int16x32",
        )
        C[T.ramp(T.int32(0), 1, 16)] = C.vload([0], dtype="int32x16") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"),
            pairs,
            T.int16x32(1),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _bits_desc(
    A: T.Buffer((32,), "int8", offset_factor=1),
    W: T.Buffer((1,), "uint32", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], W[0:1], A[0:32])
        T.writes(C[0:8])
        for lane, j in T.grid(T.int64(8), T.int64(4)):
            with T.sblock("update"):
                vl, vj = T.axis.remap("SR", [lane, j])
                C[vl] = C[vl] + T.Cast(
                    "int32", W[T.int64(0)] >> T.Cast("uint32", vl * T.int64(4) + vj) & T.uint32(1)
                ) * T.Cast("int32", A[vl * T.int64(4) + vj])


@T.prim_func(s_tir=True)
def _bits_vnni(
    A: T.Buffer((32,), "int8", offset_factor=1),
    W: T.Buffer((1,), "uint32", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], W[0:1], A[0:32])
        T.writes(C[0:8])
        # vpmovswb with the tile word as its mask: 32 bytes, 1 where a bit is set, else 0
        bits = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.mask.pmovs.wb.512"),
            T.broadcast(T.int16(1), 32),
            T.broadcast(T.int8(0), 32),
            T.reinterpret(W[0], dtype="int32"),
            dtype="int8x32",
        )
        C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
            C.vload([0], dtype="int32x8"),
            bits,
            A.vload([0], dtype="int8x32"),
            dtype="int32x8",
        )


BITS_VNNI = "tbn_bits_32_u8_vnni"
TensorIntrin.register(BITS_VNNI, _bits_desc, _bits_vnni, override=True)
VNNI_DOT = "tbn_dot_16x4_u8s8_vnni"
AVX512_DOT = "tbn_dot_16x4_u8s8_avx512bw"
TensorIntrin.register(VNNI_DOT, _dot_desc_local, _dot_vnni_local, override=True)
TensorIntrin.register(AVX512_DOT, _dot_desc_local, _dot_avx512_local, override=True)


def wants_int8(func: tirx.PrimFunc) -> bool:
    """True when ``func`` is a ``linear_aligned`` kernel asked for int8 precision."""
    attrs = func.attrs
    return (
        kernel_kind(func) == "linear_aligned"
        and attrs is not None
        and str(attrs.get(PRECISION_ATTR, "")) == "int8"
    )


INT8_MIN_ROWS = 16
"""Without VNNI, input rows from which an int8 linear runs in (panel) int8 form: below,
unpacking the tile costs more than the float32 kernels (words form) take, and those run
exact."""


class Int8Product(ScheduleRule):
    """``linear_aligned`` kernels marked int8: the int8 forms by batch (see the module
    docstring), one function for a symbolic batch."""

    name = "int8-product"

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        if not wants_int8(func):
            return None
        if kernel_form(func) == INT8_LUT_FORM:  # built scheduled; its tile is in LUT layout
            return func
        form = int8_linear_primfunc(func)
        if form is None:
            return None
        from .cpu import _rules_after, _with_attrs_of

        intrinsic = _dot_intrinsic(target)
        if intrinsic == VNNI_DOT:  # few rows: the bits form, by blocks of rows from 4 on
            small = [(BITS_BLOCK_ROWS, _bits_scheduled(func, 1))]
            small.append((BITS_MAX_ROWS, _bits_scheduled(func, BITS_BLOCK_ROWS)))
        else:  # few rows: the float32 kernel
            small = [(INT8_MIN_ROWS, apply_first(func, target, _rules_after(self)))]
        batch = shape_vars(form)
        if not batch:
            m = int(form.params[0].shape[0])
            chosen = next((f for below, f in small if m < below), None)
            if chosen is not None:
                return _with_attrs_of(chosen, func)
        sch = Schedule(form)
        schedule_int8_linear(sch, intrinsic)
        scheduled = sch.mod["main"]
        if batch:
            cases = [(batch[0] < below, f) for below, f in small]
            scheduled = dispatch(form, cases, scheduled)
        return _with_attrs_of(scheduled, func)


def lut_batch_dispatch(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """``func`` (a ``linear_aligned`` kernel marked int8, symbolic batch, for which
    :func:`..int8_lut.lut_applies`) as one function reading its tile in LUT layout: the
    LUT form below :data:`..int8_lut.LUT_MAX_ROWS` rows, else the tile restored to words
    in column layout (:func:`..int8_lut.restore_columns_primfunc`, into a workspace) and
    the panel form on it. Attribute :data:`..kernels.FORM_ATTR`
    :data:`..int8_lut.INT8_LUT_FORM`."""
    var = shape_vars(func)[0]
    cases = [(var < LUT_MAX_ROWS, int8_lut_primfunc(func))]
    standard = _column_panel_form(func.with_attr(TILE_LAYOUT_ATTR, COLUMNS), target)
    spec = kernel_spec(func)
    k, rows = int(spec["in_features"]), int(spec["out_features"]) // int(spec["p"])
    tile = func.params[1]
    restored = tirx.decl_buffer(tile.shape, "uint32", "tile_columns")
    with_restored = [restored if at == 1 else param for at, param in enumerate(func.params)]
    body = tirx.SeqStmt(
        [
            tirx.AllocBuffer(restored),
            case_body(restore_columns_primfunc(rows, k), [tile, restored]),
            case_body(standard, with_restored),
        ]
    )
    default = tirx.PrimFunc(func.params, body, attrs=standard.attrs)
    return _with_form(dispatch(func, cases, default), func)


def _column_panel_form(columns: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """The panel form of ``columns`` (a symbolic-batch kernel reading its tile in column
    layout), which runs from :data:`..int8_lut.LUT_MAX_ROWS` rows on. (Not
    :class:`Int8Product`: its cases for few rows, float32 ones included, would read the
    tile as bit rows.)"""
    sch = Schedule(int8_linear_primfunc(columns))
    schedule_int8_linear(sch, _dot_intrinsic(target))
    return sch.mod["main"]


def _with_form(scheduled: tirx.PrimFunc, func: tirx.PrimFunc) -> tirx.PrimFunc:
    from .cpu import _with_attrs_of

    return _with_attrs_of(scheduled, func).with_attr(FORM_ATTR, INT8_LUT_FORM)


def kernel_form(func: tirx.PrimFunc) -> str | None:
    """The :data:`..kernels.FORM_ATTR` of ``func`` (None when it has none)."""
    attrs = func.attrs
    return None if attrs is None or FORM_ATTR not in attrs else str(attrs[FORM_ATTR])


def _bits_scheduled(func: tirx.PrimFunc, rows: int) -> tirx.PrimFunc:
    """``func`` in bits form, input rows in register blocks of ``rows``."""
    sch = Schedule(int8_linear_primfunc(func, bits=True, row_block=rows))
    schedule_int8_bits(sch, rows)
    return sch.mod["main"]


def _dot_intrinsic(target: Target | None) -> str | None:
    """The 16x4 u8 x s8 dot-product intrinsic the target has (None: plain vectors)."""
    if target is None or target.kind.name != "llvm":
        return None
    has = tvm.target.codegen.target_has_features
    if has("avx512vnni", target):
        return VNNI_DOT
    if has("avx512bw", target):
        return AVX512_DOT
    return None


def schedule_int8_linear(sch: Schedule, intrinsic: str | None) -> None:
    """Schedule every block of an :func:`..int8_kernels.int8_linear_primfunc` kernel
    (``intrinsic``: a registered 16x4 dot-product tensor intrinsic, or None): parallel
    loops over input rows (row maxima, row sums), blocks of them (quantized rows), tasks
    of tile rows (panel and product) and rows of outputs."""
    _quantize(sch, sch.get_sblock("xq"), sch.get_sblock("amax_lanes"))
    sums = sch.get_sblock("qsum_lanes")
    _parallel(sch, sch.get_loops(sums)[0])
    _lanes(sch, sums)
    _product(sch, sch.get_sblock("acc"), intrinsic)
    _rescale(sch, sch.get_sblock("out"))


def schedule_int8_bits(sch: Schedule, mr: int = 1) -> None:
    """Schedule an :func:`..int8_kernels.int8_linear_primfunc` kernel in bits form (few
    rows, VNNI; its rows a multiple of ``mr``): everything serial but the product, which
    runs in parallel tasks of tile rows, register blocks of ``mr`` input rows x
    :data:`BITS_TILE_ROWS` tile rows, one ``vpmovswb`` (a tile word as the mask: 32
    bytes 0 or 1) per tile row and word, shared by the block's input rows, and one
    256-bit ``vpdpbusd`` per input row, tile row and word."""
    for name in ("amax_lanes", "qsum_lanes"):
        _lanes(sch, sch.get_sblock(name))
    _, k = sch.get_loops(sch.get_sblock("xq"))
    vectorize_inner(sch, k, (16, 8, 4))
    block = sch.get_sblock("acc_lanes")
    i, r, lane, w, j = sch.get_loops(block)
    rows = extent(sch, r)
    per_task = factor(rows, (TASK_ROWS, 32, 16))
    nr = factor(per_task, (BITS_TILE_ROWS, 2))
    ro, rr, rn = sch.split(r, [None, per_task // nr, nr])
    io, ii = sch.split(i, [None, mr])
    sch.reorder(ro, io, rr, w, ii, rn, lane, j)
    sch.unroll(ii)
    _parallel(sch, ro)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, ro)
    sch.reverse_compute_at(sch.get_sblock("acc"), ro)
    sch.unroll(rn)
    sch.decompose_reduction(block, w)
    sch.tensorize(lane, BITS_VNNI)
    out = sch.get_sblock("out")
    func = sch.mod["main"]
    n_rows = int(func.params[-1].shape[1]) // int(func.params[2].shape[0])
    sch.transform_block_layout(out, lambda i, col: (i, col // n_rows, col % n_rows))
    r = sch.get_loops(out)[-1]
    vectorize_inner(sch, r, (16, 8, 4, 2))


def _parallel(sch: Schedule, loop) -> None:
    n = known_extent(sch, loop)
    if n is None or n > 1:
        sch.parallel(loop)


def _lanes(sch: Schedule, block) -> None:
    """A ``(rows, lanes)`` block of partial maxima or sums: reduction outside, the
    lanes one vector."""
    *_, v, ko = sch.get_loops(block)
    sch.reorder(ko, v)
    sch.vectorize(v)
    sch.decompose_reduction(block, ko)


def _quantize(sch: Schedule, block, amax_lanes) -> None:
    """``xq (m_pad, k)``: parallel over blocks of :data:`ROW_BLOCK` rows, 16 inputs a
    vector; before it the row maxima, parallel over rows (the maxima feed the outputs
    too, so they cannot be computed per block)."""
    i, k = sch.get_loops(block)
    b, _ = sch.split(i, [None, ROW_BLOCK])
    _parallel(sch, b)
    ko, ki = sch.split(k, [None, factor(extent(sch, k), (16, 8, 4))])
    sch.vectorize(ki)
    _parallel(sch, sch.get_loops(amax_lanes)[0])
    _lanes(sch, amax_lanes)


def _product(sch: Schedule, block, intrinsic: str | None) -> None:
    """``acc (m_pad, rows_pad) += xq . panel``: see the module docstring."""
    i, r, g, j = sch.get_loops(block)
    b, i = sch.split(i, [None, ROW_BLOCK])
    rows, groups = extent(sch, r), extent(sch, g)
    per_task = factor(rows, (TASK_ROWS, 32, 16))
    vectors = factor(per_task // 16, (VECTORS, 2, 1))
    chunk = factor(groups, (CHUNK // 4, 32, 16, 8))
    ro, rv, rw, rl = sch.split(r, [None, per_task // (16 * vectors), vectors, 16])
    go, gi = sch.split(g, [None, chunk])
    sch.reorder(ro, go, b, rv, gi, i, rw, rl, j)
    _parallel(sch, ro)
    panel, words = sch.get_sblock("panel"), sch.get_sblock("words")
    sch.compute_at(panel, go)
    sch.compute_at(words, go)
    pr = sch.get_loops(panel)[-1]
    _, pv = sch.split(pr, [None, 16])
    sch.vectorize(pv)
    sch.unroll(i)
    sch.unroll(rw)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, ro)
    sch.vectorize(sch.split(sch.get_loops(acc)[-1], [None, 16])[1])
    if intrinsic is not None:
        sch.decompose_reduction(block, go)
        sch.tensorize(rl, intrinsic)
    else:
        sch.reorder(j, rl)
        sch.vectorize(rl)
        sch.decompose_reduction(block, go)


def _rescale(sch: Schedule, block) -> None:
    """``out (m, n)`` as ``(m, p, rows)`` loops (a copy's tile rows contiguous, no
    ``col % rows`` per element), parallel over rows, 16 tile rows a vector."""
    func = sch.mod["main"]
    rows = int(func.params[-1].shape[1]) // int(func.params[2].shape[0])
    sch.transform_block_layout(block, lambda i, col: (i, col // rows, col % rows))
    i, c, r = sch.get_loops(block)
    _parallel(sch, i)
    _, ri = sch.split(r, [None, factor(rows, (16, 8, 4, 2))])
    sch.vectorize(ri)
