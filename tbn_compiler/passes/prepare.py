"""prepare: float layers -> trainable tiled (QAT) layers, following the tile-op records.

The first half of the prepare/convert split (:mod:`.convert` is the second): every
module of a record's float types becomes that record's QAT type, with p planned per
layer (:func:`.plan.plan_weight`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..config import LayerPlan, TBNConfig
from ..nn import TiledLayer, TiledMultiheadAttention, mha_unsupported, weight_owners
from ..tile_ops import tile_op_for_module
from .plan import plan_weight

__all__ = ["prepare"]


def prepare(model: nn.Module, cfg: TBNConfig | None = None) -> nn.Module:
    """Return a copy of ``model`` with eligible ``nn.Linear`` / ``nn.Conv1d`` /
    ``nn.Conv2d`` (the float types of the registered tile ops) replaced by trainable
    tiled layers; ``model`` is not modified.

    "First"/"last" (``keep_first``/``keep_last``) follow module registration order.
    Layers that share a weight ``Parameter`` share their ``scores``/``weight`` after
    preparation too. The decisions are kept in ``model.tbn_plan`` (name -> LayerPlan).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    if cfg is not None and not isinstance(cfg, TBNConfig):
        raise TypeError(f"cfg must be a TBNConfig, got {type(cfg).__name__}")
    cfg = cfg or TBNConfig()
    model = _with_projected_attention(copy.deepcopy(model))
    candidates = [(n, m) for n, m in model.named_modules() if tile_op_for_module(m) is not None]
    direct = _weights_read_by_parent(model)
    owners = weight_owners(model)
    aliases = {n: owners[f"{n}.weight" if n else "weight"].layer_names for n, _ in candidates}
    cfg.check_patterns_used(a for n, _ in candidates for a in aliases[n])
    plans: dict[str, LayerPlan] = {}
    # weight id -> (the weight, its tiled layer): the weight is kept so that its id cannot
    # be reused by another tensor while this runs
    shared: dict[int, tuple[torch.Tensor, TiledLayer]] = {}
    for i, (name, module) in enumerate(candidates):
        plan = _plan_module(cfg, name, module, i == 0, i == len(candidates) - 1, aliases[name])
        if name in direct:
            plan = LayerPlan(
                None,
                f"its weight is read directly by {direct[name]}, not through "
                "its forward(); kept float",
            )
        weight = module.weight
        source = shared[id(weight)][1] if id(weight) in shared else None
        if plan.p is not None and source is not None and source.p != plan.p:
            plan = LayerPlan(source.p, f"shares its weight with a layer tiled at p={source.p}")
        plans[name] = plan
        if plan.p is None:
            continue
        qat_type = tile_op_for_module(module).qat_type
        tiled = qat_type.from_float(module, plan.p, cfg.alpha)
        if source is not None:
            tiled.scores, tiled.weight = source.scores, source.weight
        else:
            shared[id(weight)] = (weight, tiled)
        if name:
            _set_submodule(model, name, tiled)
        else:  # the model is itself a single layer
            model = tiled
    model.tbn_plan = plans
    return model


def _plan_module(
    cfg: TBNConfig,
    name: str,
    module: nn.Module,
    is_first: bool,
    is_last: bool,
    aliases: tuple[str, ...],
) -> LayerPlan:
    """The plan of one float layer module; ``aliases``: the other layer names of its
    weight when it is shared."""
    _, unsupported = tile_op_for_module(module).module_attrs(module)
    return plan_weight(
        cfg,
        (name, *(a for a in aliases if a != name)),
        module.weight.numel(),
        type(module),
        is_first,
        is_last,
        f"{type(module).__name__}, weight {tuple(module.weight.shape)}",
        unsupported,
    )


def _weights_read_by_parent(model: nn.Module) -> dict[str, str]:
    """Layers whose parent uses their ``.weight`` without calling them (the
    ``out_proj`` of an ``nn.MultiheadAttention`` that could not be swapped):
    replacing them would change nothing."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not isinstance(
            module, TiledMultiheadAttention
        ):
            prefix = f"{name}." if name else ""
            out[f"{prefix}out_proj"] = f"nn.MultiheadAttention ({mha_unsupported(module)})"
    return out


def _with_projected_attention(model: nn.Module) -> nn.Module:
    """``model`` with every supported ``nn.MultiheadAttention`` swapped for a
    :class:`TiledMultiheadAttention` (in place), and the nested-tensor fast path of
    the ``nn.TransformerEncoder`` s holding one turned off (it would hand the attention
    nested tensors)."""
    if isinstance(model, nn.MultiheadAttention) and mha_unsupported(model) is None:
        if not isinstance(model, TiledMultiheadAttention):
            return TiledMultiheadAttention.from_float(model)
        return model
    for name, module in list(model.named_modules()):
        if (
            name
            and isinstance(module, nn.MultiheadAttention)
            and not isinstance(module, TiledMultiheadAttention)
            and mha_unsupported(module) is None
        ):
            _set_submodule(model, name, TiledMultiheadAttention.from_float(module, name))
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, TiledMultiheadAttention) for m in module.modules()
        ):
            module.use_nested_tensor = False
    return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)
