"""Hand-written schedules for the tile-op kernels of :mod:`.kernels`.

Entry point: :func:`schedule_for`. It dispatches on the kernel kind (the
``tbn_kernel`` attribute the builders set) and the target kind (``llvm``/``c`` or
``cuda``) and returns a new, scheduled PrimFunc; the input is not modified.
Every schedule is exact for every shape: CPU loop splits only use factors that divide
the extent (no bound predicates, clean vector loops); CUDA splits may leave a
predicated tail, which TVM guards.

CPU (``llvm``): build with a target that names the CPU (see :func:`host_target`);
plain ``"llvm"`` means generic x86-64 (SSE2) and runs these kernels about 2x slower.

* Table-driven products (``linear_aligned``, realigned ``linear_general``, im2col
  convs): the 8 bits of one sign-table entry become the vector lanes (``rfactor``);
  a register block of ``mr`` input rows x ``nr`` tile rows x 8 lanes stays in
  registers over the whole reduction; parallel over blocks. For convs each parallel
  task first builds its im2col rows (a cache-sized ``patches`` block).
* ``(in, out)`` products: output columns are the lanes (one table entry = 8
  columns); ``mr`` rows x 32 columns (one tile word) per register block.
* Direct convs (filters not whole words, depthwise): output width is the vector,
  ``fr`` filters per register block, one scalar sign per filter tap.
* Anything else: parallel over outputs, serial reduction.
* ``gather`` (checked gather): serial. Its range assert must stay out of
  parallel loops: an assert failing inside a parallel task is not reported and
  leaves the output unwritten.

CUDA: a warp per tile row for the table-driven products (lanes over packed words,
warp-shuffle reduction, row blocks on ``threadIdx.y``); one output per thread for
the other stages. Sign table, padding and im2col are inlined (bit tests on
registers, no intermediate copies). CUDA kernels cannot raise, so their asserts
(the gather range check) are dropped; the kernels stay in bounds without them.

A schedule step TVM refuses raises :class:`ScheduleError` (a ``RuntimeError``);
the optional steps of :func:`parallelize_generic` catch exactly that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from .kernels import kernel_kind

__all__ = ["schedule_for", "host_target", "parallelize_generic", "KINDS"]

KINDS = (
    "linear_aligned",
    "linear_in_out_aligned",
    "linear_general",
    "conv_aligned",
    "conv_general",
    "gather",
)

_REDUCE = 2  # IterVar.CommReduce


def host_target() -> Target:
    """LLVM target for this machine's CPU (e.g. ``znver3``: AVX2 + FMA)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return Target({"kind": "llvm", "mcpu": cpu})


def schedule_for(
    func: tirx.PrimFunc, target: Target | str | dict, kind: str | None = None
) -> tirx.PrimFunc:
    """Schedule a kernel built by :mod:`.kernels` for ``target``.

    ``kind`` defaults to the function's ``tbn_kernel`` attribute (one of
    :data:`KINDS`). Returns the scheduled PrimFunc (attributes kept).
    """
    target = target if isinstance(target, Target) else Target(target)
    kind = kind or kernel_kind(func)
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    name = target.kind.name
    if name == "cuda":
        sch = Schedule(_without_asserts(func))
        _CUDA[kind](sch, int(target.attrs.get("max_num_threads", 1024)))
    elif name in ("llvm", "c"):
        sch = Schedule(func)
        _CPU[kind](sch)
    else:
        raise ValueError(f"no tbn schedules for target kind {name!r}")
    return sch.mod["main"]


# --------------------------------------------------------------------------- helpers


def _without_asserts(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` without its assert statements (device code has no way to raise)."""
    return tirx.transform.SkipAssert()(tvm.IRModule({"main": func}))["main"]


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _factor(n: int, candidates: Sequence[int]) -> int:
    """Largest candidate (in the given order) dividing ``n``; 1 if none does."""
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return 1


def _block(sch: Schedule, name: str):
    """The block called ``name``, or ``None``."""
    try:
        return sch.get_sblock(name)
    except ScheduleError:  # no such block
        return None


def _n_reduce(sch: Schedule, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == _REDUCE)


def _split_loops(sch: Schedule, block) -> tuple[list, list]:
    """(spatial loops, reduction loops) of a TE-made block (reductions come last)."""
    loops = sch.get_loops(block)
    nr = _n_reduce(sch, block)
    return (list(loops[: len(loops) - nr]), list(loops[len(loops) - nr :]))


def _reduction_block(sch: Schedule):
    """The main reduction block: ``small`` (aligned kernels), else ``acc`` or ``out``."""
    for name in ("small", "acc", "out"):
        b = _block(sch, name)
        if b is not None and _n_reduce(sch, b):
            return b
    raise ValueError("kernel has no reduction block")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


# --------------------------------------------------------------------------- CPU


def _cpu_elementwise(sch: Schedule, block, vec: int = 8) -> None:
    """Parallel outer loops, vectorized innermost loop (any shape)."""
    loops = sch.get_loops(block)
    v = _factor(_extent(sch, loops[-1]), (vec * 4, vec * 2, vec, 4, 2))
    if v > 1:
        outer_inner = sch.split(loops[-1], [None, v])
        sch.vectorize(outer_inner[1])
        loops = sch.get_loops(block)[:-1]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if _extent(sch, fused) > 1:
        sch.parallel(fused)


def _cpu_reduce_simple(sch: Schedule, block) -> None:
    """Parallel over all outputs, serial reduction (fallback for odd shapes)."""
    spatial, _ = _split_loops(sch, block)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    if _extent(sch, fused) > 1:
        sch.parallel(fused)


def parallelize_generic(func: tirx.PrimFunc, min_work: int = 4096) -> tirx.PrimFunc:
    """Default CPU schedule for kernels nobody scheduled (TVM-legalized ops such as
    attention, softmax, LayerNorm): every top-level reduction block doing at least
    ``min_work`` iterations gets its innermost reduction split into 8 vector lanes
    (``rfactor``, when it is contiguous and long enough) and its leading data-parallel
    loops run in parallel (fused until there are a few tasks per core). A step a block
    refuses is skipped; the result is exact either way."""
    sch = Schedule(func)
    root = _block(sch, "root")
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
    spatial, reduction = _split_loops(sch, block)
    if len(reduction) != 1 or not spatial:
        return sch, None
    extent = _extent(sch, reduction[0])
    work = extent
    for loop in spatial:
        work *= _extent(sch, loop)
    if extent % lanes or extent < 2 * lanes or work < min_work:
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
    spatial, reduction = _split_loops(sch, block)
    extents = [_extent(sch, loop) for loop in spatial]
    work = 1
    for e in extents + [_extent(sch, loop) for loop in reduction]:
        work *= e
    # Elementwise kernels are memory-bound: on a few cores their fork/join costs more
    # than it saves (measured on ResNet-18). Reductions (matmuls, softmax) gain.
    if not spatial or not reduction or work < min_work:
        return None
    n, tasks = 0, 1
    while n < len(spatial) and tasks < 4 * _cores():
        tasks *= extents[n]
        n += 1
    trial = sch.copy()
    try:
        loops = trial.get_loops(block)[:n]
        trial.parallel(trial.fuse(*loops) if n > 1 else loops[0])
    except ScheduleError:  # not a data-parallel prefix
        return None
    return trial


def _cpu_linear_aligned(sch: Schedule) -> None:
    small = sch.get_sblock("small")
    if len(sch.get_loops(small)) != 5:  # in_features % 8 != 0: bit-serial reduction
        _cpu_reduce_simple(sch, small)
    else:
        _cpu_lut_gemm(sch, small)
    _cpu_elementwise(sch, sch.get_sblock("out"))


def _cpu_lut_gemm(sch: Schedule, block, patches=None) -> None:
    """``block[i, r] = sum over (word, byte, bit)``: the 8 bits of a table entry become
    vector lanes (rfactor); ``mr x nr`` register blocks accumulate over the whole
    reduction; parallel over blocks. ``block`` keeps the final 8-lane sum. With
    ``patches`` (im2col rows), a task is ``mr * mb`` rows x all tile rows and builds
    its patch rows first."""
    loops = sch.get_loops(block)
    m, rows = _extent(sch, loops[0]), _extent(sch, loops[1])
    mr, mb = (_factor(m, (4, 2)), 1) if patches is None else _row_blocks(m, _cores())
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


def _cpu_linear_in_out_aligned(sch: Schedule) -> None:
    xs = _block(sch, "xs")
    if xs is not None:
        _cpu_reduce_simple(sch, xs)
    small = sch.get_sblock("small")
    loops = sch.get_loops(small)
    if len(loops) != 5:  # out_features % 32 != 0
        _cpu_reduce_simple(sch, small)
        _cpu_elementwise(sch, sch.get_sblock("out"))
        return
    i, ow, ob, ol, j = loops
    mr = _factor(_extent(sch, i), (4, 2))
    io, ii = sch.split(i, [None, mr])
    sch.reorder(io, ow, j, ii, ob, ol)
    outer = sch.fuse(io, ow)
    sch.parallel(outer)
    acc = sch.cache_write(small, 0, "local")
    sch.reverse_compute_at(acc, outer)
    sch.unroll(ii)
    sch.unroll(ob)
    sch.vectorize(ol)
    init = sch.decompose_reduction(small, j)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    _cpu_elementwise(sch, sch.get_sblock("out"))


def _cpu_linear_general(sch: Schedule) -> None:
    if _block(sch, "small") is not None:  # (in, out) weight, realigned words
        _cpu_linear_in_out_aligned(sch)
        return
    block = _reduction_block(sch)
    has_epilogue = sch.get(block).name_hint != "out"
    if len(sch.get_loops(block)) == 5:  # (out, in) weight, realigned words
        _cpu_lut_gemm(sch, block)
    else:
        _cpu_reduce_simple(sch, block)
    if has_epilogue:
        _cpu_elementwise(sch, sch.get_sblock("out"))


def _tile_rows(rows: int, mr: int) -> int:
    """Tile rows per register block for ``mr`` input rows: ``mr * nr`` accumulators
    of 8 lanes stay within 8 of the 16 AVX2 registers (measured best on Zen 3)."""
    return _factor(rows, {4: (2,), 2: (4, 2)}.get(mr, (8, 4, 2)))


def _row_blocks(m: int, cores: int) -> tuple[int, int]:
    """(register rows ``mr``, register blocks per task ``mb``) for ``m`` rows: tasks
    of ``mr * mb <= 32`` rows that split evenly over ``cores`` (or are many)."""
    for mr in (4, 2, 1):
        if m % mr:
            continue
        q = m // mr
        for mb in range(min(q, 32 // mr), 0, -1):
            if q % mb == 0 and ((q // mb) % cores == 0 or q // mb >= 8 * cores):
                return mr, mb
    return _factor(m, (4, 2)), 1


def _cpu_conv_im2col(sch: Schedule) -> None:
    """Table-driven product over im2col rows, then the NCHW epilogue."""
    xpad = _block(sch, "xpad")
    if xpad is not None:
        _cpu_elementwise(sch, xpad)
    _cpu_lut_gemm(sch, sch.get_sblock("small"), patches=sch.get_sblock("patches"))
    _cpu_elementwise(sch, sch.get_sblock("out"))


def _cpu_conv(sch: Schedule) -> None:
    """im2col form (see :func:`_cpu_conv_im2col`); direct form: ``fr`` filters x
    output-width vector per register block, one scalar sign per filter tap."""
    if _block(sch, "patches") is not None:
        _cpu_conv_im2col(sch)
        return
    xpad = _block(sch, "xpad")
    if xpad is not None:
        _cpu_elementwise(sch, xpad)
    block = _reduction_block(sch)
    has_epilogue = sch.get(block).name_hint != "out"
    spatial, red = _split_loops(sch, block)
    batch, filt, *sp = spatial
    width = _extent(sch, sp[-1])
    vec = width if width <= 16 else _factor(width, (16, 8, 4, 2))
    fr = _factor(_extent(sch, filt), (4, 2))
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
    if has_epilogue:
        _cpu_elementwise(sch, sch.get_sblock("out"))


def _cpu_serial(sch: Schedule) -> None:
    """Leave the kernel as built (serial loops)."""


_CPU: dict[str, Callable[[Schedule], None]] = {
    "linear_aligned": _cpu_linear_aligned,
    "linear_in_out_aligned": _cpu_linear_in_out_aligned,
    "linear_general": _cpu_linear_general,
    "conv_aligned": _cpu_conv,
    "conv_general": _cpu_conv,
    "gather": _cpu_serial,
}


# --------------------------------------------------------------------------- CUDA


def _cuda_flat(sch: Schedule, block, threads: int) -> None:
    """One output per thread: fuse the spatial loops, bind blocks and threads."""
    spatial, _ = _split_loops(sch, block)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    n = _extent(sch, fused)
    t = min(threads, 256, max(32, n))
    bx, tx = sch.split(fused, [None, t])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _cuda_inline_helpers(sch: Schedule) -> None:
    for name in ("sign_lut", "xpad", "patches"):
        b = _block(sch, name)
        if b is not None:
            sch.compute_inline(b)


def _cuda_all_flat(sch: Schedule, threads: int, skip: str = "") -> None:
    """Every remaining block but ``skip``: one output per thread (serial reductions)."""
    for name in ("xs", "small", "acc", "out"):
        b = _block(sch, name)
        if b is not None and name != skip:
            _cuda_flat(sch, b, threads)


def _cuda_generic(sch: Schedule, threads: int) -> None:
    _cuda_inline_helpers(sch)
    _cuda_all_flat(sch, threads)


def _cuda_table_product(sch: Schedule, threads: int, unroll: bool = True) -> None:
    """Reductions split (word, byte, bit): a warp per output, lanes over packed words
    (warp-shuffle reduction), ``ry`` outputs of a row block on ``threadIdx.y``. The
    byte and bit loops are unrolled for aligned kernels (constant shifts); the general
    kernels' realigned-word math is too large to unroll 32 times."""
    _cuda_inline_helpers(sch)
    block = _reduction_block(sch)
    loops = sch.get_loops(block)
    words = _extent(sch, loops[2]) if _n_reduce(sch, block) == 3 else 0
    if words < 8:
        _cuda_all_flat(sch, threads)
        return
    lanes = 32 if words >= 32 else 16 if words >= 16 else 8
    i, r, kw, kb, kl = loops
    ry = _factor(_extent(sch, r), (4, 2))
    ro, ri = sch.split(r, [None, ry])
    kwo, kwi = sch.split(kw, [None, lanes])
    sch.reorder(i, ro, ri, kwi, kwo, kb, kl)
    sch.bind(sch.fuse(i, ro), "blockIdx.x")
    sch.bind(ri, "threadIdx.y")
    sch.bind(kwi, "threadIdx.x")
    if unroll:
        sch.unroll(kb)
        sch.unroll(kl)
    _cuda_all_flat(sch, threads, skip=sch.get(block).name_hint)


def _cuda_conv(sch: Schedule, threads: int) -> None:
    """im2col form: the table-product mapping over patch rows; direct form: flat."""
    if _block(sch, "patches") is not None:
        _cuda_table_product(sch, threads, unroll=kernel_kind(sch.mod["main"]) == "conv_aligned")
    else:
        _cuda_generic(sch, threads)


def _cuda_gather(sch: Schedule, threads: int) -> None:
    _cuda_flat(sch, sch.get_sblock("gather"), threads)


_CUDA: dict[str, Callable[[Schedule, int], None]] = {
    "linear_aligned": _cuda_table_product,
    "linear_in_out_aligned": _cuda_generic,
    "linear_general": lambda sch, threads: _cuda_table_product(sch, threads, unroll=False),
    "conv_aligned": _cuda_conv,
    "conv_general": _cuda_conv,
    "gather": _cuda_gather,
}
