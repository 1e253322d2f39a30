"""Input/output descriptions of compiled modules (runtime-safe: no TVM import).

:class:`TensorSpec` is shared by the compiler (:mod:`.relax_import` fills it in) and the
load/call path (:mod:`.artifact`), which must run with TVM's runtime alone; so is
:func:`check_index_inputs`, which checks gather ids given as inputs before a call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorSpec", "check_index_inputs"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one graph input or output (JSON-friendly)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(
            name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch.")
        )


def check_index_inputs(checks: Sequence[Mapping[str, Any]], inputs: Mapping[str, Any]) -> None:
    """Raise the check's ``error`` (torch's exception for that op; ``IndexError`` when
    absent) with the kernel's message when an input named by a check
    of :func:`.relax_import.index_input_checks` holds an id outside ``[low, high)``
    (``[0, rows)`` in checks that give ``rows``). Pure torch, on the inputs' device: a
    few reductions and one synchronisation. For targets whose kernels cannot raise
    (CUDA); runtime-safe, unlike :mod:`.relax_import`."""
    for check in checks:
        ids = inputs[check["input"]]
        low, high = check.get("low", 0), check.get("high", check.get("rows"))
        if ids.numel() and bool(((ids < low) | (ids >= high)).any()):
            raise _ERRORS.get(check.get("error", ""), IndexError)(check["message"])


# the exception a check names (torch's for that op), by name as JSON keeps it
_ERRORS: dict[str, type[Exception]] = {"IndexError": IndexError, "RuntimeError": RuntimeError}
