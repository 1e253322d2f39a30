"""TBNConfig: which layers get tiled, with which p.

Rules are resolved per layer by :meth:`TBNConfig.plan_layer`, in this order:

1. ``exclude`` (names, glob patterns or module types) -> kept dense.
2. ``layers``: the first entry whose key matches the layer name exactly, else the first
   glob match; its value is that layer's ``p`` (``None`` keeps it dense).
3. ``keep_first`` / ``keep_last`` -> the first / last eligible layer is kept dense.
4. Otherwise ``p`` for layers with at least ``min_numel`` weights, else ``p = 1``
   (plain binary weights with one scale, as in the paper).

Layer names are module paths as in ``model.named_modules()`` (``"encoder.layers.0.linear1"``);
a weight used through a functional call is named by its parameter path minus ``.weight``.
A weight shared by several modules (tied weights) has one name per module; rules match
any of them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .tiling import ALPHA_MODES


@dataclass(frozen=True)
class LayerPlan:
    """Decision for one layer: ``p`` (None = keep dense) and a human-readable reason."""

    p: int | None
    reason: str


@dataclass
class TBNConfig:
    """Configuration of tiling.

    p: global compression factor (tile reused p times), >= 1.
    min_numel: layers with fewer weights use p = 1 (binary, one alpha).
    layers: exact name or glob -> p for that layer, or None to keep it dense.
    exclude: names, globs or ``nn.Module`` subclasses kept dense (one string is one
        pattern). A type matches layers whose weight belongs to a module of that type.
    keep_first / keep_last: keep the first / last eligible layer (graph order) dense.
    alpha: "per_tile" (p scales from the weight chunks) or "single" (one scale).
    strict: False skips layers whose size is not divisible by p (with a reason);
        True raises instead, and also raises for ``layers``/``exclude`` patterns
        that match no layer.
    """

    p: int = 4
    min_numel: int = 64_000
    layers: Mapping[str, int | None] = field(default_factory=dict)
    exclude: Iterable[str | type] = ()
    keep_first: bool = False
    keep_last: bool = False
    alpha: str = "per_tile"
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise TypeError(
                "TBNConfig.layers must map layer names or globs to p, e.g. {'fc': 2}, "
                f"got {type(self.layers).__name__} {self.layers!r}"
            )
        self.layers = dict(self.layers)
        # a single name, glob or type is one entry, not a sequence of letters
        single = isinstance(self.exclude, (str, type))
        self.exclude = (self.exclude,) if single else tuple(self.exclude)
        _check_p(self.p, "TBNConfig.p")
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"TBNConfig.min_numel must be an int >= 0, got {self.min_numel!r}")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"TBNConfig.alpha must be one of {ALPHA_MODES}, got {self.alpha!r}")
        for key, value in self.layers.items():
            if not isinstance(key, str):
                raise TypeError(f"TBNConfig.layers keys must be names or globs, got {key!r}")
            if value is not None:
                _check_p(value, f"TBNConfig.layers[{key!r}]")
        for item in self.exclude:
            if not isinstance(item, (str, type)):
                raise TypeError(
                    f"TBNConfig.exclude entries must be names, globs or module types, got {item!r}"
                )

    # ------------------------------------------------------------------ per layer

    def excluded(
        self,
        name: str,
        module_type: type | tuple[type, ...] | None,
        aliases: Sequence[str] = (),
    ) -> str | None:
        """The exclude entry that matches this layer (under ``name`` or any of its
        ``aliases``: the other names of a shared weight; by the type of any module
        that owns the weight), as text, or None."""
        names = _all_names(name, aliases)
        types = module_type if isinstance(module_type, tuple) else (module_type,)
        for item in self.exclude:
            if isinstance(item, str) and any(_name_matches(item, n) for n in names):
                return item
            if isinstance(item, type) and any(t is not None and issubclass(t, item) for t in types):
                return item.__name__
        return None

    def layer_rule(self, name: str, aliases: Sequence[str] = ()) -> tuple[str, int | None] | None:
        """The ``layers`` entry for this layer, or None: an exact match of ``name`` or an
        alias first, then the first glob that matches one of them."""
        names = _all_names(name, aliases)
        for n in names:
            if n in self.layers:
                return n, self.layers[n]
        for pattern, value in self.layers.items():
            if any(_name_matches(pattern, n) for n in names):
                return pattern, value
        return None

    def plan_layer(
        self,
        name: str,
        numel: int,
        module_type: type | tuple[type, ...] | None = None,
        is_first: bool = False,
        is_last: bool = False,
        aliases: Sequence[str] = (),
    ) -> LayerPlan:
        """Decide p for one eligible layer (divisibility is checked by the caller).
        ``aliases`` are the layer's other names (a weight shared by several modules):
        ``exclude`` and ``layers`` rules apply to every one of them."""
        hit = self.excluded(name, module_type, aliases)
        if hit is not None:
            return LayerPlan(None, f"excluded by {hit!r}")
        rule = self.layer_rule(name, aliases)
        if rule is not None:
            pattern, p = rule
            if p is None:
                return LayerPlan(None, f"kept dense by layers[{pattern!r}]")
            return LayerPlan(p, f"layers[{pattern!r}]")
        if is_first and self.keep_first:
            return LayerPlan(None, "first layer kept dense (keep_first)")
        if is_last and self.keep_last:
            return LayerPlan(None, "last layer kept dense (keep_last)")
        if numel < self.min_numel:
            return LayerPlan(1, f"{numel} < min_numel={self.min_numel}: binary, p=1")
        return LayerPlan(self.p, "global p")

    def divisible(self, plan: LayerPlan, name: str, numel: int, detail: str = "") -> LayerPlan:
        """``plan`` when its ``p`` divides the layer's ``numel`` weights (or it keeps the
        layer dense); else the layer is kept dense with the reason, or, in strict mode, a
        ValueError naming the layer (``detail``: e.g. its op and weight shape) is raised."""
        if plan.p is None or numel % plan.p == 0:
            return plan
        if self.strict:
            where = f" ({detail})" if detail else ""
            raise ValueError(
                f"layer {name!r}{where}: {numel} weights not divisible by p={plan.p}; set a p "
                "that divides it in TBNConfig.layers or exclude the layer"
            )
        return LayerPlan(None, f"{numel} weights not divisible by p={plan.p}")

    def check_patterns_used(self, names: Iterable[str]) -> None:
        """In strict mode, raise if a ``layers``/``exclude`` name or glob matches no layer."""
        if not self.strict:
            return
        names = list(names)
        patterns = list(self.layers) + [e for e in self.exclude if isinstance(e, str)]
        unused = [pat for pat in patterns if not any(_name_matches(pat, n) for n in names)]
        if unused:
            raise ValueError(
                f"TBNConfig patterns match no eligible layer: {unused}. "
                f"Eligible layers are: {names}"
            )


def _check_p(p: object, what: str) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"{what} must be an int >= 1, got {p!r}")


def _all_names(name: str, aliases: Sequence[str]) -> list[str]:
    return [name, *(a for a in aliases if a != name)]


def _name_matches(pattern: str, name: str) -> bool:
    return pattern == name or fnmatch.fnmatchcase(name, pattern)
