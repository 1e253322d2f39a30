"""Run one TIR kernel on the host CPU with torch tensors (test helper)."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import tirx

from tbn_compiler.backends import schedule_rules

HOST = schedule_rules.host_target()


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array; uint32 (packed tile words) through an int32 view."""
    return t.view(torch.int32).numpy().view(np.uint32) if t.dtype == torch.uint32 else t.numpy()


def build_kernel(func: tirx.PrimFunc, target=HOST):
    """``func`` compiled for ``target`` as the module's ``main``."""
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)


def run_kernel(func: tirx.PrimFunc, inputs: list[torch.Tensor], out_shape) -> np.ndarray:
    """Build ``func`` for :data:`HOST`, run it on ``inputs``, return its float32 output."""
    lib = build_kernel(func)
    out = tvm.runtime.tensor(np.zeros(tuple(out_shape), np.float32))
    lib["main"](*[tvm.runtime.tensor(as_numpy(t)) for t in inputs], out)
    return out.numpy()
