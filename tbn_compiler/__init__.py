"""tbn_compiler: compile PyTorch models into Tiled Bit Networks.

Public API (see DESIGN.md)::

    cfg = tbn.TBNConfig(p=4)
    qat = tbn.prepare(model, cfg)                  # trainable tiled layers
    gm  = tbn.rewrite(model, example_inputs, cfg)  # fx graph with tile ops; runs in torch
    print(tbn.inspect(gm))                         # per-layer report
    cm  = tbn.compile(model, example_inputs, target="llvm")   # TVM build; "cuda", ...
    y   = cm(*example_inputs)
    cm.save(path); cm2 = tbn.load(path)
    tbn.qat.fit(qat, loader, teacher=model)        # fine-tuning recipe (tbn_compiler/qat.py)

TVM is imported only when a backend name (``compile``, ``load``, ...) is first used.
"""

from typing import Any

from . import ops, qat  # noqa: F401  (ops registers torch.ops.tbn.*; qat: the QAT recipe)
from .capture import CaptureError, capture
from .config import TBNConfig
from .inspect import Report, inspect
from .nn import TiledConv1d, TiledConv2d, TiledLinear
from .passes import convert, prepare, rewrite
from .targets import known_targets, register_target, resolve_target

__version__ = "0.1.0"

# Public names served by the TVM backends, imported on first use.
_LAZY = {
    "compile": "tbn_compiler.backends.build",
    "compile_graph": "tbn_compiler.backends.build",
    "load": "tbn_compiler.backends.artifact",
    "CompiledModule": "tbn_compiler.backends.artifact",
    "ArtifactError": "tbn_compiler.backends.artifact",
    "ArtifactWriteError": "tbn_compiler.backends.artifact",
    "InputError": "tbn_compiler.backends.artifact",
    "Tuning": "tbn_compiler.backends.tuning",
    "ValidationError": "tbn_compiler.backends.validate",
    "TBNFallbackWarning": "tbn_compiler.backends.torch_backend",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tbn_compiler' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "CaptureError",
    "Report",
    "TBNConfig",
    "TiledConv1d",
    "TiledConv2d",
    "TiledLinear",
    "capture",
    "convert",
    "inspect",
    "known_targets",
    "prepare",
    "qat",
    "register_target",
    "resolve_target",
    "rewrite",
]
