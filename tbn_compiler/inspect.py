"""Reports on rewritten graphs: a per-layer table, a dict, and a DOT rendering.

``inspect(gm)`` reads the tile ops in the graph (the source of truth for tiled
layers) and ``gm.meta["tbn_skipped"]`` (layers the rewrite kept dense, with why).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import networkx as nx
import torch.fx as fx
from tabulate import tabulate

from . import tiling
from .ops import tile_op_name
from .passes.patterns import get_attr_tensor
from .passes.rewrite import SkippedLayer, tile_op_layer_name

__all__ = ["LayerInfo", "Report", "inspect", "graph_to_networkx"]

FLOAT_BYTES = 4


@dataclass(frozen=True)
class LayerInfo:
    """One row of the report. Sizes in bytes; ``tbn_bytes`` counts packed tile words,
    4 bytes per alpha and the float32 bias; ``dense_bytes`` the float32 weight + bias."""

    name: str
    op: str
    shape: tuple[int, ...]
    numel: int
    p: int | None
    aligned: bool | None
    status: str  # "tiled" | "skipped"
    reason: str
    dense_bytes: int
    tbn_bytes: int
    uses: int = 1
    aliases: tuple[str, ...] = ()  # every name of a weight shared by several modules

    @property
    def label(self) -> str:
        """The name, followed by the layer's other names when its weight is shared."""
        others = [a for a in self.aliases if a != self.name]
        return f"{self.name} (= {', '.join(others)})" if others else self.name

    @property
    def bits_per_weight(self) -> float:
        return (
            8 * (self.tbn_bytes - self._bias_bytes) / self.numel if self.status == "tiled" else 32.0
        )

    @property
    def _bias_bytes(self) -> int:
        return self.dense_bytes - FLOAT_BYTES * self.numel


def _tiled_info(gm: fx.GraphModule, node: fx.Node) -> LayerInfo:
    op = tile_op_name(node.target)
    alphas = get_attr_tensor(gm, node.args[2].target)
    bias = node.args[3]
    bias_numel = (
        get_attr_tensor(gm, bias.target).numel()
        if isinstance(bias, fx.Node) and bias.op == "get_attr"
        else 0
    )
    meta = node.meta.get("tbn", {})
    if op == "tiled_linear":
        out_f, in_f = node.args[4], node.args[5]
        in_out = node.args[6] if len(node.args) > 6 else node.kwargs.get("weight_in_out", False)
        shape = (in_f, out_f) if in_out else (out_f, in_f)
        row = tiling.row_length(shape, in_out)
        label = "linear (in,out)" if in_out else "linear"
    else:
        shape = tuple(node.args[4])
        row = tiling.row_length(shape)
        label = op.removeprefix("tiled_")
    numel = 1
    for d in shape:
        numel *= int(d)
    p = alphas.numel()
    return LayerInfo(
        name=meta.get("name", tile_op_layer_name(node)),
        op=label,
        shape=tuple(int(d) for d in shape),
        numel=numel,
        p=p,
        aligned=tiling.is_aligned(numel, p, row),
        status="tiled",
        reason=f"{meta.get('source', 'tile op')}: {meta.get('reason', '')}".rstrip(": "),
        dense_bytes=FLOAT_BYTES * (numel + bias_numel),
        tbn_bytes=tiling.tbn_bytes(numel, p, bias_numel),
        aliases=tuple(meta.get("aliases", ())),
    )


def _skipped_info(s: SkippedLayer) -> LayerInfo:
    numel = 1
    for d in s.shape:
        numel *= int(d)
    dense = FLOAT_BYTES * numel
    return LayerInfo(
        s.name,
        s.op,
        s.shape,
        numel,
        None,
        None,
        "skipped",
        s.reason,
        dense,
        dense,
        aliases=tuple(s.aliases),
    )


@dataclass
class Report:
    """Per-layer view of a rewritten graph; ``str()`` is a table, see :meth:`to_dict`."""

    layers: list[LayerInfo]
    graph_module: fx.GraphModule

    @property
    def totals(self) -> dict[str, Any]:
        tiled = [r for r in self.layers if r.status == "tiled"]
        dense = sum(r.dense_bytes for r in self.layers)
        tbn = sum(r.tbn_bytes for r in self.layers)
        return {
            "layers": len(self.layers),
            "tiled": len(tiled),
            "skipped": len(self.layers) - len(tiled),
            "dense_bytes": dense,
            "tbn_bytes": tbn,
            "compression": dense / tbn if tbn else 1.0,
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": [one dict per row: the LayerInfo fields + bits_per_weight],
        "totals": ...}``, JSON-ready."""
        rows = []
        for r in self.layers:
            d = asdict(r)
            d["shape"] = list(r.shape)
            d["aliases"] = list(r.aliases)
            d["bits_per_weight"] = r.bits_per_weight
            rows.append(d)
        return {"layers": rows, "totals": self.totals}

    def __str__(self) -> str:
        rows = [
            [
                r.label,
                r.op,
                "x".join(map(str, r.shape)),
                r.p if r.p is not None else "-",
                {True: "yes", False: "no", None: "-"}[r.aligned],
                f"{r.bits_per_weight:.3f}",
                r.dense_bytes,
                r.tbn_bytes,
                r.uses,
                r.status if r.status == "tiled" else f"skipped: {r.reason}",
            ]
            for r in self.layers
        ]
        t = self.totals
        rows.append(
            [
                "TOTAL",
                "",
                "",
                "",
                "",
                "",
                t["dense_bytes"],
                t["tbn_bytes"],
                "",
                f"{t['tiled']} tiled, {t['skipped']} skipped, {t['compression']:.1f}x smaller",
            ]
        )
        headers = [
            "layer",
            "op",
            "weight",
            "p",
            "aligned",
            "bits/w",
            "dense B",
            "TBN B",
            "uses",
            "status",
        ]
        return tabulate(rows, headers=headers)

    def to_networkx(self) -> nx.DiGraph:
        return graph_to_networkx(self.graph_module)

    def to_dot(self) -> str:
        """Graphviz DOT text of the graph; tile ops are filled green with their layer name."""
        g = self.to_networkx()
        lines = ["digraph tbn {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
        for name, attrs in g.nodes(data=True):
            style = ', style=filled, fillcolor="#9be59b"' if attrs["tiled"] else ""
            lines.append(f'  "{name}" [label="{_escape(attrs["label"])}"{style}];')
        lines += [f'  "{a}" -> "{b}";' for a, b in g.edges()]
        lines.append("}")
        return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def graph_to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph (get_attr nodes left out); node attributes:
    ``label``, ``op``, ``tiled``."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        op = tile_op_name(node.target)
        if op:
            label = f"{op}\n{node.meta.get('tbn', {}).get('name', node.name)}"
        elif node.op in ("call_function", "call_method", "call_module"):
            label = f"{node.name}\n{getattr(node.target, '__name__', node.target)}"
        else:
            label = f"{node.op}: {node.name}"
        g.add_node(node.name, label=label, op=node.op, tiled=bool(op))
        for inp in node.all_input_nodes:
            if inp.op != "get_attr":
                g.add_edge(inp.name, node.name)
    return g


def _merge_uses(rows: Iterable[LayerInfo]) -> list[LayerInfo]:
    """One row per tiled layer name (a tile used by several calls counts once)."""
    out: dict[str, LayerInfo] = {}
    for r in rows:
        key = f"{r.status}:{r.name}"
        if key in out and r.status == "tiled":
            prev = out[key]
            out[key] = replace(prev, uses=prev.uses + 1)
        elif key not in out:
            out[key] = r
    return list(out.values())


def inspect(gm: fx.GraphModule) -> Report:
    """Build the per-layer :class:`Report` of a graph produced by ``rewrite``."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"inspect expects the fx.GraphModule returned by rewrite, got {type(gm).__name__}"
        )
    rows = [_tiled_info(gm, n) for n in gm.graph.nodes if tile_op_name(n.target)]
    rows += [_skipped_info(s) for s in gm.meta.get("tbn_skipped", [])]
    return Report(_merge_uses(rows), gm)
