"""One tiling decision per weight, the same for :func:`~.prepare.prepare` and the
rewrite pass."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import LayerPlan, TBNConfig

__all__ = ["plan_weight"]


def plan_weight(
    cfg: TBNConfig,
    names: Sequence[str],
    numel: int,
    module_types: type | tuple[type, ...] | None,
    is_first: bool,
    is_last: bool,
    detail: str,
    unsupported: str | None = None,
) -> LayerPlan:
    """The plan of one weight of ``numel`` elements, known by ``names`` (the first is
    the layer's name, the others its aliases when the weight is shared).

    In order: ``unsupported`` (why the tile op cannot compute one of its layers) keeps
    it dense; then ``cfg``'s rules decide p; then p must divide ``numel`` (else dense
    with the reason, or in strict mode a ValueError naming the layer and ``detail``)."""
    if unsupported:
        return LayerPlan(None, unsupported)
    name = names[0]
    plan = cfg.plan_layer(name, numel, module_types, is_first, is_last, aliases=tuple(names))
    return cfg.divisible(plan, name, numel, detail)
