"""TBNConfig rules and validation; the inspect report against hand-computed sizes."""

import pytest
import torch
import torch.nn as nn
from models import zoo

import tbn_compiler as tbn


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=0), "p must be an int >= 1"),
        (dict(p=2.5), "p must be an int >= 1"),
        (dict(alpha="median"), "alpha must be one of"),
        (dict(min_numel=-1), "min_numel"),
        (dict(layers={"fc": 0}), r"layers\['fc'\]"),
        (dict(exclude=[3]), "exclude entries"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tbn.TBNConfig(**kwargs)


def test_plan_layer_precedence():
    cfg = tbn.TBNConfig(
        p=4,
        min_numel=100,
        layers={"enc.*": 8, "enc.skip": None, "dec.0": 2},
        exclude=["head", nn.Conv1d],
        keep_first=True,
    )
    assert cfg.plan_layer("enc.skip", 1000).p is None  # exact key before glob
    assert cfg.plan_layer("enc.fc", 1000).p == 8
    assert cfg.plan_layer("dec.0", 10).p == 2  # explicit rule beats min_numel
    assert cfg.plan_layer("head", 1000).p is None
    assert cfg.plan_layer("x", 1000, nn.Conv1d).p is None
    assert cfg.plan_layer("x", 1000, is_first=True).p is None
    assert cfg.plan_layer("x", 99).p == 1
    assert cfg.plan_layer("x", 100).p == 4


def test_report_sizes_and_dict():
    model, x = zoo()["mlp"]
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=4, min_numel=5000))
    report = tbn.inspect(gm)
    d = report.to_dict()
    rows = {r["name"]: r for r in d["layers"]}
    r0 = rows["layers.0"]  # 128x64, p=4: L=2048 bits = 64 words, 4 alphas, 128 biases
    assert r0["p"] == 4 and r0["aligned"] and r0["status"] == "tiled"
    assert r0["dense_bytes"] == 4 * (128 * 64 + 128)
    assert r0["tbn_bytes"] == 2048 // 8 + 4 * 4 + 4 * 128
    r2 = rows["layers.2"]  # 10x32 < min_numel -> p=1: 320 bits
    assert r2["p"] == 1 and r2["tbn_bytes"] == 40 + 4 + 40
    assert set(r0) >= {
        "name",
        "op",
        "shape",
        "numel",
        "p",
        "aligned",
        "status",
        "reason",
        "dense_bytes",
        "tbn_bytes",
    }
    assert d["totals"]["dense_bytes"] == sum(r["dense_bytes"] for r in d["layers"])
    text = str(report)
    assert "layers.0" in text and "TOTAL" in text


def test_report_lists_skips_with_reasons_and_dot():
    model, x = zoo()["mlp"]
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=3, min_numel=0, exclude=["layers.1"]))
    report = tbn.inspect(gm)
    rows = {r["name"]: r for r in report.to_dict()["layers"]}
    assert rows["layers.1"]["status"] == "skipped" and "excluded" in rows["layers.1"]["reason"]
    assert "not divisible by p=3" in rows["layers.0"]["reason"]
    assert rows["layers.2"]["status"] == "skipped"  # 320 weights, not divisible by 3
    assert "excluded" in str(report)
    dot = report.to_dot()
    assert dot.startswith("digraph") and dot.count("fillcolor") == 0
    gm2 = tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0))
    dot2 = tbn.inspect(gm2).to_dot()
    assert dot2.count("fillcolor") == 3 and "layers.0" in dot2


def test_inspect_rejects_non_graph():
    with pytest.raises(TypeError, match="GraphModule"):
        tbn.inspect(torch.nn.Linear(2, 2))
