"""Input/output descriptions of compiled modules (runtime-safe: no TVM import).

:class:`TensorSpec` is shared by the compiler (:mod:`.relax_import` fills it in) and the
load/call path (:mod:`.artifact`), which must run with TVM's runtime alone; so are
:func:`shape_mismatch`, which checks a call's input shapes against the specs' dims (the
batch any size, the same for every input naming it), and :func:`check_index_inputs`,
which checks gather ids given as inputs before a call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorSpec", "check_index_inputs", "shape_mismatch"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one graph input or output (JSON-friendly).

    ``shape`` is the example's shape (one the module runs on). ``dims`` is the signature,
    per dim its size (static) or a name (symbolic): an input's dim named
    :data:`~tbn_compiler.capture.BATCH` takes any size, the same in every input naming it; an output's may be
    an expression of it (``"4*batch"``). Default: ``shape`` (all static)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    dims: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        dims = self.shape if self.dims is None else tuple(self.dims)
        if len(dims) != len(self.shape):
            raise ValueError(f"{self.name}: dims {dims} do not match shape {self.shape}")
        object.__setattr__(self, "dims", dims)

    @property
    def dynamic(self) -> bool:
        """True when a dim is symbolic (named)."""
        return any(isinstance(d, str) for d in self.dims)

    @property
    def signature(self) -> str:
        """The dims as text, e.g. ``"(batch, 64)"`` (a static one as its tuple)."""
        return _dims_text(self.dims)

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.dynamic:
            data["dims"] = list(self.dims)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        dims = data.get("dims")
        return cls(
            str(data["name"]),
            tuple(int(d) for d in data["shape"]),
            str(data["dtype"]),
            None if dims is None else tuple(d if isinstance(d, str) else int(d) for d in dims),
        )

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(
            name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch.")
        )


def _dims_text(dims: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def shape_mismatch(
    spec: TensorSpec, shape: Sequence[int], bound: dict[str, tuple[int, str]]
) -> str | None:
    """Why an input of ``shape`` does not fit ``spec`` (the :class:`InputError` message,
    from ``input 'name': expected shape (batch, 64), got (3, 65)``), or None when it
    fits. ``bound`` maps each dim name to ``(size, input name)`` of the first input of
    the call that named it; names first met here are added."""
    shape = tuple(int(d) for d in shape)
    head = f"input {spec.name!r}: expected shape {spec.signature}, got {_dims_text(shape)}"
    if len(shape) != len(spec.dims):
        return head
    for d, (want, got) in enumerate(zip(spec.dims, shape, strict=True)):
        if isinstance(want, int):
            if want != got:
                return head
            continue
        size, source = bound.setdefault(want, (got, spec.name))
        if size != got:
            return f"{head}: dim {d} ({want}) is {size} in input {source!r}"
    return None


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
