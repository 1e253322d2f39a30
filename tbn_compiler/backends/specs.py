"""Input/output descriptions of compiled modules (runtime-safe: no TVM import).

:class:`TensorSpec` is shared by the compiler (:mod:`.relax_import` fills it in) and the
load/call path (:mod:`.artifact`), which must run with TVM's runtime alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorSpec"]


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
