"""Cortex-M schedule rules: single core, no parallel loops, no vectors.

:func:`schedule_mcu` first replaces an aligned linear or conv kernel by its lookup-table
variant (:func:`..lut_kernels.lut_variant`: same buffers and result, one table load per 4
weight bits), then applies :data:`MCU_RULES` (first that applies) and returns an
equivalent PrimFunc:

* :class:`McuLutKernel` (LUT kernels): see :func:`_schedule_lut`.
* :class:`McuTileKernel` (our kernels): the 256 x 8 sign table is inlined (sign masks
  become shifts of the tile word in registers: no 8 KiB table rebuilt on every call, no
  workspace); an im2col block over :data:`MAX_IM2COL_BYTES` is inlined too (the product
  then reads the padded input directly: less RAM, more index math); for aligned kinds
  the innermost reduction loops of the product are unrolled over one tile word (or the
  largest power of two <= 32 dividing the row length), so each word is loaded once and
  every bit position is a constant shift.
* :class:`InlineElementwise` (TVM-legalized, possibly fused functions): every block that
  can be inlined into its consumers is, unless a consumer reduces (a plain copy, such as
  an unpadded pooling ``pad``, is inlined even then), so a fused chain such as an
  inference BatchNorm is one loop nest without intermediate buffers; a reduction over at
  most :data:`MAX_UNROLLED_WINDOW` elements (a pooling window) is unrolled into a scalar
  accumulator; elementwise reads that the innermost loop does not change (per-channel
  parameters) are loaded once into scalars at the loop they depend on.

A kernel whose schedule fails is returned unscheduled, with a warning.
"""

from __future__ import annotations

import math
import warnings

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.sym import Analyzer
from tvm.target import Target

from ..kernels import kernel_kind
from ..lut_kernels import LUT_ATTR, LUT_KINDS, lut_chunking, lut_variant
from .base import (
    ALIGNED_KINDS,
    ScheduleRule,
    Stage,
    analyse,
    apply_first,
    extent,
    reduces,
    root_block,
    split_loops,
)

__all__ = [
    "MAX_IM2COL_BYTES",
    "MAX_UNROLLED_WINDOW",
    "MCU_RULES",
    "InlineElementwise",
    "McuLutKernel",
    "McuTileKernel",
    "inline_elementwise",
    "schedule_mcu",
]

MAX_IM2COL_BYTES = 16 * 1024
"""An im2col block larger than this is inlined (saves RAM, costs index math)."""


def _buffer_bytes(stage: Stage) -> int:
    """Bytes of the buffer a block writes."""
    buf = stage.writes[0]
    return math.prod(int(d) for d in buf.shape) * tvm.DataType(buf.dtype).bits // 8


def _pow2_factor(n: int, cap: int = 32) -> int:
    f = 1
    while f < cap and n % (2 * f) == 0:
        f *= 2
    return f


def _unroll_word(sch: Schedule, product: Stage) -> None:
    """Unroll the product's innermost loops that make up one word of the tile: its
    last two iterations when they are the (byte, bit) split of a word, else the largest
    power of two <= 32 dividing the innermost extent."""
    loops = sch.get_loops(product.block)
    if product.extents[-2:] == (4, 8):
        sch.unroll(loops[-1])
        sch.unroll(loops[-2])
        return
    innermost = product.extents[-1]
    f = _pow2_factor(innermost)
    if f > 1 and innermost > f:
        _, inner = sch.split(loops[-1], [None, f])
        sch.unroll(inner)
    elif f > 1:
        sch.unroll(loops[-1])


class McuTileKernel(ScheduleRule):
    """Our kernels (see the module docstring)."""

    name = "mcu-tile-kernel"

    def apply(self, func: tirx.PrimFunc, target: Target | None) -> Schedule | None:
        sch = Schedule(tvm.IRModule({"main": func}))
        kernel = analyse(sch)
        if not kernel.kind:
            return None
        for stage in kernel.with_role("table"):
            sch.compute_inline(stage.block)
        for stage in kernel.with_role("im2col"):
            if _buffer_bytes(stage) > MAX_IM2COL_BYTES:
                sch.compute_inline(stage.block)
        if kernel.kind in ALIGNED_KINDS and kernel.product is not None:
            _unroll_word(sch, kernel.product)
        return sch


def _schedule_lut(sch: Schedule, func: tirx.PrimFunc) -> None:
    """Tables built per block of chunks, shared by every row before the next block.

    Loops of ``small`` become ``(*i, chunk block, row, chunk, group)``: the tables of a
    block (blocks ``pair`` and ``table``, computed under the block loop, one group at a
    time with its 16 entries unrolled) stay on the stack, the accumulator of a row is
    initialised before the block loop, and the chunks and groups of a block are unrolled
    (each chunk's word is read once, every nibble is a constant shift). The epilogue
    ``out`` runs under the innermost ``i`` loop (``small`` shrinks to the rows of one
    input row); a conv's im2col row is built under it too, its loop split by channel
    and filter tap so that its indices need no division."""
    ch = lut_chunking(func)
    small = sch.get_sblock("small")
    *lead, row, kc, kg = sch.get_loops(small)
    position = lead[-1]
    outer, inner = sch.split(kc, [None, ch.block])
    sch.reorder(outer, row)
    sch.decompose_reduction(small, outer)
    table, pair = sch.get_sblock("table"), sch.get_sblock("pair")
    sch.compute_at(table, outer)
    group, entry = sch.get_loops(table)[-2:]
    sch.compute_at(pair, group)
    for loop in [*sch.get_loops(pair)[-2:], entry, inner, kg]:
        sch.unroll(loop)
    sch.reverse_compute_at(sch.get_sblock("out"), position)
    if kernel_kind(func) == "conv_lut":
        patches = sch.get_sblock("patches")
        sch.compute_at(patches, position)
        dims = [int(d) for d in func.attrs[LUT_ATTR]["filter_dims"]]
        sch.split(sch.get_loops(patches)[-1], dims)


class McuLutKernel(ScheduleRule):
    """LUT kernels of :mod:`..lut_kernels` (see :func:`_schedule_lut`)."""

    name = "mcu-lut-kernel"

    def apply(self, func: tirx.PrimFunc, target: Target | None) -> Schedule | None:
        if kernel_kind(func) not in LUT_KINDS:
            return None
        sch = Schedule(tvm.IRModule({"main": func}))
        _schedule_lut(sch, func)
        return sch


class InlineElementwise(ScheduleRule):
    """Functions that are not our kernels: intermediate blocks inlined."""

    name = "inline-elementwise"

    def apply(self, func: tirx.PrimFunc, target: Target | None) -> Schedule | None:
        try:
            sch = Schedule(tvm.IRModule({"main": func}))
            root = root_block(sch)
            blocks = [] if root is None else sch.get_child_blocks(root)
        except Exception:  # not schedulable: stays as it is
            return None
        if analyse(sch).kind:
            return None
        for block in blocks:
            try:
                if _is_copy(sch, block) or not _feeds_reduction(sch, block):
                    sch.compute_inline(block)
            except Exception:  # outputs, reductions: stay as they are
                continue
        for block in sch.get_child_blocks(root_block(sch)):
            if reduces(sch, block):
                sch = _with_small_window_unrolled(sch, block)
            else:
                sch = _with_invariant_reads_hoisted(sch, block)
        return sch


MAX_UNROLLED_WINDOW = 16
"""A reduction over at most this many elements (a pooling window) is unrolled, its
accumulator kept in a local scalar."""


def _with_small_window_unrolled(sch: Schedule, block: object) -> Schedule:
    """``sch`` with the reduction loops of ``block`` unrolled when they cover at most
    :data:`MAX_UNROLLED_WINDOW` elements, the block accumulating into a one-element
    buffer written out after each window (the output pointer could alias the input: the
    compiler would load and store it at every tap). ``sch`` itself when that does not
    apply or fails (a copy is scheduled)."""
    spatial, reduction = split_loops(sch, block)
    if not reduction or math.prod(extent(sch, loop) for loop in reduction) > MAX_UNROLLED_WINDOW:
        return sch
    if _has_min_max(sch.get(block).body):
        # TVM's C printer names the operands of max/min once per scope and reuses the
        # name for an equal load later in it: unrolled, acc = max(acc, x) would keep
        # reading the first acc.
        return sch
    trial = sch.copy()
    try:
        copy = trial.cache_write(block, 0, "global")
        if spatial:
            trial.reverse_compute_at(copy, spatial[-1])
        for loop in split_loops(trial, block)[1]:
            trial.unroll(loop)
    except Exception:  # e.g. a reduction with several outputs: stays as it is
        return sch
    return trial


_GET_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def _loop_vars_of_iters(sch: Schedule, block: object) -> list[tirx.Var] | None:
    """The block's iteration variables when each is bound to the loop at its own depth
    (as in the functions TE builds), else None."""
    loops = sch.get_loops(block)
    values = list(_GET_REALIZE(sch, block).iter_values)
    if len(values) != len(loops):
        return None
    if not all(v.same_as(sch.get(lp).loop_var) for v, lp in zip(values, loops, strict=True)):
        return None
    return [iv.var for iv in sch.get(block).iter_vars]


def _region_depth(region: object, iter_vars: list[tirx.Var]) -> int | None:
    """Depth of the innermost iteration variable a one-element read region uses (-1: none),
    None for a region of more than one element."""
    if not all(isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1 for r in region):
        return None
    used: list = []
    for r in region:
        tvm_ffi.structural_walk(r.min, [(tirx.Var, used.append)])
    depths = [k for k, v in enumerate(iter_vars) if any(u.same_as(v) for u in used)]
    return max(depths, default=-1)


def _with_invariant_reads_hoisted(sch: Schedule, block: object) -> Schedule:
    """``sch`` with each one-element read of ``block`` that the innermost loop does not
    change (a per-channel BatchNorm parameter) copied to a local scalar at the loop it
    depends on: the output pointer could alias it, so the compiler would load it again
    for every element. ``sch`` itself when nothing applies or the schedule fails."""
    iter_vars = _loop_vars_of_iters(sch, block)
    if not iter_vars:
        return sch
    hoist = []
    for region in sch.get(block).reads:
        depth = _region_depth(region.region, iter_vars)
        if depth is not None and depth < len(iter_vars) - 1:
            hoist.append((region.source, max(depth, 0)))
    if not hoist:
        return sch
    trial = sch.copy()
    try:
        for source, depth in hoist:
            reads = [r.source for r in trial.get(block).reads]
            index = next(k for k, r in enumerate(reads) if r.same_as(source))
            cached = trial.cache_read(block, index, "global")
            trial.compute_at(cached, trial.get_loops(block)[depth])
    except Exception:  # stays as it is
        return sch
    return trial


def _has_min_max(stmt: object) -> bool:
    found: list = []
    tvm_ffi.structural_walk(stmt, [((tirx.Max, tirx.Min), found.append)])
    return bool(found)


def _feeds_reduction(sch: Schedule, block: object) -> bool:
    """True when a consumer of ``block`` reduces (inlining would recompute it per tap)."""
    return any(reduces(sch, consumer) for consumer in sch.get_consumers(block))


def _is_copy(sch: Schedule, block: object) -> bool:
    """True when ``block`` stores a plain read of another buffer (an unpadded ``pad``, a
    reshape): inlined, each read of it is the same one load, without the copy."""
    stmt = sch.get(block)
    value = getattr(stmt.body, "value", None)
    if value is None or reduces(sch, block):
        return False
    an = Analyzer()
    for iv in stmt.iter_vars:
        an.bind(iv.var, iv.dom)
    return isinstance(an.simplify(value), tvm.ir.TensorLoad)  # what tirx.BufferLoad builds


MCU_RULES: tuple[ScheduleRule, ...] = (McuLutKernel(), McuTileKernel(), InlineElementwise())
"""The Cortex-M rules, in the order they are tried."""


def inline_elementwise(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every block that can be inlined into its consumers inlined."""
    return apply_first(func, None, (InlineElementwise(),)) or func


def schedule_mcu(func: tirx.PrimFunc, lut: bool = True) -> tirx.PrimFunc:
    """The Cortex-M schedule of a function (see the module docstring); with ``lut`` a
    kernel that has a LUT variant (:func:`..lut_kernels.lut_variant`) is replaced by it."""
    variant = lut_variant(func, kernel_kind(func)) if lut else None
    if variant is not None:
        try:
            return apply_first(variant, None, MCU_RULES) or variant
        except Exception as exc:  # the table-free kernel below computes the same
            _warn(variant, exc, "using the kernel without tables")
    try:
        return apply_first(func, None, MCU_RULES) or func
    except Exception as exc:  # the unscheduled kernel is exact; a schedule only speeds it up
        _warn(func, exc, "using it unscheduled")
        return func


def _warn(func: tirx.PrimFunc, exc: Exception, action: str) -> None:
    warnings.warn(
        f"MCU schedule of a {kernel_kind(func)} kernel failed ({type(exc).__name__}: {exc}); "
        f"{action}",
        RuntimeWarning,
        stacklevel=3,
    )
