"""What the schedule rules know about a kernel, and how rules are applied.

A :class:`ScheduleRule` looks at a PrimFunc and either declines (``None``: it does not
apply) or returns a :class:`~tvm.s_tir.Schedule` of it; :func:`apply_first` tries rules
in order and keeps the first that applies (TVM's DLight ``ApplyDefaultSchedule`` works
the same way). Rules decide from :func:`analyse`, which reads the PrimFunc itself:

* the kernel kind (the ``tbn_kernel`` attribute set by :mod:`..kernels`; ``""`` for
  TVM's own functions);
* each top-level block's iteration kinds (``S`` data-parallel, ``R`` reduction, ``O``
  other), extents, the buffers it reads and writes, and its annotations;
* from the dataflow between blocks, the *role* of each block of a tile kernel, whose
  buffers are ``x, tile, alphas, [bias], out`` (see :mod:`..kernels`):

  ``product``  the reduction that reads the packed ``tile`` (the binary product);
  ``table``    a block that reads no buffer (the 256 x 8 sign-mask table);
  ``im2col``   a block annotated with ``tbn_row_dims`` (patch rows of a conv);
  ``pre``      another reduction feeding the product (alpha-weighted input sums);
  ``padding``  another data-parallel block feeding the product (padded input);
  ``epilogue`` a block after the product (scale, bias, layout);
* whether the function holds asserts (run-time checks).

A function with a symbolic batch can be scheduled once per case of it (:func:`dispatch`:
e.g. a batch that is a multiple of 4 gets register blocks of 4 rows, any other batch one
row; a small batch runs serially), in one PrimFunc that branches once per call.

Also here: the shared helpers of the CPU, CUDA and Cortex-M rules, and the attributes
that tell the Relax pipelines which functions are our kernels (:func:`mark_opaque`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.stmt import SBlock, SBlockRealize
from tvm.target import Target

from ..kernels import KERNEL_ATTR, kernel_kind

__all__ = [
    "ALIGNED_KINDS",
    "CONV_KINDS",
    "KINDS",
    "KernelAnalysis",
    "Stage",
    "ScheduleRule",
    "TILE_KINDS",
    "analyse",
    "apply_first",
    "cores",
    "as_multiple",
    "at_value",
    "case_body",
    "dispatch",
    "dispatch_on_multiples",
    "extent",
    "factor",
    "vectorize_inner",
    "is_kernel",
    "is_scheduled",
    "is_symbolic_move",
    "known_extent",
    "mark_opaque",
    "reduces",
    "root_block",
    "shape_vars",
    "split_loops",
    "static_multiple",
    "without_asserts",
]

KINDS = (
    "linear_aligned",
    "linear_in_out_aligned",
    "linear_general",
    "conv_aligned",
    "conv_general",
    "gather",
)
"""Every kernel kind :mod:`..kernels` builds."""

TILE_KINDS = KINDS[:-1]
"""The kinds of tile-op kernels (buffers ``x, tile, alphas, [bias], out``)."""

ALIGNED_KINDS = ("linear_aligned", "linear_in_out_aligned", "conv_aligned")
"""Kinds whose product reads the tile directly (no realigned words, no per-element
alpha): their inner (byte, bit) loops are short enough to unroll."""

CONV_KINDS = ("conv_aligned", "conv_general")

_ITER_KIND = {0: "S", 2: "R"}  # IterVar.DataPar, IterVar.CommReduce; anything else "O"
_OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps never fuses into it
_IM2COL_ANNOTATION = "tbn_row_dims"


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True, eq=False)
class Stage:
    """One top-level block of a PrimFunc (see the module docstring for ``role``)."""

    block: object  # SBlockRV of the schedule the analysis was made on
    name: str
    iter_kinds: str
    extents: tuple[int, ...]
    reads: tuple[object, ...]  # buffers (buffer Vars in TVM 0.27)
    writes: tuple[object, ...]
    annotations: dict
    role: str = ""

    @property
    def is_reduction(self) -> bool:
        return "R" in self.iter_kinds

    def reads_from(self, other: Stage) -> bool:
        """True when this block reads a buffer ``other`` writes."""
        return any(r.same_as(w) for r in self.reads for w in other.writes)


@dataclass(frozen=True)
class KernelAnalysis:
    """A PrimFunc as the rules see it: kind, blocks in program order, checks."""

    kind: str
    stages: tuple[Stage, ...]
    has_asserts: bool

    def with_role(self, role: str) -> list[Stage]:
        return [s for s in self.stages if s.role == role]

    def first(self, role: str) -> Stage | None:
        found = self.with_role(role)
        return found[0] if found else None

    @property
    def product(self) -> Stage | None:
        return self.first("product")

    @property
    def work(self) -> int:
        """Block iterations of the whole function (the sum over blocks of the product
        of their extents); -1 when an extent is symbolic."""
        total = 0
        for stage in self.stages:
            if any(e < 0 for e in stage.extents):
                return -1
            total += math.prod(stage.extents)
        return total

    @property
    def table_product(self) -> bool:
        """True when the product takes its sign masks from the sign table."""
        product, table = self.product, self.first("table")
        return product is not None and table is not None and product.reads_from(table)

    @property
    def im2col_product(self) -> bool:
        """True when the product reads im2col patch rows."""
        product, patches = self.product, self.first("im2col")
        return product is not None and patches is not None and product.reads_from(patches)


def analyse(sch: Schedule) -> KernelAnalysis:
    """The analysis of ``sch.mod["main"]`` (block handles belong to ``sch``)."""
    func = sch.mod["main"]
    root = root_block(sch)
    stages = [] if root is None else [_stage(sch, rv) for rv in sch.get_child_blocks(root)]
    kind = kernel_kind(func)
    if kind in TILE_KINDS:
        stages = _with_roles(stages, func.params[1])
    return KernelAnalysis(kind, tuple(stages), _has_asserts(func))


def root_block(sch: Schedule) -> object | None:
    """The root block of ``sch.mod["main"]``, or None for a function without blocks."""
    block = getattr(sch.mod["main"].body, "block", None)
    return None if block is None else sch.get_sblock(block.name_hint)


def _stage(sch: Schedule, rv: object) -> Stage:
    block = sch.get(rv)
    return Stage(
        block=rv,
        name=block.name_hint,
        iter_kinds="".join(_ITER_KIND.get(int(iv.iter_type), "O") for iv in block.iter_vars),
        extents=tuple(_as_int(iv.dom.extent) for iv in block.iter_vars),
        reads=tuple(r.source for r in block.reads),
        writes=tuple(w.source for w in block.writes),
        annotations=dict(block.annotations),
    )


def _as_int(value: object) -> int:
    """A constant extent, or -1 for a symbolic one."""
    return int(value) if isinstance(value, tirx.IntImm) else -1


def _with_roles(stages: list[Stage], tile: object) -> list[Stage]:
    """``stages`` with roles; the product is the reduction reading the packed tile."""
    product = next(
        (s for s in stages if s.is_reduction and any(r.same_as(tile) for r in s.reads)), None
    )
    if product is None:
        return stages
    feeding = _producers(stages, product)
    out = []
    for s in stages:
        if s is product:
            role = "product"
        elif not s.reads:
            role = "table"
        elif s not in feeding:
            role = "epilogue"
        elif _IM2COL_ANNOTATION in s.annotations:
            role = "im2col"
        else:
            role = "pre" if s.is_reduction else "padding"
        out.append(dataclasses.replace(s, role=role))
    return out


def _producers(stages: list[Stage], consumer: Stage) -> list[Stage]:
    """Blocks whose results ``consumer`` reads, directly or through other blocks."""
    found: list[Stage] = []
    todo = [consumer]
    while todo:
        current = todo.pop()
        for s in stages:
            if s is not consumer and s not in found and current.reads_from(s):
                found.append(s)
                todo.append(s)
    return found


def _has_asserts(func: tirx.PrimFunc) -> bool:
    return not tvm_ffi.structural_equal(without_asserts(func), func)


def without_asserts(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` without its assert statements (device code has no way to raise)."""
    return tirx.transform.SkipAssert()(tvm.IRModule({"main": func}))["main"]


# --------------------------------------------------------------------------- rules


class ScheduleRule:
    """A schedule that says whether it applies. Subclasses implement :meth:`apply`:
    ``None`` when the rule does not apply to ``func``, else a new schedule of it, or the
    scheduled PrimFunc itself (the input is never modified)."""

    name = "rule"

    def apply(self, func: tirx.PrimFunc, target: Target | None) -> Schedule | tirx.PrimFunc | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<schedule rule {self.name}>"


def apply_first(
    func: tirx.PrimFunc, target: Target | None, rules: Sequence[ScheduleRule]
) -> tirx.PrimFunc | None:
    """The scheduled PrimFunc of the first rule in ``rules`` that applies, else None.
    An error inside an applying rule propagates (a rule that applies must succeed)."""
    for rule in rules:
        result = rule.apply(func, target)
        if isinstance(result, tirx.PrimFunc):
            return result
        if result is not None:
            return result.mod["main"]
    return None


# --------------------------------------------------------------------------- helpers


def extent(sch: Schedule, loop: object) -> int:
    """The extent of a loop known to be static (TypeError for a symbolic one)."""
    return int(sch.get(loop).extent)


def known_extent(sch: Schedule, loop: object) -> int | None:
    """The extent of ``loop``, or None when it is symbolic (the batch)."""
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


def static_multiple(sch: Schedule, loop: object) -> int:
    """The largest constant the extent of ``loop`` is known to be a multiple of: the
    extent itself when static, the constant factors of a product (``n * 64`` for a
    symbolic batch ``n`` of 64 rows each) else, 1 for a plain variable."""
    return _constant_factor(sch.get(loop).extent)


def _constant_factor(expr: object) -> int:
    if isinstance(expr, tirx.IntImm):
        return int(expr)
    if isinstance(expr, tirx.Mul):
        return _constant_factor(expr.a) * _constant_factor(expr.b)
    return 1


# --------------------------------------------------------------------------- dispatch


def dispatch(
    func: tirx.PrimFunc,
    cases: Sequence[tuple[tirx.Expr, tirx.PrimFunc]],
    default: tirx.PrimFunc,
) -> tirx.PrimFunc:
    """One PrimFunc with ``func``'s parameters that runs the first of ``cases`` whose
    condition (over the variables of ``func``'s parameters) holds, else ``default``:
    it branches once per call. Each case and the default is ``func`` scheduled, maybe
    specialized first (:func:`as_multiple`)."""
    body = case_body(default, func.params)
    for condition, case in reversed(cases):
        body = tirx.IfThenElse(condition, case_body(case, func.params), body)
    root = SBlockRealize([], tirx.const(True, "bool"), SBlock([], [], [], "root", body))
    return tirx.PrimFunc(func.params, root, attrs=default.attrs)


def dispatch_on_multiples(
    func: tirx.PrimFunc,
    var: tirx.Var,
    multiples: Sequence[int],
    schedule: Callable[[tirx.PrimFunc], tirx.PrimFunc],
    when: tirx.Expr | None = None,
) -> list[tuple[tirx.Expr, tirx.PrimFunc]]:
    """Cases for :func:`dispatch`: for each ``d`` of ``multiples`` (in order), ``func``
    with ``var = d * q`` scheduled by ``schedule`` (which then sees the multiple and can
    split by it exactly), taken when ``d`` divides ``var`` (and ``when`` holds)."""
    cases = []
    for d in multiples:
        condition = tirx.floormod(var, d) == 0
        if when is not None:
            condition = tirx.all(when, condition)
        cases.append((condition, schedule(as_multiple(func, var, d))))
    return cases


def as_multiple(func: tirx.PrimFunc, var: tirx.Var, d: int) -> tirx.PrimFunc:
    """``func`` with the parameter dim ``var`` replaced by ``d * q`` (a new var ``q``)."""
    param = next(p for p in func.params if any(dim.same_as(var) for dim in _shape_of(p)))
    q = tirx.Var(f"{var.name}_{d}", "int64")
    shape = [q * d if dim.same_as(var) else dim for dim in param.shape]
    return func.specialize({param: tirx.decl_buffer(shape, param.dtype, param.name)})


def at_value(func: tirx.PrimFunc, var: tirx.Var, value: int) -> tirx.PrimFunc:
    """``func`` with the parameter dim ``var`` fixed to ``value``."""
    param = next(p for p in func.params if any(dim.same_as(var) for dim in _shape_of(p)))
    shape = [tirx.IntImm("int64", value) if dim.same_as(var) else dim for dim in param.shape]
    return func.specialize({param: tirx.decl_buffer(shape, param.dtype, param.name)})


def shape_vars(func: tirx.PrimFunc) -> list[tirx.Var]:
    """The variables that are dims of ``func``'s buffer parameters (symbolic sizes)."""
    found: list[tirx.Var] = []
    for param in func.params:
        for dim in _shape_of(param):
            if isinstance(dim, tirx.Var) and not any(dim.same_as(v) for v in found):
                found.append(dim)
    return found


def _shape_of(param: object) -> tuple:
    return tuple(getattr(param, "shape", None) or ())


def case_body(case: tirx.PrimFunc, params: Sequence[object]) -> tirx.Stmt:
    """``case``'s body (definitions renewed) run on ``params`` (the parameters of the
    function it goes into, or buffers that function allocates): its size variables bound
    from theirs (``q = var // d`` where ``case`` has ``d * q`` for ``var``), its buffer
    parameters declared on their data, its scalar parameters bound to them."""
    case = _renew_defs(case)
    binds: list[tirx.Stmt] = []
    bound: list[tirx.Var] = []

    def bind(var: tirx.Var, value: tirx.Expr) -> None:
        if not any(var.same_as(v) for v in bound):
            bound.append(var)
            binds.append(tirx.Bind(var, value))

    decls: list[tirx.Stmt] = []
    for new, old in zip(case.params, params, strict=True):
        if not _shape_of(old) and not hasattr(old, "data"):
            bind(new, old)  # a scalar parameter
            continue
        for new_dim, old_dim in zip(_shape_of(new), _shape_of(old), strict=True):
            if isinstance(old_dim, tirx.Var) and not new_dim.same_as(old_dim):
                bind(*_solve(new_dim, old_dim))
        decls.append(tirx.DeclBuffer(new, data=old.data))
    return tirx.SeqStmt([*binds, *decls, case.body])


def _solve(new_dim: tirx.Expr, old_dim: tirx.Var) -> tuple[tirx.Var, tirx.Expr]:
    """``(var, value)`` such that ``new_dim`` equals ``old_dim``: ``new_dim`` is a var,
    or ``d * q`` / ``q * d``."""
    if isinstance(new_dim, tirx.Var):
        return new_dim, old_dim
    if isinstance(new_dim, tirx.Mul):
        for var, d in ((new_dim.a, new_dim.b), (new_dim.b, new_dim.a)):
            if isinstance(var, tirx.Var) and isinstance(d, tirx.IntImm):
                return var, tirx.floordiv(old_dim, d)
    raise ValueError(f"cannot bind {new_dim} to {old_dim}")


def _renew_defs(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every definition (buffers, loops, blocks) fresh: cases of one
    dispatch share no buffer, which TVM requires of one function."""
    return tvm_ffi.get_global_func("s_tir.RenewDefs")(func)


def vectorize_inner(sch: Schedule, loop: object, widths: Sequence[int]) -> None:
    """Split the static ``loop`` by the largest of ``widths`` dividing its extent and
    vectorize the inner part (a loop of one iteration stays scalar): bounded vectors,
    where a whole loop of hundreds of lanes makes LLVM compile for minutes."""
    inner = sch.split(loop, [None, factor(extent(sch, loop), widths)])[1]
    if extent(sch, inner) > 1:
        sch.vectorize(inner)


def factor(n: int, candidates: Sequence[int]) -> int:
    """Largest candidate (in the given order) dividing ``n``; 1 if none does."""
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return 1


def _n_reduce(sch: Schedule, block: object) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if _ITER_KIND.get(int(iv.iter_type)) == "R")


def reduces(sch: Schedule, block: object) -> bool:
    """True when ``block`` has a reduction iteration."""
    return _n_reduce(sch, block) > 0


def split_loops(sch: Schedule, block: object) -> tuple[list, list]:
    """(spatial loops, reduction loops) of a TE-made block (reductions come last)."""
    loops = sch.get_loops(block)
    nr = _n_reduce(sch, block)
    return (list(loops[: len(loops) - nr]), list(loops[len(loops) - nr :]))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def is_kernel(func: object) -> bool:
    """True for a PrimFunc built by :mod:`..kernels` (it carries a kernel kind)."""
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs


def is_symbolic_move(func: object) -> bool:
    """True for a PrimFunc of symbolic shapes, not ours, whose one block (data-parallel)
    stores a load of an input, maybe cast: a reshape, transpose, broadcast copy."""
    if not isinstance(func, tirx.PrimFunc) or is_kernel(func) or not shape_vars(func):
        return False
    sch = Schedule(func)
    root = root_block(sch)
    blocks = [] if root is None else sch.get_child_blocks(root)
    if len(blocks) != 1 or reduces(sch, blocks[0]):
        return False
    body = sch.get(blocks[0]).body
    value = getattr(body, "value", None)
    value = value.value if isinstance(value, tirx.Cast) else value
    return isinstance(body, tirx.BufferStore) and isinstance(value, tvm.ir.TensorLoad)


def is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def mark_opaque(mod: tvm.IRModule) -> tvm.IRModule:
    """A copy of ``mod`` whose tbn kernels are opaque to FuseOps (never fused with others)."""
    mod = mod.clone()
    for gv, func in list(mod.functions.items()):
        if is_kernel(func):
            mod[gv] = func.with_attr("op_pattern", _OP_PATTERN_OPAQUE)
    return mod
