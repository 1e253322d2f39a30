"""``compile_graph_cortex_m``: rewritten graph -> Relax -> TIR -> static C program.

Steps: :func:`..relax_import.import_graph` (the graph of tile ops that
:func:`tbn_compiler.passes.rewrite` made),
:func:`..pipelines.cortex_m` (whole graph to ``call_tir``, every kernel with the
single-core schedule of :mod:`..schedule_rules.mcu`: no parallel loops, no vectors),
:func:`.aot.plan_main` (call order, constants, arena), :func:`.lower.lower_kernels` +
:func:`.c_kernels.c_kernels` (each kernel's facts from its TIR, and its C) +
:func:`.c_kernels.kernels_c_file` (one C file of kernels), :mod:`.emit` (weights + entry
point + headers). No TVM runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import tvm

from ...capture import example_tensors, output_tree
from ...targets import TargetSpec, resolve_target
from .. import pipelines
from ..relax_import import import_graph
from . import aot, c_kernels, emit, lower
from .module import CortexMModule, ModelInfo

__all__ = ["GeneratedProgram", "compile_graph_cortex_m", "generate_sources"]


def _state_names(gm: torch.nn.Module) -> dict[bytes, str | None]:
    """Raw bytes of each tensor of the rewritten graph -> its state_dict name; None where
    several tensors hold the same bytes (e.g. freshly initialized BatchNorms)."""
    names: dict[bytes, str | None] = {}
    for name, t in gm.state_dict().items():
        t = t.detach().cpu().contiguous()
        raw = (t.view(torch.int32) if t.dtype == torch.uint32 else t).numpy().tobytes()
        names[raw] = name if raw not in names else None
    return names


def _step_layers(plan: aot.Plan, gm: torch.nn.Module) -> list[tuple[list[int], str | None]]:
    """Per kernel call: the constants it uses first (a constant counts at its first use)
    and the model layer they come from (tile/alphas/bias are stored unchanged, so they
    are found by content; folded constants such as BatchNorm's are not: None)."""
    names = _state_names(gm)
    seen: set[int] = set()
    rows = []
    for step in plan.steps:
        consts = [r.index for r in step.args if r.kind == "const" and r.index not in seen]
        seen.update(consts)
        found = [names.get(plan.constants[c].array.tobytes()) for c in consts]
        rows.append((consts, next((n.rpartition(".")[0] or n for n in found if n), None)))
    return rows


def _per_layer(plan: aot.Plan, layers: list[tuple[list[int], str | None]]) -> list[dict[str, Any]]:
    """Weight bytes of each kernel call that brings constants, with their model layer."""
    return [
        {
            "step": i,
            "kernel": step.func,
            "layer": layer,
            "weights_bytes": sum(plan.constants[c].nbytes for c in consts),
        }
        for i, (step, (consts, layer)) in enumerate(zip(plan.steps, layers, strict=True))
        if consts
    ]


def _arg_origin(plan: aot.Plan, ref: aot.Ref, step: int) -> str:
    """Where an input of a kernel call comes from: "input", "const", "output" (the model
    output, read back) or "step <k>" (the call that wrote it)."""
    if ref.kind not in ("buffer", "output"):
        return ref.kind
    for k in range(step - 1, -1, -1):
        if ref in plan.steps[k].args[-plan.steps[k].outputs :]:
            return f"step {k}"
    return ref.kind


def step_table(
    plan: aot.Plan,
    layers: list[tuple[list[int], str | None]],
    lines: list[dict[str, list[int]]],
) -> list[dict[str, Any]]:
    """One row per kernel call: ``step``, ``kernel`` (C name), ``func`` (Relax function,
    named after the ops it computes), ``layer`` (model layer of its weights or None),
    ``inputs`` (origin of each input argument, see :func:`_arg_origin`) and ``lines``
    (where its code is, see :class:`GeneratedProgram`)."""
    return [
        {
            "step": i,
            "kernel": step.kernel,
            "func": step.func,
            "layer": layer,
            "inputs": [_arg_origin(plan, r, i) for r in step.args[: -step.outputs]],
            "lines": where,
        }
        for i, (step, (_, layer), where) in enumerate(zip(plan.steps, layers, lines, strict=True))
    ]


@dataclass
class GeneratedProgram:
    """The generated C of a model: ``sources`` (relative path -> text: the four files of
    :func:`generate_sources`), the ``plan`` behind them, and where each program step's
    code is: ``lines[i]`` maps ``src/tbn_kernels.h``, ``src/tbn_kernels.c`` and
    ``src/tbn_model.c`` to the first and last line of step ``i``'s kernel declaration,
    kernel definition and call."""

    sources: dict[str, str]
    plan: aot.Plan
    lines: list[dict[str, list[int]]]


def generate_sources(
    mod: tvm.IRModule,
    name: str,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> GeneratedProgram:
    """The four C files (``include/tbn_model.h``, ``src/tbn_kernels.{h,c}``,
    ``src/tbn_model.c``) for an imported Relax module, the plan behind them and where each
    step's code is. The kernels' parameters, workspace and failure paths come from their
    TIR (:func:`.c_kernels.c_kernels`), not from the C text. ``input_names`` /
    ``output_names``: the model's names of its tensors, for the header (default: the
    Relax parameters' names and ``output<k>``)."""
    mod = pipelines.cortex_m()(mod)
    draft = aot.plan_main(mod, {})
    funcs: dict[str, Any] = {}
    for step in draft.steps:
        funcs.setdefault(step.kernel, mod[step.func])
    kernels = c_kernels.c_kernels(lower.lower_kernels(funcs))
    plan = aot.plan_main(mod, {k.name: k.workspace_bytes for k in kernels.values()})
    header = emit.kernels_header(kernels.values())
    kernels_c = c_kernels.kernels_c_file(kernels.values())
    model_c = emit.model_source(plan, kernels)
    weights = sum(c.nbytes for c in plan.constants)
    if input_names is None:
        input_names = [p.name for p in mod["main"].params]
    sources = {
        "include/tbn_model.h": emit.model_header(plan, name, weights, input_names, output_names),
        "src/tbn_kernels.h": header.text,
        "src/tbn_kernels.c": kernels_c.text,
        "src/tbn_model.c": model_c.text,
    }
    lines = [
        {
            "src/tbn_kernels.h": list(header.lines[step.kernel]),
            "src/tbn_kernels.c": list(kernels_c.lines[step.kernel]),
            "src/tbn_model.c": list(model_c.lines[i]),
        }
        for i, step in enumerate(plan.steps)
    ]
    return GeneratedProgram(sources, plan, lines)


def compile_graph_cortex_m(
    gm: torch.nn.Module, example_inputs: Any, target: Any, report: Any = None
) -> CortexMModule:
    """Compile an already rewritten graph for a Cortex-M preset; the generated C is
    compiled before this returns (see :meth:`CortexMModule.check_build`: the Arm
    toolchain, else a host C compiler syntax check, else :class:`.toolchain.ToolchainError`),
    so a model whose C does not build fails here, naming the kernel and its model step."""
    inputs = example_tensors(example_inputs)
    spec: TargetSpec = resolve_target(target)
    if spec.kind != "cortex-m" or spec.board is None:
        raise ValueError(f"target {spec.name!r} is not a Cortex-M board or CPU preset")
    imported = import_graph(gm, inputs)
    name = type(gm).__name__
    program = generate_sources(
        imported.mod,
        name,
        [s.name for s in imported.inputs],
        [s.name for s in imported.outputs],
    )
    plan = program.plan
    layers = _step_layers(plan, gm)
    info = ModelInfo(
        imported.inputs,
        imported.outputs,
        sum(c.nbytes for c in plan.constants),
        plan.arena_bytes,
        _per_layer(plan, layers),
        report,
        step_table(plan, layers, program.lines),
        output_tree(gm, inputs),
        imported.index_checks,
    )
    cm = CortexMModule(spec, program.sources, info)
    try:
        cm.check_build()
    except BaseException:
        cm.close()
        raise
    return cm
