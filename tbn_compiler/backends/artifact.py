"""The compiled module: call it with torch tensors, save it to one file, load it back.

Artifact format (one zip file written by :func:`.archive.write_archive`: every member,
``metadata.json`` included, is covered by ``checksums.json``), format version
:data:`FORMAT_VERSION`:

* ``metadata.json``: ``format`` (= :data:`FORMAT_NAME`), ``format_version``, ``versions``
  (tbn_compiler, tvm, torch, python), ``target`` (a :class:`TargetSpec` dict, with the
  exact TVM target used), ``inputs`` / ``outputs`` (name, shape: the example's, dtype;
  ``dims`` where the batch is symbolic: per dim an int or a name, e.g. ``["batch",
  64]``; an archive without it is static, as are those of older versions),
  ``static_batch`` (why a host or CUDA module takes one batch size, when known), ``output_tree``
  (the model's output structure, :class:`~tbn_compiler.capture.OutputTree` JSON, or
  null), ``report`` (text or null); for CUDA targets ``cuda_kernels`` (``"fatbin"``:
  compiled for the target's architecture; ``"source"``: CUDA source, compiled where
  loaded); for host-CPU code (``mcpu`` set) ``cpu_features`` (the compiling CPU's
  feature flags, checked where TVM's compiler cannot name the CPU); ``index_checks``
  (gather ids given as inputs: input name, valid range, the kernel's message; checked
  before each call on CUDA, whose kernels cannot raise); ``precision`` where it is not
  ``"float32"`` (``"int8"``: see ``compile``).
* ``library.so``: the TVM library from ``export_library`` (Relax VM bytecode + kernels;
  for CUDA a fatbin, or source when nvcc was missing at compile time).
* ``kernels.cu`` (CUDA targets only): the generated CUDA source, readable without a GPU.

Loading and calling need TVM's runtime only (``TVM_USE_RUNTIME_LIB=1`` works: nothing
here imports ``tvm.relax`` or TVM's compiler); for CUDA modules TVM's CUDA runtime
(:mod:`.cuda_runtime`) is loaded explicitly.

Cortex-M modules use the same container with their own members (see
:mod:`.cortex_m.module`); :func:`load` gives back the right kind of module.

:func:`load` refuses a file that is not such an archive, is truncated, misses a member,
has another format or version, fails a checksum, or targets something that cannot run
on this machine (no GPU, another GPU architecture, another CPU); each with an
:class:`ArtifactError` saying which.

Host threads (:func:`configure_host_threads`, when this module is imported, before TVM's
thread pool starts): unless set already, ``TVM_NUM_THREADS`` becomes the number of
physical cores this process may use (TVM's own default halves the logical CPUs on x86,
which runs single-threaded on a 2-core machine without SMT) and
``TVM_THREAD_POOL_SPIN_COUNT`` becomes :data:`POOL_SPIN_COUNT` (TVM's default keeps a
worker yielding for 300,000 rounds after each parallel region, milliseconds in which
torch's OpenMP workers, in a pipeline mixing torch ops with our calls, lose a core).
``TBN_THREADS=N`` asks for N threads; ``TBN_THREADS=off`` leaves TVM's settings alone.
See ``docs/performance.md``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
import tvm_ffi
from tvm.runtime.vm import VirtualMachine

from ..capture import BATCH, OutputTree
from ..targets import TargetSpec, host_arch, local_cuda_arch, norm_arch
from . import cuda_runtime
from .archive import (
    ArtifactError,
    ArtifactWriteError,
    package_versions,
    read_archive,
    write_archive,
)
from .protocol import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Backend,
    InputError,
    backend_for,
    register_backend,
)
from .specs import TensorSpec, check_index_inputs, shape_mismatch

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ArtifactError",
    "ArtifactWriteError",
    "InputError",
    "CompiledModule",
    "cuda_runnable_here",
    "host_cpu_features",
    "host_runnable_here",
    "load",
    "load_tvm_archive",
]

_META = "metadata.json"
_LIB = "library.so"
_CU = "kernels.cu"


# --------------------------------------------------------------------------- threads

THREADS_ENV = "TBN_THREADS"
"""Environment variable: the number of TVM threads, or ``off`` to leave TVM's own
settings (``TVM_NUM_THREADS``, ``TVM_THREAD_POOL_SPIN_COUNT``) alone."""

POOL_SPIN_COUNT = 10_000
"""Rounds a TVM worker yields for new work after a parallel region before it sleeps
(TVM's default: 300,000). Long enough to bridge the gaps between the kernels of one
call; short enough that the worker is asleep soon after the call returns, when torch
ops of the same program need its core (``benchmarks/bench_mixed.py``)."""


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (all of them where the
    ratio of logical to physical CPUs is unknown)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    try:
        import psutil
    except ImportError:
        return max(1, usable)
    logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
    if not logical or not physical:
        return max(1, usable)
    return max(1, usable * physical // logical)


def configure_host_threads(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the TVM thread pool's environment (``os.environ`` by default) unless the user
    did: ``TVM_NUM_THREADS`` (``$TBN_THREADS``, else :func:`physical_cores`) and
    ``TVM_THREAD_POOL_SPIN_COUNT`` (:data:`POOL_SPIN_COUNT`). TVM reads both when its
    pool starts (at the first parallel kernel of the process). Returns what it set;
    ``TBN_THREADS=off`` sets nothing. ValueError for another ``TBN_THREADS`` that is not
    a positive integer."""
    env = os.environ if environ is None else environ
    setting = env.get(THREADS_ENV, "").strip()
    if setting.lower() == "off":
        return {}
    if setting and not (setting.isdigit() and int(setting) > 0):
        raise ValueError(f"{THREADS_ENV}={setting!r}: expected a positive integer or 'off'")
    wanted = {
        "TVM_NUM_THREADS": setting or str(physical_cores()),
        "TVM_THREAD_POOL_SPIN_COUNT": str(POOL_SPIN_COUNT),
    }
    done = {k: v for k, v in wanted.items() if k not in env}
    env.update(done)
    return done


configure_host_threads()


# --------------------------------------------------------------------------- module


class CompiledModule:
    """A model compiled by TVM for one target: for any batch size where its input specs
    name the batch dim (``dims``, see :class:`.specs.TensorSpec`), else at the example's
    shapes (``static_batch`` says why, when known).

    ``cm(*inputs)`` takes torch tensors on the target's device and returns what the
    model returns (a tensor, or tensors in the same tuples/dicts/named tuples, given by
    ``output_tree``), sharing memory with TVM's results (DLPack, no copy). It may be
    called from several threads at once: each thread runs its own Relax VM (cheaper than
    a lock: 8 threads x 200 calls of a small MLP took 0.09 s with a VM per thread and
    0.14 s with one VM behind a lock).
    Attributes: ``target`` (:class:`TargetSpec`), ``input_specs`` / ``output_specs``
    (:class:`TensorSpec` lists, flat), ``report`` (``tbn_compiler.inspect`` of the
    rewritten graph, or its text after :func:`load`), ``cuda_kernels`` (CUDA targets:
    ``"fatbin"`` or ``"source"``, else None), ``cpu_features`` (host-CPU code: the
    compiling CPU's feature flags, else None) and ``index_checks`` (see
    :func:`.specs.check_index_inputs`: on CUDA a bad gather id given as input raises
    the ``IndexError`` a host kernel raises), ``precision`` (``"float32"``, or
    ``"int8"`` for a module compiled with int8 activations in its tiled linears).
    """

    def __init__(
        self,
        library: tvm.runtime.Module | None,
        target: TargetSpec,
        input_specs: Sequence[TensorSpec],
        output_specs: Sequence[TensorSpec],
        report: Any = None,
        library_bytes: bytes | None = None,
        cuda_source: str | None = None,
        output_tree: OutputTree | None = None,
        cuda_kernels: str | None = None,
        cpu_features: Sequence[str] | None = None,
        index_checks: Sequence[dict[str, Any]] = (),
        static_batch: str | None = None,
        precision: str = "float32",
    ) -> None:
        self._library = library
        self._library_bytes = library_bytes
        self._cuda_source = cuda_source
        self.target = target
        self.input_specs = list(input_specs)
        self.output_specs = list(output_specs)
        self.report = report
        self.output_tree = output_tree
        self.cuda_kernels = cuda_kernels
        self.cpu_features = None if cpu_features is None else sorted(cpu_features)
        self.index_checks = [dict(c) for c in index_checks]
        self.static_batch = None if self.dynamic_batch else static_batch
        self.precision = precision
        if output_tree is not None and output_tree.num_leaves != len(self.output_specs):
            raise ValueError(
                f"output tree has {output_tree.num_leaves} tensors, the library returns "
                f"{len(self.output_specs)}"
            )
        self._per_thread = threading.local()  # one Relax VM per calling thread
        self._direct = _direct_inputs(self.target.kind, self.input_specs)
        self._single_output = output_tree is None or output_tree == _SINGLE_TENSOR

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{s.signature}" for s in self.input_specs)
        return f"CompiledModule(target={self.target.name!r}, inputs=({ins}))"

    @property
    def dynamic_batch(self) -> bool:
        """True when the module takes any batch size (an input dim is symbolic)."""
        return any(s.dynamic for s in self.input_specs)

    # ------------------------------------------------------------------ running

    @property
    def device(self) -> torch.device:
        """The torch device inputs must be on."""
        return backend_for(self.target.kind).device(self.target)

    def _function(self) -> Any:
        """The VM's ``main`` for the calling thread (a VM is not safe to share)."""
        main = getattr(self._per_thread, "main", None)
        if main is None:
            self._check_runnable()
            dev = tvm.cuda(0) if self.target.kind == "cuda" else tvm.cpu(0)
            vm = VirtualMachine(self._library, dev)
            self._per_thread.vm, self._per_thread.main = vm, vm["main"]
            main = self._per_thread.main
        return main

    def _check_runnable(self) -> None:
        reason = backend_for(self.target.kind).runnable_here(self.target)
        if reason is not None:
            raise RuntimeError(
                f"this module was compiled for {self.target.name} and cannot run here: "
                f"{reason}; it can still be saved, and inspected (cuda_source() for CUDA)"
            )
        if self._library is None:
            raise RuntimeError(
                f"the library of this {self.target.name} module was not loaded "
                "(load(..., check_target=False) on a machine that cannot run it)"
            )

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """Raise :class:`InputError` naming the first input that does not match (count,
        shape: static dims and one size per named dim, dtype, device)."""
        specs = self.input_specs
        if len(inputs) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InputError(f"expected {len(specs)} inputs ({names}), got {len(inputs)}")
        bound: dict[str, tuple[int, str]] = {}
        for spec, value in zip(specs, inputs, strict=True):
            _check_input(spec, value, self.device, bound, self._static_note())

    def _static_note(self) -> str:
        """What a shape error of a module without a symbolic batch adds."""
        if self.dynamic_batch:
            return ""
        if self.static_batch:
            return f" (the batch is static: {self.static_batch})"
        return " (shapes are static; compile again for other shapes)"

    def __call__(self, *inputs: torch.Tensor) -> Any:
        main = self._function()
        result = main(*self._arguments(inputs))
        if self._single_output and isinstance(result, torch.Tensor):
            return result
        result = _to_torch(result)
        if self.output_tree is None:
            return result
        flat = result if isinstance(result, tuple) else (result,)
        # constants (None, ...) in the output come back from the VM too; the tree has them
        return self.output_tree.unflatten([v for v in flat if isinstance(v, torch.Tensor)])

    def _arguments(self, inputs: Sequence[Any]) -> Sequence[Any]:
        """What ``main`` is called with. Host modules take the torch tensors themselves
        (TVM's FFI converts them with DLPack, and hands back torch tensors); inputs that
        match the specs and are already compact and 64-byte aligned (what TVM's kernels
        assume) pass through with these few checks. Anything else takes the full checks
        (:meth:`check_inputs`) and is made detached, compact and aligned (a copy only if
        needed); CUDA modules also check gather ids, then convert to TVM tensors."""
        if self._direct is not None and _ready_as_is(self._direct, inputs):
            return inputs
        self.check_inputs(inputs)
        if self.target.kind == "cuda":
            if self.index_checks:  # host kernels raise themselves
                named = {s.name: t for s, t in zip(self.input_specs, inputs, strict=True)}
                check_index_inputs(self.index_checks, named)
            return [tvm.runtime.from_dlpack(_dlpack_ready(t)) for t in inputs]
        return [_dlpack_ready(t) for t in inputs]

    # ------------------------------------------------------------------ inspection

    def cuda_source(self) -> str:
        """The generated CUDA source of all kernels (CUDA targets only)."""
        if self.target.kind != "cuda":
            raise ValueError(f"cuda_source(): this module targets {self.target.name}, not CUDA")
        if self._cuda_source is None:
            self._cuda_source = self._find_cuda_source()
        return self._cuda_source

    def _find_cuda_source(self) -> str:
        if self._library is None:
            raise RuntimeError("no CUDA source: the library is not loaded")
        sources = [
            m.inspect_source("cuda") for m in _walk_imports(self._library) if m.kind == "cuda"
        ]
        if not sources:
            raise RuntimeError("no CUDA module found in the compiled library")
        return "\n".join(str(s) for s in sources)

    @property
    def library(self) -> tvm.runtime.Module | None:
        """The TVM runtime module (Relax VM executable and kernels)."""
        return self._library

    # ------------------------------------------------------------------ save

    def save(self, path: str | os.PathLike) -> Path:
        """Write the module to ONE file (see the module docstring), atomically; raises
        :class:`ArtifactWriteError` naming ``path`` when it cannot be written. Returns
        the path."""
        members = {_LIB: self._library_bytes or self._export()}
        if self.target.kind == "cuda":
            members[_CU] = self.cuda_source().encode()
        return write_archive(path, self._metadata(), members)

    def _export(self) -> bytes:
        if self._library is None:
            raise RuntimeError("cannot save: the library is not loaded")
        with tempfile.TemporaryDirectory(prefix="tbn_export_") as tmp:
            lib = Path(tmp) / _LIB
            self._library.export_library(str(lib))
            return lib.read_bytes()

    def _metadata(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.target.kind == "cuda":
            extra["cuda_kernels"] = self.cuda_kernels or "source"
        if self.cpu_features is not None:
            extra["cpu_features"] = self.cpu_features
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": package_versions(tvm=str(tvm.__version__)),
            "target": self.target.to_dict(),
            "inputs": [s.to_dict() for s in self.input_specs],
            "outputs": [s.to_dict() for s in self.output_specs],
            "output_tree": None if self.output_tree is None else self.output_tree.to_json(),
            "report": None if self.report is None else str(self.report),
            "index_checks": self.index_checks,
            **({"static_batch": self.static_batch} if self.static_batch else {}),
            **({"precision": self.precision} if self.precision != "float32" else {}),
            **extra,
        }


# --------------------------------------------------------------------------- helpers


def _check_input(
    spec: TensorSpec,
    value: Any,
    device: torch.device,
    bound: dict[str, tuple[int, str]],
    static_note: str,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"input {spec.name!r}: expected a torch.Tensor, got {type(value).__name__}"
        )
    problem = shape_mismatch(spec, value.shape, bound)
    if problem is not None:
        raise InputError(problem + static_note)
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {dtype}")
    if value.device.type != device.type:
        raise InputError(
            f"input {spec.name!r}: expected a tensor on {device.type}, got one on {value.device}"
        )


_ALIGNMENT = 64  # bytes; TVM's kernels assume it (tvm.runtime.from_dlpack requires it)
_SINGLE_TENSOR = OutputTree({"t": "tensor"})


def _direct_inputs(kind: str, specs: Sequence[TensorSpec]) -> tuple | None:
    """Per input ``(shape, dims after the batch, torch dtype)`` for the pass-through test
    of :meth:`CompiledModule._arguments`: ``shape`` for a static input (then None
    after it), None for one whose dim 0 alone is named. None where inputs are always
    converted (CUDA, a dtype torch does not name, other named dims)."""
    if kind != "llvm":
        return None
    dtypes = [getattr(torch, s.dtype, None) for s in specs]
    if not all(isinstance(d, torch.dtype) for d in dtypes):
        return None
    expected = []
    for s, dtype in zip(specs, dtypes, strict=True):
        if not s.dynamic:
            expected.append((torch.Size(s.shape), None, dtype))
        elif s.dims[0] == BATCH and all(isinstance(d, int) for d in s.dims[1:]):
            expected.append((None, torch.Size(s.dims[1:]), dtype))
        else:
            return None
    return tuple(expected)


def _ready_as_is(expected: tuple, inputs: Sequence[Any]) -> bool:
    """True when ``inputs`` are plain CPU tensors of the expected shapes (one batch
    size for all batched inputs) and dtypes, compact and aligned: what the kernels can
    read in place."""
    if len(inputs) != len(expected):
        return False
    batch = None
    for (shape, rest, dtype), t in zip(expected, inputs, strict=True):
        if not (
            type(t) is torch.Tensor
            and t.dtype is dtype
            and t.is_cpu
            and t.is_contiguous()
            and t.data_ptr() % _ALIGNMENT == 0
        ):
            return False
        if shape is not None:
            if t.shape != shape:
                return False
            continue
        size = t.shape
        if len(size) != len(rest) + 1 or size[1:] != rest:
            return False
        if batch is not None and size[0] != batch:
            return False
        batch = size[0]
    return True


def _dlpack_ready(t: torch.Tensor) -> torch.Tensor:
    """Detached (DLPack refuses tensors that require grad), compact and 64-byte aligned
    (a copy only if not: a view into the middle of a tensor may be unaligned)."""
    t = t.detach()
    if t.is_contiguous() and t.data_ptr() % _ALIGNMENT == 0:
        return t
    copy = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # allocator: 64-aligned
    return copy.copy_(t)


def _to_torch(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # TVM's FFI converted it (torch inputs)
        return value
    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_dlpack(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return tuple(_to_torch(v) for v in value)
    if value is None:
        return None
    raise TypeError(f"unexpected output of type {type(value).__name__} from the compiled module")


def _walk_imports(mod: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    seen, stack, out = set(), [mod], []
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(m.imports)
    return out


# --------------------------------------------------------------------------- load


def check_format(path: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`ArtifactError` unless ``meta`` is of a compiled module this version reads."""
    if meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {version!r} is not supported (this tbn_compiler reads "
            f"version {FORMAT_VERSION}); compile the model again"
        )
    for key in ("target", "inputs", "outputs"):
        if key not in meta:
            raise ArtifactError(f"{path}: {_META} lacks {key!r}")


def _check_target(path: Path, spec: TargetSpec, cpu_features: Sequence[str] | None) -> None:
    reason = backend_for(spec.kind).runnable_here(spec)
    if reason is None and spec.kind == "llvm":
        reason = _cpu_mismatch(spec, cpu_features)
    if reason is None and spec.kind == "cuda":
        reason = _gpu_mismatch(spec)
    if reason is not None:
        raise ArtifactError(f"{path}: target {spec.name!r} cannot run here: {reason}")


def _cpu_mismatch(spec: TargetSpec, cpu_features: Sequence[str] | None) -> str | None:
    """Why code for ``spec``'s CPU cannot run here: the CPU name differs (where TVM's
    compiler can name this CPU), else a feature flag of the compiling CPU is missing."""
    mcpu = spec.tvm_target.get("mcpu")
    if not mcpu:
        return None
    here = _llvm_host_cpu()
    if here is not None:
        if mcpu == here:
            return None
        return (
            f"code was generated for CPU {mcpu!r}, this machine is {here!r} "
            "(compile with target='llvm-generic' for portable code)"
        )
    local = host_cpu_features()
    if cpu_features is None or local is None:
        return (
            f"code was generated for CPU {mcpu!r}, and neither TVM's runtime nor the "
            "artifact tell whether this CPU has its features (compile with "
            "target='llvm-generic' for portable code)"
        )
    missing = sorted(set(cpu_features) - set(local))
    if missing:
        return (
            f"code was generated for CPU {mcpu!r}, this CPU lacks its features "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (compile with "
            "target='llvm-generic' for portable code)"
        )
    return None


def _llvm_host_cpu() -> str | None:
    """LLVM's name for this CPU; None where only TVM's runtime is loaded."""
    if tvm_ffi.get_global_func("target.llvm_get_system_cpu", allow_missing=True) is None:
        return None
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_cpu_features() -> list[str] | None:
    """This CPU's feature flags as Linux reports them (``/proc/cpuinfo``), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(set(value.split()))
    return None


def _gpu_mismatch(spec: TargetSpec) -> str | None:
    """Why CUDA code for ``spec`` cannot run on this machine's GPU (another compute
    capability), or None."""
    here = local_cuda_arch()
    if spec.arch is None or here is None or spec.arch == here:
        return None
    return (
        f"its kernels were compiled for {spec.arch}, this GPU is {here} "
        f"(compile again with target='cuda:{here}')"
    )


def load(path: str | os.PathLike, *, check_target: bool = True) -> Any:
    """Load a module written by ``save``, validating it first: a :class:`CompiledModule`
    for host and CUDA targets, the module kind of the backend that wrote it otherwise
    (e.g. a Cortex-M module).

    ``check_target=False`` skips the "can this target run here" check (e.g. to read the
    CUDA source of a GPU module on a machine without a GPU); calls may then fail."""
    path = Path(path)
    meta, members = read_archive(path)
    check_format(path, meta)
    kind = meta["target"].get("kind") if isinstance(meta["target"], dict) else None
    try:
        backend = backend_for(str(kind))
    except ModuleNotFoundError as exc:  # e.g. the deploy bundle's runtime part
        raise ArtifactError(
            f"{path}: {kind} modules need the full tbn_compiler package ({exc})"
        ) from exc
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    return backend.load_archive(path, meta, members, check_target)


def load_tvm_archive(
    path: Path, meta: dict[str, Any], members: dict[str, bytes], check_target: bool
) -> CompiledModule:
    """The host or CUDA :class:`CompiledModule` held by an archive that :func:`load` has
    read and checked (format, version, checksums)."""
    try:
        spec = TargetSpec.from_dict(meta["target"])
        inputs = [TensorSpec.from_dict(d) for d in meta["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in meta["outputs"]]
        tree = meta.get("output_tree")
        output_tree = None if tree is None else OutputTree.from_json(tree)
        cpu_features = meta.get("cpu_features")
        cpu_features = None if cpu_features is None else [str(f) for f in cpu_features]
        index_checks = [dict(c) for c in meta.get("index_checks", [])]
        static_batch = meta.get("static_batch")
        precision = str(meta.get("precision", "float32"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed {_META} ({type(exc).__name__}: {exc})") from exc
    if _LIB not in members:
        raise ArtifactError(f"{path}: not a complete compiled module, missing {_LIB!r}")
    library = members[_LIB]
    source = members.get(_CU)
    cuda_source = source.decode() if source is not None else None
    cuda_kernels = meta.get("cuda_kernels", "source") if spec.kind == "cuda" else None
    rest = (spec, inputs, outputs, meta.get("report"), library, cuda_source, output_tree)
    extra = {
        "cuda_kernels": cuda_kernels,
        "cpu_features": cpu_features,
        "index_checks": index_checks,
        "static_batch": None if static_batch is None else str(static_batch),
        "precision": precision,
    }
    if check_target:
        _check_target(path, spec, cpu_features)
    elif backend_for(spec.kind).runnable_here(spec) is not None:  # metadata and source only
        return CompiledModule(None, *rest, **extra)
    if spec.kind == "cuda":
        _prepare_cuda(path, cuda_kernels)
    try:
        return CompiledModule(_load_library(path, library, spec), *rest, **extra)
    except ValueError as exc:
        raise ArtifactError(f"{path}: inconsistent {_META} ({exc})") from exc


def _prepare_cuda(path: Path, cuda_kernels: str | None) -> None:
    """Load TVM's CUDA runtime; refuse CUDA source where nothing can compile it."""
    try:
        cuda_runtime.load()
    except cuda_runtime.CudaRuntimeError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    compiler = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    if cuda_kernels != "fatbin" and compiler is None:
        raise ArtifactError(
            f"{path}: its CUDA kernels are source, not compiled (nvcc or TVM's CUDA runtime "
            "was missing where it was compiled), and TVM's runtime alone cannot compile "
            "them; compile the model again where `make setup` built TVM's CUDA runtime"
        )


def _load_library(path: Path, library: bytes, spec: TargetSpec) -> tvm.runtime.Module:
    with tempfile.TemporaryDirectory(prefix="tbn_load_") as tmp:
        lib = Path(tmp) / _LIB
        lib.write_bytes(library)
        try:
            with cuda_runtime.compile_arch(spec.arch):  # for CUDA source compiled on load
                return tvm.runtime.load_module(str(lib))
        except Exception as exc:
            raise ArtifactError(
                f"{path}: TVM could not load the library ({type(exc).__name__}: {exc})"
            ) from exc


# --------------------------------------------------------------------------- backends


def host_runnable_here(spec: TargetSpec) -> str | None:
    """None when host-CPU code for ``spec`` runs on this machine's architecture."""
    triple = str(spec.tvm_target.get("mtriple", ""))
    if triple and norm_arch(triple.split("-")[0]) != host_arch():
        return f"built for {triple!r}, this machine is {host_arch()}"
    return None


def cuda_runnable_here(spec: TargetSpec) -> str | None:
    """None when a CUDA GPU is visible here."""
    if torch.cuda.is_available() or local_cuda_arch() is not None:
        return None
    return "it needs a CUDA GPU, but no CUDA GPU is visible on this machine"


_COMPILE_TVM = "tbn_compiler.backends.build:compile_tvm_graph"
_LOAD_TVM = "tbn_compiler.backends.artifact:load_tvm_archive"
register_backend(
    Backend(
        "llvm",
        "host CPU through LLVM (Relax VM)",
        _COMPILE_TVM,
        _LOAD_TVM,
        host_runnable_here,
        dynamic_batch=True,
    )
)
register_backend(
    Backend(
        "cuda",
        "NVIDIA GPU through CUDA (Relax VM, fatbin kernels)",
        _COMPILE_TVM,
        _LOAD_TVM,
        cuda_runnable_here,
        device=lambda spec: torch.device("cuda", 0),
        dynamic_batch=True,
    )
)
