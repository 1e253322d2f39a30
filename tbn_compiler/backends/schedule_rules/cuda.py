"""CUDA schedule rules for the tile kernels (and the checked gather).

CUDA kernels cannot raise, so asserts (the gather's range check) are dropped after
scheduling (:func:`finish_cuda`); the kernels stay in bounds without them. Splits may leave a predicated tail, which TVM guards. The
sign table, padding and im2col blocks are inlined (bit tests on registers, no
intermediate copies). :data:`CUDA_RULES`, first that applies:

* :class:`WarpRowTableProduct`: a table-driven product of rows by tile rows with at
  least 8 packed words per row: a warp per tile row (lanes over packed words,
  warp-shuffle reduction), ``ry`` tile rows of a block on ``threadIdx.y``; the byte and
  bit loops are unrolled for aligned kinds (constant shifts), not for the general
  kernels, whose realigned-word math is too large to unroll 32 times.
* :class:`OneOutputPerThread`: every block one output per thread (serial reductions).

A symbolic batch (the rows of a linear, the images of a conv) is one more data-parallel
extent: it lands in ``blockIdx.x`` (fused with static ones); threads are split from the
fused loop with a guarded tail, so one kernel runs every batch size.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.target import Target

from .base import (
    ALIGNED_KINDS,
    KernelAnalysis,
    ScheduleRule,
    analyse,
    extent,
    factor,
    split_loops,
    without_asserts,
)

__all__ = ["CUDA_RULES", "OneOutputPerThread", "WarpRowTableProduct", "finish_cuda"]

_INLINED_ROLES = ("table", "padding", "im2col")
"""Blocks inlined into their consumers, in this order."""


def _threads(target: Target) -> int:
    return int(target.attrs.get("max_num_threads", 1024))


def _schedule(func: tirx.PrimFunc) -> tuple[Schedule, KernelAnalysis]:
    sch = Schedule(func)
    return sch, analyse(sch)


def _inline_inputs(sch: Schedule, kernel: KernelAnalysis) -> None:
    for role in _INLINED_ROLES:
        for stage in kernel.with_role(role):
            sch.compute_inline(stage.block)


def _known_extent(sch: Schedule, loop) -> int | None:
    """The extent of ``loop``, or None when it is symbolic."""
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


def _flat(sch: Schedule, block, threads: int) -> None:
    """One output per thread: fuse the spatial loops, bind blocks and threads (256 per
    block, fewer for a small static extent)."""
    spatial, _ = split_loops(sch, block)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    n = _known_extent(sch, fused)
    t = min(threads, 256) if n is None else min(threads, 256, max(32, n))
    bx, tx = sch.split(fused, [None, t])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _flat_rest(sch: Schedule, kernel: KernelAnalysis, threads: int, skip: object = None) -> None:
    """Every block not inlined and not ``skip``: one output per thread, program order."""
    for stage in kernel.stages:
        if stage.role not in _INLINED_ROLES and stage is not skip:
            _flat(sch, stage.block, threads)


class WarpRowTableProduct(ScheduleRule):
    """A warp per tile row for table-driven ``S S R R R`` products of >= 8 words."""

    name = "warp-row-table-product"

    def apply(self, func: tirx.PrimFunc, target: Target) -> Schedule | None:
        sch, kernel = _schedule(func)
        product = kernel.product
        if not kernel.table_product or product.iter_kinds != "SSRRR" or product.extents[2] < 8:
            return None
        _inline_inputs(sch, kernel)
        words = product.extents[2]
        lanes = 32 if words >= 32 else 16 if words >= 16 else 8
        i, r, kw, kb, kl = sch.get_loops(product.block)
        ry = factor(extent(sch, r), (4, 2))
        ro, ri = sch.split(r, [None, ry])
        kwo, kwi = sch.split(kw, [None, lanes])
        sch.reorder(i, ro, ri, kwi, kwo, kb, kl)
        sch.bind(sch.fuse(i, ro), "blockIdx.x")
        sch.bind(ri, "threadIdx.y")
        sch.bind(kwi, "threadIdx.x")
        if kernel.kind in ALIGNED_KINDS:
            sch.unroll(kb)
            sch.unroll(kl)
        _flat_rest(sch, kernel, _threads(target), skip=product)
        return sch


class OneOutputPerThread(ScheduleRule):
    """Any kernel of ours: inputs inlined, one output per thread everywhere."""

    name = "one-output-per-thread"

    def apply(self, func: tirx.PrimFunc, target: Target) -> Schedule | None:
        sch, kernel = _schedule(func)
        if not kernel.kind:
            return None
        _inline_inputs(sch, kernel)
        _flat_rest(sch, kernel, _threads(target))
        return sch


CUDA_RULES: tuple[ScheduleRule, ...] = (WarpRowTableProduct(), OneOutputPerThread())
"""The CUDA rules for our kernels, in the order they are tried."""


def finish_cuda(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """A scheduled kernel as CUDA code needs it: without asserts. (Stripped after
    scheduling: a schedule of the stripped function, which shares the original's body,
    would change the original in place.)"""
    return without_asserts(func)
