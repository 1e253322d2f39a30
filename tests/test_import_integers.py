"""Integer position-id idioms import with torch's semantics (llvm and Cortex-M in QEMU).

``torch.clamp`` of an integer tensor with one bound (TVM's ``clip`` cast the missing
bound, an infinity, to an integer and failed), with a float bound (torch's result is
float), and ``cumsum`` of an int32 or bool mask (torch sums in int64, TVM's converter
kept the operand's dtype). The reference is torch itself on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from emulated import host_and_board

import tbn_compiler as tbn


class Positions(nn.Module):
    """Position ids from a mask through ``op``."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.op(mask.cumsum(-1) - 1)


OPS = {
    "clamp-min": lambda t: t.clamp(min=0),
    "clamp-max": lambda t: t.clamp(max=2),
    "clamp-both": lambda t: t.clamp(0, 2),
    "clamp-min-op": lambda t: torch.clamp_min(t, 1),
    "clamp-float": lambda t: t.clamp(min=0.5),
    "cumsum": lambda t: t,
}


CASES = [(name, torch.int32) for name in sorted(OPS)] + [("cumsum", torch.bool)]


@pytest.mark.parametrize("target", host_and_board())
@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_integer_positions(name: str, dtype: torch.dtype, target: str) -> None:
    mask = torch.randint(0, 3, (2, 6), generator=torch.Generator().manual_seed(0)).to(dtype)
    model = Positions(OPS[name])
    cm = tbn.compile(model, (mask,), target=target)
    try:
        fresh = torch.randint(0, 3, (2, 6), generator=torch.Generator().manual_seed(1)).to(dtype)
        for m in (mask, fresh):
            got, ref = cm(m), model(m)
            assert got.dtype == ref.dtype and torch.equal(got, ref)
    finally:
        getattr(cm, "close", lambda: None)()
