"""``compile_cortex_m``: model -> rewritten graph -> Relax -> TIR -> static C program.

Steps: :func:`tbn_compiler.passes.rewrite` (tile ops), :func:`..relax_import.import_graph`,
:func:`.lower.legalize` (whole graph to ``call_tir``), :func:`.aot.plan_main` (call order,
constants, arena), :func:`.lower.lower_kernels` + :func:`.lower.kernels_c_source` (one C
file of kernels), :mod:`.emit` (weights + entry point + header). Tile kernels get the
single-core MCU schedule of :mod:`.schedule` (no parallel loops, no vectors); the rest
stay unscheduled. No TVM runtime.
"""

from __future__ import annotations

from typing import Any

import torch
import tvm

from ...targets import TargetSpec, resolve_target
from ..build import example_tensors
from ..relax_import import import_graph
from . import aot, emit, lower
from .module import CortexMModule, ModelInfo
from .schedule import schedule_mcu

__all__ = ["compile_cortex_m", "compile_graph_cortex_m", "generate_sources"]


def _state_names(gm: torch.nn.Module) -> dict[bytes, str | None]:
    """Raw bytes of each tensor of the rewritten graph -> its state_dict name; None where
    several tensors hold the same bytes (e.g. freshly initialized BatchNorms)."""
    names: dict[bytes, str | None] = {}
    for name, t in gm.state_dict().items():
        t = t.detach().cpu().contiguous()
        raw = (t.view(torch.int32) if t.dtype == torch.uint32 else t).numpy().tobytes()
        names[raw] = name if raw not in names else None
    return names


def _per_layer(plan: aot.Plan, gm: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight bytes of each kernel call (a constant counts at its first use), with the
    model layer its constants come from (tile/alphas/bias are stored unchanged, so
    they are found by content; folded constants such as BatchNorm's are not: None)."""
    names = _state_names(gm)
    seen: set[int] = set()
    rows = []
    for i, step in enumerate(plan.steps):
        consts = [r.index for r in step.args if r.kind == "const" and r.index not in seen]
        seen.update(consts)
        if not consts:
            continue
        found = [names.get(plan.constants[c].array.tobytes()) for c in consts]
        layer = next((n.rpartition(".")[0] or n for n in found if n), None)
        rows.append(
            {
                "step": i,
                "kernel": step.func,
                "layer": layer,
                "weights_bytes": sum(plan.constants[c].nbytes for c in consts),
            }
        )
    return rows


def generate_sources(
    mod: tvm.IRModule, name: str, fuse: bool = True
) -> tuple[dict[str, str], aot.Plan]:
    """The four C files (``include/tbn_model.h``, ``src/tbn_kernels.{h,c}``,
    ``src/tbn_model.c``) for an imported Relax module, and the plan behind them."""
    mod = lower.legalize(mod, fuse=fuse)
    draft = aot.plan_main(mod, {})
    funcs: dict[str, Any] = {}
    for step in draft.steps:
        funcs.setdefault(step.kernel, schedule_mcu(mod[step.func]))
    kernels_c = lower.kernels_c_source(lower.lower_kernels(funcs))
    plan = aot.plan_main(mod, lower.workspace_bytes(kernels_c))
    weights = sum(c.nbytes for c in plan.constants)
    sources = {
        "include/tbn_model.h": emit.model_header(plan, name, weights),
        "src/tbn_kernels.h": emit.kernels_header(kernels_c),
        "src/tbn_kernels.c": kernels_c,
        "src/tbn_model.c": emit.model_source(plan, emit.kernel_prototypes(kernels_c)),
    }
    return sources, plan


def compile_graph_cortex_m(
    gm: torch.nn.Module, example_inputs: Any, target: Any, report: Any = None, fuse: bool = True
) -> CortexMModule:
    """Compile an already rewritten graph for a Cortex-M preset."""
    inputs = example_tensors(example_inputs)
    spec: TargetSpec = resolve_target(target)
    if spec.kind != "cortex-m" or spec.board is None:
        raise ValueError(f"target {spec.name!r} is not a Cortex-M board or CPU preset")
    imported = import_graph(gm, inputs)
    if len(imported.inputs) != 1 or len(imported.outputs) != 1:
        raise aot.AotError(
            f"the Cortex-M backend takes one input and one output tensor, the model has "
            f"{len(imported.inputs)} and {len(imported.outputs)}"
        )
    name = type(gm).__name__
    sources, plan = generate_sources(imported.mod, name, fuse=fuse)
    info = ModelInfo(
        imported.inputs,
        imported.outputs,
        sum(c.nbytes for c in plan.constants),
        plan.arena_bytes,
        _per_layer(plan, gm),
        report,
    )
    return CortexMModule(spec, sources, info)


def compile_cortex_m(
    model: torch.nn.Module, example_inputs: Any, spec: Any, config: Any = None
) -> CortexMModule:
    """Rewrite ``model`` with ``config`` (default ``TBNConfig()``) and compile it for the
    Cortex-M preset ``spec`` (a name or a :class:`TargetSpec`); same as
    ``tbn_compiler.compile(model, example_inputs, spec, config)``."""
    from ..build import compile as compile_model

    return compile_model(model, example_inputs, spec, config)
