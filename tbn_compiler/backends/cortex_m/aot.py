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

The model has one float32 input and one float32 output; the output of the last call is
written straight into the caller's ``output`` and the input is read in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from .c_kernels import WS_ALIGN

__all__ = ["AotError", "Ref", "Step", "Const", "Buffer", "Plan", "plan_main", "plan_arena"]


class AotError(RuntimeError):
    """The Relax main cannot be turned into a static C program."""


@dataclass(frozen=True)
class Ref:
    """An argument: kind "input" | "output" | "const" | "buffer", index into its table."""

    kind: str
    index: int = 0


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
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()


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


class _Walker:
    """State while walking the bindings of ``main``."""

    def __init__(self, main: relax.Function) -> None:
        if len(main.params) != 1:
            raise AotError(
                f"the Cortex-M backend takes exactly one input, the model has {len(main.params)}"
            )
        self.plan = Plan()
        self.plan.input_shape, dtype = _tensor_info(main.params[0].ty, "the model input")
        if dtype != "float32":
            raise AotError(f"the model input must be float32, got {dtype}")
        self.env: dict[relax.Var, Ref | list[Ref]] = {main.params[0]: Ref("input")}
        self.const_ids: dict[int, int] = {}
        self.kernel_names: dict[str, str] = {}

    def arg(self, expr: relax.Expr, step: int) -> Ref:
        if isinstance(expr, tvm.ir.Constant):
            return self.const(expr)
        if isinstance(expr, relax.Var) and expr in self.env:
            ref = self.env[expr]
            if isinstance(ref, list):
                raise AotError(f"a tuple value {expr.name_hint} is passed to a kernel")
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
                raise AotError(f"tuple projection of a non-tuple {value.tuple_value.name_hint}")
            self.env[var] = outs[value.index]
        elif isinstance(value, tvm.ir.Constant):
            self.env[var] = self.const(value)
        else:
            raise AotError(f"op left after legalization cannot run on a microcontroller: {value}")


def _redirect_output(plan: Plan, out: Ref) -> None:
    """Make the producer of the output buffer write into ``output`` directly."""
    if out.kind != "buffer":
        raise AotError("the model output must be computed by a kernel (not an input or constant)")
    for step in plan.steps:
        step.args = [Ref("output") if a == out else a for a in step.args]
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
    if not isinstance(result, relax.Var) or result not in walker.env:
        raise AotError(f"the model must return one tensor, got {type(result).__name__}")
    out = walker.env[result]
    if isinstance(out, list):
        raise AotError(f"the Cortex-M backend returns one tensor, the model returns {len(out)}")
    plan = walker.plan
    plan.output_shape, dtype = _tensor_info(result.ty, "the model output")
    if dtype != "float32":
        raise AotError(f"the model output must be float32, got {dtype}")
    _redirect_output(plan, out)
    for i, step in enumerate(plan.steps):
        nbytes = workspace.get(step.kernel, 0)
        if nbytes:
            plan.buffers.append(Buffer(nbytes, i, i))
            step.workspace = len(plan.buffers) - 1
    plan.arena_bytes = plan_arena(plan.buffers)
    return plan
