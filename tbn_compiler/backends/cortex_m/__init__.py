"""Cortex-M backend: a model as one static C program (kernels, AOT entry, weights in flash).

``compile_cortex_m(model, example_inputs, target, config)`` returns a
:class:`CortexMModule`; ``cm.export(dir)`` writes a C project that builds with ``make``
(or CMake) and nothing else from this package; on QEMU-emulated boards ``cm(x)`` runs it.
"""

from ...targets import boards as _boards  # noqa: F401  (registers the board presets)
from ..artifact import LOADERS as _LOADERS
from .aot import AotError
from .driver import compile_cortex_m, compile_graph_cortex_m, generate_sources
from .module import CortexMModule, ModelTooLargeError, NotEmulatedError
from .qemu import BuildError, KernelError, RunError, ToolchainError, require_toolchain

_LOADERS["cortex-m"] = CortexMModule.from_archive  # tbn.load of a saved Cortex-M module

__all__ = [
    "AotError",
    "BuildError",
    "CortexMModule",
    "KernelError",
    "ModelTooLargeError",
    "NotEmulatedError",
    "RunError",
    "ToolchainError",
    "compile_cortex_m",
    "compile_graph_cortex_m",
    "generate_sources",
    "require_toolchain",
]
