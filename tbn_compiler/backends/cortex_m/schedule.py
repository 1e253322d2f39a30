"""A simple single-core schedule of the tile kernels for Cortex-M (no parallel, no vectors).

:func:`schedule_mcu` returns an equivalent PrimFunc:

* the 256 x 8 sign table (``sign_lut`` block) is inlined: sign masks become shifts of the
  tile word in registers (no 8 KiB table rebuilt on every call, no workspace); an im2col
  copy (``patches`` block) over :data:`MAX_IM2COL_BYTES` is inlined too (the product then
  reads the padded input directly: less RAM, more index math);
* the innermost reduction loops of the binary product (block ``small``) are unrolled over
  one tile word (or the largest power of two <= 32 dividing the row length), so each word
  is loaded once and every bit position is a constant shift.

Other (TVM-legalized, possibly fused) functions get their intermediate elementwise blocks
inlined by :func:`inline_elementwise`, so a fused chain such as an inference BatchNorm is
one loop nest without intermediate buffers. Anything a schedule cannot handle is returned
unchanged.
"""

from __future__ import annotations

import math
import warnings

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from ..kernels import kernel_kind

__all__ = ["schedule_mcu", "inline_elementwise"]

_REDUCE = 2  # IterVar.CommReduce
MAX_IM2COL_BYTES = 16 * 1024
"""An im2col copy (``patches``) larger than this is inlined (saves RAM, costs index math)."""
_UNROLL_KINDS = ("linear_aligned", "linear_in_out_aligned", "conv_aligned")


def _has_block(sch: Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:
        return False
    return True


def _block_bytes(sch: Schedule, name: str) -> int:
    """Bytes of the buffer written by block ``name``."""
    buf = sch.get(sch.get_sblock(name)).writes[0].source
    return math.prod(int(d) for d in buf.shape) * tvm.DataType(buf.dtype).bits // 8


def _pow2_factor(extent: int, cap: int = 32) -> int:
    f = 1
    while f < cap and extent % (2 * f) == 0:
        f *= 2
    return f


def _unroll_inner(sch: Schedule) -> None:
    """Unroll the reduction loops of ``small`` that make up one word of the tile."""
    block = sch.get_sblock("small")
    loops = sch.get_loops(block)
    extents = [int(sch.get(lp).extent) for lp in loops]
    if len(loops) >= 3 and extents[-2:] == [4, 8]:  # (word, byte, bit) split
        sch.unroll(loops[-1])
        sch.unroll(loops[-2])
        return
    factor = _pow2_factor(extents[-1])
    if factor > 1 and extents[-1] > factor:
        _, inner = sch.split(loops[-1], [None, factor])
        sch.unroll(inner)
    elif factor > 1:
        sch.unroll(loops[-1])


def inline_elementwise(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every block that can be inlined into its consumers inlined."""
    try:
        sch = Schedule(tvm.IRModule({"main": func}))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:
        return func
    for block in blocks:
        try:
            if not _feeds_reduction(sch, block):
                sch.compute_inline(block)
        except Exception:  # outputs, reductions: stay as they are
            continue
    return sch.mod["main"]


def _feeds_reduction(sch: Schedule, block: object) -> bool:
    """True when a consumer of ``block`` reduces (inlining would recompute it per tap)."""
    for consumer in sch.get_consumers(block):
        if any(int(iv.iter_type) == _REDUCE for iv in sch.get(consumer).iter_vars):
            return True
    return False


def schedule_mcu(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The MCU schedule of a function (see module doc)."""
    kind = kernel_kind(func)
    if not kind:
        return inline_elementwise(func)
    try:
        sch = Schedule(tvm.IRModule({"main": func}))
        if _has_block(sch, "sign_lut"):
            sch.compute_inline(sch.get_sblock("sign_lut"))
        if _has_block(sch, "patches") and _block_bytes(sch, "patches") > MAX_IM2COL_BYTES:
            sch.compute_inline(sch.get_sblock("patches"))
        if kind in _UNROLL_KINDS and _has_block(sch, "small"):
            _unroll_inner(sch)
        return sch.mod["main"]
    except Exception as exc:  # the unscheduled kernel is exact; a schedule only speeds it up
        warnings.warn(
            f"MCU schedule of a {kind} kernel failed ({type(exc).__name__}: {exc}); "
            "using it unscheduled",
            RuntimeWarning,
            stacklevel=2,
        )
        return func
