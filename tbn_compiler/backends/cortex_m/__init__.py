"""Cortex-M backend: a model as one static C program (kernels, AOT entry, weights in flash).

``tbn.compile(model, example_inputs, target=<board>)`` (through
:func:`compile_graph_cortex_m`) returns a :class:`CortexMModule`; ``cm.export(dir)`` writes a C project that builds with ``make``
(or CMake) and nothing else from this package; on QEMU-emulated boards ``cm(x)`` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...targets import TargetSpec
from ...targets import boards as _boards  # noqa: F401  (registers the board presets)
from ..protocol import Backend, register_backend
from .aot import AotError
from .driver import compile_graph_cortex_m, generate_sources
from .module import CortexMModule, ModelTooLargeError, NotEmulatedError
from .qemu import KernelError, RunError
from .toolchain import BuildError, ToolchainError, require_toolchain


def compile_for_backend(
    gm: torch.nn.Module, inputs: tuple, spec: TargetSpec, tune: Any, report: Any
) -> CortexMModule:
    """The Cortex-M :class:`~..protocol.Backend`'s compile: no tuning for boards."""
    if tune is not None:
        raise ValueError(f"tuning is not available for Cortex-M targets ({spec.name!r})")
    return compile_graph_cortex_m(gm, inputs, spec, report=report)


def load_for_backend(
    path: Path, meta: dict[str, Any], members: dict[str, bytes], check_target: bool
) -> CortexMModule:
    """The Cortex-M backend's load (a saved module runs wherever QEMU does)."""
    return CortexMModule.from_archive(path, meta, members)


def runnable_here(spec: TargetSpec) -> str | None:
    """None for boards QEMU emulates; the reason for build-only boards."""
    if spec.board is not None and spec.board.qemu_machine is not None:
        return None
    return f"board {spec.name!r} is build only (QEMU does not emulate it)"


register_backend(
    Backend(
        "cortex-m",
        "Cortex-M boards: a static C program, run in QEMU where emulated",
        "tbn_compiler.backends.cortex_m:compile_for_backend",
        "tbn_compiler.backends.cortex_m:load_for_backend",
        runnable_here,
    )
)

__all__ = [
    "AotError",
    "BuildError",
    "CortexMModule",
    "KernelError",
    "ModelTooLargeError",
    "NotEmulatedError",
    "RunError",
    "ToolchainError",
    "compile_graph_cortex_m",
    "generate_sources",
    "require_toolchain",
]
