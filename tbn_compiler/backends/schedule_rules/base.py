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

Also here: the shared helpers of the CPU, CUDA and Cortex-M rules, and the attributes
that tell the Relax pipelines which functions are our kernels (:func:`mark_opaque`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule
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
    "extent",
    "factor",
    "is_kernel",
    "is_scheduled",
    "known_extent",
    "mark_opaque",
    "reduces",
    "root_block",
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
    ``None`` when the rule does not apply to ``func``, else a new schedule of it (the
    input is never modified)."""

    name = "rule"

    def apply(self, func: tirx.PrimFunc, target: Target | None) -> Schedule | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<schedule rule {self.name}>"


def apply_first(
    func: tirx.PrimFunc, target: Target | None, rules: Sequence[ScheduleRule]
) -> tirx.PrimFunc | None:
    """The scheduled PrimFunc of the first rule in ``rules`` that applies, else None.
    An error inside an applying rule propagates (a rule that applies must succeed)."""
    for rule in rules:
        sch = rule.apply(func, target)
        if sch is not None:
            return sch.mod["main"]
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


def is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def mark_opaque(mod: tvm.IRModule) -> tvm.IRModule:
    """A copy of ``mod`` whose tbn kernels are opaque to FuseOps (never fused with others)."""
    mod = mod.clone()
    for gv, func in list(mod.functions.items()):
        if is_kernel(func):
            mod[gv] = func.with_attr("op_pattern", _OP_PATTERN_OPAQUE)
    return mod
