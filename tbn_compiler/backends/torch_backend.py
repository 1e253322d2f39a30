"""The ``torch.compile`` backend ``"tbn"``.

``torch.compile(model, backend="tbn", options={"config": TBNConfig(...), "target": "llvm"})``
(registered through the ``torch_dynamo_backends`` entry point: no import of this package
needed). Options: ``config`` (:class:`~tbn_compiler.TBNConfig`, default ``TBNConfig()``),
``target`` (anything :func:`tbn_compiler.compile` takes, default ``"llvm"``), ``tune`` (a
:class:`.tuning.Tuning`, default none) and ``fallback`` (default True; False raises
instead of running a graph in PyTorch).

Contract, per graph that TorchDynamo captures (a model with graph breaks gives several):

* The graph is compiled with :func:`.build.compile`: its module parameters and buffers
  are frozen into it as weights (so that tiling sees them), its layers are named by
  their paths in the user's module (``"encoder.linear1"``) and ``config`` applies by those
  names; ``exclude`` by module type uses the types TorchDynamo recorded. ``keep_first``
  / ``keep_last`` and ``strict``'s check that every pattern matches a layer apply to the
  layers of each captured graph, not of the whole model.
* Inference only: a graph is compiled when autograd does not record it (under
  ``torch.no_grad()`` / ``torch.inference_mode()``, or nothing requires grad) and it holds no
  training-mode op (dropout or batch norm in training mode) and no in-place write to an
  input. Otherwise, and when the compile fails (an op TVM cannot import, ...), the graph
  runs in PyTorch as TorchDynamo captured it, with ONE :class:`TBNFallbackWarning` that
  names the op and the reason (``fallback=False``: the error is raised instead).
* Shapes are static: a new input shape makes TorchDynamo recompile, or, for a graph it
  captured with symbolic sizes, compiles a module for that shape at its first call.
  Weights replaced or modified in place after compiling are detected at the next call
  and the graph is compiled again, with a warning.
* PyTorch's fused fast paths of ``nn.TransformerEncoderLayer`` and
  ``nn.MultiheadAttention`` (taken in eval mode without autograd) are traced as the
  modules' reference math, so that their projections are tiled as ``rewrite`` tiles them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import TBNConfig
from ..nn import TiledConv1d, TiledConv2d, TiledLinear, layer_name
from ..ops import tile_op_name
from .build import compile as compile_model
from .tuning import Tuning

__all__ = ["BackendOptions", "TBNFallbackWarning", "TBNGraph", "tbn_backend"]


class TBNFallbackWarning(UserWarning):
    """A captured graph runs in PyTorch instead of as a compiled TBN module."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BackendOptions:
    """The ``options`` of ``torch.compile(..., backend="tbn", options=...)``."""

    config: TBNConfig | None = None
    target: Any = "llvm"
    tune: Tuning | None = None
    fallback: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Options from torch.compile's dict; ValueError/TypeError name a bad one."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown tbn backend options {unknown}; known options: {known}")
        parsed = cls(**options)
        if parsed.config is not None and not isinstance(parsed.config, TBNConfig):
            raise TypeError(f"option 'config' must be a TBNConfig, got {parsed.config!r}")
        if parsed.tune is not None and not isinstance(parsed.tune, Tuning):
            raise TypeError(f"option 'tune' must be a tbn_compiler.Tuning, got {parsed.tune!r}")
        if not isinstance(parsed.fallback, bool):
            raise TypeError(f"option 'fallback' must be a bool, got {parsed.fallback!r}")
        return parsed


# --------------------------------------------------------------------------- graph inputs


@dataclass(frozen=True)
class Slot:
    """One placeholder of a captured graph: a runtime ``input`` tensor, a module
    ``weight`` (parameter or buffer, frozen into the compiled graph under ``path``), or a
    symbolic ``size`` (fixed per compiled shape)."""

    kind: str
    name: str
    path: str = ""
    is_buffer: bool = False
    owner: tuple[str, ...] = ()  # weight: the owning module's source path tokens


# `L['self']._modules['fc1']._parameters['weight']`, `G['model'].encoder._buffers['x']`
_SOURCE_TOKEN = re.compile(r"\.(\w+)|\['([^'\]]*)'\]|\[(\d+)\]")
_HIDDEN = ("_modules", "_parameters", "_buffers")


def source_tokens(source: str) -> tuple[str, ...] | None:
    """``L['self']._modules['fc1']._parameters['weight']`` -> ``('L', 'self', 'fc1',
    'weight')`` (container dicts dropped); None for a source of another form."""
    head = re.match(r"[A-Za-z_]\w*", source)
    if head is None:
        return None
    tokens, pos = [head.group(0)], head.end()
    while pos < len(source):
        m = _SOURCE_TOKEN.match(source, pos)
        if m is None:
            return None
        tokens.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return tuple(t for t in tokens if t not in _HIDDEN)


def _weight_kind(source: str) -> str | None:
    """``"parameter"`` / ``"buffer"`` for a module's parameter/buffer source, else None."""
    if re.search(r"\._parameters\['[^']*'\]$", source):
        return "parameter"
    if re.search(r"\._buffers\['[^']*'\]$", source):
        return "buffer"
    return None


def graph_slots(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Slot]:
    """Classify the placeholders of a TorchDynamo graph (in order)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"the captured graph has {len(placeholders)} inputs but {len(example_inputs)} "
            "example inputs were given"
        )
    raw: list[tuple[fx.Node, Any, str | None, tuple[str, ...] | None]] = []
    for node, example in zip(placeholders, example_inputs, strict=True):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else ""
        raw.append((node, example, _weight_kind(source), source_tokens(source)))
    relative = [tokens[2:] if kind and tokens else None for _, _, kind, tokens in raw]
    counts: dict[tuple[str, ...], int] = {}
    for r in relative:
        if r:
            counts[r] = counts.get(r, 0) + 1
    slots = []
    for (node, example, kind, tokens), rel in zip(raw, relative, strict=True):
        if isinstance(example, (torch.SymInt, int)) and not isinstance(example, bool):
            slots.append(Slot("size", node.name))
        elif kind is not None and isinstance(example, torch.Tensor):
            # a path in the user's module; the root's name too when two roots clash
            parts = rel if rel and counts[rel] == 1 else (tokens[1:] if tokens else None)
            path = ".".join(parts) if parts else f"_tbn_weights.{node.name}"
            owner = tokens[:-1] if tokens else ()
            slots.append(Slot("weight", node.name, path, kind == "buffer", owner))
        elif isinstance(example, torch.Tensor):
            slots.append(Slot("input", node.name))
        else:
            raise TypeError(
                f"graph input {node.name!r} is a {type(example).__name__}; the tbn backend "
                "takes tensors and sizes"
            )
    return slots


def size_value(example: Any) -> int:
    """The concrete value of a (symbolic) size example."""
    if isinstance(example, torch.SymInt):
        return int(example.node.hint)
    return int(example)


# --------------------------------------------------------------------------- what runs in torch

# torch-level functions whose `training`-like argument, when true, makes them random
# or stateful: a compiled inference module cannot reproduce them
_TRAINING_ARGS: dict[Callable[..., Any], str] = {
    F.dropout: "training",
    F.dropout1d: "training",
    F.dropout2d: "training",
    F.dropout3d: "training",
    F.alpha_dropout: "training",
    F.feature_alpha_dropout: "training",
    F.batch_norm: "training",
    F.rrelu: "training",
    torch.dropout: "train",
    torch.alpha_dropout: "train",
    torch.feature_dropout: "train",
    torch.feature_alpha_dropout: "train",
}
# fused fast paths (builtins without a signature) -> position of their mask argument
_FUSED_FAST_PATH_MASK = {
    torch._transformer_encoder_layer_fwd: 18,
    torch._native_multi_head_attention: 9,
}
# ops through which a result may share storage with its first argument
_VIEW_NAMES = {
    "view", "reshape", "transpose", "permute", "t", "unsqueeze", "squeeze", "flatten",
    "unflatten", "expand", "expand_as", "narrow", "select", "getitem", "contiguous",
    "view_as", "chunk", "split", "unbind", "as_strided", "diagonal", "movedim", "swapaxes",
    "detach", "real", "imag", "T", "mT",
}  # fmt: skip


def op_label(node: fx.Node) -> str:
    """A readable name of a node's op (``torch.nn.functional.dropout``, ``Tensor.add_``)."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    if inspect.isbuiltin(target) or module.startswith("torch._C") or not module:
        return f"torch.{getattr(target, '__name__', target)}"
    return f"{module}.{getattr(target, '__qualname__', target)}"


def _input_label(node: fx.Node) -> str:
    """How the user's code names a graph input (``L['x']``), else the node's name."""
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None else node.name


def _origin(node: fx.Node) -> str:
    """`` (file.py:12, in forward)`` from the node's stack trace, or ``""``."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line, func = frames[-1]
    return f" ({path.rsplit('/', 1)[-1]}:{line}, in {func})"


def _bound_argument(node: fx.Node, name: str) -> Any:
    """The value of parameter ``name`` in a call_function node (its default if unset)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound.arguments.get(name)


def _training_reason(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    flag = _TRAINING_ARGS.get(node.target)
    if flag is not None and _bound_argument(node, flag) is True:
        return f"{op_label(node)}{_origin(node)} runs in training mode; call model.eval()"
    if node.target is F.scaled_dot_product_attention:
        p = _bound_argument(node, "dropout_p")
        if not isinstance(p, (int, float)) or p != 0:
            return f"{op_label(node)}{_origin(node)} has dropout_p={p}; call it with 0.0"
    position = _FUSED_FAST_PATH_MASK.get(node.target)
    if position is not None:
        mask = node.args[position] if len(node.args) > position else node.kwargs.get("mask")
        if mask is not None:
            return f"{op_label(node)}{_origin(node)} is given a mask (only mask-free calls compile)"
    return None


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    return (
        name in ("setitem", "iadd", "isub", "imul", "itruediv")
        or node.kwargs.get("inplace") is True
        or (name.endswith("_") and not name.endswith("__"))
    )


def _aliases_input(value: Any) -> fx.Node | None:
    """The placeholder ``value`` may be a view of, following view-like ops; else None."""
    while isinstance(value, fx.Node):
        if value.op == "placeholder":
            return value
        label = (
            str(value.target)
            if value.op == "call_method"
            else getattr(value.target, "__name__", "")
        )
        if value.op not in ("call_method", "call_function") or label not in _VIEW_NAMES:
            return None
        value = value.args[0] if value.args else None
    return None


def not_compiled_reason(
    gm: fx.GraphModule, slots: Sequence[Slot], example_inputs: Sequence[Any]
) -> str | None:
    """Why the graph must run in PyTorch (an inference-only check), or None."""
    if torch.is_grad_enabled():
        for slot, example in zip(slots, example_inputs, strict=True):
            if isinstance(example, torch.Tensor) and example.requires_grad:
                what = f"weight {slot.path!r}" if slot.kind == "weight" else f"input {slot.name!r}"
                return (
                    f"autograd records this graph ({what} requires grad) and the tbn backend "
                    "compiles inference graphs: call the model under torch.no_grad() or "
                    "torch.inference_mode()"
                )
    for node in gm.graph.nodes:
        reason = _training_reason(node)
        if reason is not None:
            return reason
        if _is_inplace(node) and node.args:
            source = _aliases_input(node.args[0])
            if source is not None:
                return f"{op_label(node)}{_origin(node)} writes in place to the graph input {_input_label(source)}"
        prepared = _prepared_layer(node)
        if prepared is not None:
            return (
                f"{op_label(node)}{_origin(node)} belongs to the prepared (QAT) layer "
                f"{prepared}; compile tbn.convert(model) instead"
            )
    return None


def _prepared_layer(node: fx.Node) -> str | None:
    """``'fc1' (TiledLinear)`` when ``node`` computes part of a prepared layer, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(module_type, type) and issubclass(
            module_type, (TiledLinear, TiledConv1d, TiledConv2d)
        ):
            tokens = source_tokens(path)
            name = ".".join(tokens[2:]) if tokens and len(tokens) > 2 else path
            return f"{name!r} ({module_type.__name__})"
    return None


# --------------------------------------------------------------------------- fused fast paths


def _encoder_layer_reference(
    src: torch.Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: torch.Tensor,
    norm_bias_1: torch.Tensor,
    norm_weight_2: torch.Tensor,
    norm_bias_2: torch.Tensor,
    ffn_weight_1: torch.Tensor,
    ffn_bias_1: torch.Tensor,
    ffn_weight_2: torch.Tensor,
    ffn_bias_2: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_type: int | None = None,
) -> torch.Tensor:
    """``torch._transformer_encoder_layer_fwd`` without a mask, as the eval-mode
    ``nn.TransformerEncoderLayer`` computes it outside its fast path (batch first)."""

    def attention(x: torch.Tensor) -> torch.Tensor:
        q = x.transpose(1, 0)
        out = F.multi_head_attention_forward(
            q, q, q, embed_dim, num_heads, qkv_weight, qkv_bias, None, None, False, 0.0,
            proj_weight, proj_bias, training=False, need_weights=False,
        )[0]  # fmt: skip
        return out.transpose(1, 0)

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    shape = (embed_dim,)
    norm1 = lambda x: F.layer_norm(x, shape, norm_weight_1, norm_bias_1, eps)  # noqa: E731
    norm2 = lambda x: F.layer_norm(x, shape, norm_weight_2, norm_bias_2, eps)  # noqa: E731
    if norm_first:
        x = src + attention(norm1(src))
        return x + feed_forward(norm2(x))
    x = norm1(src + attention(src))
    return norm2(x + feed_forward(x))


def _multi_head_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    mask_type: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch._native_multi_head_attention`` without a mask, as the eval-mode
    ``nn.MultiheadAttention`` (batch first) computes it outside its fast path."""
    q, k, v = (t.transpose(1, 0) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        q, k, v, embed_dim, num_head, qkv_weight, qkv_bias, None, None, False, 0.0,
        proj_weight, proj_bias, training=False, need_weights=need_weights,
        average_attn_weights=average_attn_weights,
    )  # fmt: skip
    return out.transpose(1, 0), weights


_FAST_PATH_REFERENCES: dict[Any, Callable[..., Any]] = {
    torch._transformer_encoder_layer_fwd: _encoder_layer_reference,
    torch._native_multi_head_attention: _multi_head_attention_reference,
}


# --------------------------------------------------------------------------- frozen graph


def _set_tensor(root: nn.Module, path: str, tensor: torch.Tensor, is_buffer: bool) -> None:
    """Register ``tensor`` at dotted ``path`` under ``root`` (holder modules created)."""
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if is_buffer:
        owner.register_buffer(leaf, tensor.detach())
    else:
        owner.register_parameter(leaf, nn.Parameter(tensor.detach(), requires_grad=False))


def _copy_attribute(root: nn.Module, gm: fx.GraphModule, target: str) -> None:
    """Copy ``gm``'s attribute or submodule at ``target`` to the same path in ``root``."""
    *parents, leaf = target.split(".")
    src: Any = gm
    dst = root
    for part in parents:
        src = getattr(src, part)
        if part not in dst._modules:
            dst.add_module(part, nn.Module())
        dst = dst._modules[part]
    value = getattr(src, leaf)
    if isinstance(value, nn.Module):
        dst.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        dst.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        dst.register_buffer(leaf, value)
    else:
        setattr(dst, leaf, value)


def frozen_graph(
    gm: fx.GraphModule,
    slots: Sequence[Slot],
    weights: Sequence[torch.Tensor | None],
    sizes: Sequence[int | None],
) -> fx.GraphModule:
    """A copy of ``gm`` taking only its ``input`` slots: weights become attributes at
    their paths, sizes become constants, fused fast paths their reference math. Node
    metadata other than stack traces is dropped (TorchDynamo's holds fake tensors)."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    placeholders = iter(zip(slots, weights, sizes, strict=True))
    copied: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            slot, weight, size = next(placeholders)
            if slot.kind == "weight":
                _set_tensor(root, slot.path, weight, slot.is_buffer)
                env[node] = graph.get_attr(slot.path)
            elif slot.kind == "size":
                env[node] = size
            else:
                env[node] = graph.placeholder(node.name)
            continue
        if node.op in ("get_attr", "call_module") and node.target not in copied:
            _copy_attribute(root, gm, str(node.target))
            copied.add(str(node.target))
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = {k: v for k, v in node.meta.items() if k == "stack_trace"}
        if new.op == "call_function" and new.target in _FAST_PATH_REFERENCES:
            new.target = _FAST_PATH_REFERENCES[new.target]
        env[node] = new
    frozen = fx.GraphModule(root, graph)
    if any(tile_op_name(n.target) for n in graph.nodes if n.op == "call_function"):
        frozen.tbn_plan = {}  # a converted (QAT) model: its float layers stay float
    return frozen


# --------------------------------------------------------------------------- config


def _owner_types(gm: fx.GraphModule) -> dict[tuple[str, ...], type]:
    """Module source path tokens -> module type, from TorchDynamo's nn_module_stack."""
    types: dict[tuple[str, ...], type] = {}
    for node in gm.graph.nodes:
        for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            tokens = source_tokens(path)
            if tokens is not None and isinstance(module_type, type):
                types[tokens] = module_type
    return types


def _matches(pattern: str, names: Iterable[str]) -> bool:
    import fnmatch

    return any(pattern == n or fnmatch.fnmatchcase(n, pattern) for n in names)


def graph_config(cfg: TBNConfig, gm: fx.GraphModule, slots: Sequence[Slot]) -> TBNConfig:
    """``cfg`` for one captured graph: ``exclude`` types become the names of this graph's
    layers owned by modules of those types (the compiled graph holds no user modules);
    in strict mode, patterns that name no layer of this graph are left out (another
    graph may hold it)."""
    weights = [s for s in slots if s.kind == "weight"]
    names = [layer_name(s.path) for s in weights]
    types = _owner_types(gm)
    exclude: list[str | type] = []
    for item in cfg.exclude:
        if isinstance(item, type):
            exclude += [
                layer_name(s.path)
                for s in weights
                if isinstance(types.get(s.owner), type) and issubclass(types[s.owner], item)
            ]
        elif not cfg.strict or _matches(item, names):
            exclude.append(item)
    layers = cfg.layers
    if cfg.strict:
        layers = {k: v for k, v in cfg.layers.items() if _matches(k, names)}
    return dataclasses.replace(cfg, exclude=tuple(dict.fromkeys(exclude)), layers=layers)


def _check_output_dtypes(gm: fx.GraphModule, outputs: Any) -> None:
    """TypeError when the compiled module's ``outputs`` have other dtypes than those
    TorchDynamo recorded for the graph (TVM promotes types where torch does not, e.g.
    by 0-d tensors)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    values = [n.meta.get("example_value") if isinstance(n, fx.Node) else n for n in leaves]
    expected = [v.dtype for v in values if isinstance(v, torch.Tensor)]
    got = [t.dtype for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if len(expected) == len(got) and expected != got:
        i = next(i for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g)
        raise TypeError(f"compiled output {i} is {got[i]} where torch gives {expected[i]}")


# --------------------------------------------------------------------------- the compiled graph


class TBNGraph:
    """The callable that TorchDynamo runs for one captured graph: compiled TBN modules,
    one per input shape, built from the weights seen at compile time (rebuilt when they
    change). The first compile (for the example inputs) happens in the constructor and
    raises on failure; a later one that fails runs that shape in PyTorch, with the
    warning (or raises, with ``fallback=False``)."""

    def __init__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: BackendOptions
    ) -> None:
        self.gm = gm
        self.options = options
        self.slots = graph_slots(gm, example_inputs)
        self.config = graph_config(options.config or TBNConfig(), gm, self.slots)
        self._lock = threading.Lock()
        self._weights = self._weight_state(example_inputs)
        key = self._key(example_inputs)
        self._runners: dict[tuple, Callable[[Sequence[Any]], Any]] = {
            key: self._compile(example_inputs)
        }

    def _weight_state(self, args: Sequence[Any]) -> list[tuple[torch.Tensor, int] | None]:
        return [
            (a, a._version) if s.kind == "weight" else None
            for s, a in zip(self.slots, args, strict=True)
        ]

    def _changed_weight(self, args: Sequence[Any]) -> str | None:
        """The path of the first weight replaced or written since compiling, or None."""
        for slot, seen, arg in zip(self.slots, self._weights, args, strict=True):
            if seen is not None and (arg is not seen[0] or arg._version != seen[1]):
                return slot.path
        return None

    def _key(self, args: Sequence[Any]) -> tuple:
        return tuple(
            (tuple(a.shape), a.dtype, a.device) if s.kind == "input" else size_value(a)
            for s, a in zip(self.slots, args, strict=True)
            if s.kind != "weight"
        )

    def _compile(self, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        """Compile the graph for the shapes, sizes and weights of ``args``; return a
        runner that takes the graph's full argument list."""
        pick = [s.kind for s in self.slots]
        weights = [a if k == "weight" else None for k, a in zip(pick, args, strict=True)]
        sizes = [size_value(a) if k == "size" else None for k, a in zip(pick, args, strict=True)]
        # copies: torch.export marks the dynamic dims of the tensors it is given, and
        # TorchDynamo's guards on the caller's tensors read those marks
        inputs = tuple(a.detach().clone() for k, a in zip(pick, args, strict=True) if k == "input")
        module = frozen_graph(self.gm, self.slots, weights, sizes)
        opts = self.options
        with torch._guards.tracing(None):  # outside TorchDynamo's fake-tensor context
            compiled = compile_model(
                module, inputs, opts.target, self.config, opts.tune, dynamic_batch=False
            )
            _check_output_dtypes(self.gm, compiled(*inputs))

        def run(call_args: Sequence[Any]) -> Any:
            return compiled(*(a for k, a in zip(pick, call_args, strict=True) if k == "input"))

        run.module = compiled  # type: ignore[attr-defined]
        return run

    def _compile_or_fallback(self, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        try:
            return self._compile(args)
        except Exception as exc:  # the graph still runs, in torch
            if not self.options.fallback:
                raise
            _fallback(self.gm, f"compiling it for {self._key(args)} failed: {_first_lines(exc)}")
            return lambda call_args: self.gm(*call_args)

    def _runner_for(self, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        key = self._key(args)
        runner = self._runners.get(key)
        if runner is None:
            with self._lock:
                runner = self._runners.get(key)
                if runner is None:
                    runner = self._runners[key] = self._compile_or_fallback(args)
        return runner

    @property
    def modules(self) -> list[Any]:
        """The compiled modules so far (one per input shape)."""
        return [r.module for r in self._runners.values() if hasattr(r, "module")]

    def __call__(self, *args: Any) -> Any:
        changed = self._changed_weight(args)
        if changed is not None:
            warnings.warn(
                f"tbn backend: weight {changed!r} changed since the graph was compiled; "
                "compiling it again",
                TBNFallbackWarning,
                stacklevel=2,
            )
            with self._lock:
                self._runners.clear()
                self._weights = self._weight_state(args)
        return self._runner_for(args)(args)


# --------------------------------------------------------------------------- entry point


def _fallback(gm: fx.GraphModule, reason: str) -> Callable[..., Any]:
    warnings.warn(
        f"tbn backend: a captured graph runs in PyTorch, not compiled: {reason}",
        TBNFallbackWarning,
        stacklevel=3,
    )
    return gm.forward


def _first_lines(error: BaseException, n: int = 4) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return " | ".join(line.strip() for line in text.splitlines()[:n] if line.strip())


def tbn_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """The ``"tbn"`` backend of ``torch.compile`` (see the module docstring)."""
    opts = BackendOptions.parse(options)
    try:
        slots = graph_slots(gm, example_inputs)
    except TypeError as exc:  # an input kind the compiled modules do not take
        reason: str | None = str(exc)
    else:
        reason = not_compiled_reason(gm, slots, example_inputs)
    if reason is not None:
        if not opts.fallback:
            raise RuntimeError(f"tbn backend cannot compile this graph: {reason}")
        return _fallback(gm, reason)
    try:
        return TBNGraph(gm, example_inputs, opts)
    except Exception as exc:  # any compile failure: the graph still runs, in torch
        if not opts.fallback:
            raise
        return _fallback(gm, f"compiling it failed: {_first_lines(exc)}")
