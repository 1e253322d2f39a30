"""The compiled module: call it with torch tensors, save it to one file, load it back.

Artifact format (one zip file, format version :data:`FORMAT_VERSION`):

* ``metadata.json``: ``format`` (= :data:`FORMAT_NAME`), ``format_version``, ``versions``
  (tbn_compiler, tvm, torch, python), ``target`` (a :class:`TargetSpec` dict, with the
  exact TVM target used), ``inputs`` / ``outputs`` (name, shape, dtype), ``library``
  (member name, size, sha256) and ``report`` (text or null).
* ``library.so``: the TVM library from ``export_library`` (Relax VM bytecode + kernels;
  for CUDA the kernels as CUDA source, compiled when first loaded on a GPU).
* ``kernels.cu`` (CUDA targets only): the generated CUDA source, readable without a GPU;
  its sha256 is in ``metadata.json`` under ``cuda_source``.

:func:`load` refuses a file that is not such an archive, is truncated, misses a member,
has another format or version, fails its checksum, or targets something that cannot
run on this machine; each with an :class:`ArtifactError` saying which.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
from tvm import relax

from ..targets import TargetSpec, local_cuda_arch
from .relax_import import TensorSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ArtifactError",
    "InputError",
    "CompiledModule",
    "load",
]

FORMAT_NAME = "tbn_compiler.compiled_module"
FORMAT_VERSION = 1
_META = "metadata.json"
_LIB = "library.so"
_CU = "kernels.cu"


class ArtifactError(ValueError):
    """A saved compiled module cannot be loaded (corrupt, foreign or not runnable here)."""


class InputError(TypeError, ValueError):
    """Inputs do not match what the module was compiled for (count, shape, dtype, device)."""


# --------------------------------------------------------------------------- module


class CompiledModule:
    """A model compiled by TVM for one target, at static input shapes.

    ``cm(*inputs)`` takes torch tensors on the target's device and returns a tensor (one
    output) or a tuple of tensors, sharing memory with TVM's results (DLPack, no copy).
    Attributes: ``target`` (:class:`TargetSpec`), ``input_specs`` / ``output_specs``
    (:class:`TensorSpec` lists) and ``report`` (``tbn_compiler.inspect`` of the rewritten
    graph, or its text after :func:`load`).
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
    ) -> None:
        self._library = library
        self._library_bytes = library_bytes
        self._cuda_source = cuda_source
        self.target = target
        self.input_specs = list(input_specs)
        self.output_specs = list(output_specs)
        self.report = report
        self._vm: relax.VirtualMachine | None = None
        self._main: Any = None

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.input_specs)
        return f"CompiledModule(target={self.target.name!r}, inputs=({ins}))"

    # ------------------------------------------------------------------ running

    @property
    def device(self) -> torch.device:
        """The torch device inputs must be on."""
        return torch.device("cuda", 0) if self.target.kind == "cuda" else torch.device("cpu")

    def _function(self) -> Any:
        if self._main is None:
            self._check_runnable()
            dev = tvm.cuda(0) if self.target.kind == "cuda" else tvm.cpu(0)
            self._vm = relax.VirtualMachine(self._library, dev)
            self._main = self._vm["main"]
        return self._main

    def _check_runnable(self) -> None:
        if self.target.kind == "cuda" and not (torch.cuda.is_available() or local_cuda_arch()):
            raise RuntimeError(
                f"this module was compiled for {self.target.name} and needs a CUDA GPU, but "
                "none is visible here; it can still be saved, and cuda_source() shows its "
                "kernels"
            )
        if self.target.kind not in ("llvm", "cuda"):
            raise RuntimeError(f"modules for target kind {self.target.kind!r} do not run here")
        if self._library is None:
            raise RuntimeError(
                f"the library of this {self.target.name} module was not loaded "
                "(load(..., check_target=False) on a machine that cannot run it)"
            )

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """Raise :class:`InputError` naming the first input that does not match."""
        specs = self.input_specs
        if len(inputs) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InputError(f"expected {len(specs)} inputs ({names}), got {len(inputs)}")
        for spec, value in zip(specs, inputs, strict=True):
            _check_input(spec, value, self.device)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        main = self._function()
        self.check_inputs(inputs)
        args = [tvm.runtime.from_dlpack(_dlpack_ready(t)) for t in inputs]
        return _to_torch(main(*args))

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
        """Write the module to ONE file (zip; see the module docstring). Returns the path."""
        path = Path(path)
        library = self._library_bytes if self._library_bytes is not None else self._export()
        source = self.cuda_source().encode() if self.target.kind == "cuda" else None
        meta = self._metadata(library, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_META, json.dumps(meta, indent=2))
            zf.writestr(_LIB, library)
            if source is not None:
                zf.writestr(_CU, source)
        os.replace(tmp, path)
        return path

    def _export(self) -> bytes:
        if self._library is None:
            raise RuntimeError("cannot save: the library is not loaded")
        with tempfile.TemporaryDirectory(prefix="tbn_export_") as tmp:
            lib = Path(tmp) / _LIB
            self._library.export_library(str(lib))
            return lib.read_bytes()

    def _metadata(self, library: bytes, source: bytes | None) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "target": self.target.to_dict(),
            "inputs": [s.to_dict() for s in self.input_specs],
            "outputs": [s.to_dict() for s in self.output_specs],
            "library": {
                "member": _LIB,
                "size": len(library),
                "sha256": hashlib.sha256(library).hexdigest(),
            },
            "cuda_source": None
            if source is None
            else {
                "member": _CU,
                "sha256": hashlib.sha256(source).hexdigest(),
            },
            "report": None if self.report is None else str(self.report),
        }


# --------------------------------------------------------------------------- helpers


def _check_input(spec: TensorSpec, value: Any, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"input {spec.name!r}: expected a torch.Tensor, got {type(value).__name__}"
        )
    shape = tuple(value.shape)
    if shape != spec.shape:
        raise InputError(
            f"input {spec.name!r}: expected shape {spec.shape}, got {shape} "
            "(shapes are static; compile again for other shapes)"
        )
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {dtype}")
    if value.device.type != device.type:
        raise InputError(
            f"input {spec.name!r}: expected a tensor on {device.type}, got one on {value.device}"
        )


def _dlpack_ready(t: torch.Tensor) -> torch.Tensor:
    """Detached (DLPack refuses tensors that require grad) and compact (copy only if not)."""
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _to_torch(value: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_dlpack(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return tuple(_to_torch(v) for v in value)
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


def _versions() -> dict[str, str]:
    from importlib import metadata

    try:
        tbn = metadata.version("tbn_compiler")
    except metadata.PackageNotFoundError:
        tbn = "unknown"
    return {
        "tbn_compiler": tbn,
        "tvm": str(tvm.__version__),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- load


def _read_archive(path: Path) -> tuple[dict[str, Any], bytes, bytes | None]:
    if not path.is_file():
        raise FileNotFoundError(f"no compiled module at {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for member in (_META, _LIB):
                if member not in names:
                    raise ArtifactError(
                        f"{path}: not a complete compiled module, missing {member!r}"
                    )
            raw_meta = zf.read(_META)
            library = zf.read(_LIB)
            source = zf.read(_CU) if _CU in names else None
    except zipfile.BadZipFile as exc:
        raise ArtifactError(
            f"{path}: not a tbn_compiler compiled module, or the file is truncated/corrupt ({exc})"
        ) from exc
    except (EOFError, OSError, ValueError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{path}: corrupt archive ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(raw_meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: {_META} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: {_META} must hold a JSON object")
    return meta, library, source


def _check_metadata(path: Path, meta: dict[str, Any], library: bytes, source: bytes | None) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {version!r} is not supported (this tbn_compiler reads "
            f"version {FORMAT_VERSION}); compile the model again"
        )
    for key in ("target", "inputs", "outputs", "library"):
        if key not in meta:
            raise ArtifactError(f"{path}: {_META} lacks {key!r}")
    expected = meta["library"].get("sha256")
    actual = hashlib.sha256(library).hexdigest()
    if expected != actual:
        raise ArtifactError(
            f"{path}: checksum mismatch for {_LIB} (expected {expected}, got {actual}); "
            "the file is corrupt"
        )
    cu = meta.get("cuda_source")
    if cu is not None:
        if source is None:
            raise ArtifactError(f"{path}: not a complete compiled module, missing {_CU!r}")
        if hashlib.sha256(source).hexdigest() != cu.get("sha256"):
            raise ArtifactError(f"{path}: checksum mismatch for {_CU}; the file is corrupt")


def _check_target(path: Path, spec: TargetSpec) -> None:
    reason = spec.runnable_here()
    if reason is None and spec.kind == "llvm":
        reason = _cpu_mismatch(spec)
    if reason is not None:
        raise ArtifactError(f"{path}: target {spec.name!r} cannot run here: {reason}")


def _cpu_mismatch(spec: TargetSpec) -> str | None:
    mcpu = spec.tvm_target.get("mcpu")
    if not mcpu:
        return None
    here = str(tvm.target.codegen.llvm_get_system_cpu())
    if mcpu != here:
        return (
            f"code was generated for CPU {mcpu!r}, this machine is {here!r} "
            "(compile with target='llvm-generic' for portable code)"
        )
    return None


def load(path: str | os.PathLike, *, check_target: bool = True) -> CompiledModule:
    """Load a module written by :meth:`CompiledModule.save`, validating it first.

    ``check_target=False`` skips the "can this target run here" check (e.g. to read the
    CUDA source of a GPU module on a machine without a GPU); calls may then fail."""
    path = Path(path)
    meta, library, source = _read_archive(path)
    _check_metadata(path, meta, library, source)
    try:
        spec = TargetSpec.from_dict(meta["target"])
        inputs = [TensorSpec.from_dict(d) for d in meta["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in meta["outputs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed {_META} ({type(exc).__name__}: {exc})") from exc
    cuda_source = source.decode() if source is not None else None
    if check_target:
        _check_target(path, spec)
    elif spec.runnable_here() is not None:  # keep metadata and source; calls raise
        return CompiledModule(None, spec, inputs, outputs, meta.get("report"), library, cuda_source)
    runtime_mod = _load_library(path, library)
    return CompiledModule(
        runtime_mod, spec, inputs, outputs, meta.get("report"), library, cuda_source
    )


def _load_library(path: Path, library: bytes) -> tvm.runtime.Module:
    with tempfile.TemporaryDirectory(prefix="tbn_load_") as tmp:
        lib = Path(tmp) / _LIB
        lib.write_bytes(library)
        try:
            return tvm.runtime.load_module(str(lib))
        except Exception as exc:
            raise ArtifactError(
                f"{path}: TVM could not load the library ({type(exc).__name__}: {exc})"
            ) from exc
