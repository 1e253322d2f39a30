"""Model -> ``torch.fx.GraphModule``.

``torch.export`` (non-strict) first: it handles real models that ``symbolic_trace``
cannot (Hugging Face transformers, in-place tensor writes, ...) and yields an
ATen-level graph whose parameters are ``get_attr`` nodes. The leading (batch)
dimension of tensor inputs is exported as dynamic where the model allows it, so
the captured graph runs on other batch sizes too (an example batch of 1 pins it).
``torch.fx.symbolic_trace`` is the fallback. When both fail, :class:`CaptureError`
names both failures and what to do.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = ["CaptureError", "capture", "as_input_tuple"]


class CaptureError(RuntimeError):
    """Neither torch.export nor torch.fx.symbolic_trace could capture the model."""


_ADVICE = (
    "What you can do: make control flow depend on shapes only, not on tensor values "
    "(or use torch.cond); move data-dependent Python logic out of forward(); wrap "
    "untraceable helper functions with torch.fx.wrap; or capture the model yourself "
    "(torch.export.export(...).module() or torch.fx.symbolic_trace) and pass the "
    "resulting GraphModule."
)


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalize example inputs: a single tensor or a sequence of them -> tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple/list of inputs, got {type(example_inputs).__name__}"
    )


def _batch_dynamic_shapes(args: tuple, kwargs: Mapping[str, Any]):
    """``Dim.AUTO`` on dim 0 of every tensor with at least one dim; None elsewhere."""

    def spec(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    return spec(args), {k: spec(v) for k, v in kwargs.items()}


def _export(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    dyn_args, dyn_kwargs = _batch_dynamic_shapes(args, kwargs)
    dynamic = (*dyn_args, *dyn_kwargs.values()) if kwargs else dyn_args
    try:
        ep = torch.export.export(model, args, dict(kwargs), strict=False, dynamic_shapes=dynamic)
    except Exception:  # a model may refuse a dynamic batch; static shapes are still useful
        ep = torch.export.export(model, args, dict(kwargs), strict=False)
    return ep.module()


def _symbolic_trace(
    model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> fx.GraphModule:
    if kwargs:
        raise CaptureError("symbolic_trace fallback does not take keyword inputs")
    gm = torch.fx.symbolic_trace(model)
    gm(*args)  # a trace that cannot run the example is no capture
    return gm


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Capture ``model`` as an fx GraphModule runnable on ``example_inputs``.

    The model is not modified and its train/eval mode is used as it is. Raises
    :class:`CaptureError` naming the torch.export and the symbolic_trace failures.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_input_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = _export(model, args, kwargs)
        gm.meta["tbn_capture"] = "torch.export"
        return gm
    except Exception as export_error:  # noqa: BLE001 - reported below with the fallback's error
        export_msg = _first_lines(export_error)
    try:
        with contextlib.redirect_stdout(None):
            gm = _symbolic_trace(model, args, kwargs)
        gm.meta["tbn_capture"] = "symbolic_trace"
        return gm
    except Exception as trace_error:  # noqa: BLE001
        trace_msg = _first_lines(trace_error)
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph.\n"
        f"  torch.export failed: {export_msg}\n"
        f"  torch.fx.symbolic_trace failed: {trace_msg}\n"
        f"{_ADVICE}"
    )


def _first_lines(error: BaseException, n: int = 3) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return " | ".join(line.strip() for line in text.splitlines()[:n] if line.strip())
