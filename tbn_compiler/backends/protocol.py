"""What every compiled module is, and the backends that make them, by target kind.

Runtime-safe (no TVM import): the load/call path uses it with TVM's runtime alone.

* :class:`CompiledProgram`: the protocol shared by every compiled module (host and CUDA
  :class:`~.artifact.CompiledModule`, :class:`~.cortex_m.CortexMModule`): ``target``,
  ``input_specs``, ``output_specs``, ``report``, ``cm(*inputs)``, ``cm.save(path)``; a
  call with inputs that do not match raises :class:`InputError`.
* :class:`Backend`: one record per target kind (``TargetSpec.kind``): how to compile a
  rewritten graph for it, how to load a saved module of it, its device, and whether its
  modules can run here. ``compile`` and ``load`` only dispatch through
  :func:`backend_for`; a new target kind is one :func:`register_backend` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..targets import TargetSpec
from .specs import TensorSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Backend",
    "CompiledProgram",
    "InputError",
    "backend_for",
    "register_backend",
]

FORMAT_NAME = "tbn_compiler.compiled_module"
"""``format`` of every saved compiled module's metadata, whatever its target kind."""
FORMAT_VERSION = 2


class InputError(TypeError, ValueError):
    """Inputs do not match what the module was compiled for (count, shape, dtype, device)."""


@runtime_checkable
class CompiledProgram(Protocol):
    """A model compiled for one target (see the module docstring)."""

    target: TargetSpec
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]
    report: Any

    def __call__(self, *inputs: torch.Tensor) -> Any: ...

    def save(self, path: Any) -> Path: ...


CompileFn = Callable[[torch.nn.Module, tuple, TargetSpec, Any, Any], CompiledProgram]
LoadFn = Callable[[Path, dict, dict, bool], CompiledProgram]


@dataclass(frozen=True)
class Backend:
    """How one target kind is built, loaded and run.

    ``compile`` / ``load`` are ``"module:function"`` paths, imported on first use (the
    compiler's imports stay off the load/call path): ``compile(gm, inputs, spec, tune,
    report)`` builds a rewritten graph, ``load(path, meta, members, check_target)``
    rebuilds a saved module from its archive. ``runnable_here(spec)`` is None when
    modules for ``spec`` can run on this machine, else the reason; ``device(spec)`` is the
    torch device their inputs live on. ``dynamic_batch``: its modules can take any batch
    size; ``compile`` then also takes ``dynamic_batch=`` (a bool) and this is the
    default."""

    kind: str
    description: str
    compile: str
    load: str
    runnable_here: Callable[[TargetSpec], str | None]
    device: Callable[[TargetSpec], torch.device] = lambda spec: torch.device("cpu")
    dynamic_batch: bool = False

    def compile_graph(
        self,
        gm: torch.nn.Module,
        inputs: tuple,
        spec: TargetSpec,
        tune: Any,
        report: Any,
        **options: Any,
    ) -> CompiledProgram:
        """Build ``gm``; ``options`` (``dynamic_batch``) go to ``compile`` as keywords."""
        return _resolve(self.compile)(gm, inputs, spec, tune, report, **options)

    def load_archive(
        self, path: Path, meta: dict, members: dict, check_target: bool
    ) -> CompiledProgram:
        return _resolve(self.load)(path, meta, members, check_target)


_BACKENDS: dict[str, Backend] = {}
# modules that register the built-in backends when imported
_BUILTIN = {
    "llvm": "tbn_compiler.backends.artifact",
    "cuda": "tbn_compiler.backends.artifact",
    "cortex-m": "tbn_compiler.backends.cortex_m",
}


def register_backend(backend: Backend) -> None:
    """Add the backend of one target kind (replacing none: kinds are unique)."""
    if backend.kind in _BACKENDS and _BACKENDS[backend.kind] != backend:
        raise ValueError(f"a backend for target kind {backend.kind!r} is already registered")
    _BACKENDS[backend.kind] = backend


def backend_for(kind: str) -> Backend:
    """The backend registered for a target kind; ValueError naming the known kinds."""
    if kind not in _BACKENDS and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    if kind not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_BUILTIN))
        raise ValueError(f"no backend builds target kind {kind!r}; known kinds: {known}")
    return _BACKENDS[kind]


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
