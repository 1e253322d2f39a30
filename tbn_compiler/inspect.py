"""Reports on rewritten graphs: a per-layer table, a dict, a DOT rendering and an HTML page.

``inspect(gm)`` reads the tile ops in the graph (the source of truth for tiled
layers) and ``gm.meta["tbn_skipped"]`` (layers the rewrite kept dense, with why).
networkx (graphs) and matplotlib (the HTML page's chart) are imported only by the
methods that need them.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from tabulate import tabulate

from . import tiling
from .ops import tile_op_name
from .passes.patterns import get_attr_tensor
from .passes.rewrite import SkippedLayer, tile_op_layer_name

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["LayerInfo", "Report", "inspect", "graph_to_networkx"]

FLOAT_BYTES = 4
TABLE_HEADERS = (
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
)


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


def _skipped_info(gm: fx.GraphModule, s: SkippedLayer) -> LayerInfo:
    numel = 1
    for d in s.shape:
        numel *= int(d)
    dense = FLOAT_BYTES * (numel + _bias_numel(gm, s.name))
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


def _bias_numel(gm: fx.GraphModule, layer: str) -> int:
    """Elements of the parameter ``<layer>.bias`` of a layer kept dense (0 when the graph
    has none): the bias of the layer's module, as in the model."""
    try:
        return gm.get_parameter(f"{layer}.bias").numel()
    except AttributeError:
        return 0


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

    def table_rows(self) -> list[list[Any]]:
        """One row per layer, then the TOTAL row; the columns of :data:`TABLE_HEADERS`."""
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
        summary = f"{t['tiled']} tiled, {t['skipped']} skipped, {t['compression']:.1f}x smaller"
        rows.append(["TOTAL", "", "", "", "", "", t["dense_bytes"], t["tbn_bytes"], "", summary])
        return rows

    def __str__(self) -> str:
        return tabulate(self.table_rows(), headers=TABLE_HEADERS)

    def to_html(
        self,
        path: str | os.PathLike | None = None,
        memory: Mapping[str, Any] | None = None,
        title: str = "Tiled Bit Network report",
    ) -> str:
        """A standalone HTML page: the totals, a bar chart of dense vs TBN bytes per layer
        (a PNG drawn with matplotlib, embedded as base64), the per-layer table and, when
        ``memory`` is given (``cm.memory`` of a Cortex-M module), the flash and RAM split
        (weights, code, arena) against the board's limits. Writes it to ``path`` when
        given (its directory is created); returns the HTML text. Needs matplotlib
        (ImportError naming the package otherwise); ValueError for a ``memory`` dict
        without the sizes above."""
        memory_html = _memory_section(memory) if memory is not None else ""
        page = _html_page(self, title, _bytes_chart_png(self.layers), memory_html)
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(page, encoding="utf-8")
        return page

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
    import networkx as nx

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
    rows += [_skipped_info(gm, s) for s in gm.meta.get("tbn_skipped", [])]
    return Report(_merge_uses(rows), gm)


# --------------------------------------------------------------------------- HTML page

CHART_MAX_LAYERS = 40  # more rows make an unreadable chart: the largest layers are drawn

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em;
       color: #1f2933; max-width: 72em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border-bottom: 1px solid #d9dee3; padding: 0.3em 0.7em; text-align: left; }
th { white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.skipped td { color: #7b8794; }
tfoot td { font-weight: bold; border-top: 2px solid #9aa5b1; }
.bar { display: flex; width: 16em; height: 1.1em; background: #eef1f4; border: 1px solid #9aa5b1; }
.bar span { display: block; height: 100%; }
.weights { background: #2e9e5b; } .code { background: #3e7cb1; }
.arena { background: #d9822b; } .other { background: #9aa5b1; }
.over { color: #c62828; font-weight: bold; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em 0 0.9em; }
img { max-width: 100%; border: 1px solid #d9dee3; }
.note { color: #52606d; font-size: 0.9em; }
"""


def _html_page(report: Report, title: str, chart_png: str | None, memory_html: str) -> str:
    esc = html.escape
    if chart_png is None:
        chart = '<p class="note">No Linear or Conv layers: nothing to draw.</p>'
    else:
        n = len(report.layers)
        shown = "" if n <= CHART_MAX_LAYERS else f" (the {CHART_MAX_LAYERS} largest of {n})"
        chart = (
            f'<p class="note">Bytes of each layer\'s weights and bias, dense float32 vs '
            f"TBN (packed tile, alphas, bias), log scale{shown}.</p>\n"
            f'<img id="bytes-chart" alt="dense vs TBN bytes per layer" '
            f'src="data:image/png;base64,{chart_png}">'
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{esc(title)}</h1>
<section id="totals">
<h2>Totals</h2>
{_totals_table(report.totals)}
</section>
<section id="chart">
<h2>Dense vs TBN bytes per layer</h2>
{chart}
</section>
{memory_html}
<section id="layers">
<h2>Layers</h2>
{_layers_table(report)}
</section>
</body>
</html>
"""


def _totals_table(t: Mapping[str, Any]) -> str:
    rows = [
        ("layers", t["layers"]),
        ("tiled", t["tiled"]),
        ("skipped (kept dense)", t["skipped"]),
        ("dense bytes", t["dense_bytes"]),
        ("TBN bytes", t["tbn_bytes"]),
        ("compression", f"{t['compression']:.1f}x"),
    ]
    body = "\n".join(
        f'<tr><th>{label}</th><td class="num">{html.escape(str(v))}</td></tr>' for label, v in rows
    )
    return f'<table class="totals">\n{body}\n</table>'


_NUMERIC_COLUMNS = frozenset({"p", "bits/w", "dense B", "TBN B", "uses"})
_NUM_CLASS = ' class="num"'


def _layers_table(report: Report) -> str:
    def cells(row: list[Any], tag: str = "td") -> str:
        return "".join(
            f"<{tag}{_NUM_CLASS if h in _NUMERIC_COLUMNS else ''}>{html.escape(str(v))}</{tag}>"
            for h, v in zip(TABLE_HEADERS, row, strict=True)
        )

    *rows, total = report.table_rows()
    body = "\n".join(
        f'<tr class="{r.status}">{cells(row)}</tr>'
        for r, row in zip(report.layers, rows, strict=True)
    )
    head = cells(list(TABLE_HEADERS), "th")
    return (
        f'<table class="layers">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n'
        f"<tfoot><tr>{cells(total)}</tr></tfoot>\n</table>"
    )


def _bytes_chart_png(layers: list[LayerInfo]) -> str | None:
    """Base64 PNG of grouped horizontal bars (dense vs TBN bytes per layer, log scale), or
    None when there are no layers. Drawn on an Agg canvas: no pyplot, no global backend."""
    if not layers:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "Report.to_html draws its chart with matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from e
    shown = _largest_layers(layers, CHART_MAX_LAYERS)
    fig = Figure(figsize=(9, 1.4 + 0.42 * len(shown)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = range(len(shown))
    dense = [r.dense_bytes for r in shown]
    tbn = [r.tbn_bytes for r in shown]
    ax.barh([y - 0.2 for y in ys], dense, height=0.4, color="#9aa5b1", label="dense float32")
    ax.barh([y + 0.2 for y in ys], tbn, height=0.4, color="#2e9e5b", label="TBN")
    for y, d, t in zip(ys, dense, tbn, strict=True):
        ax.annotate(f" {d / t:.1f}x", (d, y - 0.2), va="center", fontsize=8, color="#52606d")
    ax.set_yticks(list(ys), [r.label for r in shown])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(dense) * 4)  # room for the ratio labels
    ax.set_xlabel("bytes (log scale)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="major", color="#e4e7eb")
    ax.set_axisbelow(True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _largest_layers(layers: list[LayerInfo], n: int) -> list[LayerInfo]:
    """The ``n`` layers with the most dense bytes, in report order."""
    if len(layers) <= n:
        return list(layers)
    keep = set(sorted(range(len(layers)), key=lambda i: -layers[i].dense_bytes)[:n])
    return [r for i, r in enumerate(layers) if i in keep]


_MEMORY_KEYS = ("weights_bytes", "code_bytes", "arena_bytes", "flash_bytes", "ram_bytes")


def memory_split(memory: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"flash": {...}, "ram": {...}}`` from ``cm.memory``: each with ``parts`` (name ->
    bytes; flash: weights, code, other; RAM: arena, other), ``used`` and ``limit`` (the
    board's bytes, or None for a library preset). ValueError naming missing sizes."""
    missing = [k for k in _MEMORY_KEYS if not isinstance(memory.get(k), int)]
    if missing:
        raise ValueError(
            f"memory must be the sizes of a Cortex-M module (cm.memory); missing {missing}"
        )
    weights, code, arena = memory["weights_bytes"], memory["code_bytes"], memory["arena_bytes"]
    flash, ram = memory["flash_bytes"], memory["ram_bytes"]
    return {
        "flash": {
            "parts": {"weights": weights, "code": code, "other": max(0, flash - weights - code)},
            "used": flash,
            "limit": memory.get("board_flash_bytes"),
        },
        "ram": {
            "parts": {"arena": arena, "other": max(0, ram - arena)},
            "used": ram,
            "limit": memory.get("board_ram_bytes"),
        },
    }


def _memory_section(memory: Mapping[str, Any]) -> str:
    split = memory_split(memory)
    rows = []
    for key, label in (("flash", "flash"), ("ram", "RAM")):
        m = split[key]
        used, limit = m["used"], m["limit"]
        parts = m["parts"]
        part_cells = "".join(
            f'<td class="num">{parts.get(p, "-")}</td>'
            for p in ("weights", "code", "arena", "other")
        )
        if limit:
            pct = 100 * used / limit
            fits = "" if used <= limit else ' class="over"'
            limit_cells = (
                f'<td class="num">{limit}</td><td class="num"><span{fits}>{pct:.2f}%</span></td>'
                f'<td class="num">{limit - used}</td>'
            )
        else:
            limit_cells = '<td colspan="3">no board limit (library preset)</td>'
        rows.append(
            f'<tr id="memory-{key}"><th>{label}</th>{part_cells}<td class="num">{used}</td>'
            f"{limit_cells}<td>{_memory_bar(parts, limit or used)}</td></tr>"
        )
    firmware = ""
    if "firmware_flash_bytes" in memory:
        firmware = (
            f'<p class="note">The whole firmware image of the emulated board, QEMU harness '
            f"and C library included: {memory['firmware_flash_bytes']} bytes of flash, "
            f"{memory.get('firmware_ram_bytes', '?')} bytes of RAM.</p>"
        )
    head = "".join(
        f'<th class="num">{h}</th>'
        for h in ("weights", "code", "arena", "other", "used", "board", "used %", "free")
    )
    return f"""<section id="memory">
<h2>Flash and RAM</h2>
<p class="note">Bytes of the model library from the real build (arm-none-eabi-size):
flash holds the code and the weights (const), RAM the static arena of activations;
the stack is not counted. Bars are drawn against the board's memory:
<span class="swatch weights"></span>weights <span class="swatch code"></span>code
<span class="swatch arena"></span>arena <span class="swatch other"></span>other.</p>
<table class="memory">
<thead><tr><th>memory</th>{head}<th>share of the board</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
{firmware}
</section>"""


def _memory_bar(parts: Mapping[str, int], whole: int) -> str:
    spans = "".join(
        f'<span class="{name}" title="{name}: {size} bytes" '
        f'style="width: {100 * size / whole:.3f}%; min-width: {1 if size else 0}px"></span>'
        for name, size in parts.items()
    )
    return f'<div class="bar">{spans}</div>'
