"""``compile`` checks itself: the compiled module against the graph it was compiled from.

:func:`validate_build` runs the rewritten graph ``gm`` (in torch, the numerical
reference) and the compiled module on two input sets and compares every output tensor:

* the example inputs;
* one fresh input of the same signature (:func:`fresh_inputs`, seeded): floats drawn
  uniformly in ``[min, max]`` of the example's finite values (its NaN/inf kept where they
  are), integers (token ids) uniformly in ``[min, max]`` of the example so that
  embeddings stay in range, booleans (masks) kept as given. Where the graph itself
  raises on it (ids it computes fall out of range), that input is not compared.

A compiled module that raises where the graph runs raises :class:`ValidationError` too.

Error of one tensor (:func:`scaled_error`): ``max |out - ref| / max(max |ref|, 1e-6)``
over the positions where the reference is finite; NaN and infinities must sit at the same
positions with the same values, integer and boolean tensors must be equal, and shapes and
dtypes the same (else the error is infinite). A tensor whose error exceeds :data:`TOLERANCE` (1e-3) is a mismatch
(:data:`INT8_TOLERANCE` for modules compiled with ``precision="int8"``).
fp32 reordering stays far below that: on the models of ``tests/models.py``, the fuzzer's
nets, ResNet-18 and the Hugging Face models of ``tests/test_hf_models.py`` the largest error
measured is about 3e-6; a wrong op gives errors of 1e-2 and more.

On a mismatch :func:`locate_divergence` finds the first diverging node of ``gm`` by
bisection over the graph: a probe builds the graph cut after one node (that node's value
is the only output, :func:`~tbn_compiler.capture.graph_with_outputs`) for the same target
and compares it with torch's value of the node; about ``log2(nodes)`` probes find a node
that diverges while the node before it in graph order matches, and one more build checks
its tensor inputs: if one of them diverges the search continues among that input's
ancestors, so the node reported is one whose inputs all match. :class:`ValidationError`
names the node, its op, its module path and source line, and the error sizes.

Targets: host (LLVM) and CUDA builds are validated where they can run
(``backend_for(kind).runnable_here``; CUDA needs a GPU). Cortex-M builds are validated
where QEMU and the Arm toolchain are installed, on their final outputs only: a probe
there would be one firmware build and QEMU run each, so the error names no node and says
to compile for ``"llvm"`` to locate it. Probes are built without tuning. The result is
kept on the compiled module as ``validation`` (:class:`Validation`); a target that cannot
run here is recorded there as skipped, with the reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..capture import graph_with_outputs
from ..targets import TargetSpec
from .protocol import CompiledProgram, backend_for

__all__ = [
    "INT8_TOLERANCE",
    "TOLERANCE",
    "Divergence",
    "Validation",
    "ValidationError",
    "fresh_inputs",
    "locate_divergence",
    "scaled_error",
    "validate_build",
]

TOLERANCE = 1e-3
"""Largest :func:`scaled_error` of an output tensor that counts as a match."""

INT8_TOLERANCE = 5e-2
"""The same for a module compiled with ``precision="int8"`` (``program.precision``):
int8 activations round each input of a tiled linear by up to ``max |row| / 254``, about
1e-2 of a layer's output range for Gaussian inputs (docs/performance.md), and the errors
of stacked layers add up. A wrong op still gives errors of 1e-1 and more."""

_SCALE_FLOOR = 1e-6
_FRESH_SEED = 20240611
_log = logging.getLogger("tbn_compiler")

Build = Callable[[fx.GraphModule], CompiledProgram]
"""Compiles a graph for the target being validated (probes of the bisection)."""


@dataclass(frozen=True)
class Divergence:
    """The first node of the graph whose compiled value differs from torch's: fx node
    ``node`` (its name), ``op`` (its target), ``module`` (module path, or None),
    ``source`` (the model's source line, or None) and its :func:`scaled_error`."""

    node: str
    op: str
    module: str | None
    source: str | None
    error: float

    def describe(self) -> str:
        where = f" in module {self.module!r}" if self.module else ""
        line = f" ({self.source})" if self.source else ""
        return f"node {self.node!r} (op {self.op}){where}{line}: error {self.error:.3g}"


@dataclass(frozen=True)
class Validation:
    """What the check found: ``status`` ("passed" or "skipped"), ``reason`` (why it was
    skipped, else None), ``max_error`` (largest :func:`scaled_error` over all outputs
    and input sets, None when skipped) and ``input_sets`` (how many were compared)."""

    status: str
    reason: str | None = None
    max_error: float | None = None
    input_sets: int = 0


class ValidationError(RuntimeError):
    """The compiled module does not compute what the rewritten graph computes.

    Attributes: ``output`` (index of the first mismatching output tensor; -1 when the
    compiled module raised), ``error``
    (its :func:`scaled_error`), ``input_set`` ("example" or "fresh random"), and
    ``divergence`` (the first diverging node, a :class:`Divergence`, or None where it
    was not located)."""

    def __init__(
        self, message: str, output: int, error: float, input_set: str, divergence: Any
    ) -> None:
        super().__init__(message)
        self.output = output
        self.error = error
        self.input_set = input_set
        self.divergence = divergence


# --------------------------------------------------------------------------- comparing


def scaled_error(ref: torch.Tensor, out: Any) -> float:
    """Error of ``out`` against ``ref`` (see the module docstring); ``inf`` when ``out``
    is not a tensor of ``ref``'s shape and dtype, or non-finite values or exact dtypes
    differ."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    if out.dtype != ref.dtype:
        return math.inf
    ref, out = ref.detach().cpu(), out.detach().cpu()
    if ref.numel() == 0:
        return 0.0
    if not (ref.dtype.is_floating_point or ref.dtype.is_complex):
        return 0.0 if torch.equal(ref, out.to(ref.dtype)) else math.inf
    ref, out = ref.double(), out.double()
    finite = torch.isfinite(ref)
    if not torch.equal(ref[~finite].nan_to_num(), out[~finite].nan_to_num()) or not torch.equal(
        ref[~finite].isnan(), out[~finite].isnan()
    ):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    diff = (out[finite] - ref[finite]).abs().max()
    if not bool(torch.isfinite(diff)):
        return math.inf
    scale = max(float(ref[finite].abs().max()), _SCALE_FLOOR)
    return float(diff) / scale


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _output_errors(refs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> list[float]:
    if len(refs) != len(outs):
        return [math.inf] * max(len(refs), 1)
    return [scaled_error(r, o) for r, o in zip(refs, outs, strict=True)]


# --------------------------------------------------------------------------- inputs


def fresh_inputs(inputs: Sequence[torch.Tensor], seed: int = _FRESH_SEED) -> tuple:
    """A new input set of the same shapes and dtypes (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(_fresh_tensor(t, gen) for t in inputs)


def _fresh_tensor(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    cpu = t.detach().cpu()
    if cpu.numel() == 0 or cpu.dtype == torch.bool:
        return t.detach().clone()
    if cpu.dtype.is_floating_point:
        finite = torch.isfinite(cpu)
        if not bool(finite.any()):
            return t.detach().clone()
        low, high = (float(v) for v in (cpu[finite].min(), cpu[finite].max()))
        drawn = torch.rand(cpu.shape, generator=gen, dtype=torch.float64) * (high - low) + low
        fresh = torch.where(finite, drawn.to(cpu.dtype), cpu)
    elif cpu.dtype.is_complex:
        return t.detach().clone()
    else:
        low, high = int(cpu.min()), int(cpu.max())
        fresh = torch.randint(low, high + 1, cpu.shape, generator=gen, dtype=torch.int64)
        fresh = fresh.to(cpu.dtype)
    return fresh.to(t.device)


# --------------------------------------------------------------------------- running


def _run_reference(gm: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensor_leaves(gm(*inputs))


def _run_program(
    program: CompiledProgram, inputs: Sequence[torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    moved = [t.to(device) for t in inputs]
    return [t.cpu() for t in _tensor_leaves(program(*moved))]


def _why_not_runnable(spec: TargetSpec) -> str | None:
    """None when modules for ``spec`` can run here, else why not."""
    reason = backend_for(spec.kind).runnable_here(spec)
    if reason is None and spec.kind == "cortex-m":  # emulated board: QEMU must be installed
        from .cortex_m import ToolchainError, require_toolchain

        try:
            require_toolchain(qemu=True)
        except ToolchainError as exc:
            reason = str(exc)
    return reason


def validate_build(
    gm: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    program: CompiledProgram,
    spec: TargetSpec,
    build: Build | None = None,
) -> Validation:
    """Compare ``program`` with ``gm`` (see the module docstring); sets and returns
    ``program.validation``. ``build`` compiles a probe graph for the same target (None:
    the divergence is not located). Raises :class:`ValidationError` on a mismatch."""
    reason = _why_not_runnable(spec)
    if reason is not None:
        _log.info("compiled module for %s not validated: %s", spec.name, reason)
        return _record(program, Validation("skipped", reason=reason))
    device = backend_for(spec.kind).device(spec)
    tolerance = tolerance_of(program)
    worst, compared = 0.0, 0
    for name, xs in (("example", tuple(inputs)), ("fresh random", fresh_inputs(inputs))):
        refs = _reference_or_none(gm, xs, name)
        if refs is None:
            continue
        errors = _output_errors(refs, _run_checked(program, xs, device, spec, name))
        worst, compared = max(worst, *errors), compared + 1
        bad = next((i for i, e in enumerate(errors) if not e <= tolerance), None)
        if bad is not None:
            raise _mismatch(gm, xs, spec, build, name, bad, errors[bad], tolerance)
    _log.info("compiled module for %s validated: max error %.3g", spec.name, worst)
    return _record(program, Validation("passed", max_error=worst, input_sets=compared))


def tolerance_of(program: CompiledProgram) -> float:
    """:data:`INT8_TOLERANCE` for a program compiled with int8 precision, else
    :data:`TOLERANCE`."""
    return INT8_TOLERANCE if getattr(program, "precision", "float32") == "int8" else TOLERANCE


def _reference_or_none(
    gm: torch.nn.Module, inputs: Sequence[torch.Tensor], input_set: str
) -> list[torch.Tensor] | None:
    """Torch's outputs; None for a fresh input the graph itself refuses (e.g. ids it
    computes from the input fall out of range), which is then not compared."""
    try:
        return _run_reference(gm, inputs)
    except Exception as exc:
        if input_set == "example":
            raise
        _log.info(
            "%s input not compared: the graph raised %s: %s", input_set, type(exc).__name__, exc
        )
        return None


def _run_checked(
    program: CompiledProgram,
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    spec: TargetSpec,
    input_set: str,
) -> list[torch.Tensor]:
    """The compiled module's outputs; :class:`ValidationError` when it raises where the
    graph did not."""
    try:
        return _run_program(program, inputs, device)
    except Exception as exc:
        message = (
            f"the module compiled for {spec.name} raised {type(exc).__name__} on the "
            f"{input_set} input, on which the rewritten graph runs: {exc}"
        )
        raise ValidationError(message, -1, math.inf, input_set, None) from exc


def _record(program: CompiledProgram, validation: Validation) -> Validation:
    program.validation = validation
    return validation


def _mismatch(
    gm: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    spec: TargetSpec,
    build: Build | None,
    input_set: str,
    output: int,
    error: float,
    tolerance: float = TOLERANCE,
) -> ValidationError:
    head = (
        f"the module compiled for {spec.name} does not compute what the rewritten graph "
        f"computes: on the {input_set} input, output tensor {output} is off by {error:.3g} "
        f"(max abs difference / max abs value; tolerance {tolerance:g})."
    )
    if math.isinf(error):
        head += (
            " (An infinite error: another shape or dtype, non-finite values elsewhere, or "
            "unequal integers.)"
        )
    divergence = None
    if build is not None and isinstance(gm, fx.GraphModule):
        divergence = locate_divergence(gm, inputs, build, output, tolerance)
    if divergence is not None:
        where = f" The first diverging node is {divergence.describe()}; its inputs match."
    elif build is None:
        where = (
            f" Diverging node not located for {spec.kind} targets (each probe is a full "
            "build and run); compile for target='llvm' to locate it."
        )
    else:
        where = " No single node of the graph diverges when built alone."
    tail = (
        " This is a compiler defect: please report it. compile(..., validate=False) "
        "returns the module unchecked."
    )
    return ValidationError(head + where + tail, output, error, input_set, divergence)


# --------------------------------------------------------------------------- locating


def _node_values(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, Any]:
    """Torch's value of every node of ``gm`` on ``inputs``."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def _probe_error(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    values: dict[fx.Node, Any],
    inputs: Sequence[torch.Tensor],
    build: Build,
) -> list[float]:
    """The :func:`scaled_error` of each of ``nodes`` in a build whose outputs they are."""
    program = build(graph_with_outputs(gm, nodes))
    device = backend_for(program.target.kind).device(program.target)
    outs = _run_program(program, inputs, device)
    return _output_errors([values[n] for n in nodes], outs)


def _ancestors(node: fx.Node, candidates: Sequence[fx.Node]) -> list[fx.Node]:
    """``candidates`` (in graph order) that ``node`` depends on, ``node`` included."""
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return [n for n in candidates if n in seen]


def locate_divergence(
    gm: fx.GraphModule,
    inputs: Sequence[torch.Tensor],
    build: Build,
    output: int,
    tolerance: float = TOLERANCE,
) -> Divergence | None:
    """The first node of ``gm`` whose compiled value diverges from torch's (an error
    over ``tolerance``) while its tensor inputs match (see the module docstring),
    searched among the nodes that output tensor ``output`` depends on; None when that
    output is not computed by the graph (an input or a constant) or does not diverge in
    a build of its own."""
    values = _node_values(gm, inputs)
    computed = [
        n
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_method", "call_module")
        and isinstance(values.get(n), torch.Tensor)
    ]
    leaves = _output_nodes(gm, values)
    last = leaves[output] if output < len(leaves) else None
    if last not in computed:
        return None
    if _probe_error(gm, [last], values, inputs, build)[0] <= tolerance:
        return None
    return _bisect(gm, _ancestors(last, computed), values, inputs, build, tolerance)


def _output_nodes(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> list[Any]:
    """The graph's output tensors as nodes, in the order of the output's tensor leaves."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    return [n for n in leaves if isinstance(n, fx.Node) and isinstance(values[n], torch.Tensor)]


def _bisect(
    gm: fx.GraphModule,
    candidates: list[fx.Node],
    values: dict[fx.Node, Any],
    inputs: Sequence[torch.Tensor],
    build: Build,
    tolerance: float,
) -> Divergence:
    """Bisect ``candidates`` (graph order, the last one diverging) down to a node whose
    tensor inputs match; the search moves to an input's ancestors when one diverges."""
    low, high = -1, len(candidates) - 1  # candidates[low] matches (-1: the inputs)
    while True:
        while high - low > 1:
            mid = (low + high) // 2
            if _probe_error(gm, [candidates[mid]], values, inputs, build)[0] > tolerance:
                high = mid
            else:
                low = mid
        node = candidates[high]
        parents = [p for p in node.all_input_nodes if p in set(candidates[:high])]
        errors = _probe_error(gm, [node, *parents], values, inputs, build) if parents else []
        bad = next((p for p, e in zip(parents, errors[1:], strict=True) if e > tolerance), None)
        if bad is None:
            error = errors[0] if errors else _probe_error(gm, [node], values, inputs, build)[0]
            return _divergence(node, error)
        candidates = _ancestors(bad, candidates)
        low, high = -1, len(candidates) - 1


def _divergence(node: fx.Node, error: float) -> Divergence:
    return Divergence(node.name, _op_name(node), _module_path(node), _source_line(node), error)


def _op_name(node: fx.Node) -> str:
    """``aten.mul.Tensor``, ``tbn.tiled_linear.default``, ``getitem``, a method name..."""
    target = node.target
    if isinstance(target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target))


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path) or None


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _source_line(node: fx.Node) -> str | None:
    """``file:line`` of the model code that made ``node`` (its innermost frame)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else None
