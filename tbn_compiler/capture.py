"""Model -> ``torch.fx.GraphModule``.

``torch.export`` (non-strict) first: it handles real models that ``symbolic_trace``
cannot (Hugging Face transformers, in-place tensor writes, ...) and yields an
ATen-level graph whose parameters are ``get_attr`` nodes. The leading (batch)
dimension of tensor inputs is exported as one symbolic dimension, :data:`BATCH`
(:func:`export_dynamic_batch`; an example batch of 1 too), so the captured graph runs
on other batch sizes; where the model fixes it, each input's leading dimension is
dynamic where the model allows it (``Dim.AUTO``), else static.
``torch.fx.symbolic_trace`` is the fallback. When both fail, :class:`CaptureError`
names both failures and what to do.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "BATCH",
    "CaptureError",
    "OutputTree",
    "as_input_tuple",
    "capture",
    "example_batch",
    "example_tensors",
    "export_dynamic_batch",
    "graph_with_outputs",
    "output_tree",
]


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


def example_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (compiled modules take tensors only)."""
    inputs = as_input_tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example input {i} must be a torch.Tensor, got {type(t).__name__}")
    return inputs


BATCH = "batch"
"""Name of the symbolic batch dimension: dim 0 of every batched input (see
:func:`export_dynamic_batch`), as compiled modules' signatures name it."""


def example_batch(values: Any) -> int | None:
    """The example's batch size: dim 0 of the first tensor of at least one dim among
    ``values`` (pytree order), or None."""
    for leaf in torch.utils._pytree.tree_leaves(values):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _is_batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _batch_dynamic_shapes(args: tuple, kwargs: Mapping[str, Any], dim: Any, batch: int | None):
    """``dynamic_shapes`` for ``torch.export``: ``{0: dim}`` for every tensor whose dim 0
    is ``batch`` (None: every tensor of at least one dim); None elsewhere."""

    def spec(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return {0: dim} if batch is None or value.shape[0] == batch else None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    return spec(args), {k: spec(v) for k, v in kwargs.items()}


def _as_export_arg(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """``dynamic_shapes`` as ``torch.export.export`` takes it: the positional specs,
    followed by the keyword ones when there are keyword inputs."""
    return (*args, *kwargs.values()) if kwargs else args


def _doubled(values: Any, batch: int) -> Any:
    """``values`` with every batched tensor repeated twice along dim 0."""
    return torch.utils._pytree.tree_map(
        lambda v: torch.cat([v, v]) if _is_batched(v, batch) else v, values
    )


def export_dynamic_batch(
    model: torch.nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    **export_kwargs: Any,
) -> tuple[torch.export.ExportedProgram | None, str | None]:
    """``torch.export`` of ``model`` with one symbolic batch dimension, :data:`BATCH`:
    dim 0 of every tensor input whose dim 0 is that of the first tensor input (of at
    least one dim). Returns ``(program, None)``, or ``(None, why not)`` when no input has
    a batch dimension or the model fixes it (torch's error, first lines).

    An example batch of 1 is traced at 2 (each batched input repeated): torch.export
    specializes sizes 0 and 1, and refuses a symbolic dimension whose example is one.
    The program is valid for every batch size; torch's own output is kept from stderr."""
    kwargs = dict(kwargs or {})
    batch = example_batch((args, kwargs))
    if batch is None:
        return None, "no input has a batch dimension"
    if batch == 0:
        return None, "the example batch is empty"
    dim = torch.export.Dim(BATCH)
    dyn_args, dyn_kwargs = _batch_dynamic_shapes(args, kwargs, dim, batch)
    if batch == 1:
        args, kwargs = _doubled((args, kwargs), batch)
    try:
        with _quiet_export():
            program = torch.export.export(
                model,
                tuple(args),
                kwargs,
                dynamic_shapes=_as_export_arg(dyn_args, dyn_kwargs),
                **export_kwargs,
            )
    except Exception as exc:  # the model fixes the batch (or does not run at another)
        return None, f"the model fixes its batch size (torch.export: {_first_lines(exc, 2)})"
    return program, None


def register_output_pytrees(cls: type) -> None:
    """Make the output classes of ``cls``'s library flattenable by ``torch.utils._pytree``
    where the library says how: for Hugging Face ``transformers`` classes, its own
    ``register_dynamic_cache_export_support`` (a ``DynamicCache`` holding the key/value
    cache is what decoders return by default). Idempotent; other classes: nothing."""
    if not cls.__module__.startswith("transformers."):
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:  # a transformers without it: its caches cannot be exported
        return
    register_dynamic_cache_export_support()


def _export(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    """The model exported with a symbolic batch (:func:`export_dynamic_batch`), else
    with each input's dim 0 dynamic where the model allows it, else static."""
    register_output_pytrees(type(model))
    program, _ = export_dynamic_batch(model, args, kwargs, strict=False)
    if program is not None:
        return program.module()
    dyn_args, dyn_kwargs = _batch_dynamic_shapes(args, kwargs, torch.export.Dim.AUTO, None)
    dynamic = _as_export_arg(dyn_args, dyn_kwargs)
    try:
        ep = torch.export.export(model, args, dict(kwargs), strict=False, dynamic_shapes=dynamic)
    except Exception:  # a model may refuse a dynamic batch; static shapes are still useful
        ep = torch.export.export(model, args, dict(kwargs), strict=False)
    return ep.module()


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep torch.export's own reports from the user's stderr: of a failed attempt (the
    partial graph, symbolic-shape log warnings; the :class:`CaptureError` reports the
    failure instead), and the note that a batch of 1 pins the batch dimension (nothing
    the user can act on: the capture is then static in that dimension)."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export.non_strict_utils")


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
        with _quiet_export():
            gm = _export(model, args, kwargs)
        gm.meta["tbn_capture"] = "torch.export"
        return gm
    except Exception as export_error:  # reported below with the fallback's error
        export_msg = _first_lines(export_error)
    try:
        with contextlib.redirect_stdout(None):
            gm = _symbolic_trace(model, args, kwargs)
        gm.meta["tbn_capture"] = "symbolic_trace"
        return gm
    except Exception as trace_error:
        trace_msg = _first_lines(trace_error)
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph.\n"
        f"  torch.export failed: {export_msg}\n"
        f"  torch.fx.symbolic_trace failed: {trace_msg}\n"
        f"{_ADVICE}"
    )


def graph_with_outputs(
    gm: fx.GraphModule, outputs: Sequence[fx.Node] | None = None
) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` (nodes of ``gm.graph``; default: the tensors
    ``gm`` returns, in pytree order) as a flat tuple from the flat positional inputs,
    with the nodes that do not lead to them removed. ``gm`` is left unchanged and the
    copy shares its parameters. Graphs from ``torch.export`` rebuild their output tree
    (a ``ModelOutput``, a ``DynamicCache``, ...) in Python; the copy does not, so that
    a further ``torch.export`` traces tensor code only."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    returned = graph.graph_copy(gm.graph, copies)
    if outputs is None:
        wanted = [v for v in torch.utils._pytree.tree_leaves(returned) if isinstance(v, fx.Node)]
    else:
        wanted = [copies[n] for n in outputs]
    graph.output(tuple(wanted))
    flat = fx.GraphModule(gm, graph)
    flat.graph.eliminate_dead_code()
    flat.recompile()
    flat.meta.update(gm.meta)
    return flat


def _first_lines(error: BaseException, n: int = 3) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return " | ".join(line.strip() for line in text.splitlines()[:n] if line.strip())


# --------------------------------------------------------------------------- output structure

_CONSTANT_TYPES = (type(None), bool, int, float, str)


class OutputTree:
    """The structure of a model's output (tensors inside tuples, lists, dicts, named
    tuples, dict-like output classes and other classes registered with
    ``torch.utils._pytree``, such as Hugging Face's ``DynamicCache``), so that compiled
    modules return what the model returns. Tensors are the leaves, numbered in
    ``torch.utils._pytree`` order (the order in which ``torch.export`` lists graph
    outputs); constants (None, numbers, strings) are kept in the tree. JSON-serializable
    with :meth:`to_json` / :meth:`from_json`.

    A registered class is stored with the context its flatten function gives (which
    must be made of None, numbers, strings, lists, tuples and dicts) and rebuilt by its
    unflatten function; where that class is not registered (a process that loads a saved
    module without having captured one), :func:`register_output_pytrees` registers it
    first, else the output holds a tuple of its children instead, with a warning."""

    def __init__(self, node: dict[str, Any]) -> None:
        self._node = node
        self.num_leaves = _count_leaves(node)

    @classmethod
    def of(cls, output: Any) -> OutputTree:
        """The tree of one output value; raises TypeError for unsupported containers."""
        return cls(_encode(output, "output"))

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """Rebuild the output from ``leaves`` (one per tensor, in order)."""
        if len(leaves) != self.num_leaves:
            raise ValueError(f"expected {self.num_leaves} output tensors, got {len(leaves)}")
        it = iter(leaves)
        return _decode(self._node, it)

    def to_json(self) -> str:
        return json.dumps(self._node)

    @classmethod
    def from_json(cls, text: str) -> OutputTree:
        return cls(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputTree) and self._node == other._node

    def __repr__(self) -> str:
        return f"OutputTree({self.to_json()})"


def output_tree(gm: torch.nn.Module, example_inputs: Any) -> OutputTree:
    """Run ``gm`` on the example inputs and return the structure of its output."""
    with torch.no_grad():
        return OutputTree.of(gm(*as_input_tuple(example_inputs)))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"t": "tensor"}
    if isinstance(value, _CONSTANT_TYPES):
        return {"t": "const", "v": value}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {
            "t": "namedtuple",
            "cls": _class_path(type(value)),
            "fields": list(value._fields),
            "c": [_encode(v, f"{where}.{f}") for f, v in zip(value._fields, value, strict=True)],
        }
    if isinstance(value, (tuple, list)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {"t": kind, "c": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, Mapping):
        keys = list(value.keys())
        if not all(isinstance(k, (str, int)) for k in keys):
            raise TypeError(f"{where}: dict keys must be str or int, got {keys!r}")
        node = {"t": "dict", "k": keys, "c": [_encode(value[k], f"{where}[{k!r}]") for k in keys]}
        if type(value) is not dict:
            node["cls"] = _class_path(type(value))
        return node
    registered = torch.utils._pytree.SUPPORTED_NODES.get(type(value))
    if registered is not None:
        return _encode_pytree_node(value, registered, where)
    raise TypeError(
        f"{where}: outputs of type {type(value).__name__} are not supported; return tensors "
        "in tuples, lists, dicts or named tuples"
    )


def _encode_pytree_node(value: Any, registered: Any, where: str) -> dict[str, Any]:
    children, context = registered.flatten_fn(value)
    try:
        ctx = _context_to_json(context)
    except TypeError as exc:
        raise TypeError(
            f"{where}: the pytree context of {type(value).__name__} cannot be saved ({exc})"
        ) from exc
    return {
        "t": "pytree",
        "cls": _class_path(type(value)),
        "ctx": ctx,
        "c": [_encode(v, f"{where}.{i}") for i, v in enumerate(children)],
    }


def _context_to_json(value: Any) -> Any:
    """A pytree context as JSON, lists, tuples and dicts tagged (JSON has lists only)."""
    if isinstance(value, _CONSTANT_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_context_to_json(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {"dict": [[k, _context_to_json(v)] for k, v in value.items()]}
    raise TypeError(f"a {type(value).__name__} in its context")


def _context_from_json(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, items),) = value.items()
    if kind == "dict":
        return {k: _context_from_json(v) for k, v in items}
    values = [_context_from_json(v) for v in items]
    return values if kind == "list" else tuple(values)


def _count_leaves(node: dict[str, Any]) -> int:
    if node["t"] == "tensor":
        return 1
    return sum(_count_leaves(c) for c in node.get("c", ()))


def _import_class(path: str) -> type | None:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def _decode(node: dict[str, Any], leaves: Iterator[Any]) -> Any:
    kind = node["t"]
    if kind == "tensor":
        return next(leaves)
    if kind == "const":
        return node["v"]
    children = [_decode(c, leaves) for c in node["c"]]
    if kind == "pytree":
        return _decode_pytree_node(node, children)
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return children
    if kind == "namedtuple":
        cls = _import_class(node["cls"])
        if cls is None:  # the class is not importable here: an equivalent named tuple
            cls = collections.namedtuple(node["cls"].rpartition(".")[2], node["fields"])
        return cls(*children)
    items = dict(zip(node["k"], children, strict=True))
    cls = _import_class(node["cls"]) if "cls" in node else None
    if cls is None:  # a plain dict, or a dict-like class not importable here
        return items
    return cls(**items) if all(isinstance(k, str) for k in items) else cls(items)


def _decode_pytree_node(node: dict[str, Any], children: list[Any]) -> Any:
    cls = _import_class(node["cls"])
    if cls is not None and cls not in torch.utils._pytree.SUPPORTED_NODES:
        register_output_pytrees(cls)
    registered = None if cls is None else torch.utils._pytree.SUPPORTED_NODES.get(cls)
    if registered is None:
        warnings.warn(
            f"the model's output holds a {node['cls']}, which cannot be rebuilt here (not "
            "importable, or not registered with torch.utils._pytree); it is returned as a "
            "tuple of its parts",
            RuntimeWarning,
            stacklevel=4,
        )
        return tuple(children)
    return registered.unflatten_fn(children, _context_from_json(node["ctx"]))
