"""Every Relax pipeline of tbn_compiler, each defined once from named stages.

A stage is a function that returns a list of passes; a pipeline is a pass that runs its
stages in order inside the target's scope. Our tile kernels are marked opaque first
(fusion never merges them with TVM's operators) and scheduled by the rules of
:mod:`.schedule_rules`; everything else is legalized and fused by TVM.

=========================  ==================================================================
pipeline                   stages
=========================  ==================================================================
:func:`cpu`                lut_int8_tiles, mark_kernels, schedule_kernels,
                           dispatch_libraries, legalize_and_fuse, parallelize_unscheduled,
                           lower_and_finalize
:func:`gpu`                mark_kernels, schedule_kernels, TVM's default pipeline for the
                           target (dispatch, legalize, fuse, DLight, lower, finalize)
:func:`tuned`              mark_kernels, dispatch_libraries, legalize_and_fuse,
                           apply_tuning_database, schedule_kernels (those the database
                           missed), then parallelize_unscheduled (CPU) or
                           default_gpu_schedules (GPU), lower_and_finalize
:func:`prepare_for_tuning` mark_kernels, dispatch_libraries, legalize_and_fuse: the module
                           MetaSchedule extracts its tasks from (and keys its database on)
:func:`cortex_m`           mark_kernels, legalize_for_inference, fuse,
                           dead_code_elimination, schedule_for_mcu
=========================  ==================================================================

:func:`default` picks :func:`cpu` or :func:`gpu` for a target. The CPU pipelines give
every function no rule scheduled (TVM's operators, and tuned builds' kernels that the
database missed) the generic parallel schedule; TVM's own CPU pipeline leaves them serial.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.backend.cpu_generic import pipeline as tvm_cpu
from tvm.relax.backend.cuda import pipeline as tvm_cuda
from tvm.s_tir import dlight
from tvm.target import Target

from . import schedule_rules
from .int8_lut import relayout_lut_tiles
from .schedule_rules.attention_cpu import attention_attrs

__all__ = [
    "COMMON_LEGALIZATIONS",
    "CPU_LEGALIZATIONS",
    "INDEX_ERROR_FN",
    "MCU_LEGALIZATIONS",
    "apply_tuning_database",
    "checked_take",
    "cortex_m",
    "cpu",
    "cpu_softmax",
    "default",
    "default_gpu_schedules",
    "dead_code_elimination",
    "dispatch_libraries",
    "fuse",
    "gpu",
    "legalize_and_fuse",
    "legalize_for_inference",
    "lower_and_finalize",
    "mark_kernels",
    "matmul_by_rows",
    "parallelize_unscheduled",
    "prepare_for_tuning",
    "schedule_for_mcu",
    "schedule_kernels",
    "serial_scan",
    "shared_transposed_constants",
    "slice_scatter",
    "tuned",
]

Stage = list[tvm.transform.Pass]


# --------------------------------------------------------------------------- stages


def mark_kernels() -> Stage:
    """Our kernels opaque to fusion (:func:`.schedule_rules.mark_opaque`)."""
    return [_module_pass("MarkKernelsOpaque", schedule_rules.mark_opaque)]


def lut_int8_tiles(target: Target) -> Stage:
    """Int8 linears at a batch of a few rows given their table-lookup kernel and their
    tiles in its layout (:func:`.int8_lut.relayout_lut_tiles`)."""
    return [_module_pass("LutInt8Tiles", lambda mod: relayout_lut_tiles(mod, target))]


def schedule_kernels(target: Target, skip_scheduled: bool = False) -> Stage:
    """Our kernels scheduled by the rules for ``target`` and marked scheduled
    (:func:`.schedule_rules.schedule_kernels`); ``skip_scheduled`` keeps those a tuning
    database scheduled."""
    return [
        _module_pass(
            "ScheduleKernels",
            lambda mod: schedule_rules.schedule_kernels(mod, target, skip_scheduled),
        )
    ]


def dispatch_libraries(target: Target) -> Stage:
    """TVM's library dispatch for the target (sampling, sort and scan)."""
    return _tvm_backend(target).library_dispatch_passes(target)


def legalize_and_fuse(target: Target | None = None) -> Stage:
    """Every Relax operator to TIR, constants folded, operators fused into kernels. For
    CPU targets, softmax and attention take :func:`cpu_softmax` (a polynomial ``exp``
    that vectorizes)."""
    cpu_target = target is not None and target.kind.name in ("llvm", "c")
    return [
        relax.transform.LegalizeOps(CPU_LEGALIZATIONS if cpu_target else COMMON_LEGALIZATIONS),
        relax.transform.AnnotateTIROpPattern(),
        _module_pass("MarkSymbolicMovesInjective", _mark_symbolic_moves_injective),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def apply_tuning_database() -> Stage:
    """Schedules from the MetaSchedule database in scope (``with database:``)."""
    return [relax.transform.MetaScheduleApplyDatabase()]


def parallelize_unscheduled() -> Stage:
    """The generic parallel CPU schedule (:func:`.schedule_rules.parallelize_generic`)
    for every PrimFunc not marked ``tirx.is_scheduled``."""
    return [_module_pass("ParallelizeUnscheduled", _parallelize_unscheduled)]


def default_gpu_schedules() -> Stage:
    """DLight's GPU rules (those of TVM's CUDA pipeline) for what is not scheduled."""
    return [
        dlight.ApplyDefaultSchedule(
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        )
    ]


def lower_and_finalize(target: Target) -> Stage:
    """TVM's dataflow lowering and finalization (memory planning, VM lowering)."""
    backend = _tvm_backend(target)
    return backend.dataflow_lower_passes(target) + backend.finalize_passes(target)


def legalize_for_inference() -> Stage:
    """BatchNorm decomposed for inference, every operator legalized to TIR (``take`` by
    :func:`checked_take`, ``cumsum``/``cumprod`` by :func:`serial_scan`: TVM leaves them
    to a library dispatch with parallel loops), TIR patterns annotated, constants folded:
    every call whose arguments are all constants (position ids, causal masks, a
    ``cumsum`` over them) is computed at build time and becomes a constant."""
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(MCU_LEGALIZATIONS),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]


def shared_transposed_constants() -> Stage:
    """``matmul(x, permute_dims(C))`` of a 2-D constant ``C`` (a linear layer, e.g. a
    language-model head tied to the token embedding) as one kernel that reads ``C``
    itself (:func:`matmul_by_rows`): folding the transpose would store ``C`` twice when
    another op (the embedding lookup) uses it too."""
    return [_module_pass("SharedTransposedConstants", _share_transposed_constants)]


def fuse() -> Stage:
    """Elementwise chains fused into the kernels around them (ours stay opaque)."""
    return [relax.transform.FuseOps(), relax.transform.FuseTIR()]


def dead_code_elimination() -> Stage:
    return [relax.transform.DeadCodeElimination()]


def schedule_for_mcu() -> Stage:
    """Every PrimFunc given the Cortex-M schedule (:func:`.schedule_rules.schedule_mcu`)."""
    return [_module_pass("ScheduleForMCU", _schedule_for_mcu)]


# --------------------------------------------------------------------------- pipelines


def cpu(target: Target) -> tvm.transform.Pass:
    """The host (LLVM) pipeline (see the module docstring)."""
    return _pipeline(
        "TBNCPUPipeline",
        target,
        [
            lut_int8_tiles(target),
            mark_kernels(),
            schedule_kernels(target),
            dispatch_libraries(target),
            legalize_and_fuse(target),
            parallelize_unscheduled(),
            lower_and_finalize(target),
        ],
    )


def gpu(target: Target) -> tvm.transform.Pass:
    """The GPU pipeline: our kernels scheduled, then TVM's default pipeline for
    ``target`` (which schedules the rest with DLight)."""
    return _pipeline(
        "TBNGPUPipeline",
        target,
        [mark_kernels(), schedule_kernels(target), [relax.get_default_pipeline(target)]],
    )


def default(target: Target) -> tvm.transform.Pass:
    """:func:`cpu` for LLVM targets, else :func:`gpu`."""
    return cpu(target) if target.kind.name == "llvm" else gpu(target)


def prepare_for_tuning(target: Target) -> tvm.transform.Pass:
    """The module MetaSchedule tunes: kernels marked, operators legalized and fused."""
    return _pipeline("TBNPrepareForTuning", target, _tuning_front(target))


def tuned(target: Target) -> tvm.transform.Pass:
    """The pipeline of a tuned build; run it inside ``with database:`` (see the module
    docstring). Kernels the database misses get the same schedules as in :func:`default`."""
    rest = default_gpu_schedules() if "gpu" in target.keys else parallelize_unscheduled()
    return _pipeline(
        "TBNTunedPipeline",
        target,
        [
            *_tuning_front(target),
            apply_tuning_database(),
            schedule_kernels(target, skip_scheduled=True),
            rest,
            lower_and_finalize(target),
        ],
    )


def cortex_m() -> tvm.transform.Pass:
    """The Cortex-M pipeline: a module whose ``main`` is a flat sequence of ``call_tir``
    on tensors and constants, every PrimFunc scheduled for a single Cortex-M core."""
    return _pipeline(
        "TBNCortexMPipeline",
        None,
        [
            mark_kernels(),
            shared_transposed_constants(),
            legalize_for_inference(),
            fuse(),
            dead_code_elimination(),
            schedule_for_mcu(),
        ],
        opt_level=3,
    )


def _tuning_front(target: Target) -> list[Stage]:
    return [mark_kernels(), dispatch_libraries(target), legalize_and_fuse(target)]


# --------------------------------------------------------------------------- helpers


def _pipeline(
    name: str, target: Target | None, stages: Sequence[Stage], opt_level: int | None = None
) -> tvm.transform.Pass:
    """One pass running ``stages`` in order (inside ``target``'s scope when given, and a
    PassContext of ``opt_level`` when given)."""
    passes = [p for stage in stages for p in stage]

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with _scope(target), _pass_context(opt_level):
            return tvm.transform.Sequential(passes)(mod)

    return run


def _scope(target: Target | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if target is None else target


def _pass_context(opt_level: int | None) -> contextlib.AbstractContextManager:
    if opt_level is None:
        return contextlib.nullcontext()
    return tvm.transform.PassContext(opt_level=opt_level)


def _module_pass(name: str, fn: Callable[[tvm.IRModule], tvm.IRModule]) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return fn(mod)

    return run


def _tvm_backend(target: Target) -> object:
    """TVM's per-target pass lists (CUDA for GPU targets, generic CPU otherwise)."""
    return tvm_cuda if target.kind.name == "cuda" else tvm_cpu


def _parallelize_unscheduled(mod: tvm.IRModule) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and not schedule_rules.is_scheduled(func):
            mod[gv] = schedule_rules.parallelize_generic(func)
    return mod


_OP_PATTERN_INJECTIVE = 2  # relax OpPatternKind::kInjective


def _mark_symbolic_moves_injective(mod: tvm.IRModule) -> tvm.IRModule:
    """Reshapes and other pure data movement of a symbolic shape (the batch) marked
    injective, as they are when static: TVM's pattern analysis calls them opaque (it
    cannot follow their index arithmetic), and FuseOps would leave each its own pass over
    memory instead of fusing it with its neighbours."""
    for gv, func in list(mod.functions.items()):
        if schedule_rules.is_symbolic_move(func):
            mod[gv] = func.with_attr("op_pattern", _OP_PATTERN_INJECTIVE)
    return mod


def matmul_by_rows(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``x @ w.T``: ``x`` (..., K) and ``w`` (N, K) give (..., N), summed over K in order."""
    k = te.reduce_axis((0, w.shape[1]), name="k")
    return te.compute(
        (*x.shape[:-1], w.shape[0]),
        lambda *i: te.sum(x[(*i[:-1], k)] * w[i[-1], k], axis=k),
        name="T_matmul_NT",
    )


@relax.expr_functor.mutator
class _TransposedConstantMatmul(relax.PyExprMutator):
    """Rewrites ``matmul(x, permute_dims(C, [1, 0]))`` (float32, ``C`` a 2-D constant)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != _MATMUL or len(call.args) != 2:
            return call
        x, rhs = call.args
        moved = self.lookup_binding(rhs) if isinstance(rhs, relax.Var) else rhs
        if not isinstance(moved, relax.Call) or moved.op != _PERMUTE_DIMS:
            return call
        const = moved.args[0]
        if not isinstance(const, tvm.ir.Constant) or len(const.ty.shape) != 2:
            return call
        if moved.attrs.axes is not None and [int(a) for a in moved.attrs.axes] != [1, 0]:
            return call
        if not (_dtype(x) == _dtype(const) == _dtype(call) == "float32"):
            return call
        return self.builder_.call_te(matmul_by_rows, x, const, primfunc_name_hint="matmul_nt")


_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")


def _dtype(expr: relax.Expr) -> str | None:
    return getattr(expr.ty, "dtype", None)


def _share_transposed_constants(mod: tvm.IRModule) -> tvm.IRModule:
    mutator = _TransposedConstantMatmul(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def _schedule_for_mcu(mod: tvm.IRModule) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = schedule_rules.schedule_mcu(func)
    return mod


# --------------------------------------------------------------------------- checked take


INDEX_ERROR_FN = "tbn_index_error"
"""The C function :func:`checked_take` calls on an index out of range: ``int32_t
(int64_t index, int64_t bound)``, defined by the Cortex-M kernel file
(:mod:`.cortex_m.c_kernels`); it sets the kernel error flag and returns 0."""


def checked_take(data: te.Tensor, indices: te.Tensor, axis: int | None) -> te.Tensor:
    """``take`` that never reads outside ``data``: an index outside ``[0, n)`` reads row 0
    and calls :data:`INDEX_ERROR_FN` ``(index, n)``."""
    if axis is None:
        data = topi.reshape(data, (math.prod(int(d) for d in data.shape),))
        axis = 0
    axis = axis % len(data.shape)
    bound = data.shape[axis]
    n_idx = len(indices.shape)

    def element(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        index = indices[i[axis : axis + n_idx]].astype("int64")
        ok = tirx.all(index >= 0, index < tirx.IntImm("int64", int(bound)))
        safe = tirx.Select(ok, index, tirx.IntImm("int64", 0))
        value = data[(*i[:axis], safe, *i[axis + n_idx :])]
        error = tirx.call_extern("int32", INDEX_ERROR_FN, index, bound.astype("int64"))
        return tirx.if_then_else(ok, value, error.astype(data.dtype))

    shape = [*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]]
    return te.compute(shape, element, name="T_take")


def _legalize_take(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    mode = str(call.attrs.mode)
    axis = None if call.attrs.axis is None else int(call.attrs.axis)
    if mode != "fast":  # "clip", "wrap", "nan": in bounds by construction
        return bb.call_te(topi.take, call.args[0], call.args[1], axis, mode=mode)
    return bb.call_te(checked_take, call.args[0], call.args[1], axis, primfunc_name_hint="take")


# --------------------------------------------------------------------------- scans


def serial_scan(
    data: te.Tensor, axis: int | None, dtype: str | None, exclusive: bool, product: bool
) -> te.Tensor:
    """``cumsum`` (or with ``product`` ``cumprod``) of ``data`` along ``axis`` (None: over
    the flattened tensor) in ``dtype`` (None: the input's), as one plain reduction per
    element: ``out[.., k, ..] = sum(x[.., r, ..] for r <= k)`` (``r < k`` when
    ``exclusive``), the terms added in order from ``r = 0`` like a sequential scan, so
    float results are torch's. Quadratic in the scanned length: meant for what reaches a
    microcontroller (position ids and masks over a short sequence, mostly constants that
    are folded at build time)."""
    dtype = dtype or data.dtype
    if axis is None:
        data = topi.reshape(data, (math.prod(int(d) for d in data.shape),))
        axis = 0
    axis = axis % len(data.shape)
    n = data.shape[axis]
    r = te.reduce_axis((0, n), name="r")
    identity = tirx.const(1 if product else 0, dtype)

    def element(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        k = i[axis]
        inside = r < k if exclusive else r <= k
        value = data[(*i[:axis], r, *i[axis + 1 :])].astype(dtype)
        term = tirx.Select(inside, value, identity)
        if product:
            return te.comm_reducer(lambda a, b: a * b, lambda t: tirx.const(1, t))(term, axis=r)
        return te.sum(term, axis=r)

    return te.compute(data.shape, element, name="cumprod" if product else "cumsum")


def _legalize_scan(product: bool) -> Callable[[relax.BlockBuilder, relax.Call], relax.Expr]:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        attrs = call.attrs
        axis = None if attrs.axis is None else int(attrs.axis)
        dtype = str(attrs.dtype) if attrs.dtype is not None and str(attrs.dtype) else None
        return bb.call_te(
            serial_scan,
            call.args[0],
            axis,
            dtype,
            bool(attrs.exclusive),
            product,
            primfunc_name_hint="cumprod" if product else "cumsum",
        )

    return legalize


# --------------------------------------------------------------------------- CPU softmax


def cpu_softmax(x: te.Tensor, axis: int = -1) -> te.Tensor:
    """Softmax with TVM's polynomial ``exp`` (``topi.fast_exp``) for float32: LLVM has no
    vector ``exp`` and calls the C library once per element; this one vectorizes
    (TVM's legalized attention of the bench_models transformer: 0.33 -> 0.26 ms). Its
    relative error over [-80, 80] is 2.9e-7 (2 to 3 float32 ulp); in that attention the
    outputs moved by 6e-8 of their largest value."""
    if x.dtype != "float32":
        return topi.nn.softmax(x, axis)
    return topi.nn.fast_softmax(x, axis)


def _attention_te(q: te.Tensor, k: te.Tensor, v: te.Tensor, scale: object) -> te.Tensor:
    """TVM's legalization of ``R.nn.attention`` (no mask, no bias) with :func:`cpu_softmax`:
    ``(batch, seq, heads, dim)`` in and out. It states the math; the CPU build runs the
    kernel of :mod:`.schedule_rules.attention_cpu` in its place (same arithmetic, sums
    in another order), which :func:`_legalize_attention` marks it for."""
    batch, seq, heads, dim = q.shape
    seq_kv, dim_v = v.shape[1], v.shape[3]
    rows = batch * heads

    def heads_first(t: te.Tensor, n: object, d: object) -> te.Tensor:
        return topi.reshape(topi.transpose(t, [0, 2, 1, 3]), [rows, n, d])

    scores = topi.nn.batch_matmul(
        heads_first(q, seq, dim), heads_first(k, seq_kv, dim), oshape=[rows, seq, seq_kv]
    )
    if scale is not None:
        scores = topi.multiply(scores, scale)
    else:
        scores = topi.divide(scores, tirx.sqrt(tirx.Cast(scores.dtype, dim)))
    probs = cpu_softmax(scores, -1)
    v_rows = heads_first(v, seq_kv, dim_v)
    out = topi.nn.batch_matmul(probs, v_rows, transpose_b=False, oshape=[rows, seq, dim_v])
    return topi.transpose(topi.reshape(out, [batch, heads, seq, dim_v]), [0, 2, 1, 3])


def _legalize_softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(cpu_softmax, call.args[0], int(call.attrs.axis))


def _legalize_attention(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Attention without mask as :func:`_attention_te`, marked for the CPU kernel
    (:func:`.schedule_rules.attention_cpu.attention_attrs`) and opaque to fusion, so that
    the function the generic schedule meets is the attention itself; masked attention
    as TVM legalizes it."""
    attrs = call.attrs
    if attrs.causal_mask is not None or attrs.window_size is not None:
        return _TVM_LEGALIZE_ATTENTION(bb, call)  # masks: TVM's own legalization
    q, k, v = call.args[:3]
    return bb.call_te(
        _attention_te,
        q,
        k,
        v,
        attrs.scale,
        primfunc_name_hint="attention",
        primfunc_attrs={**attention_attrs(attrs.scale), "op_pattern": _OP_PATTERN_OPAQUE},
    )


_OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps leaves the kernel alone


_TVM_LEGALIZE_ATTENTION = tvm.ir.Op.get("relax.nn.attention").get_attr("FLegalize")


def slice_scatter(
    data: te.Tensor,
    src: te.Tensor,
    start: tirx.PrimExpr,
    end: tirx.PrimExpr,
    step: tirx.PrimExpr,
    axis: int,
) -> te.Tensor:
    """``data`` with ``src`` written over ``data[..., start:end:step, ...]`` along ``axis``
    (torch's ``slice_scatter``; bounds already normalized by the import). Reads only
    in-bounds elements of ``src``: TOPI's version gathers with a "fast" ``take`` and
    warns on stderr at every build that out-of-bounds indices would crash."""
    axis = axis % len(data.shape)
    start, end, step = (tirx.Cast("int64", v) for v in (start, end, step))
    last = tirx.Cast("int64", src.shape[axis]) - 1

    def element(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        j = tirx.Cast("int64", i[axis])
        inside = tirx.all(j >= start, j < end, tirx.floormod(j - start, step) == 0)
        k = tirx.Select(
            inside, tirx.min(tirx.floordiv(j - start, step), last), tirx.const(0, "int64")
        )
        from_src = src[(*i[:axis], k, *i[axis + 1 :])]
        return tirx.if_then_else(inside, from_src, data[i])

    return te.compute(data.shape, element, name="T_slice_scatter")


def _legalize_slice_scatter(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    data, src, start, end, step = call.args
    return bb.call_te(
        slice_scatter,
        data,
        src,
        start,
        end,
        step,
        int(call.attrs.axis),
        primfunc_name_hint="slice_scatter",
    )


COMMON_LEGALIZATIONS = {
    "relax.slice_scatter": _legalize_slice_scatter,
}
"""Legalizations of every pipeline that replace TVM's (see :func:`slice_scatter`)."""

MCU_LEGALIZATIONS = {
    **COMMON_LEGALIZATIONS,
    "relax.take": _legalize_take,
    "relax.cumsum": _legalize_scan(product=False),
    "relax.cumprod": _legalize_scan(product=True),
}
"""Legalizations of the Cortex-M pipeline that replace TVM's (or add what it has none of)."""

CPU_LEGALIZATIONS = {
    **COMMON_LEGALIZATIONS,
    "relax.nn.softmax": _legalize_softmax,
    "relax.nn.attention": _legalize_attention,
}
"""Legalizations of the CPU pipelines that replace TVM's (see :func:`cpu_softmax`)."""
