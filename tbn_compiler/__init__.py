"""tbn_compiler: compile PyTorch models into Tiled Bit Networks.

Public API (see DESIGN.md)::

    cfg = tbn.TBNConfig(p=4)
    qat = tbn.prepare(model, cfg)                  # trainable tiled layers
    gm  = tbn.rewrite(model, example_inputs, cfg)  # fx graph with tile ops; runs in torch
    print(tbn.inspect(gm))                         # per-layer report
"""

from . import ops  # noqa: F401  (registers torch.ops.tbn.*)
from .capture import CaptureError, capture
from .config import TBNConfig
from .inspect import Report, inspect
from .nn import TiledConv1d, TiledConv2d, TiledLinear, prepare
from .passes import convert, rewrite

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "Report",
    "TBNConfig",
    "TiledConv1d",
    "TiledConv2d",
    "TiledLinear",
    "capture",
    "convert",
    "inspect",
    "prepare",
    "rewrite",
]
