"""Compile a model for the host CPU (LLVM) or an NVIDIA GPU (CUDA) with TVM.

``compile(model, example_inputs, target, config, tune)``:

1. ``tbn_compiler.passes.rewrite`` turns eligible layers into ``tbn::tiled_*`` ops;
2. :func:`.relax_import.import_graph` imports the graph into Relax (our TIR kernels for
   the tile ops, TVM's frontend for the rest);
3. :func:`schedule_kernels` applies :func:`.schedules.schedule_for` to our kernels (they
   are then marked scheduled and opaque, so fusion and DLight leave them alone);
4. TVM's default Relax pipeline for the target (for CUDA it schedules every other
   kernel with DLight), optionally with a MetaSchedule database (:class:`.tuning.Tuning`);
5. ``tvm.compile`` and a :class:`.artifact.CompiledModule` around the executable.

Shapes are static: the compiled module accepts inputs of the example inputs' shapes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import tvm
from tvm import relax, tirx

from ..capture import as_input_tuple, output_tree
from ..inspect import inspect
from ..targets import TargetSpec, resolve_target
from . import schedules
from .artifact import CompiledModule
from .relax_import import KERNEL_ATTR, ImportResult, import_graph
from .tuning import Tuning

__all__ = [
    "compile",
    "compile_graph",
    "make_tvm_target",
    "native_spec",
    "schedule_kernels",
    "mark_opaque",
    "build_executable",
    "example_tensors",
]

_OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps never fuses into it


def native_spec(spec: TargetSpec) -> TargetSpec:
    """``spec`` with the host CPU filled in for the plain ``"llvm"`` target (``mcpu``).

    Other specs (``"llvm-generic"``, CUDA, user-given TVM targets) are returned as is."""
    if spec.name != "llvm" or spec.tvm_object is not None or "mcpu" in spec.tvm_target:
        return spec
    cpu = str(tvm.target.codegen.llvm_get_system_cpu())
    target = {**spec.tvm_target, "mcpu": cpu}
    return dataclasses.replace(spec, tvm_target=target, description=f"host CPU (LLVM, {cpu})")


def make_tvm_target(spec: TargetSpec) -> tvm.target.Target:
    """The ``tvm.target.Target`` for a spec (a user-given TVM object is returned unchanged)."""
    if spec.tvm_object is not None:
        return spec.tvm_object
    if spec.tvm_host is not None:
        return tvm.target.Target(dict(spec.tvm_target), host=dict(spec.tvm_host))
    return tvm.target.Target(dict(spec.tvm_target))


def _is_kernel(func: Any) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def mark_opaque(mod: tvm.IRModule) -> tvm.IRModule:
    """A copy of ``mod`` whose tbn kernels are opaque to FuseOps (never fused with others)."""
    mod = mod.clone()
    for gv, func in list(mod.functions.items()):
        if _is_kernel(func):
            mod[gv] = func.with_attr("op_pattern", _OP_PATTERN_OPAQUE)
    return mod


def schedule_kernels(
    mod: tvm.IRModule, target: tvm.target.Target, skip_scheduled: bool = False
) -> tvm.IRModule:
    """A copy of ``mod`` whose tbn kernels are scheduled for ``target``, marked
    ``tirx.is_scheduled`` and opaque. ``skip_scheduled`` leaves already scheduled kernels
    (e.g. from a tuning database) alone. A kernel whose schedule fails is left to the
    default schedules (LLVM: unscheduled; CUDA: DLight), with a warning."""
    mod = mark_opaque(mod)
    for gv, func in list(mod.functions.items()):
        if not _is_kernel(func) or (skip_scheduled and _is_scheduled(func)):
            continue
        try:
            func = schedules.schedule_for(func, target).with_attr("tirx.is_scheduled", True)
        except Exception as exc:  # keep the build going; the kernel is still exact
            warnings.warn(
                f"tbn kernel {gv.name_hint} ({func.attrs[KERNEL_ATTR]}): schedule failed for "
                f"{target.kind.name} ({type(exc).__name__}: {exc}); using the default schedule",
                RuntimeWarning,
                stacklevel=2,
            )
        mod[gv] = func
    return mod


def build_executable(
    mod: tvm.IRModule, target: tvm.target.Target, tune: Tuning | None = None
) -> relax.Executable:
    """Schedule our kernels (or tune everything), run the target's default Relax pipeline
    and ``tvm.compile``."""
    if tune is not None:
        from .tuning import compile_tuned

        return compile_tuned(mark_opaque(mod), target, tune)
    mod = schedule_kernels(mod, target)
    if target.kind.name == "llvm":
        return tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    return tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))


@tvm.transform.module_pass(opt_level=0, name="ParallelizeUnscheduled")
def parallelize_unscheduled(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Give every PrimFunc not marked ``tirx.is_scheduled`` the generic parallel CPU
    schedule (:func:`.schedules.parallelize_generic`)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            mod[gv] = schedules.parallelize_generic(func)
    return mod


def cpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with :func:`parallelize_unscheduled` after legalization and
    fusion: TVM's own CPU pipeline leaves every legalized kernel serial."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="TBNCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        passes = (
            cpu.library_dispatch_passes(target)
            + cpu.legalize_passes(target)
            + [parallelize_unscheduled]
            + cpu.dataflow_lower_passes(target)
            + cpu.finalize_passes(target)
        )
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def example_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (compiled modules take tensors only)."""
    inputs = as_input_tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example input {i} must be a torch.Tensor, got {type(t).__name__}")
    return inputs


def compile_graph(
    gm: torch.nn.Module,
    example_inputs: Any,
    target: Any = "llvm",
    tune: Tuning | None = None,
    report: Any = None,
) -> CompiledModule:
    """Compile an already rewritten graph (tile ops in place) for ``target``:
    "llvm", "cuda[:sm_XX]", a ``tvm.target.Target``, or a Cortex-M board/CPU preset
    (which gives a :class:`~.cortex_m.CortexMModule` instead)."""
    inputs = example_tensors(example_inputs)
    spec = native_spec(resolve_target(target))
    if spec.kind == "cortex-m":
        if tune is not None:
            raise ValueError(f"tuning is not available for Cortex-M targets ({spec.name!r})")
        from .cortex_m import compile_graph_cortex_m

        return compile_graph_cortex_m(gm, inputs, spec, report=report)
    if spec.kind not in ("llvm", "cuda"):
        raise ValueError(
            f"target {spec.name!r} (kind {spec.kind!r}) is not built by this backend; "
            "use 'llvm', 'cuda' or a Cortex-M preset"
        )
    tree = output_tree(gm, inputs)
    imported: ImportResult = import_graph(gm, inputs)
    tvm_target = make_tvm_target(spec)
    executable = build_executable(imported.mod, tvm_target, tune)
    return CompiledModule(
        executable.mod,
        spec,
        imported.inputs,
        imported.outputs,
        report=report,
        output_tree=tree,
    )


def compile(  # noqa: A001 - the public name is part of the API
    model: torch.nn.Module,
    example_inputs: Any,
    target: Any = "llvm",
    config: Any = None,
    tune: Tuning | None = None,
) -> CompiledModule:
    """Rewrite ``model`` with ``config`` (default ``TBNConfig()``), then compile it.

    ``target``: "llvm" (host CPU), "cuda", "cuda:sm_80", ... or a ``tvm.target.Target``.
    ``tune``: a :class:`Tuning` to run MetaSchedule (database reused and updated).
    The result runs on inputs of the same shapes, dtypes and device kind as the examples.
    """
    from ..config import TBNConfig
    from ..passes import rewrite

    inputs = example_tensors(example_inputs)
    gm = rewrite(model, inputs, config or TBNConfig())
    return compile_graph(gm, inputs, target, tune, report=inspect(gm))
