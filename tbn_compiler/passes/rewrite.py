"""The tile-rewrite pass and :func:`rewrite`, the front half of the data path.

``tile_layers(gm, cfg)`` is a plain composable fx pass: it finds tileable layers
(:mod:`.patterns`), plans ``p`` per layer (:class:`~tbn_compiler.config.TBNConfig`),
replaces each by a ``torch.ops.tbn.tiled_*`` call on packed buffers, and deletes the
float weights it made unused. Decisions are kept for :mod:`tbn_compiler.inspect`:
``node.meta["tbn"]`` on every tile op and ``gm.meta["tbn_skipped"]`` for layers kept
dense, each with a reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .. import tiling
from ..capture import capture
from ..config import LayerPlan, TBNConfig
from ..nn import WeightOwners, weight_owners
from ..ops import tile_op_name
from ..tile_ops import LayerMatch, float_layer_types, get_attr_tensor
from .convert import convert
from .patterns import dense_layer, match_node
from .plan import plan_weight

__all__ = [
    "SkippedLayer",
    "WeightOwners",
    "matches_in",
    "rewrite",
    "tile_layers",
    "tile_op_layer_name",
    "weight_owners",
]


@dataclass(frozen=True)
class SkippedLayer:
    """An eligible-looking layer kept dense, and why. ``aliases``: every name of the
    layer when its weight is shared by several modules (tied weights), else empty."""

    name: str
    op: str
    shape: tuple[int, ...]
    reason: str
    aliases: tuple[str, ...] = ()


@dataclass
class _Tiled:
    """Buffers created for one weight tensor (shared by every use of it)."""

    tile: str
    alphas: str
    p: int
    name: str


def _owner_and_leaf(path: str) -> tuple[str, str]:
    owner, _, leaf = path.rpartition(".")
    return owner, leaf


def _free_attr(module: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _register_tile_buffers(
    gm: fx.GraphModule, match: LayerMatch, packed: tiling.PackedTile
) -> tuple[str, str]:
    """Store tile and alphas next to the weight; return their attribute paths."""
    owner_path, leaf = _owner_and_leaf(match.weight)
    owner = gm.get_submodule(owner_path) if owner_path else gm
    stem = "" if leaf == "weight" else f"{leaf}_"
    tile_attr = _free_attr(owner, f"{stem}tile")
    owner.register_buffer(tile_attr, packed.words)
    alphas_attr = _free_attr(owner, f"{stem}alphas")
    owner.register_buffer(alphas_attr, packed.alphas)
    prefix = f"{owner_path}." if owner_path else ""
    return prefix + tile_attr, prefix + alphas_attr


TensorAt = Callable[[str], torch.Tensor | None]
"""The tensor at an attribute path of the graph module (:func:`_tensors_by_path`)."""


def _tensors_by_path(gm: fx.GraphModule) -> TensorAt:
    """:func:`get_attr_tensor` of ``gm`` returning one object per path for as long as the
    function lives. The rewrite tells weights apart by ``id``: a parametrized weight
    (``weight_norm``, ...) is computed anew at every access, so its id would change from
    one access to the next, or be reused by another tensor."""
    seen: dict[str, torch.Tensor | None] = {}

    def tensor_at(path: str) -> torch.Tensor | None:
        if path not in seen:
            seen[path] = get_attr_tensor(gm, path)
        return seen[path]

    return tensor_at


def _ineligible_uses(
    gm: fx.GraphModule, matches: list[LayerMatch], tensor_at: TensorAt
) -> dict[int, str]:
    """Weight tensors (by id) that something other than a matched layer also reads,
    mapped to a description of that use."""
    matched_nodes = {m.node for m in matches}
    weight_nodes = {n for m in matches for n in m.weight_nodes}
    other: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = tensor_at(node.target)
        if tensor is None:
            continue
        for user in node.users:
            if user in matched_nodes or user in weight_nodes:
                continue
            other.setdefault(id(tensor), f"{user.name} ({user.target})")
    return other


def _layer_shape(gm: fx.GraphModule, match: LayerMatch) -> tuple[int, ...]:
    return tuple(get_attr_tensor(gm, match.weight).shape)


def _plan(
    cfg: TBNConfig,
    gm: fx.GraphModule,
    match: LayerMatch,
    owners: WeightOwners,
    shared_use: str | None,
    unsupported: str | None,
    is_first: bool,
    is_last: bool,
) -> LayerPlan:
    """One decision for a weight tensor, over every call that uses it: ``unsupported``
    is the reason of a call the tile ops cannot compute, ``shared_use`` a use of the
    weight by something that is not a layer, ``is_first``/``is_last`` whether one of its
    calls is the first/last layer of the graph."""
    weight = get_attr_tensor(gm, match.weight)
    if shared_use and not unsupported:
        unsupported = (
            f"weight also used by {shared_use}, which is not a linear/conv layer; kept dense"
        )
    return plan_weight(
        cfg,
        owners.layer_names,
        weight.numel(),
        owners.module_types or match.module_type,
        is_first,
        is_last,
        f"{match.op}, weight {tuple(weight.shape)}",
        unsupported,
    )


def _emit_tile_op(gm: fx.GraphModule, match: LayerMatch, tiled: _Tiled) -> fx.Node:
    """Insert the record's tile op for ``match`` before its node, on the tile buffers."""
    graph, node, record = gm.graph, match.node, match.record
    with graph.inserting_before(node):
        tile = graph.get_attr(tiled.tile)
        alphas = graph.get_attr(tiled.alphas)
        bias = graph.get_attr(match.bias) if isinstance(match.bias, str) else match.bias
        args = record.op_args(_layer_shape(gm, match), match.attrs)
        new = graph.call_function(record.op.default, (match.input, tile, alphas, bias, *args))
    new.meta.update(
        {k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")}
    )
    return new


def _drop_unused_weights(gm: fx.GraphModule, tensor_ids: set[int]) -> None:
    """Delete tiled float weights no node refers to any more, under every name they
    have (tied parameters are aliases), and replace layer modules no longer called."""
    gm.graph.eliminate_dead_code()
    used_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    named = [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]
    for path in [path for path, t in named if id(t) in tensor_ids and path not in used_attrs]:
        owner_path, leaf = _owner_and_leaf(path)
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if (
            isinstance(owner, float_layer_types())
            and leaf == "weight"
            and owner_path not in used_modules
        ):
            _replace_layer_module(gm, owner_path, owner)
        elif hasattr(owner, leaf):
            delattr(owner, leaf)


def _replace_layer_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Swap a replaced float layer module for a plain holder of its tile buffers and bias."""
    holder = nn.Module()
    for name, buf in module.named_buffers(recurse=False):
        holder.register_buffer(name, buf)
    if module.bias is not None:
        holder.register_buffer("bias", module.bias.detach())
    owner_path, leaf = _owner_and_leaf(path)
    setattr(gm.get_submodule(owner_path) if owner_path else gm, leaf, holder)


def tile_layers(
    gm: fx.GraphModule,
    cfg: TBNConfig,
    keep_dense: Mapping[str, str] | None = None,
    tile_float: bool = True,
) -> fx.GraphModule:
    """Rewrite every eligible float layer of ``gm`` into a tile op, in place; return ``gm``.

    ``keep_dense`` maps layer names to a reason for keeping them dense whatever ``cfg``
    says. With ``tile_float=False`` no float layer is tiled (each is reported with
    why): used for prepared models, whose float layers are float on purpose. Existing
    tile ops (from a converted QAT model) are kept and counted as layers for
    ``keep_first`` / ``keep_last``."""
    keep_dense = dict(keep_dense or {})
    owners_by_path: Mapping[str, WeightOwners] = gm.meta.get("tbn_weight_owners") or {}
    matches = matches_in(gm)

    def owners_of(match: LayerMatch) -> WeightOwners:
        return owners_by_path.get(match.weight) or WeightOwners((match.weight,), match.module_type)

    if not tile_float:
        for m in matches:
            keep_dense.setdefault(owners_of(m).layer_names[0], "left float by prepare()")
    nodes = list(gm.graph.nodes)
    layer_nodes = [n for n in nodes if tile_op_name(n.target)] + [m.node for m in matches]
    order = {n: i for i, n in enumerate(nodes)}
    layer_nodes.sort(key=order.__getitem__)
    first = layer_nodes[0] if layer_nodes else None
    last = layer_nodes[-1] if layer_nodes else None
    cfg.check_patterns_used(
        [name for m in matches for name in owners_of(m).layer_names]
        + [tile_op_layer_name(n) for n in layer_nodes if tile_op_name(n.target)]
    )
    tensor_at = _tensors_by_path(gm)
    other_uses = _ineligible_uses(gm, matches, tensor_at)
    tiled_by_tensor: dict[int, _Tiled] = {}
    skipped: list[SkippedLayer] = list(gm.meta.get("tbn_skipped", []))
    layer_set = set(layer_nodes)
    skipped += [
        SkippedLayer(d.name, d.op, d.shape, d.reason)
        for d in (dense_layer(gm, n) for n in nodes if n not in layer_set)
        if d is not None
    ]
    calls = _calls_by_weight(matches, tensor_at)
    first_weight = _weight_key(first, matches, tensor_at)
    last_weight = _weight_key(last, matches, tensor_at)
    dense_weights: set[int] = set()
    done_weights: set[int] = set()
    for planned in matches:
        # Match again at rewrite time: an earlier replacement may have erased the node
        # this layer reads (a tiled layer feeding a tiled layer), and replace_all_uses_with
        # has already pointed this node's arguments at its replacement.
        match = match_node(gm, planned.node) or planned
        weight = tensor_at(match.weight)
        owners = owners_of(match)
        names = owners.layer_names
        aliases = names if len(names) > 1 else ()
        key = id(weight)
        tiled = tiled_by_tensor.get(key)
        if key in dense_weights:  # one decision per weight: every call stays dense
            continue
        dense_reason = next((keep_dense[n] for n in names if n in keep_dense), None)
        if tiled is None and dense_reason is not None:
            skipped.append(
                SkippedLayer(names[0], match.op, tuple(weight.shape), dense_reason, aliases)
            )
            dense_weights.add(key)
            continue
        if tiled is None:
            plan = _plan(
                cfg,
                gm,
                match,
                owners,
                other_uses.get(key),
                next((c.unsupported for c in calls[key] if c.unsupported), None),
                key == first_weight,
                key == last_weight,
            )
            if plan.p is None:
                skipped.append(
                    SkippedLayer(names[0], match.op, tuple(weight.shape), plan.reason, aliases)
                )
                dense_weights.add(key)
                continue
            packed = tiling.tile_weight(weight, weight, plan.p, cfg.alpha)
            tile_path, alphas_path = _register_tile_buffers(gm, match, packed)
            tiled = tiled_by_tensor[key] = _Tiled(tile_path, alphas_path, plan.p, names[0])
            reason = plan.reason
        else:
            reason = f"shares the tile of {tiled.name!r}"
        new = _emit_tile_op(gm, match, tiled)
        new.meta["tbn"] = {
            "name": tiled.name,
            "aliases": aliases,
            "source": "post-training",
            "reason": reason,
            "weight_in_out": match.weight_in_out,
        }
        match.node.replace_all_uses_with(new)
        gm.graph.erase_node(match.node)
        done_weights.add(key)
    _drop_unused_weights(gm, done_weights)
    gm.meta["tbn_skipped"] = skipped
    gm.graph.lint()
    gm.recompile()
    return gm


def _calls_by_weight(matches: list[LayerMatch], tensor_at: TensorAt) -> dict[int, list[LayerMatch]]:
    """id(weight tensor) -> every matched call that uses it (a module called several
    times, tied weights), in graph order."""
    calls: dict[int, list[LayerMatch]] = {}
    for m in matches:
        calls.setdefault(id(tensor_at(m.weight)), []).append(m)
    return calls


def _weight_key(node: fx.Node | None, matches: list[LayerMatch], tensor_at: TensorAt) -> int | None:
    """id of the weight tensor a matched layer node uses; None for other nodes."""
    match = next((m for m in matches if m.node is node), None)
    return None if match is None else id(tensor_at(match.weight))


def matches_in(gm: fx.GraphModule) -> list[LayerMatch]:
    """Every tileable layer use in ``gm``, in graph order."""
    return [m for m in (match_node(gm, n) for n in gm.graph.nodes) if m is not None]


def tile_op_layer_name(node: fx.Node) -> str:
    """Layer name of a tile-op node: the path of its tile buffer minus ``.tile``."""
    tile = node.args[1]
    path = tile.target if isinstance(tile, fx.Node) and tile.op == "get_attr" else node.name
    owner, leaf = _owner_and_leaf(path)
    return owner if leaf == "tile" and owner else path


def _mark_converted_ops(gm: fx.GraphModule) -> None:
    """Tag tile ops that came from converted QAT layers for the inspect report."""
    for node in gm.graph.nodes:
        if tile_op_name(node.target) and "tbn" not in node.meta:
            node.meta["tbn"] = {
                "name": tile_op_layer_name(node),
                "source": "QAT",
                "reason": "prepared",
            }


def rewrite(
    model: nn.Module,
    example_inputs: Any,
    cfg: TBNConfig | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Capture ``model`` (in eval mode) and rewrite its eligible layers into tile ops.

    ``model`` may be a float model (post-training tiling) or the result of
    :func:`tbn_compiler.prepare`: then its learned tiles are used exactly and every
    other layer stays float, so the graph computes what the prepared model does. The model is
    not modified. Returns a GraphModule that runs in PyTorch; its ``state_dict`` holds
    packed tiles, alphas and biases in place of the float weights of tiled layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"rewrite expects a torch.nn.Module, got {_describe(model)}; wrap a plain "
            "function in an nn.Module whose forward() calls it"
        )
    if cfg is not None and not isinstance(cfg, TBNConfig):
        raise TypeError(f"cfg must be a TBNConfig, got {type(cfg).__name__}")
    cfg = cfg or TBNConfig()
    prepared_plan: Mapping[str, LayerPlan] | None = getattr(model, "tbn_plan", None)
    keep_dense = {
        n: f"{plan.reason} (prepare)" for n, plan in (prepared_plan or {}).items() if plan.p is None
    }
    model = convert(copy.deepcopy(model).eval(), inplace=True)
    gm = capture(model, example_inputs, example_kwargs)
    gm.meta["tbn_weight_owners"] = weight_owners(model)
    _mark_converted_ops(gm)
    return tile_layers(gm, cfg, keep_dense, tile_float=prepared_plan is None)


def _describe(obj: Any) -> str:
    name = getattr(obj, "__name__", None)
    kind = type(obj).__name__
    return f"{kind} {name!r}" if name else kind
