"""Target and board registry (a leaf module: no TVM import).

``resolve_target("llvm" | "cuda" | "cuda:sm_80" | <registered name> | tvm.target.Target)``
returns a :class:`TargetSpec`; backends turn its dicts into ``tvm.target.Target`` objects.
"""

from . import boards  # noqa: E402, F401  (registers the Cortex-M presets)
from .registry import (
    DEFAULT_CUDA_ARCH,
    BoardInfo,
    TargetSpec,
    closest_targets,
    cuda_spec,
    host_arch,
    known_targets,
    llvm_generic_spec,
    llvm_spec,
    local_cuda_arch,
    norm_arch,
    register_target,
    resolve_target,
)

__all__ = [
    "DEFAULT_CUDA_ARCH",
    "BoardInfo",
    "TargetSpec",
    "closest_targets",
    "cuda_spec",
    "host_arch",
    "known_targets",
    "llvm_generic_spec",
    "llvm_spec",
    "local_cuda_arch",
    "norm_arch",
    "register_target",
    "resolve_target",
]
