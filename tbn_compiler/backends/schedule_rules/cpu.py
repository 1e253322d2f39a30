"""CPU (``llvm``) schedule rules for the tile kernels, and the generic CPU schedule.

Build with a target that names the CPU (:func:`host_target`); plain ``"llvm"`` means
generic x86-64 (SSE2) and runs these kernels about 2x slower. Every schedule is exact
for every shape: loop splits only use factors that divide the extent (no bound
predicates, clean vector loops). :data:`CPU_RULES`, first that applies:

* :class:`.int8_cpu.Int8Product`: an aligned linear compiled with ``precision="int8"``
  (opt-in) runs its int8 forms (:mod:`..int8_kernels`; below 32 rows with AVX-512BW the
  table-lookup form of :mod:`..int8_lut`, built before scheduling); nothing else.
* :class:`ChecksStaySerial`: a kernel with asserts (the checked gather) stays serial: an
  assert failing inside a parallel task is not reported and leaves the output unwritten.
* :class:`.winograd_cpu.WinogradProduct`: an aligned 2-D 3x3 stride-1 conv with at least
  :data:`.winograd_cpu.WINOGRAD_MIN_ROWS` output positions is rebuilt in Winograd form
  (:func:`..winograd.winograd_primfunc`: filters and input tiles transformed every
  call, a register-blocked product per transform position, 2.25x or 4x fewer
  multiply-adds); a symbolic batch runs the next rules below that many positions.
* :class:`PanelProduct`: an aligned linear or conv with at least
  :data:`PANEL_MIN_ROWS` rows (input rows, output positions) is rebuilt in its panel
  form (:func:`..kernels.panel_primfunc`: tile rows unpacked once into ``+-1`` numbers,
  tile rows contiguous) and run as a register-blocked matrix product: ``mr`` rows x
  ``nr`` tile rows (the vector) per block, one broadcast input per row and reduction
  step, fused multiply-adds; a conv reads its padded input directly (no im2col). A
  symbolic batch runs the table form (next rules) below that many rows, in the same
  function.
* :class:`WordsProduct`: an aligned linear with fewer rows (and whole-word tile rows) is
  rebuilt in words form (:func:`..kernels.words_primfunc`): the 32 bits of a tile word
  give ``select(bit, x, -x)`` over 16 (8) lanes, ``nr`` tile rows per vector of inputs.
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

A kernel with a symbolic batch gets one schedule per case of the batch, in one function
that branches once per call (:func:`.base.dispatch`): each case scheduled as a static
build at such a batch would be (serial below the batch that does
:data:`MIN_PARALLEL_WORK` iterations; register blocks of 4 or 2 rows for a batch that is
a multiple of 4 or 2, exact splits, no guarded tails); TVM's functions likewise run
serially below the batch at which they would be parallel.

Around the product each rule schedules the other blocks alike: padding and epilogues
parallel and vectorized, other reductions parallel over outputs, the table left as built.
A kernel doing less than :data:`MIN_PARALLEL_WORK` block iterations stays serial
(:func:`worth_parallel`): a parallel launch costs more than it takes.

:func:`parallelize_generic` is the schedule of the functions no rule scheduled (TVM's
legalized operators and what FuseOps fused): producers inlined, functions with
reductions (softmax, LayerNorm, attention, matmuls) run row by row in one parallel loop,
elementwise passes vectorized (parallel only from :data:`MIN_PARALLEL_ELEMENTS` on). A
schedule step TVM refuses raises :class:`ScheduleError` (a ``RuntimeError``); the
optional steps of :func:`parallelize_generic` catch exactly that.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from ..kernels import (
    PANEL_KINDS,
    kernel_kind,
    kernel_spec,
    padded_tile_rows,
    panel_primfunc,
    words_primfunc,
)
from .attention_cpu import schedule_attention
from .base import (
    CONV_KINDS,
    KernelAnalysis,
    ScheduleRule,
    Stage,
    analyse,
    apply_first,
    at_value,
    cores,
    dispatch,
    dispatch_on_multiples,
    extent,
    factor,
    known_extent,
    reduces,
    root_block,
    shape_vars,
    split_loops,
    static_multiple,
    vectorize_inner,
)
from .fast_math import with_fast_math
from .int8_cpu import Int8Product
from .winograd_cpu import WinogradProduct

__all__ = [
    "CPU_RULES",
    "ChecksStaySerial",
    "ColumnTableProduct",
    "DirectConv",
    "PANEL_MIN_ROWS",
    "PanelProduct",
    "ParallelOutputs",
    "RowTableProduct",
    "Int8Product",
    "WinogradProduct",
    "WordsProduct",
    "MIN_PARALLEL_ELEMENTS",
    "MIN_PARALLEL_WORK",
    "host_target",
    "inline_producers",
    "parallelize_generic",
    "worth_parallel",
]


MIN_PARALLEL_WORK = 1 << 16
"""Block iterations below which a function runs serially: on 2 cores a parallel launch
costs microseconds (tens when the cores are busy), more than such a function takes."""

MIN_PARALLEL_ELEMENTS = 1 << 20
"""Iterations below which an elementwise function (memory-bound) runs serially: on 2
busy cores a second thread made elementwise passes of up to a million elements slower
(ResNet-18 BatchNorm + ReLU at batch 16, transformer layout copies), not faster."""


def host_target() -> Target:
    """LLVM target for this machine's CPU (e.g. ``znver3``: AVX2 + FMA)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return Target({"kind": "llvm", "mcpu": cpu})


# --------------------------------------------------------------------------- rules


class _ProductRule(ScheduleRule):
    """A tile-kernel rule: :meth:`matches` says whether it applies, :meth:`schedule_product`
    schedules the product; the blocks around it get :func:`_schedule_around`.

    A kernel with a symbolic batch gets one schedule per case of it (:func:`.base.dispatch`),
    each as a static build at such a batch would have: serial below the batch at which the
    kernel does :data:`MIN_PARALLEL_WORK` iterations, parallel from there; and where the
    rule blocks rows in registers (:attr:`blocks_rows`), register blocks of 4 (2) rows for
    a batch that is a multiple of 4 (2) (:func:`_row_multiples`)."""

    blocks_rows = False
    """Whether :meth:`schedule_product` blocks the product's rows in registers."""

    def matches(self, kernel: KernelAnalysis) -> bool:
        raise NotImplementedError

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis, parallel: bool) -> None:
        raise NotImplementedError

    def apply(self, func: tirx.PrimFunc, target: Target) -> Schedule | tirx.PrimFunc | None:
        sch = Schedule(func)
        kernel = analyse(sch)
        if kernel.product is None or not self.matches(kernel):
            return None
        batch = shape_vars(func)
        if kernel.work >= 0 or len(batch) != 1:
            self.schedule_all(sch, worth_parallel(kernel))
            return sch
        return self._dispatch(func, sch, kernel, batch[0])

    def schedule_all(self, sch: Schedule, parallel: bool, passes: bool | None = None) -> None:
        """Schedule every block of ``sch`` (the product and the blocks around it);
        ``passes``: whether elementwise passes run in parallel too (None: from their size,
        :func:`_many`)."""
        _schedule_around(sch, analyse(sch), self.schedule_product, parallel, passes)

    def _dispatch(
        self, func: tirx.PrimFunc, sch: Schedule, kernel: KernelAnalysis, batch: tirx.Var
    ) -> tirx.PrimFunc:
        return dispatch(func, *self._cases(func, sch, kernel, batch))

    def _cases(
        self, func: tirx.PrimFunc, sch: Schedule, kernel: KernelAnalysis, batch: tirx.Var
    ) -> tuple[list[tuple[tirx.Expr, tirx.PrimFunc]], tirx.PrimFunc]:
        """(cases, default) for :func:`.base.dispatch` of ``func`` over ``batch``."""
        multiples = self._multiples(sch, kernel)
        cases = []
        small = _serial_below(func, batch, MIN_PARALLEL_WORK, lambda f: analyse(Schedule(f)).work)
        if small > 1:
            serial = functools.partial(self._scheduled, parallel=False)
            below = batch < small
            cases += dispatch_on_multiples(func, batch, multiples, serial, when=below)
            cases.append((below, serial(func)))
        mid = _serial_below(func, batch, MIN_PARALLEL_ELEMENTS, _pass_iterations)
        if mid > small:  # product in parallel, small elementwise passes serial
            product = functools.partial(self._scheduled, parallel=True, passes=False)
            below = batch < mid
            cases += dispatch_on_multiples(func, batch, multiples, product, when=below)
            cases.append((below, product(func)))
        parallel = functools.partial(self._scheduled, parallel=True)
        cases += dispatch_on_multiples(func, batch, multiples, parallel)
        return cases, parallel(func)

    def _scheduled(
        self, func: tirx.PrimFunc, parallel: bool, passes: bool | None = None
    ) -> tirx.PrimFunc:
        sch = Schedule(func)
        self.schedule_all(sch, parallel, passes)
        return sch.mod["main"]

    def _multiples(self, sch: Schedule, kernel: KernelAnalysis) -> list[int]:
        """Multiples of a symbolic batch that get cases of their own (largest first)."""
        return _row_multiples(sch, kernel) if self.blocks_rows else []


ROW_MULTIPLES = (2, 4)
"""Row counts a symbolic batch may be a multiple of, for register blocks of rows."""


def _row_multiples(sch: Schedule, kernel: KernelAnalysis) -> list[int]:
    """Multiples of the batch (largest first) that allow larger register blocks of rows
    than the product's known multiple of rows does (none when the rows are static)."""
    rows = sch.get_loops(kernel.product.block)[0]
    if known_extent(sch, rows) is not None:
        return []
    known = static_multiple(sch, rows)
    best, multiples = _row_factor(known), []
    for d in ROW_MULTIPLES:
        if _row_factor(known * d) > best:
            best = _row_factor(known * d)
            multiples.insert(0, d)
    return multiples


def _row_factor(rows: int) -> int:
    return factor(rows, (4, 2))


def _serial_below(
    func: tirx.PrimFunc, batch: tirx.Var, min_work: int, work: Callable[[tirx.PrimFunc], int]
) -> int:
    """The batch from which ``func`` does ``min_work`` iterations (``work`` of ``func`` at
    batch 1, times the batch); 1 when its work at batch 1 cannot be counted."""
    try:
        unit = work(at_value(func, batch, 1))
    except (TypeError, ValueError, RuntimeError):  # TVM cannot fix this batch to 1
        return 1
    return -(-min_work // unit) if unit > 0 else 1


def worth_parallel(kernel: KernelAnalysis) -> bool:
    """True when ``kernel`` does enough work (:data:`MIN_PARALLEL_WORK` block iterations,
    or a symbolic extent) that running it on several cores pays for the fork and join."""
    return kernel.work < 0 or kernel.work >= MIN_PARALLEL_WORK


def _schedule_around(
    sch: Schedule,
    kernel: KernelAnalysis,
    product: Callable[[Schedule, KernelAnalysis, bool], None],
    parallel: bool,
    passes: bool | None = None,
) -> None:
    """Input stages (padding: elementwise; other reductions: parallel outputs), then the
    product, then the epilogue (elementwise); parallel loops where ``parallel``, for the
    elementwise stages only from :data:`MIN_PARALLEL_ELEMENTS` iterations on (on two busy
    cores a parallel loop can wait a time slice for a descheduled thread: the 4096 outputs
    of a 4096x4096 linear at batch 1 in parallel made its best time 0.16 instead of 0.07
    ms; ``passes`` overrides the size test). The sign table stays as built."""

    def wide(stage: Stage) -> bool:
        return parallel and (_many(stage) if passes is None else passes)

    for stage in kernel.stages:
        if stage.role == "padding":
            _cpu_elementwise(sch, stage.block, wide(stage))
        elif stage.role == "pre":
            _cpu_reduce_simple(sch, stage.block, parallel)
    product(sch, kernel, parallel)
    for stage in kernel.with_role("epilogue"):
        _cpu_elementwise(sch, stage.block, wide(stage))


def _pass_iterations(func: tirx.PrimFunc) -> int:
    """Iterations of the largest elementwise pass of a static kernel: a data-parallel
    top-level block that reads a buffer (not the sign table), not a panel (built inside
    tasks or once)."""
    stages = analyse(Schedule(func)).stages
    passes = [s for s in stages if not s.is_reduction and s.reads and s.name != "panel"]
    return max((math.prod(s.extents) for s in passes), default=0)


def _many(stage: Stage) -> bool:
    """True when ``stage`` has :data:`MIN_PARALLEL_ELEMENTS` iterations (or a symbolic
    extent)."""
    return any(e < 0 for e in stage.extents) or math.prod(stage.extents) >= MIN_PARALLEL_ELEMENTS


class ChecksStaySerial(ScheduleRule):
    """Kernels with asserts: left serial, as built (see the module docstring)."""

    name = "checks-stay-serial"

    def apply(self, func: tirx.PrimFunc, target: Target) -> Schedule | None:
        sch = Schedule(func)
        return sch if analyse(sch).has_asserts else None


PANEL_MIN_ROWS = {"linear_aligned": 32, "conv_aligned": 16}
"""Per kind, the rows (input rows of a linear, output positions of a conv, over the
whole batch) from which a kernel with a panel form (:func:`..kernels.panel_primfunc`)
runs in it: fewer rows do not pay for unpacking the tile into numbers (measured on
Zen 4: a 4096x4096 p=8 linear is faster in table form below 32 rows; a 512-channel
3x3 conv at 4x4 positions, 16 rows, already 1.4x faster in panel form)."""


class PanelProduct(ScheduleRule):
    """Aligned linear and conv kernels with enough rows: rebuilt in panel form (the tile
    unpacked into ``+-1`` numbers once, tile rows contiguous) and scheduled as a
    register-blocked matrix product with broadcast inputs and fused multiply-adds
    (:func:`_cpu_panel_linear`, :func:`_cpu_panel_conv`). Declines below
    :data:`PANEL_MIN_ROWS` rows; with a symbolic batch, batches below it run the table
    form as the next rules schedule it, in the same function."""

    name = "panel-product"

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        if kernel_kind(func) not in PANEL_KINDS:
            return None
        panel = panel_primfunc(func, _panel_row_block(func, _vector_lanes(target)))
        if panel is None:
            return None
        rule = _PanelSchedule(_vector_lanes(target))
        sch = Schedule(panel)
        kernel = analyse(sch)
        per_batch = _rows_per_batch(panel)
        batch = shape_vars(panel)
        min_rows = PANEL_MIN_ROWS[kernel_kind(func)]
        if kernel.work >= 0 or len(batch) != 1:
            rows = per_batch * int(panel.params[0].shape[0])
            if rows < min_rows:
                return None
            rule.schedule_all(sch, worth_parallel(kernel))
            return _with_attrs_of(sch.mod["main"], func)
        cases, default = rule._cases(panel, sch, kernel, batch[0])
        small = -(-min_rows // per_batch)
        if small > 1:
            table = apply_first(func, target, _rules_after(self))
            cases.insert(0, (batch[0] < small, table))
        return _with_attrs_of(dispatch(panel, cases, default), func)


class _PanelSchedule(_ProductRule):
    """The schedule of a kernel in panel form, with ``lanes``-wide vectors (the
    dispatch over a symbolic batch of :class:`_ProductRule`)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def schedule_all(self, sch: Schedule, parallel: bool, passes: bool | None = None) -> None:
        if kernel_kind(sch.mod["main"]) not in CONV_KINDS:
            _cpu_panel_linear(sch, sch.get_sblock("small"), parallel, self.lanes)
            out = next(s for s in analyse(sch).stages if s.name == "out")
            _cpu_copies(sch, out.block, parallel and (_many(out) if passes is None else passes))
            return
        panel = next(s for s in analyse(sch).stages if s.name == "panel")
        big = math.prod(panel.extents) >= MIN_PARALLEL_PANEL
        _cpu_elementwise(sch, panel.block, parallel and big)
        task = _cpu_panel_conv(sch, sch.get_sblock("small"), parallel, self.lanes)
        pad = _child(sch, "xpad")
        if pad is not None:  # the padded rows a task reads, built by the task
            sch.compute_at(pad, task)
        sch.reverse_compute_at(sch.get_sblock("out"), task)
        # a vector of the task's positions per filter: contiguous stores (LLVM vectorized
        # over filters, storing channels first with scatters: the 3-channel stem conv of
        # ResNet-18-CIFAR 0.45 -> 0.06 ms at batch 1, 8.2 -> 1.9 ms at batch 16)
        # (at most 16 lanes: a longer last loop, e.g. a whole row of positions, made
        # LLVM take minutes to compile ConvNeXt)
        vectorize_inner(sch, sch.get_loops(sch.get_sblock("out"))[-1], (16, 8, 4, 2))


class WordsProduct(ScheduleRule):
    """Aligned linear kernels with whole-word rows and fewer rows than the panel form
    takes (batch-1 matrix-vector products): rebuilt in words form
    (:func:`..kernels.words_primfunc`) and scheduled by :func:`_cpu_words_product`."""

    name = "words-product"

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        words = words_primfunc(func)
        if words is None:
            return None
        sch = Schedule(words)
        kernel = analyse(sch)
        rule = _WordsSchedule(_vector_lanes(target))
        batch = shape_vars(words)
        if kernel.work >= 0 or len(batch) != 1:
            rule.schedule_all(sch, worth_parallel(kernel))
            return _with_attrs_of(sch.mod["main"], func)
        return _with_attrs_of(rule._dispatch(words, sch, kernel, batch[0]), func)


class _WordsSchedule(_ProductRule):
    """The schedule of a kernel in words form, with ``lanes``-wide vectors."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def schedule_all(self, sch: Schedule, parallel: bool, passes: bool | None = None) -> None:
        _cpu_words_product(sch, sch.get_sblock("small"), parallel, self.lanes)
        out = next(s for s in analyse(sch).stages if s.name == "out")
        _cpu_copies(sch, out.block, parallel and (_many(out) if passes is None else passes))


MIN_PARALLEL_PANEL = 1 << 16
"""Tile weights from which a conv unpacks its panel in parallel: below, a parallel loop
costs more than the unpacking (ResNet-18-CIFAR's 64-channel convs: 36,864)."""


def _with_attrs_of(scheduled: tirx.PrimFunc, func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``scheduled`` (a rebuilt form of ``func``) with every attribute of ``func`` too
    (e.g. the op pattern that keeps the Relax pipelines from fusing it)."""
    for key, value in (func.attrs or {}).items():
        scheduled = scheduled.with_attr(key, value)
    return scheduled


def _child(sch: Schedule, name: str):
    """The top-level block ``name`` of ``sch``, or None."""
    root = root_block(sch)
    blocks = [] if root is None else sch.get_child_blocks(root)
    return next((b for b in blocks if sch.get(b).name_hint == name), None)


def _rows_per_batch(panel: tirx.PrimFunc) -> int:
    """Rows of the product per batch element: 1 for a linear, output positions per
    image for a conv (``small`` is channels last)."""
    if kernel_kind(panel) not in CONV_KINDS:
        return 1
    out = panel.params[-1]
    return math.prod(int(d) for d in out.shape[2:])


def _vector_lanes(target: Target | None) -> int:
    """float32 lanes of the target's widest vectors: 16 with AVX-512, else 8."""
    if target is None or target.kind.name != "llvm":
        return 8
    has = tvm.target.codegen.target_has_features
    return 16 if has("avx512f", target) else 8


def _rules_after(rule: ScheduleRule) -> tuple[ScheduleRule, ...]:
    return CPU_RULES[CPU_RULES.index(rule) + 1 :]


class RowTableProduct(_ProductRule):
    """Table-driven rows x tile rows product (iterations ``S S R R R``)."""

    name = "row-table-product"
    blocks_rows = True

    def matches(self, kernel: KernelAnalysis) -> bool:
        return kernel.table_product and kernel.product.iter_kinds == "SSRRR"

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis, parallel: bool) -> None:
        patches = kernel.first("im2col") if kernel.im2col_product else None
        patches = None if patches is None else patches.block
        _cpu_lut_gemm(sch, kernel.product.block, patches, parallel)


class ColumnTableProduct(_ProductRule):
    """Table-driven product with (word, byte, bit) output columns (``S S S S R``)."""

    name = "column-table-product"
    blocks_rows = True

    def matches(self, kernel: KernelAnalysis) -> bool:
        return kernel.table_product and kernel.product.iter_kinds == "SSSSR"

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis, parallel: bool) -> None:
        _cpu_column_table(sch, kernel.product.block, parallel)


class DirectConv(_ProductRule):
    """Conv product over the (padded) input, no im2col rows."""

    name = "direct-conv"

    def matches(self, kernel: KernelAnalysis) -> bool:
        return kernel.kind in CONV_KINDS and not kernel.im2col_product

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis, parallel: bool) -> None:
        _cpu_direct_conv(sch, kernel.product.block, parallel)


class ParallelOutputs(_ProductRule):
    """Any product: parallel over outputs, serial reduction (odd shapes)."""

    name = "parallel-outputs"

    def matches(self, kernel: KernelAnalysis) -> bool:
        return True

    def schedule_product(self, sch: Schedule, kernel: KernelAnalysis, parallel: bool) -> None:
        _cpu_reduce_simple(sch, kernel.product.block, parallel)


CPU_RULES: tuple[ScheduleRule, ...] = (
    Int8Product(),
    ChecksStaySerial(),
    WinogradProduct(),
    PanelProduct(),
    WordsProduct(),
    RowTableProduct(),
    ColumnTableProduct(),
    DirectConv(),
    ParallelOutputs(),
)
"""The CPU rules for tile kernels, in the order they are tried."""


# --------------------------------------------------------------------------- schedules


def _parallel(sch: Schedule, loop, enabled: bool) -> None:
    """``loop`` parallel when ``enabled`` and it may have more than one iteration."""
    n = known_extent(sch, loop)
    if enabled and (n is None or n > 1):
        sch.parallel(loop)


_SYMBOLIC_SIZE = 1 << 20
"""How many iterations a symbolic extent (the batch) counts for when weighing work."""


def _size(sch: Schedule, loop) -> int:
    """The extent of ``loop``; a symbolic one counts as :data:`_SYMBOLIC_SIZE`."""
    n = known_extent(sch, loop)
    return _SYMBOLIC_SIZE if n is None else n


def _cpu_elementwise(sch: Schedule, block, parallel: bool = True, vec: int = 8) -> None:
    """Parallel outer loops, vectorized innermost loop (any shape)."""
    loops = sch.get_loops(block)
    v = factor(static_multiple(sch, loops[-1]), (vec * 4, vec * 2, vec, 4, 2))
    if v > 1:
        outer_inner = sch.split(loops[-1], [None, v])
        sch.vectorize(outer_inner[1])
        loops = sch.get_loops(block)[:-1]
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _parallel(sch, fused, parallel)


def _cpu_reduce_simple(sch: Schedule, block, parallel: bool = True) -> None:
    """Parallel over all outputs, serial reduction (fallback for odd shapes)."""
    spatial, _ = split_loops(sch, block)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    _parallel(sch, fused, parallel)


def _cpu_lut_gemm(sch: Schedule, block, patches=None, parallel: bool = True) -> None:
    """``block[i, r] = sum over (word, byte, bit)``: the 8 bits of a table entry become
    vector lanes (rfactor); ``mr x nr`` register blocks accumulate over the whole
    reduction; parallel over blocks. ``block`` keeps the final 8-lane sum. With
    ``patches`` (im2col rows), a task is ``mr * mb`` rows x all tile rows and builds
    its patch rows first. With a symbolic number of rows (the batch) the blocks divide
    its known multiple (the rows per image, see :func:`_row_dispatch`)."""
    loops = sch.get_loops(block)
    m, rows = static_multiple(sch, loops[0]), extent(sch, loops[1])
    mr, mb = (_row_factor(m), 1) if patches is None else _row_blocks(m, cores())
    nr = _tile_rows(rows, mr)
    rf = sch.rfactor(loops[4], factor_axis=2)  # block_rf[i, r, lane]
    i, r, kw, kb, kl = sch.get_loops(rf)
    io, im, ii = sch.split(i, [None, mb, mr])
    ro, ri = sch.split(r, [None, nr])
    sch.reorder(io, ro, im, kw, kb, ii, ri, kl)
    task = sch.fuse(io, ro) if patches is None else io
    _parallel(sch, task, parallel)
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


def _cpu_column_table(sch: Schedule, block, parallel: bool = True) -> None:
    """``block[i, ow, ob, ol] = sum over j``: ``mr`` rows x one tile word of columns per
    register block, the 8 columns of a table entry as lanes, parallel over blocks."""
    i, ow, ob, ol, j = sch.get_loops(block)
    mr = _row_factor(static_multiple(sch, i))
    io, ii = sch.split(i, [None, mr])
    sch.reorder(io, ow, j, ii, ob, ol)
    outer = sch.fuse(io, ow)
    _parallel(sch, outer, parallel)
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


def _cpu_direct_conv(sch: Schedule, block, parallel: bool = True) -> None:
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
    _parallel(sch, outer, parallel)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, outer)
    sch.unroll(fi)
    if vec > 1:
        sch.vectorize(wi)
    init = sch.decompose_reduction(block, red[0])
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])


def _register_block(
    rows: int, filters: int, lanes: int, budget: int = 8, widths: tuple[int, ...] = (2, 1)
) -> tuple[int, int]:
    """(rows ``mr``, tile rows ``nr``) of a register block of ``mr x nr`` accumulators:
    ``nr`` the first of ``widths`` (in vectors of ``lanes``) that divides ``filters``,
    ``mr`` the most rows (16 at most) that keep ``budget`` vectors of accumulators."""
    nr = factor(filters, tuple(w * lanes for w in widths))
    if nr == 1:
        nr = filters if filters <= 2 * lanes else factor(filters, (8, 4, 2))
    vectors = max(1, nr // lanes)
    mr = factor(rows, tuple(r for r in (16, 8, 4, 2) if r * vectors <= budget))
    return mr, nr


def _widest_block(rows: int, filters: int, lanes: int, budget: int) -> tuple[int, int]:
    """``(mr, nr)``: of register blocks ``mr`` rows x 1, 2 or 4 vectors of filters
    (within ``budget`` vectors of accumulators), the one with the most accumulators, of
    equal ones the narrowest (more rows): a row of 4 positions gets 4 x 4 vectors, not
    4 x 1 (512-channel conv at 4x4). Filters not in whole vectors: :func:`_register_block`."""
    found = []
    for w in (1, 2, 4):
        if filters % (w * lanes) == 0:
            mr = factor(rows, tuple(r for r in (16, 8, 4, 2) if r * w <= budget))
            found.append((mr * w, -w, mr, w * lanes))
    if not found:
        return _register_block(rows, filters, lanes, budget)
    _, _, mr, nr = max(found)
    return mr, nr


def _cpu_panel_conv(sch: Schedule, block, parallel: bool, lanes: int):
    """``small (n, *out_sp, filters)`` of a conv in panel form: a register block is ``mr``
    consecutive output positions of a row x ``nr`` filters (the vector), accumulated
    over every input channel and tap (one broadcast input value per position and tap);
    parallel over tasks of (image, output row, ``mr`` positions). Returns the task loop:
    the caller builds the task's padded input rows and writes its outputs (scale, bias,
    channels first) inside it, so a conv is two parallel loops (panel, tasks), not four
    (smaller layers ran about 1.2x faster so on two busy cores)."""
    spatial, red = split_loops(sch, block)
    batch, *sp, filt = spatial
    # AVX-512 has 32 vector registers: 16 accumulators of one vector of filters each
    # (64-channel 3x3 conv at batch 16: 24.4 -> 19.8 ms against 4 positions x 2 vectors)
    budget = 16 if lanes >= 16 else 8
    mr, nr = _widest_block(extent(sch, sp[-1]), extent(sch, filt), lanes, budget)
    wo, wi = sch.split(sp[-1], [None, mr])
    fo, fi = sch.split(filt, [None, nr])
    outer = [batch, *sp[:-1], wo]
    sch.reorder(*outer, fo, *red, wi, fi)
    task = sch.fuse(*outer)
    _parallel(sch, task, parallel)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, fo)
    sch.unroll(wi)
    _vectorize(sch, fi)
    init = sch.decompose_reduction(block, red[0])
    _vectorize(sch, sch.get_loops(init)[-1])
    _vectorize(sch, sch.get_loops(acc)[-1])
    return task


def _cpu_panel_linear(sch: Schedule, block, parallel: bool, lanes: int) -> None:
    """``small (m, rows)`` of a linear in panel form (``m`` a multiple of
    :data:`..kernels.PANEL_ROW_BLOCK`): a task is a block of tile rows for a chunk of
    the input rows (chunks only when the tile rows give too few tasks, e.g. ViT's 72);
    per block of ``kb`` inputs it unpacks its panel (``kb x`` its rows, cache-sized,
    a vector of tile rows at a time) and runs ``mr x nr`` register blocks over it (one
    broadcast input value per row and input), accumulating in a task-local tile."""
    i, r, k = sch.get_loops(block)
    rows, depth = extent(sch, r), extent(sch, k)
    mr, nr, per_task = _panel_linear_tasks(rows, lanes)
    chunks = _input_row_chunks(rows // per_task, static_multiple(sch, i), mr)
    kb = factor(depth, (256, 128, 64, 32, 16, 8)) if depth > 256 else depth
    ro, rm, ri = sch.split(r, [None, per_task // nr, nr])
    ko, ki = sch.split(k, [None, kb])
    it, io, ii = sch.split(i, [chunks, None, mr])
    sch.reorder(ro, it, ko, io, rm, ki, ii, ri)
    task = sch.fuse(ro, it)
    _parallel(sch, task, parallel)
    for name in ("panel", "words"):  # consumer first: both at the same loop
        stage = _child(sch, name)
        if stage is not None:
            sch.compute_at(stage, ko)
            _vectorize(sch, sch.get_loops(stage)[-1])
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, task)
    sch.unroll(ii)
    _vectorize(sch, ri)
    init = sch.decompose_reduction(block, ko)
    _vectorize(sch, sch.get_loops(init)[-1])
    _vectorize(sch, sch.get_loops(acc)[-1])


def _cpu_copies(sch: Schedule, out, parallel: bool) -> None:
    """Block ``out (m, n)`` of a linear (the ``p`` scaled copies of ``small``'s tile rows
    side by side) as ``(m, p, rows)`` loops: a copy's tile rows are contiguous vectors
    of up to 32 lanes (no ``j % rows`` per element), parallel over (row, copy)."""
    func = sch.mod["main"]
    rows = int(func.params[-1].shape[1]) // int(func.params[2].shape[0])  # n // p
    sch.transform_block_layout(out, lambda i, j: (i, j // rows, j % rows))
    i, c, r = sch.get_loops(out)
    _parallel(sch, sch.fuse(i, c), parallel)
    # one vector of all the tile rows would be thousands of lanes for a binary layer
    # (p=1): LLVM then took minutes to compile the kernel
    vectorize_inner(sch, r, (32, 16, 8, 4, 2))


def _panel_linear_block(rows: int, lanes: int) -> tuple[int, int]:
    """``(mr, nr)`` register block of a linear's panel product: 8 input rows x one
    vector of tile rows (two were no faster on Zen 4); fewer tile rows than a vector
    all at once."""
    mr = 8
    if rows % lanes == 0:
        return mr, lanes
    return mr, rows if rows <= 2 * lanes else factor(rows, (8, 4, 2))


def _panel_linear_tasks(rows: int, lanes: int) -> tuple[int, int, int]:
    """``(mr, nr, per_task)`` of a linear's panel product over ``rows`` (padded) tile
    rows: its register block and the tile rows of a task (enough tasks for the cores
    where the tile rows allow)."""
    mr, nr = _panel_linear_block(rows, lanes)
    per_task = next(
        (t for t in (64, 32, 16) if rows % t == 0 and t % nr == 0 and rows // t >= 2 * cores()),
        rows,
    )
    return mr, nr, per_task


def _wants_row_chunks(row_tasks: int) -> bool:
    """True when a linear's tile-row tasks leave cores idle (too few, or uneven)."""
    n = cores()
    return row_tasks % n != 0 and row_tasks < 4 * n


def _input_row_chunks(row_tasks: int, row_multiple: int, mr: int) -> int:
    """Chunks of the input rows a linear's panel product is split into, so that its
    tasks keep every core busy: one when its tile-row tasks already do (or the rows do
    not split into whole register blocks), else one per core."""
    n = cores()
    if not _wants_row_chunks(row_tasks) or row_multiple % (n * mr):
        return 1
    return n


def _panel_row_block(func: tirx.PrimFunc, lanes: int) -> int:
    """Input rows per block of a linear's panel form: one register block (8), or one per
    core when its product splits the input rows over the cores (:func:`_input_row_chunks`);
    rows are padded to it, so no more (CLIP's 50 tokens: 56 rows, not 64). 0 (the
    default) for other kernels."""
    spec = kernel_spec(func, "linear_aligned")
    if spec is None:
        return 0
    rows = padded_tile_rows(int(spec["out_features"]) // int(spec["p"]))
    mr, _, per_task = _panel_linear_tasks(rows, lanes)
    return mr * (cores() if _wants_row_chunks(rows // per_task) else 1)


def _cpu_words_product(sch: Schedule, block, parallel: bool, lanes: int) -> None:
    """``small[i, r] = sum over (word, bit)`` of a linear in words form: the bits of a
    word become ``lanes`` partial sums (rfactor), ``nr`` tile rows share each vector of
    inputs (and its negation), a task is ``per_task`` tile rows for every input row.
    Measured on Zen 4 (4096x4096 p=8, batch 1): best 0.03 ms against 0.12 for the table
    form (the same signed sums: one compare and one blend per 16 weights instead of a
    table load and a sign flip per 8)."""
    i, r, kw, kl = sch.get_loops(block)
    rows = extent(sch, r)
    nr = factor(rows, (8, 4, 2))
    per_task = next(
        (t for t in (64, 32, 16) if rows % t == 0 and t % nr == 0 and rows // t >= 4 * cores()),
        nr,
    )
    klo, kli = sch.split(kl, [None, min(lanes, extent(sch, kl))])
    rf = sch.rfactor(kli, factor_axis=2)  # rf[i, r, lane]
    i, r, kw, klo, kli = sch.get_loops(rf)
    ro, rm, ri = sch.split(r, [None, per_task // nr, nr])
    sch.reorder(ro, i, rm, kw, klo, ri, kli)
    _parallel(sch, ro, parallel)
    acc = sch.cache_write(rf, 0, "local")
    sch.reverse_compute_at(acc, rm)
    for loop in (klo, ri):
        sch.unroll(loop)
    sch.vectorize(kli)
    init = sch.decompose_reduction(rf, kw)
    _vectorize(sch, sch.get_loops(init)[-1])
    _vectorize(sch, sch.get_loops(acc)[-1])
    sch.reverse_compute_at(block, ro)  # the sum of the lanes
    lane, *rest = sch.get_loops(block)[1:]  # one row's lanes at a time: LLVM had
    sch.reorder(*rest, lane)  # gathered and scattered across rows
    sch.unroll(lane)


def _vectorize(sch: Schedule, loop) -> None:
    """``loop`` as a vector when it has more than one iteration (TVM refuses one)."""
    if known_extent(sch, loop) != 1:
        sch.vectorize(loop)


# --------------------------------------------------------------------------- generic


def parallelize_generic(
    func: tirx.PrimFunc,
    min_work: int = MIN_PARALLEL_WORK,
    min_elementwise: int = MIN_PARALLEL_ELEMENTS,
) -> tirx.PrimFunc:
    """Default CPU schedule for the functions no rule scheduled (TVM-legalized operators
    such as attention, softmax, LayerNorm, matmuls, and the chains FuseOps made):

    0. float32 ``erf`` and ``sigmoid`` calls become TOPI's polynomials, which vectorize
       (:func:`.fast_math.with_fast_math`: GELU, SiLU, QuickGELU);
    1. :func:`inline_producers`: intermediate blocks folded into their readers, so an
       elementwise chain is one pass over memory and layout changes cost no pass;
    2. a function with reductions is scheduled row by row when it can be
       (:func:`_try_row_fusion`: every block computed inside the row loops of the last
       one, one parallel loop over rows, vector lanes inside a row); data movement
       left after the last reduction is scheduled as elementwise (step 4);
    3. otherwise every reduction block doing at least ``min_work`` iterations gets its
       innermost reduction split into 8 vector lanes (``rfactor``, when contiguous and
       long enough) and its leading data-parallel loops run in parallel;
    4. every elementwise block of at least ``min_elementwise`` iterations gets its
       innermost loop vectorized and its outer loops fused and parallel.

    Smaller work stays serial: its fork and join would cost more than it takes. A step
    a block refuses is skipped; the result is exact either way. A function with a
    symbolic batch runs serially below the batch at which it does that much work
    (``min_work``, or ``min_elementwise`` without reductions), parallel from there
    (:func:`.base.dispatch`). A legalized attention gets its own kernel instead
    (:func:`.attention_cpu.schedule_attention`)."""
    attention = schedule_attention(func, _vector_lanes(Target.current(allow_none=True)))
    if attention is not None:
        return attention
    batch = shape_vars(func)
    if len(batch) == 1:
        root = root_block(Schedule(func))
        reduction = root is not None and _any_reduction(func)
        small = _serial_below(
            func, batch[0], min_work if reduction else min_elementwise, _unit_iterations
        )
        if small > 1:
            serial = _parallelize_generic(func, _NEVER, _NEVER)
            parallel = _parallelize_generic(func, min_work, min_elementwise)
            return dispatch(func, [(batch[0] < small, serial)], parallel)
    return _parallelize_generic(func, min_work, min_elementwise)


_NEVER = 1 << 62
"""A work threshold no function reaches."""


def _any_reduction(func: tirx.PrimFunc) -> bool:
    sch = Schedule(func)
    return any(reduces(sch, b) for b in sch.get_child_blocks(root_block(sch)))


def _unit_iterations(func: tirx.PrimFunc) -> int:
    """Block iterations of a static function (its top-level blocks); 0 without blocks."""
    sch = Schedule(func)
    root = root_block(sch)
    return 0 if root is None else sum(_iterations(sch, b) for b in sch.get_child_blocks(root))


def _parallelize_generic(func: tirx.PrimFunc, min_work: int, min_elementwise: int) -> tirx.PrimFunc:
    """:func:`parallelize_generic` for one case of the batch."""
    sch = Schedule(with_fast_math(func))
    root = root_block(sch)
    if root is None:
        return func
    inline_producers(sch, root)
    fused = _try_row_fusion(sch, root, min_work)
    if fused is not None:
        sch, rest = fused
    else:
        rest = sch.get_child_blocks(root)
    for block in rest:
        if not reduces(sch, block):
            sch = _try_parallel_elementwise(sch, block, min_elementwise) or sch
            continue
        rf_sch, rf_block = _try_vector_reduction(sch, block, min_work)
        if rf_block is not None:
            sch = _try_parallel_prefix(rf_sch, rf_block, min_work) or rf_sch
        sch = _try_parallel_prefix(sch, block, min_work) or sch
    return sch.mod["main"]


def _try_row_fusion(sch: Schedule, root, min_work: int, lanes: int = 8) -> tuple | None:
    """(schedule, blocks left to schedule) with the blocks up to the last reduction
    computed row by row, or None when the function does not fit (no reduction, a block
    TVM cannot move into the rows, a last block with a single data-parallel loop).

    A row is one iteration of the leading data-parallel loops of the last of those
    blocks (all but its innermost): e.g. a row of LayerNorm or softmax, or one query row
    of one attention head, where every intermediate is a row or a few numbers. The row
    loop is parallel when the function does ``min_work`` iterations. Inside a row:
    reductions over a contiguous innermost index keep ``lanes`` partial sums as a vector
    (``rfactor``, done first: TVM refuses it inside another loop); reductions whose
    output index is contiguous in an input (``x[k] * w[k, j]``) run with ``j`` as the
    vector; data-parallel blocks get their innermost loop as the vector."""
    blocks = sch.get_child_blocks(root)
    body, tail = _split_movement_tail(sch, blocks)
    if not any(reduces(sch, b) for b in body):
        return None
    work = sum(_iterations(sch, b) for b in blocks)
    trial = sch.copy()
    try:
        rf_blocks = [rf for b in body if (rf := _try_lane_rfactor(trial, b, lanes)) is not None]
        tail_names = {trial.get(b).name_hint for b in tail}
        body = [b for b in trial.get_child_blocks(root) if trial.get(b).name_hint not in tail_names]
        spatial, _ = split_loops(trial, body[-1])
        if len(spatial) < 2:
            return None
        for block in reversed(body[:-1]):
            trial.compute_at(block, spatial[-2], preserve_unit_loops=True)
        rows = trial.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        _parallel(trial, rows, work >= min_work)
        rf_names = {trial.get(rf).name_hint for rf in rf_blocks}
        for block in rf_blocks:
            _lane_loop_innermost(trial, block, lanes)
        for block in body:
            if trial.get(block).name_hint not in rf_names:
                _vectorize_in_row(trial, block, lanes)
    except ScheduleError:
        return None
    return trial, tail


def _split_movement_tail(sch: Schedule, blocks: list) -> tuple[list, list]:
    """(blocks, trailing data-movement blocks): a transpose after the last reduction is
    better as its own elementwise pass than as the row anchor."""
    body = list(blocks)
    tail = []
    while (
        len(body) > 1
        and not reduces(sch, body[-1])
        and _value_kind(sch.get(body[-1]).body) == "move"
    ):
        tail.insert(0, body.pop())
    return body, tail


def _iterations(sch: Schedule, block) -> int:
    """Iterations of ``block`` (its iteration domain; symbolic extents count as large)."""
    total = 1
    for iv in sch.get(block).iter_vars:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return 1 << 40
        total *= int(iv.dom.extent)
    return total


def _single_reduction_var(sch: Schedule, block) -> tirx.Var | None:
    red = [iv.var for iv in sch.get(block).iter_vars if int(iv.iter_type) == 2]
    return red[0] if len(red) == 1 else None


def _try_lane_rfactor(sch: Schedule, block, lanes: int):
    """The rfactor block of ``block``'s single reduction split into ``lanes`` partial
    sums (the lane index last), when every input it reduces over is contiguous in it;
    else None (``block`` unchanged)."""
    k = _single_reduction_var(sch, block)
    if k is None:
        return None
    contiguous = _contiguous_reads(sch, block, k)
    _, reduction = split_loops(sch, block)
    n = known_extent(sch, reduction[0])
    if n is None or not contiguous or not all(contiguous) or n % lanes or n < 2 * lanes:
        return None
    _, inner = sch.split(reduction[0], [None, lanes])
    return sch.rfactor(inner, factor_axis=len(sch.get(block).iter_vars) - 1)


def _lane_loop_innermost(sch: Schedule, rf, lanes: int) -> None:
    """Inside a row, move the lane loop of an rfactor block innermost and vectorize it
    (compute_at makes one loop per block variable, in the block's variable order)."""
    block = sch.get(rf)
    lane = block.writes[0].region[-1].min
    ivs = list(block.iter_vars)
    pos = next((i for i, iv in enumerate(ivs) if iv.var.same_as(lane)), None)
    loops = sch.get_loops(rf)[-len(ivs) :]
    if pos is None or len(loops) != len(ivs) or known_extent(sch, loops[pos]) != lanes:
        return  # not the loop nest compute_at makes: leave the lanes serial
    sch.reorder(*[loop for i, loop in enumerate(loops) if i != pos], loops[pos])
    sch.vectorize(loops[pos])


def _vectorize_in_row(sch: Schedule, block, lanes: int) -> None:
    """Vector lanes for one block inside a row (see :func:`_try_row_fusion`)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if not reduces(sch, block):
        inner = factor(static_multiple(sch, loops[-1]), (lanes,))
        if inner > 1:
            sch.vectorize(sch.split(loops[-1], [None, inner])[1])
        return
    k = _single_reduction_var(sch, block)
    spatial, reduction = split_loops(sch, block)
    if k is None or len(reduction) != 1 or not spatial or static_multiple(sch, spatial[-1]) % lanes:
        return
    j = [iv.var for iv in sch.get(block).iter_vars if int(iv.iter_type) == 0][-1]
    if all(_contiguous_reads(sch, block, k)) or not any(_contiguous_reads(sch, block, j)):
        return  # reduces over the contiguous index (a lane sum), or nothing to vectorize
    outer, inner = sch.split(spatial[-1], [None, lanes])
    sch.reorder(reduction[0], outer, inner)
    sch.vectorize(inner)
    init = sch.decompose_reduction(block, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


def _contiguous_reads(sch: Schedule, block, var: tirx.Var) -> list[bool]:
    """For each input region of ``block`` indexed by ``var``: True when ``var`` is only
    in its last (contiguous) index, after simplifying the indices over the block's
    iteration domain (inlined reshapes leave ``(k // 64 + i) % 64``-like indices)."""
    b = sch.get(block)
    analyzer = tvm.sym.Analyzer()
    for iv in b.iter_vars:
        analyzer.bind(iv.var, iv.dom)
    out = []
    for region in b.reads:
        idx = [analyzer.simplify(r.min) for r in region.region]
        if any(_uses(i, var) for i in idx):
            out.append(_uses(idx[-1], var) and not any(_uses(i, var) for i in idx[:-1]))
    return out


def _uses(expr: object, var: tirx.Var) -> bool:
    """True when ``expr`` refers to ``var``."""
    if isinstance(expr, tirx.Var):
        return expr.same_as(var)
    for name in ("a", "b", "value", "condition", "true_value", "false_value"):
        if hasattr(expr, name) and _uses(getattr(expr, name), var):
            return True
    for name in ("args", "indices"):
        if hasattr(expr, name) and any(_uses(x, var) for x in getattr(expr, name)):
            return True
    return False


_COSTLY_CALLS = frozenset(
    f"tirx.{name}"
    for name in (
        "exp", "exp2", "exp10", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow",
        "tanh", "sigmoid", "erf", "sin", "cos", "tan", "asin", "acos", "atan", "atan2",
    )
)  # fmt: skip


def inline_producers(sch: Schedule, root) -> None:
    """Inline the data-parallel blocks of ``root`` that feed other blocks, where that
    adds no work: pure data movement (a load, maybe cast: transpose, reshape, broadcast
    copies) into any reader; other arithmetic without costly calls (``exp``, ``sqrt``,
    ...) into data-parallel readers only (inlined into a reduction it would be redone
    for every reduction step). Costly blocks stay, computed once. A block TVM refuses to
    inline stays too."""
    for block in sch.get_child_blocks(root):
        if reduces(sch, block) or not sch.get_consumers(block):
            continue
        kind = _value_kind(sch.get(block).body)
        if kind == "costly":
            continue
        if kind == "arith" and any(reduces(sch, c) for c in sch.get_consumers(block)):
            continue
        try:
            sch.compute_inline(block)
        except ScheduleError:  # e.g. it writes an output, or a reader is not affine
            continue


def _value_kind(body: object) -> str:
    """``"move"`` for a store of a load (maybe cast), ``"costly"`` when the stored value
    calls a costly function on a non-constant, else ``"arith"``."""
    value = getattr(body, "value", None)
    if not isinstance(body, tirx.BufferStore) or value is None:
        return "costly"  # not a plain store: leave it alone
    inner = value.value if isinstance(value, tirx.Cast) else value
    if isinstance(inner, tvm.ir.TensorLoad):  # what tirx.BufferLoad builds
        return "move"
    return "costly" if _has_costly_call(value) else "arith"


def _has_costly_call(expr: object) -> bool:
    op = getattr(expr, "op", None)
    args = getattr(expr, "args", None)
    if op is not None and args is not None:  # a call
        if getattr(op, "name", "") in _COSTLY_CALLS and not all(_is_constant(a) for a in args):
            return True
        return any(_has_costly_call(a) for a in args)
    children = ("a", "b", "value", "condition", "true_value", "false_value")
    return any(_has_costly_call(getattr(expr, c)) for c in children if hasattr(expr, c))


def _is_constant(expr: object) -> bool:
    return isinstance(expr, (tirx.IntImm, tirx.FloatImm))


def _try_parallel_elementwise(sch: Schedule, block, min_elements: int) -> Schedule | None:
    """A copy of ``sch`` with the data-parallel ``block`` vectorized (its trailing loops
    fused up to a vector's width) and, from ``min_elements`` iterations on, parallel
    over its outer loops (a symbolic extent, the batch, counts as large); None when TVM
    refuses a step."""
    loops = sch.get_loops(block)
    if not loops:
        return None
    trial = sch.copy()
    try:
        _fuse_trailing(trial, block, 8)
        work = math.prod(_size(sch, loop) for loop in loops)
        _cpu_elementwise(trial, block, work >= min_elements)
    except ScheduleError:
        return None
    return trial


def _fuse_trailing(sch: Schedule, block, lanes: int) -> None:
    """Fuse the innermost loops of ``block`` while the innermost is shorter than
    ``lanes`` (e.g. the 4 x 4 pixels of a channel become one loop of 16)."""
    loops = sch.get_loops(block)
    n = 1
    while n < len(loops) and math.prod(_size(sch, lp) for lp in loops[-n:]) < lanes:
        n += 1
    if n > 1:
        sch.fuse(*loops[-n:])


def _try_vector_reduction(sch: Schedule, block, min_work: int, lanes: int = 8):
    """(copy of ``sch``, rfactor block) with the single innermost reduction loop of
    ``block`` split into ``lanes`` partial sums computed as a vector; ``(sch, None)``
    when the block does not fit (several reductions, short or odd extent)."""
    spatial, reduction = split_loops(sch, block)
    if len(reduction) != 1 or not spatial:
        return sch, None
    n = known_extent(sch, reduction[0])
    if n is None:
        return sch, None
    work = n
    for loop in spatial:
        work *= _size(sch, loop)
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
    extents = [_size(sch, loop) for loop in spatial]
    work = 1
    for e in extents + [_size(sch, loop) for loop in reduction]:
        work *= e
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
