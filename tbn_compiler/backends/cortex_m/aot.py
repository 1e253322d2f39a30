"""Ahead-of-time plan of a legalized Relax ``main``: call sequence, constants, arena.

:func:`plan_main` walks the bindings of ``main`` (only ``call_tir``, variable aliases and
tuple projections are accepted) and returns a :class:`Plan`:

* ``steps``: the kernel calls in program order, each with its arguments as
  :class:`Ref` (the model input, the model output, a constant, or an arena buffer);
* ``constants``: every tensor constant once (weights, packed tiles, alphas, biases, folded
  BatchNorm scales), emitted as ``static const`` arrays (flash);
* ``buffers``: intermediates with byte offsets in ONE static arena. Offsets come from a
  greedy first-fit planner over lifetimes (largest first), so buffers whose lifetimes do
  not overlap share memory. A kernel's workspace (intermediates over 1 KiB inside the
  kernel) is a buffer live during that call only.

Inputs and outputs (:class:`Port`: shape and dtype, any dtype with a C type: float32,
int32, int64 token ids, bool masks, ...) are the caller's memory: ``main``'s parameters are
read in place (``Ref("input", i)``) and each output tensor is written straight into the
caller's output ``k`` (``Ref("output", k)``) by the call that computes it (later calls
read it back from there). An output that no call computes (an input or a constant
returned as is) or that repeats another output is copied into place after the last call
(``Plan.copies``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from .c_kernels import C_TYPES, WS_ALIGN

__all__ = [
    "AotError",
    "Ref",
    "Port",
    "Step",
    "Const",
    "Buffer",
    "Plan",
    "plan_main",
    "plan_arena",
]


class AotError(RuntimeError):
    """The Relax main cannot be turned into a static C program."""


@dataclass(frozen=True)
class Ref:
    """An argument: kind "input" | "output" | "const" | "buffer", index into its table."""

    kind: str
    index: int = 0


@dataclass(frozen=True)
class Port:
    """A model input or output: static shape and dtype (TVM's name: "float32", "int64")."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


@dataclass
class Const:
    """A constant tensor: C name, dtype and values (numpy)."""

    name: str
    array: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass
class Buffer:
    """An arena buffer: size, lifetime [first, last] step indices, offset (planned)."""

    nbytes: int
    first: int
    last: int
    offset: int = -1


@dataclass
class Step:
    """One kernel call: the Relax name of the callee, its C name, and its arguments (the
    last ``outputs`` of them are the results it writes)."""

    func: str
    kernel: str
    args: list[Ref]
    workspace: int | None = None  # index of the workspace buffer, if any
    outputs: int = 1


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    constants: list[Const] = field(default_factory=list)
    buffers: list[Buffer] = field(default_factory=list)
    arena_bytes: int = 0
    inputs: list[Port] = field(default_factory=list)
    outputs: list[Port] = field(default_factory=list)
    copies: list[tuple[int, Ref]] = field(default_factory=list)
    """(output index, source) copied after the last call: outputs no call writes."""


def _tensor_info(ty: relax.TensorType | object, what: str) -> tuple[tuple[int, ...], str]:
    try:
        shape = tuple(int(d) for d in ty.shape)
    except Exception as exc:
        raise AotError(f"{what} needs a static shape, got {ty}") from exc
    return shape, str(ty.dtype)


def _const_value(c: tvm.ir.Constant) -> object:
    """The runtime tensor held by a constant expression."""
    for attr in ("value", "data"):
        val = getattr(c, attr, None)
        if val is not None and hasattr(val, "numpy"):
            return val
    raise AotError(f"constant without tensor data: {c}")


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * tvm.DataType(dtype).bits // 8


def _port(ty: object, what: str) -> Port:
    """The :class:`Port` of a model input or output; :class:`AotError` for a dynamic shape
    or a dtype C has no type for."""
    if not isinstance(ty, relax.TensorType):
        raise AotError(f"{what} must be a tensor, got {ty}")
    shape, dtype = _tensor_info(ty, what)
    if dtype not in C_TYPES:
        raise AotError(
            f"{what} has dtype {dtype}, which the Cortex-M entry point cannot pass "
            f"(supported: {', '.join(C_TYPES)})"
        )
    return Port(shape, dtype)


class _Walker:
    """State while walking the bindings of ``main``."""

    def __init__(self, main: relax.Function) -> None:
        self.plan = Plan()
        self.env: dict[relax.Var, Ref | list[Ref]] = {}
        for i, param in enumerate(main.params):
            self.plan.inputs.append(_port(param.ty, f"model input {i} ({param.name})"))
            self.env[param] = Ref("input", i)
        self.const_ids: dict[int, int] = {}
        self.kernel_names: dict[str, str] = {}

    def arg(self, expr: relax.Expr, step: int) -> Ref:
        if isinstance(expr, tvm.ir.Constant):
            return self.const(expr)
        if isinstance(expr, relax.Var) and expr in self.env:
            ref = self.env[expr]
            if isinstance(ref, list):
                raise AotError(f"a tuple value {expr.name} is passed to a kernel")
            if ref.kind == "buffer":
                self.plan.buffers[ref.index].last = step
            return ref
        raise AotError(f"unsupported kernel argument {type(expr).__name__}: {expr}")

    def const(self, c: tvm.ir.Constant) -> Ref:
        key = c.__hash__()
        if key not in self.const_ids:
            arr = np.ascontiguousarray(_const_value(c).numpy())
            self.const_ids[key] = len(self.plan.constants)
            self.plan.constants.append(Const(f"tbn_c{len(self.plan.constants)}", arr))
        return Ref("const", self.const_ids[key])

    def new_buffer(self, ty: object, step: int) -> Ref:
        shape, dtype = _tensor_info(ty, "an intermediate")
        self.plan.buffers.append(Buffer(_nbytes(shape, dtype), step, step))
        return Ref("buffer", len(self.plan.buffers) - 1)

    def call(self, var: relax.Var, call: relax.Call) -> None:
        step = len(self.plan.steps)
        gv, args = call.args[0], call.args[1]
        if len(call.args) > 2:
            raise AotError(
                f"call_tir with symbolic shape arguments is not supported ({gv.name_hint})"
            )
        refs = [
            self.arg(a, step) for a in (args.fields if isinstance(args, relax.Tuple) else [args])
        ]
        out_ty = var.ty
        if isinstance(out_ty, relax.TupleType):
            outs = [self.new_buffer(t, step) for t in out_ty.fields]
            self.env[var] = outs
        else:
            outs = [self.new_buffer(out_ty, step)]
            self.env[var] = outs[0]
        kernel = self.kernel_names.setdefault(
            gv.name_hint, f"tbn_k{len(self.kernel_names)}_{gv.name_hint}"
        )
        self.plan.steps.append(Step(gv.name_hint, kernel, refs + outs, outputs=len(outs)))

    def bind(self, binding: relax.Binding) -> None:
        if not isinstance(binding, relax.VarBinding):
            raise AotError(f"unsupported binding {type(binding).__name__}")
        var, value = binding.var, binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
            self.call(var, value)
        elif isinstance(value, relax.Var):
            self.env[var] = self.env[value]
        elif isinstance(value, relax.TupleGetItem):
            outs = self.env[value.tuple_value]
            if not isinstance(outs, list):
                raise AotError(f"tuple projection of a non-tuple {value.tuple_value.name}")
            self.env[var] = outs[value.index]
        elif isinstance(value, tvm.ir.Constant):
            self.env[var] = self.const(value)
        elif isinstance(value, relax.Tuple):
            self.env[var] = [self.leaf(f) for f in value.fields]
        else:
            raise AotError(_left_op_message(value))

    def leaf(self, expr: relax.Expr) -> Ref:
        """The tensor ``expr`` (a variable bound to a tensor, or a constant) as a model
        output; nested tuples are refused."""
        if isinstance(expr, tvm.ir.Constant):
            return self.const(expr)
        ref = self.env.get(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(ref, Ref):
            raise AotError(f"the model returns a nested tuple or an unknown value: {expr}")
        return ref

    def results(self, result: relax.Expr) -> list[Ref]:
        """The model outputs, flat, in order."""
        if isinstance(result, relax.Tuple):
            return [self.leaf(f) for f in result.fields]
        if isinstance(result, relax.Var) and isinstance(self.env.get(result), list):
            return list(self.env[result])
        return [self.leaf(result)]


def _left_op_message(value: relax.Expr) -> str:
    """What :class:`AotError` says about an operator left in ``main`` after legalization
    and constant folding: its name, and whether its inputs are constants."""
    op = getattr(getattr(value, "op", None), "name", None)
    if op is None:
        return (
            f"a value left in the model after legalization cannot run on a microcontroller: {value}"
        )
    args = list(getattr(value, "args", []))
    consts = all(isinstance(a, tvm.ir.Constant) for a in args)
    where = (
        "its inputs are constants, yet it was not folded"
        if consts
        else "it depends on the model inputs"
    )
    return (
        f"operator {op} has no C lowering for Cortex-M ({where}): {value}. Keep the op off "
        "the microcontroller (compute it in the caller and pass it as an input), or "
        "compile for 'llvm'"
    )


def _redirect_outputs(plan: Plan, outs: list[Ref]) -> None:
    """Make the producer of each output buffer write into the caller's output directly;
    outputs no call writes (inputs, constants, a buffer already returned) are copied."""
    placed: dict[Ref, Ref] = {}
    for k, out in enumerate(outs):
        if out.kind != "buffer" or out in placed:
            plan.copies.append((k, placed.get(out, out)))
            continue
        placed[out] = Ref("output", k)
        for step in plan.steps:
            step.args = [placed[out] if a == out else a for a in step.args]
        plan.buffers[out.index].nbytes = 0


def plan_arena(buffers: list[Buffer]) -> int:
    """Assign offsets (first fit, largest first, lifetime-aware); return the arena size."""
    placed: list[Buffer] = []
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].nbytes, i))
    for i in order:
        buf = buffers[i]
        if buf.nbytes == 0:
            buf.offset = 0
            continue
        clashes = sorted(
            (b.offset, b.offset + b.nbytes)
            for b in placed
            if not (b.last < buf.first or buf.last < b.first)
        )
        offset = 0
        for lo, hi in clashes:
            if offset + buf.nbytes <= lo:
                break
            offset = max(offset, (hi + WS_ALIGN - 1) // WS_ALIGN * WS_ALIGN)
        buf.offset = offset
        placed.append(buf)
    return max((b.offset + b.nbytes for b in placed), default=0)


def plan_main(mod: tvm.IRModule, workspace: dict[str, int]) -> Plan:
    """The static program for ``mod["main"]`` (see module doc). ``workspace``: kernel C
    name -> bytes of workspace it needs."""
    main = mod["main"]
    walker = _Walker(main)
    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            walker.bind(binding)
    result = body.body
    outs = walker.results(result)
    types = list(result.ty.fields) if isinstance(result.ty, relax.TupleType) else [result.ty]
    plan = walker.plan
    plan.outputs = [_port(t, f"model output {k}") for k, t in enumerate(types)]
    if len(plan.outputs) != len(outs):
        raise AotError(f"the model returns {len(outs)} tensors, its type says {len(types)}")
    _redirect_outputs(plan, outs)
    for i, step in enumerate(plan.steps):
        nbytes = workspace.get(step.kernel, 0)
        if nbytes:
            plan.buffers.append(Buffer(nbytes, i, i))
            step.workspace = len(plan.buffers) - 1
    plan.arena_bytes = plan_arena(plan.buffers)
    return plan
