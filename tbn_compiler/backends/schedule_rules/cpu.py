"""CPU (``llvm``) schedule rules for the tile kernels, and the generic CPU schedule.

Build with a target that names the CPU (:func:`host_target`); plain ``"llvm"`` means
generic x86-64 (SSE2) and runs these kernels about 2x slower. Every schedule is exact
for every shape: loop splits only use factors that divide the extent (no bound
predicates, clean vector loops). :data:`CPU_RULES`, first that applies:

* :class:`ChecksStaySerial`: a kernel with asserts (the checked gather) stays serial: an
  assert failing inside a parallel task is not reported and leaves the output unwritten.
* :class:`RowTableProduct`: a product of rows (input or im2col rows) by tile rows whose
  sign masks come from the table, reduction split (word, byte, bit): the 8 bits of one
  table entry become the vector lanes (``rfactor``); a register block of ``mr`` rows x
  ``nr`` tile rows x 8 lanes stays in registers over the whole reduction; parallel over
  blocks. Im2col rows are built by each parallel task (a cache-sized block).
* :class:`ColumnTableProduct`: a product with output columns split (word, byte, bit)
  (``(in, out)`` weights): columns are the lanes (one table entry = 8 columns); ``mr``
  rows x 32 columns (one tile word) per register block.
* :class:`DirectConv`: a conv product without im2col (filters not whole bytes,
  depthwise, grouped): output width is the vector, ``fr`` filters per register block,
  one scalar sign per filter tap.
* :class:`ParallelOutputs`: any other product: parallel over outputs, serial reduction.

Around the product each rule schedules the other blocks alike: padding and epilogues
parallel and vectorized, other reductions parallel over outputs, the table left as built.

:func:`parallelize_generic` is the schedule of the functions no rule scheduled (TVM's
legalized operators). A schedule step TVM refuses raises :class:`ScheduleError` (a
``RuntimeError``); the optional steps of :func:`parallelize_generic` catch exactly that.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from .base import (
    CONV_KINDS,
    KernelAnalysis,
    ScheduleRule,
    analyse,
    cores,
    extent,
    factor,
    root_block,
    split_loops,
)

__all__ = [
    "CPU_RULES",
    "ChecksStaySerial",
    "ColumnTableProduct",
    "DirectConv",
    "ParallelOutputs",
    "RowTableProduct",
    "host_target",
    "parallelize_generic",
]


def host_target() -> Target:
    """LLVM target for this machine's CPU (e.g. ``znver3``: AVX2 + FMA)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return Target({"kind": "llvm", "mcpu": cpu})


# --------------------------------------------------------------------------- rules


class _ProductRule(ScheduleRule):
    """A tile-kernel rule: :meth:`matches` says whether it applies, :meth:`schedule_product`
    schedules the product; the blocks around it get :func:`_schedule_around`."""

    def matches(self, kernel: KernelAnalysis) -> bool:
        raise NotImplementedError

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis) -> None:
        raise NotImplementedError

    def apply(self, func: tirx.PrimFunc, target: Target) -> Schedule | None:
        sch = Schedule(func)
        kernel = analyse(sch)
        if kernel.product is None or not self.matches(kernel):
            return None
        _schedule_around(sch, kernel, lambda: self.schedule_product(sch, kernel))
        return sch


def _schedule_around(sch: Schedule, kernel: KernelAnalysis, product: Callable[[], None]) -> None:
    """Input stages (padding: elementwise; other reductions: parallel outputs), then the
    product, then the epilogue (elementwise). The sign table stays as built."""
    for stage in kernel.stages:
        if stage.role == "padding":
            _cpu_elementwise(sch, stage.block)
        elif stage.role == "pre":
            _cpu_reduce_simple(sch, stage.block)
    product()
    for stage in kernel.with_role("epilogue"):
        _cpu_elementwise(sch, stage.block)


class ChecksStaySerial(ScheduleRule):
    """Kernels with asserts: left serial, as built (see the module docstring)."""

    name = "checks-stay-serial"

    def apply(self, func: tirx.PrimFunc, target: Target) -> Schedule | None:
        sch = Schedule(func)
        return sch if analyse(sch).has_asserts else None


class RowTableProduct(_ProductRule):
    """Table-driven rows x tile rows product (iterations ``S S R R R``)."""

    name = "row-table-product"

    def matches(self, kernel: KernelAnalysis) -> bool:
        return kernel.table_product and kernel.product.iter_kinds == "SSRRR"

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis) -> None:
        patches = kernel.first("im2col") if kernel.im2col_product else None
        _cpu_lut_gemm(sch, kernel.product.block, None if patches is None else patches.block)


class ColumnTableProduct(_ProductRule):
    """Table-driven product with (word, byte, bit) output columns (``S S S S R``)."""

    name = "column-table-product"

    def matches(self, kernel: KernelAnalysis) -> bool:
        return kernel.table_product and kernel.product.iter_kinds == "SSSSR"

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis) -> None:
        _cpu_column_table(sch, kernel.product.block)


class DirectConv(_ProductRule):
    """Conv product over the (padded) input, no im2col rows."""

    name = "direct-conv"

    def matches(self, kernel: KernelAnalysis) -> bool:
        return kernel.kind in CONV_KINDS and not kernel.im2col_product

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis) -> None:
        _cpu_direct_conv(sch, kernel.product.block)


class ParallelOutputs(_ProductRule):
    """Any product: parallel over outputs, serial reduction (odd shapes)."""

    name = "parallel-outputs"

    def matches(self, kernel: KernelAnalysis) -> bool:
        return True

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis) -> None:
        _cpu_reduce_simple(sch, kernel.product.block)


CPU_RULES: tuple[ScheduleRule, ...] = (
    ChecksStaySerial(),
    RowTableProduct(),
    ColumnTableProduct(),
    DirectConv(),
    ParallelOutputs(),
)
"""The CPU rules for tile kernels, in the order they are tried."""


# --------------------------------------------------------------------------- schedules


def _cpu_elementwise(sch: Schedule, block, vec: int = 8) -> None:
    """Parallel outer loops, vectorized innermost loop (any shape)."""
    loops = sch.get_loops(block)
    v = factor(extent(sch, loops[-1]), (vec * 4, vec * 2, vec, 4, 2))
    if v > 1:
        outer_inner = sch.split(loops[-1], [None, v])
        sch.vectorize(outer_inner[1])
        loops = sch.get_loops(block)[:-1]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if extent(sch, fused) > 1:
        sch.parallel(fused)


def _cpu_reduce_simple(sch: Schedule, block) -> None:
    """Parallel over all outputs, serial reduction (fallback for odd shapes)."""
    spatial, _ = split_loops(sch, block)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    if extent(sch, fused) > 1:
        sch.parallel(fused)


def _cpu_lut_gemm(sch: Schedule, block, patches=None) -> None:
    """``block[i, r] = sum over (word, byte, bit)``: the 8 bits of a table entry become
    vector lanes (rfactor); ``mr x nr`` register blocks accumulate over the whole
    reduction; parallel over blocks. ``block`` keeps the final 8-lane sum. With
    ``patches`` (im2col rows), a task is ``mr * mb`` rows x all tile rows and builds
    its patch rows first."""
    loops = sch.get_loops(block)
    m, rows = extent(sch, loops[0]), extent(sch, loops[1])
    mr, mb = (factor(m, (4, 2)), 1) if patches is None else _row_blocks(m, cores())
    nr = _tile_rows(rows, mr)
    rf = sch.rfactor(loops[4], factor_axis=2)  # block_rf[i, r, lane]
    i, r, kw, kb, kl = sch.get_loops(rf)
    io, im, ii = sch.split(i, [None, mb, mr])
    ro, ri = sch.split(r, [None, nr])
    sch.reorder(io, ro, im, kw, kb, ii, ri, kl)
    task = sch.fuse(io, ro) if patches is None else io
    sch.parallel(task)
    if patches is not None:
        _cpu_patches_at(sch, patches, task)
    acc = sch.cache_write(rf, 0, "local")
    sch.reverse_compute_at(acc, im)
    for loop in (kb, ii, ri):
        sch.unroll(loop)
    sch.vectorize(kl)
    init = sch.decompose_reduction(rf, kw)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.reverse_compute_at(block, task)  # sum of the 8 lanes


def _cpu_patches_at(sch: Schedule, patches, task) -> None:
    """Build a task's im2col rows inside it; unroll the (small) kernel taps."""
    sch.compute_at(patches, task)
    dims = [int(d) for d in sch.get(patches).annotations.get("tbn_row_dims", [])]
    if len(dims) > 1:
        taps = sch.split(sch.get_loops(patches)[-1], dims)[1:]
        if len(dims) <= 3 and all(d <= 8 for d in dims[1:]):
            for loop in taps:
                sch.unroll(loop)


def _cpu_column_table(sch: Schedule, block) -> None:
    """``block[i, ow, ob, ol] = sum over j``: ``mr`` rows x one tile word of columns per
    register block, the 8 columns of a table entry as lanes, parallel over blocks."""
    i, ow, ob, ol, j = sch.get_loops(block)
    mr = factor(extent(sch, i), (4, 2))
    io, ii = sch.split(i, [None, mr])
    sch.reorder(io, ow, j, ii, ob, ol)
    outer = sch.fuse(io, ow)
    sch.parallel(outer)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, outer)
    sch.unroll(ii)
    sch.unroll(ob)
    sch.vectorize(ol)
    init = sch.decompose_reduction(block, j)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])


def _tile_rows(rows: int, mr: int) -> int:
    """Tile rows per register block for ``mr`` input rows: ``mr * nr`` accumulators
    of 8 lanes stay within 8 of the 16 AVX2 registers (measured best on Zen 3)."""
    return factor(rows, {4: (2,), 2: (4, 2)}.get(mr, (8, 4, 2)))


def _row_blocks(m: int, n_cores: int) -> tuple[int, int]:
    """(register rows ``mr``, register blocks per task ``mb``) for ``m`` rows: tasks
    of ``mr * mb <= 32`` rows that split evenly over ``n_cores`` (or are many)."""
    for mr in (4, 2, 1):
        if m % mr:
            continue
        q = m // mr
        for mb in range(min(q, 32 // mr), 0, -1):
            if q % mb == 0 and ((q // mb) % n_cores == 0 or q // mb >= 8 * n_cores):
                return mr, mb
    return factor(m, (4, 2)), 1


def _cpu_direct_conv(sch: Schedule, block) -> None:
    """``fr`` filters x output-width vector per register block, parallel over blocks,
    one scalar sign per filter tap."""
    spatial, red = split_loops(sch, block)
    batch, filt, *sp = spatial
    width = extent(sch, sp[-1])
    vec = width if width <= 16 else factor(width, (16, 8, 4, 2))
    fr = factor(extent(sch, filt), (4, 2))
    fo, fi = sch.split(filt, [None, fr])
    wo, wi = sch.split(sp[-1], [None, vec])
    outer_sp = [batch, fo, *sp[:-1], wo]
    sch.reorder(*outer_sp, *red, fi, wi)
    outer = sch.fuse(*outer_sp)
    sch.parallel(outer)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, outer)
    sch.unroll(fi)
    if vec > 1:
        sch.vectorize(wi)
    init = sch.decompose_reduction(block, red[0])
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])


# --------------------------------------------------------------------------- generic


def parallelize_generic(func: tirx.PrimFunc, min_work: int = 4096) -> tirx.PrimFunc:
    """Default CPU schedule for kernels nobody scheduled (TVM-legalized ops such as
    attention, softmax, LayerNorm): every top-level reduction block doing at least
    ``min_work`` iterations gets its innermost reduction split into 8 vector lanes
    (``rfactor``, when it is contiguous and long enough) and its leading data-parallel
    loops run in parallel (fused until there are a few tasks per core). A step a block
    refuses is skipped; the result is exact either way."""
    sch = Schedule(func)
    root = root_block(sch)
    if root is None:
        return func
    for block in sch.get_child_blocks(root):
        rf_sch, rf_block = _try_vector_reduction(sch, block, min_work)
        if rf_block is not None:
            sch = _try_parallel_prefix(rf_sch, rf_block, min_work) or rf_sch
        sch = _try_parallel_prefix(sch, block, min_work) or sch
    return sch.mod["main"]


def _try_vector_reduction(sch: Schedule, block, min_work: int, lanes: int = 8):
    """(copy of ``sch``, rfactor block) with the single innermost reduction loop of
    ``block`` split into ``lanes`` partial sums computed as a vector; ``(sch, None)``
    when the block does not fit (several reductions, short or odd extent)."""
    spatial, reduction = split_loops(sch, block)
    if len(reduction) != 1 or not spatial:
        return sch, None
    n = extent(sch, reduction[0])
    work = n
    for loop in spatial:
        work *= extent(sch, loop)
    if n % lanes or n < 2 * lanes or work < min_work:
        return sch, None
    trial = sch.copy()
    try:
        _, inner = trial.split(trial.get_loops(block)[-1], [None, lanes])
        rf = trial.rfactor(inner, factor_axis=len(spatial))
        trial.vectorize(trial.get_loops(rf)[-1])
    except ScheduleError:  # not a plain reduction
        return sch, None
    return trial, rf


def _try_parallel_prefix(sch: Schedule, block, min_work: int) -> Schedule | None:
    """A copy of ``sch`` with the leading spatial loops of ``block`` fused and parallel,
    or None when that is not allowed or not worth it."""
    spatial, reduction = split_loops(sch, block)
    extents = [extent(sch, loop) for loop in spatial]
    work = 1
    for e in extents + [extent(sch, loop) for loop in reduction]:
        work *= e
    # Elementwise kernels are memory-bound: on a few cores their fork/join costs more
    # than it saves (measured on ResNet-18). Reductions (matmuls, softmax) gain.
    if not spatial or not reduction or work < min_work:
        return None
    n, tasks = 0, 1
    while n < len(spatial) and tasks < 4 * cores():
        tasks *= extents[n]
        n += 1
    trial = sch.copy()
    try:
        loops = trial.get_loops(block)[:n]
        trial.parallel(trial.fuse(*loops) if n > 1 else loops[0])
    except ScheduleError:  # not a data-parallel prefix
        return None
    return trial
