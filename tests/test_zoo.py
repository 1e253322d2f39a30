"""The fast subset of the model zoo (benchmarks/zoo.py): one model per family, small
inputs, random init. Each is rewritten with the default config, built for llvm, and its
outputs compared with the rewritten graph run in torch. A model whose library is not
installed is skipped with the install line (see the zoo's docstring for torchvision).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import tbn_compiler as tbn

ZOO_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"


@functools.cache
def _zoo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tbn_zoo", ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tbn_zoo"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# one per family: a torchvision CNN, a torchvision ViT, a timm CNN (timm's DeiT is the
# ViT again: only in the zoo script, with the heavier models)
FAST_SUBSET = ["resnet18", "tv-vit-small", "convnext_atto"]


def _build(name: str) -> tuple[torch.nn.Module, tuple]:
    zoo = _zoo()
    entry = {m.name: m for m in zoo.ZOO}[name]
    torch.manual_seed(0)
    try:
        model, inputs = entry.build()
    except zoo.LibraryMissing as exc:
        pytest.skip(str(exc))
    return model.eval(), inputs


@pytest.mark.parametrize("name", FAST_SUBSET)
def test_zoo_model_compiles_for_llvm_with_parity(name: str) -> None:
    model, inputs = _build(name)
    gm = tbn.rewrite(model, inputs)
    assert any("tiled" in str(n.target) for n in gm.graph.nodes), "nothing was tiled"
    cm = tbn.compile_graph(gm, inputs, "llvm", validate=False)
    with torch.no_grad():
        expected = gm(*inputs)
        got = cm(*inputs)
    assert got.shape == expected.shape == (1, 1000)
    scale = float(expected.abs().max())
    assert scale > 0, "every output is 0: the parity check would be trivial"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


def test_the_tiled_share_counts_weights_of_tiled_and_dense_layers() -> None:
    model, inputs = _build("tv-vit-small")
    gm = tbn.rewrite(model, inputs, tbn.TBNConfig(exclude=["heads.*"]))
    pct, layers, reasons = _zoo().tiling_summary(gm)
    weights = {"conv_proj": model.conv_proj.weight.numel()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weights[name] = module.weight.numel()
        elif isinstance(module, torch.nn.MultiheadAttention):
            weights[name] = module.in_proj_weight.numel()
    dense = weights["heads.head"]
    assert pct == pytest.approx(100.0 * (1 - dense / sum(weights.values())))
    assert layers == f"{len(weights) - 1}/{len(weights)}"
    assert reasons == {"excluded by 'heads.*'": 1}
