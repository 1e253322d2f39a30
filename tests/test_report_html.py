"""Report.to_html: the page's tables, chart and memory split against independent numbers.

Layer sizes are recomputed here from the model's parameters (float32 weight + bias for
dense bytes; packed tile words, 4 bytes per alpha and the bias for TBN bytes), not read
from the report; the page is parsed with html.parser."""

from __future__ import annotations

import base64
import io
import math
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from models import ResidualCNN
from torch import nn

import tbn_compiler as tbn

P = 4
TBN_GREEN = (0x2E, 0x9E, 0x5B)


class PageParser(HTMLParser):
    """Collects the rows of every table (by its class) and every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.row_ids: dict[str, list[str]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("class", "")
            self.tables[self._table] = []
            self.row_ids[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
            self.row_ids[self._table].append(a.get("id", ""))
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def expected_sizes(model: nn.Module, p_of: dict[str, int | None]) -> dict[str, tuple[int, int]]:
    """Layer name -> (dense bytes, TBN bytes) from the parameters (p None: kept dense)."""
    sizes = {}
    for name, module in model.named_modules():
        if name not in p_of:
            continue
        numel = module.weight.numel()
        bias = module.bias.numel() if module.bias is not None else 0
        dense = 4 * (numel + bias)
        p = p_of[name]
        tbn_b = dense if p is None else 4 * math.ceil(numel // p / 32) + 4 * p + 4 * bias
        sizes[name] = (dense, tbn_b)
    return sizes


@pytest.fixture(scope="module")
def cnn_report():
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    gm = tbn.rewrite(
        model, torch.randn(2, 3, 16, 16), tbn.TBNConfig(p=P, min_numel=0, exclude=["fc"])
    )
    p_of = {"stem": P, "conv1": P, "conv2": P, "down": P, "fc": None}
    return tbn.inspect(gm), expected_sizes(model, p_of)


def test_layer_table_and_totals_match_the_parameters(cnn_report, tmp_path):
    report, sizes = cnn_report
    path = tmp_path / "sub" / "report.html"
    page = report.to_html(path, title="ResidualCNN <p=4>")
    assert path.read_text(encoding="utf-8") == page
    assert "<title>ResidualCNN &lt;p=4&gt;</title>" in page
    parsed = parse(page)
    header, *rows, total = parsed.tables["layers"]
    col = {h: i for i, h in enumerate(header)}
    got = {r[col["layer"]]: (int(r[col["dense B"]]), int(r[col["TBN B"]])) for r in rows}
    assert got == sizes
    skipped = next(r for r in rows if r[col["layer"]] == "fc")
    assert skipped[col["status"]].startswith("skipped: excluded")
    dense_total = sum(d for d, _ in sizes.values())
    tbn_total = sum(t for _, t in sizes.values())
    assert total[col["layer"]] == "TOTAL"
    assert (int(total[col["dense B"]]), int(total[col["TBN B"]])) == (dense_total, tbn_total)
    totals = dict(parsed.tables["totals"])
    assert int(totals["dense bytes"]) == dense_total
    assert int(totals["TBN bytes"]) == tbn_total
    assert (int(totals["tiled"]), int(totals["skipped (kept dense)"])) == (4, 1)
    assert totals["compression"] == f"{dense_total / tbn_total:.1f}x"
    assert "memory" not in parsed.tables  # no memory dict: no flash/RAM section


def test_chart_is_an_embedded_png_that_draws_the_bars(cnn_report):
    report, _ = cnn_report
    images = parse(report.to_html()).images
    assert len(images) == 1
    prefix = "data:image/png;base64,"
    assert images[0].startswith(prefix)
    png = base64.b64decode(images[0][len(prefix) :], validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    height, width = pixels.shape[:2]
    assert width >= 600 and height >= 300
    rgb = np.round(pixels[..., :3] * 255).astype(int)
    green = np.all(np.abs(rgb - np.array(TBN_GREEN)) <= 2, axis=-1)
    assert green.sum() > 500  # the TBN bars (and the legend patch) are drawn


def test_memory_split_against_the_board_limits(cnn_report):
    report, _ = cnn_report
    memory = {
        "weights_bytes": 1500,
        "code_bytes": 3000,
        "arena_bytes": 2048,
        "flash_bytes": 4700,  # 200 bytes of other constants and data
        "ram_bytes": 2100,
        "board_flash_bytes": 8192,
        "board_ram_bytes": 2000,  # does not fit: shown as over the limit
        "firmware_flash_bytes": 40000,
        "firmware_ram_bytes": 5000,
    }
    page = report.to_html(memory=memory)
    parsed = parse(page)
    header, *rows = parsed.tables["memory"]
    col = {h: i for i, h in enumerate(header)}
    flash, ram = rows
    assert parsed.row_ids["memory"][1:] == ["memory-flash", "memory-ram"]
    assert [flash[col[k]] for k in ("weights", "code", "arena", "other", "used", "board")] == [
        "1500", "3000", "-", "200", "4700", "8192",
    ]  # fmt: skip
    assert flash[col["used %"]] == f"{100 * 4700 / 8192:.2f}%"
    assert flash[col["free"]] == str(8192 - 4700)
    assert [ram[col[k]] for k in ("weights", "code", "arena", "other", "used", "board")] == [
        "-", "-", "2048", "52", "2100", "2000",
    ]  # fmt: skip
    assert ram[col["free"]] == "-100"
    assert page.count('class="over"') == 1  # RAM only
    assert "40000 bytes of flash" in page and "5000 bytes of RAM" in page


def test_memory_of_a_library_preset_has_no_limit(cnn_report):
    report, _ = cnn_report
    memory = {"weights_bytes": 10, "code_bytes": 20, "arena_bytes": 30}
    with pytest.raises(ValueError, match=r"missing \['flash_bytes', 'ram_bytes'\]"):
        report.to_html(memory=memory)
    memory.update(flash_bytes=30, ram_bytes=30, board_flash_bytes=None, board_ram_bytes=None)
    page = report.to_html(memory=memory)
    assert page.count("no board limit (library preset)") == 2


def test_model_without_tiled_layers_has_no_chart():
    gm = tbn.rewrite(nn.Sequential(nn.ReLU()).eval(), torch.randn(2, 4))
    page = tbn.inspect(gm).to_html()
    assert parse(page).images == []
    assert "No Linear or Conv layers" in page


@pytest.mark.parametrize("layers", [3, 45])
def test_chart_height_follows_the_layer_count(layers):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)]).eval()
    report = tbn.inspect(tbn.rewrite(model, torch.randn(2, 8), tbn.TBNConfig(p=2, min_numel=0)))
    page = report.to_html()
    png = base64.b64decode(parse(page).images[0].split(",", 1)[1])
    import matplotlib.image

    height = matplotlib.image.imread(io.BytesIO(png), format="png").shape[0]
    shown = min(layers, 40)
    assert abs(height - 100 * (1.4 + 0.42 * shown)) <= 2  # dpi 100
    assert ("the 40 largest of 45" in page) == (layers == 45)


def test_importing_the_package_loads_no_plotting_graph_or_tvm_module():
    code = (
        "import sys, tbn_compiler; "
        "print(sorted(m for m in ('tvm', 'matplotlib', 'networkx') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]"
