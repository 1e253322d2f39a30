"""Compile a model for the host CPU (LLVM) or an NVIDIA GPU (CUDA) with TVM.

``compile(model, example_inputs, target, config, tune, validate, dynamic_batch)``:

1. ``tbn_compiler.passes.rewrite`` turns eligible layers into ``tbn::tiled_*`` ops;
2. :func:`.relax_import.import_graph` imports the graph into Relax (our TIR kernels for
   the tile ops, TVM's frontend for the rest);
3. :func:`build_executable` builds it with the target's Relax pipeline
   (:mod:`.pipelines`: our kernels scheduled by the rules of :mod:`.schedule_rules`,
   TVM's operators legalized, fused and scheduled by TVM's or our generic schedules),
   optionally with a MetaSchedule database (:class:`.tuning.Tuning`);
4. ``tvm.compile`` and a :class:`.artifact.CompiledModule` around the executable;
5. :func:`.validate.validate_build` runs it and the rewritten graph on the example
   inputs and a fresh random input and compares them (``validate=False`` skips it).

Host (LLVM) and CUDA modules take any batch size by default (``dynamic_batch=True``):
dim 0 of the batched inputs stays symbolic through the import, the kernels and their
schedules, and the module's input specs name it ``batch``. Where the model fixes its
batch size the module is static and says why (``static_batch``; a warning where
``dynamic_batch=True`` was asked for). ``dynamic_batch=False`` gives a static build:
inputs of the example inputs' shapes. Cortex-M programs are static (one arena planned
for the example's shapes); asking them for a dynamic batch is a ValueError.

CUDA kernels are compiled at build time, on any machine with ``nvcc`` (no GPU needed):
with TVM's CUDA runtime loaded (:mod:`.cuda_runtime`) TVM's codegen hands the CUDA
source to the global ``tvm_callback_cuda_compile``, which this module replaces by
:func:`compile_cuda_source` (``nvcc -fatbin`` for the architecture of the target being
built; TVM's own callback needs a target scope that ``tvm.compile`` does not open).
Without ``nvcc`` or that runtime the kernels stay CUDA source, with a warning.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import tvm
import tvm_ffi
from tvm import relax

from ..capture import example_tensors, output_tree
from ..config import TBNConfig
from ..inspect import inspect
from ..passes import rewrite
from ..targets import DEFAULT_CUDA_ARCH, TargetSpec, local_cuda_arch, resolve_target
from . import cuda_runtime, pipelines
from .artifact import CompiledModule, host_cpu_features
from .int8_kernels import check_precision, mark_precision
from .protocol import Backend, CompiledProgram, backend_for
from .relax_import import ImportResult, import_graph
from .schedule_rules import host_target
from .tuning import Tuning, compile_tuned
from .validate import Build, validate_build

__all__ = [
    "compile",
    "compile_graph",
    "compile_tvm_graph",
    "make_tvm_target",
    "native_spec",
    "build_executable",
    "compile_cuda_source",
    "prepare_cuda_codegen",
]


def native_spec(spec: TargetSpec) -> TargetSpec:
    """``spec`` with the host CPU filled in for the plain ``"llvm"`` target (``mcpu``).

    Other specs (``"llvm-generic"``, CUDA, user-given TVM targets) are returned as is."""
    if spec.name != "llvm" or spec.tvm_object is not None or "mcpu" in spec.tvm_target:
        return spec
    cpu = str(host_target().attrs["mcpu"])
    target = {**spec.tvm_target, "mcpu": cpu}
    return dataclasses.replace(spec, tvm_target=target, description=f"host CPU (LLVM, {cpu})")


def make_tvm_target(spec: TargetSpec) -> tvm.target.Target:
    """The ``tvm.target.Target`` for a spec (a user-given TVM object is returned unchanged)."""
    if spec.tvm_object is not None:
        return spec.tvm_object
    if spec.tvm_host is not None:
        return tvm.target.Target(dict(spec.tvm_target), host=dict(spec.tvm_host))
    return tvm.target.Target(dict(spec.tvm_target))


def build_executable(
    mod: tvm.IRModule, target: tvm.target.Target, tune: Tuning | None = None
) -> relax.Executable:
    """``tvm.compile`` with the target's pipeline (:func:`.pipelines.default`), or tune
    first and build with the database (:func:`.tuning.compile_tuned`)."""
    if tune is not None:
        return compile_tuned(mod, target, tune)
    return tvm.compile(mod, target, relax_pipeline=pipelines.default(target))


# --------------------------------------------------------------------------- CUDA kernels

_CALLBACK = "tvm_callback_cuda_compile"
_CALLBACK_LOCK = threading.Lock()
_callback_registered = False


def prepare_cuda_codegen() -> str:
    """Set this process up to compile CUDA kernels at build time. Returns ``"fatbin"``
    when TVM's CUDA runtime is loaded and :func:`compile_cuda_source` is TVM's compile
    callback, else ``"source"`` (kernels stay CUDA source) with a RuntimeWarning saying
    why. Build inside :func:`.cuda_runtime.compile_arch` to choose the architecture."""
    if not cuda_runtime.is_loaded():
        reason = None
        if shutil.which("nvcc") is None:
            reason = "nvcc is not on PATH"
        else:
            try:
                cuda_runtime.load()
            except cuda_runtime.CudaRuntimeError as exc:
                reason = str(exc)
        if reason is not None:
            warnings.warn(
                f"CUDA kernels are kept as source, not compiled ({reason}); such a module "
                "needs a CUDA compiler wherever it is loaded",
                RuntimeWarning,
                stacklevel=3,
            )
            return "source"
    _register_cuda_callback()
    return "fatbin"


def _register_cuda_callback() -> None:
    global _callback_registered
    with _CALLBACK_LOCK:
        if not _callback_registered:
            tvm_ffi.register_global_func(_CALLBACK, compile_cuda_source, override=True)
            _callback_registered = True


def compile_cuda_source(code: str) -> bytes:
    """TVM's ``tvm_callback_cuda_compile``: ``nvcc -fatbin`` for the architecture set by
    :func:`.cuda_runtime.compile_arch`, else that of the current CUDA target scope, else
    the local GPU's or the default (``sm_90``), with a RuntimeWarning."""
    from tvm.support import nvcc

    arch = cuda_runtime.current_compile_arch() or _scoped_cuda_arch()
    if arch is None:
        arch = local_cuda_arch() or DEFAULT_CUDA_ARCH
        warnings.warn(
            f"CUDA kernels built outside tbn_compiler.compile and outside a CUDA target "
            f"scope are compiled for {arch}",
            RuntimeWarning,
            stacklevel=2,
        )
    if shutil.which("nvcc") is None:
        raise RuntimeError(
            "cannot compile CUDA kernels: nvcc is not on PATH (TVM's CUDA runtime is "
            "loaded in this process, so TVM compiles kernels when it builds them)"
        )
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc"))


def _scoped_cuda_arch() -> str | None:
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "cuda":
        return None
    arch = target.attrs.get("arch")
    return str(arch) if arch else None


def _target_arch(spec: TargetSpec, target: tvm.target.Target) -> str | None:
    """The CUDA architecture to compile kernels for (None: not a CUDA target)."""
    if target.kind.name != "cuda":
        return None
    if spec.arch:
        return str(spec.arch)
    arch = target.attrs.get("arch")
    return str(arch) if arch else None


# --------------------------------------------------------------------------- compile


def compile_graph(
    gm: torch.nn.Module,
    example_inputs: Any,
    target: Any = "llvm",
    tune: Tuning | None = None,
    report: Any = None,
    validate: bool = True,
    dynamic_batch: bool | None = None,
    precision: str = "float32",
) -> CompiledProgram:
    """Compile an already rewritten graph (tile ops in place) for ``target``: "llvm",
    "cuda[:sm_XX]", a ``tvm.target.Target``, or a Cortex-M board/CPU preset. Dispatches
    to the :class:`~.protocol.Backend` of the target's kind.

    ``validate``: check the compiled module against ``gm`` before returning it
    (:func:`.validate.validate_build`; raises :class:`.validate.ValidationError` naming
    the first diverging node); the result is the module's ``validation``.
    ``dynamic_batch``, ``precision``: see :func:`compile` (None: the target kind's
    default)."""
    inputs = example_tensors(example_inputs)
    spec = resolve_target(target)
    check_precision(precision, spec.kind)
    backend = backend_for(spec.kind)
    tuned = tune is not None and tune.trials > 0
    if tune is not None and precision != "float32":
        raise ValueError(
            f"precision={precision!r} cannot be combined with tune (MetaSchedule schedules "
            "the float32 kernels); compile with precision='float32' to tune"
        )
    options = _batch_options(
        backend, spec, False if dynamic_batch is None and tuned else dynamic_batch
    )
    if precision != "float32":
        options["precision"] = precision
    program = backend.compile_graph(gm, inputs, spec, tune, report, **options)
    if dynamic_batch is None and tuned and backend.dynamic_batch:
        program.static_batch = _TUNED_STATIC
    if dynamic_batch and getattr(program, "static_batch", None):
        warnings.warn(
            f"dynamic_batch=True: the batch stays static: {program.static_batch}",
            RuntimeWarning,
            stacklevel=3,
        )
    if validate:
        probe = _probe_builder(backend, inputs, spec, options)
        validate_build(gm, inputs, program, spec, probe)
    return program


_TUNED_STATIC = (
    "a tuned build is static (MetaSchedule tunes static shapes); compile untuned, or "
    "tune at the batch size it will run"
)


def _batch_options(backend: Backend, spec: TargetSpec, requested: bool | None) -> dict:
    """The ``dynamic_batch`` keyword for the backend's compile: as ``requested``, else the
    backend's default; ValueError when it is requested of a kind whose batch is static."""
    if requested and not backend.dynamic_batch:
        raise ValueError(
            f"dynamic_batch=True is not available for {spec.name!r} ({backend.description}):"
            " its programs have a static batch, the example inputs' (their memory is "
            "planned at compile time); compile with the batch size they will run, and "
            "dynamic_batch=False (the default for this target)"
        )
    if not backend.dynamic_batch:
        return {}
    return {"dynamic_batch": True if requested is None else bool(requested)}


def _probe_builder(
    backend: Backend, inputs: tuple, spec: TargetSpec, options: dict
) -> Build | None:
    """How validation builds its probe graphs: untuned, for the same target and batch
    kind; none for Cortex-M, where a probe is a firmware build and a QEMU run (see
    :mod:`.validate`)."""
    if spec.kind == "cortex-m":
        return None
    return lambda graph: backend.compile_graph(graph, inputs, spec, None, None, **options)


def compile_tvm_graph(
    gm: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    spec: TargetSpec,
    tune: Tuning | None,
    report: Any,
    dynamic_batch: bool = False,
    precision: str = "float32",
) -> CompiledModule:
    """The host (LLVM) and CUDA backends' compile: import to Relax (the batch symbolic
    with ``dynamic_batch`` where the graph allows it), build, wrap. A symbolic batch
    that TVM fails to build is built static, ``static_batch`` saying why (a failure of
    the static build is raised). ``precision``: see :func:`compile`."""
    spec = native_spec(spec)
    check_precision(precision, spec.kind)
    tree = output_tree(gm, inputs)
    imported: ImportResult = import_graph(gm, inputs, dynamic_batch)
    tvm_target = make_tvm_target(spec)
    cuda_kernels = prepare_cuda_codegen() if spec.kind == "cuda" else None
    with cuda_runtime.compile_arch(_target_arch(spec, tvm_target)):
        try:
            mod = mark_precision(imported.mod, precision)
            executable = build_executable(mod, tvm_target, tune)
        except Exception as exc:  # raised again by the static build unless the batch is why
            if imported.static_batch is not None:
                raise
            imported = import_graph(gm, inputs, dynamic_batch=False)
            imported.static_batch = f"the build of a symbolic batch failed ({_first_line(exc)})"
            mod = mark_precision(imported.mod, precision)
            executable = build_executable(mod, tvm_target, tune)
    features = host_cpu_features() if spec.tvm_target.get("mcpu") else None
    library, library_bytes = _host_library(executable.mod, spec)
    return CompiledModule(
        library,
        spec,
        imported.inputs,
        imported.outputs,
        report=report,
        output_tree=tree,
        cuda_kernels=cuda_kernels,
        cpu_features=features if spec.kind == "llvm" else None,
        index_checks=imported.index_checks,
        library_bytes=library_bytes,
        static_batch=imported.static_batch,
        precision=precision,
    )


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return next((line for line in text.splitlines() if line.strip()), type(error).__name__)


def _host_library(
    library: tvm.runtime.Module, spec: TargetSpec
) -> tuple[tvm.runtime.Module, bytes | None]:
    """For a host (LLVM) module that runs here: the library exported as a shared object
    and loaded back, with its bytes (what ``save`` writes); else ``library`` as built.

    Exporting costs what the first call would (LLVM compiles the kernels to machine code
    either way), saves then write the bytes at once, and the saved executable is the one
    no VM has run: TVM's VM, when it starts, records a memory scope for every constant of
    its executable (``memory_scopes[i]`` in ``vm.cc``), which a later save would write
    and a load read back with one "Scope Saving:" / "Scope Loaded:" warning per constant
    on stderr."""
    if spec.kind != "llvm" or backend_for(spec.kind).runnable_here(spec) is not None:
        return library, None
    with tempfile.TemporaryDirectory(prefix="tbn_build_") as tmp:
        path = Path(tmp) / "library.so"
        library.export_library(str(path))
        return tvm.runtime.load_module(str(path)), path.read_bytes()


def compile(  # shadows the builtin on purpose: the public name is part of the API
    model: torch.nn.Module,
    example_inputs: Any,
    target: Any = "llvm",
    config: Any = None,
    tune: Tuning | None = None,
    validate: bool = True,
    dynamic_batch: bool | None = None,
    precision: str = "float32",
) -> CompiledProgram:
    """Rewrite ``model`` with ``config`` (default ``TBNConfig()``), then compile it.

    ``target``: "llvm" (host CPU), "cuda", "cuda:sm_80", ... or a ``tvm.target.Target``.
    ``tune``: a :class:`Tuning` to run MetaSchedule (database reused and updated).
    ``validate``: run the compiled module and the rewritten graph on the example inputs
    and a fresh random input and compare them where the target runs here
    (:mod:`.validate`); a mismatch raises :class:`.validate.ValidationError` naming the
    first diverging node. ``False`` returns the module unchecked.
    ``dynamic_batch``: the module takes any batch size (llvm and cuda: True by default,
    but for a build that tunes; the input specs name dim 0 of the batched inputs
    ``batch``), or only the example's (``False``; Cortex-M targets, where True is a
    ValueError). A model that fixes its
    batch size compiles static, ``static_batch`` saying why (a RuntimeWarning if True
    was asked for).
    ``precision``: ``"float32"`` (exact up to float32 rounding), or ``"int8"`` (host
    CPU targets only; opt-in, approximate): aligned tiled linears quantize each input
    row to int8 on the fly (symmetric absmax scale, round to nearest) and compute the
    binary product exactly in integers (AVX-512 VNNI where the CPU has it); everything
    else stays float32 (see :mod:`.int8_kernels` and docs/performance.md for the
    measured error). Validation then accepts :data:`.validate.INT8_TOLERANCE`. Any
    other value, or ``"int8"`` for another target kind, is a ValueError.
    The result runs on inputs of the examples' dtypes and device kind, and shapes (but
    for the batch where it is dynamic).
    """
    inputs = example_tensors(example_inputs)
    check_precision(precision, resolve_target(target).kind)
    gm = rewrite(model, inputs, config or TBNConfig())
    return compile_graph(
        gm,
        inputs,
        target,
        tune,
        report=inspect(gm),
        validate=validate,
        dynamic_batch=dynamic_batch,
        precision=precision,
    )
