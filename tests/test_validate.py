"""compile checks itself: a wrong op is caught and named, a right build passes.

The reference is the rewritten graph run in plain torch; a converter of the Relax import is
replaced by one that scales its result by 1.5, and the error must name exactly the fx node
that converter imported.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tvm
from models import MLP

import tbn_compiler as tbn
from tbn_compiler.backends import relax_import, validate
from tbn_compiler.backends.relax_import import SEMANTIC_CONVERTERS

CFG = tbn.TBNConfig(p=4, min_numel=0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) + x


class TwoBlocks(nn.Module):
    """Two blocks, so the relu of the second one is not the first relu of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Block()
        self.second = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _scaled(convert, factor: float = 1.5):
    """A converter computing ``factor`` times what ``convert`` computes."""

    def wrong(node, importer):
        out = convert(node, importer)
        return importer.block_builder.emit(
            relax_import.relax.op.multiply(out, relax_import.relax.const(factor, "float32"))
        )

    return wrong


def _wrong_only_for(name: str, convert):
    """``convert`` except for the fx node called ``name`` (scaled by 1.5)."""
    wrong = _scaled(convert)
    return lambda node, importer: (wrong if node.name == name else convert)(node, importer)


def _relu_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "relu" in str(n.target)]


def test_a_correct_build_passes_and_records_its_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    cm = tbn.compile(MLP().eval(), x, config=CFG)
    assert cm.validation.status == "passed"
    assert cm.validation.input_sets == 2
    assert 0.0 <= cm.validation.max_error <= validate.TOLERANCE


def test_a_wrong_converter_is_named_with_its_node_op_and_module(monkeypatch) -> None:
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.randn(3, 16)
    gm = tbn.rewrite(model, x, CFG)
    target = _relu_nodes(gm)[1]  # the relu of the second block
    assert target.meta["nn_module_stack"]
    convert = SEMANTIC_CONVERTERS["relu.default"]
    monkeypatch.setitem(SEMANTIC_CONVERTERS, "relu.default", _wrong_only_for(target.name, convert))
    with pytest.raises(tbn.ValidationError) as info:
        tbn.compile_graph(gm, x)
    err = info.value
    assert err.divergence is not None
    assert err.divergence.node == target.name
    assert err.divergence.op == "aten.relu.default"
    assert err.divergence.module == "second"
    assert err.divergence.source is not None and "test_validate.py" in err.divergence.source
    # relu(x) * 1.5 is off by half its largest value
    assert err.divergence.error == pytest.approx(0.5, rel=1e-3)
    assert err.input_set == "example"
    assert f"node {target.name!r} (op aten.relu.default) in module 'second'" in str(err)


def test_cortex_m_builds_are_checked_in_qemu_on_their_outputs(monkeypatch) -> None:
    from tbn_compiler.backends.cortex_m import ToolchainError, require_toolchain

    try:
        require_toolchain(qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 16)
    convert = SEMANTIC_CONVERTERS["relu.default"]
    monkeypatch.setitem(SEMANTIC_CONVERTERS, "relu.default", _scaled(convert))
    with pytest.raises(tbn.ValidationError, match="compile for target='llvm' to locate it") as info:
        tbn.compile(model, x, target="mps2-an386", config=CFG)
    assert info.value.divergence is None
    assert info.value.error > 0.01


def test_validate_false_returns_the_wrong_module_unchecked(monkeypatch) -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 16)
    convert = SEMANTIC_CONVERTERS["relu.default"]
    monkeypatch.setitem(SEMANTIC_CONVERTERS, "relu.default", _scaled(convert))
    cm = tbn.compile(model, x, config=CFG, validate=False)
    assert not hasattr(cm, "validation")
    gm = tbn.rewrite(model, x, CFG)
    with torch.no_grad():
        assert not torch.allclose(cm(x), gm(x), rtol=1e-3, atol=1e-3)


class IdDifference(nn.Module):
    """Embeds the difference of two ids: in range for the example, not for every pair of
    ids in the example's range."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(3, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids[:, 0] - ids[:, 1])


def test_a_fresh_input_the_graph_refuses_is_not_compared() -> None:
    ids = torch.tensor([[5, 3], [4, 4], [5, 5], [3, 3], [4, 3], [5, 4], [4, 4], [3, 3]])
    cm = tbn.compile(IdDifference().eval(), ids, config=CFG)
    assert cm.validation.status == "passed"
    assert cm.validation.input_sets == 1  # fresh ids give negative differences


def test_scaled_error_is_relative_to_the_reference_and_exact_for_non_finite() -> None:
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert validate.scaled_error(ref, ref + torch.tensor([0.0, 0.004, 0.0])) == pytest.approx(
        1e-3, rel=1e-4
    )
    assert validate.scaled_error(ref, ref.clone()) == 0.0
    assert validate.scaled_error(ref, ref[:2]) == math.inf
    nan = torch.tensor([math.nan, math.inf, 1.0])
    assert validate.scaled_error(nan, nan.clone()) == 0.0
    assert validate.scaled_error(nan, torch.tensor([0.0, math.inf, 1.0])) == math.inf
    assert validate.scaled_error(nan, torch.tensor([math.nan, -math.inf, 1.0])) == math.inf
    ids = torch.tensor([3, 4])
    assert validate.scaled_error(ids, ids.clone()) == 0.0
    assert validate.scaled_error(ids, torch.tensor([3, 5])) == math.inf
    assert validate.scaled_error(ids, ids.int()) == math.inf  # same values, other dtype
    assert validate.scaled_error(ref, ref.double()) == math.inf


def test_a_build_of_another_output_dtype_is_caught(monkeypatch) -> None:
    """A converter that returns float64 where torch gives float32 (the values equal)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval(), torch.randn(3, 16)
    gm = tbn.rewrite(model, x, CFG)
    target = _relu_nodes(gm)[-1]
    convert = SEMANTIC_CONVERTERS["relu.default"]

    def as_double(node, importer):
        result = convert(node, importer)
        if node.name != target.name:
            return result
        return importer.block_builder.emit(tvm.relax.op.astype(result, "float64"))

    monkeypatch.setitem(SEMANTIC_CONVERTERS, "relu.default", as_double)
    monkeypatch.setattr(relax_import, "_with_torch_float_dtype", lambda bb, node, r: r)
    with pytest.raises(tbn.ValidationError, match="off by inf.*another shape or dtype"):
        tbn.compile_graph(gm, x)


def test_fresh_inputs_keep_the_signature_and_the_id_range() -> None:
    ids = torch.tensor([[5, 9, 7], [6, 5, 8]])
    x = torch.tensor([[0.5, math.nan], [2.0, 1.0]])
    mask = torch.tensor([True, False])
    fresh_ids, fresh_x, fresh_mask = validate.fresh_inputs((ids, x, mask))
    assert fresh_ids.dtype == ids.dtype and fresh_ids.shape == ids.shape
    assert int(fresh_ids.min()) >= 5 and int(fresh_ids.max()) <= 9
    assert not torch.equal(fresh_ids, ids)
    assert math.isnan(fresh_x[0, 1])
    finite = fresh_x[torch.isfinite(fresh_x)]
    assert float(finite.min()) >= 0.5 and float(finite.max()) <= 2.0
    assert torch.equal(fresh_mask, mask)
