"""The Relax side of the back half: what import_graph yields, which schedule rule takes
each kernel, and the pipelines of backends.pipelines.

Structural checks in the spirit of TVM's own IR tests: the imported module holds one
``call_tir`` per tile op of the rewritten graph and none of the tiled layers' dense
weights; schedules leave their input untouched; a tuned build whose database covers
nothing is scheduled exactly like the default build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import zoo  # noqa: E402

from tbn_compiler.backends import kernels, pipelines, schedule_rules, tuning  # noqa: E402
from tbn_compiler.backends.relax_import import import_graph  # noqa: E402
from tbn_compiler.backends.schedule_rules import cpu, cuda, mcu  # noqa: E402
from tbn_compiler.backends.schedule_rules.base import TILE_KINDS  # noqa: E402
from tbn_compiler.config import TBNConfig  # noqa: E402
from tbn_compiler.passes import rewrite  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = schedule_rules.host_target()
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


# --------------------------------------------------------------------------- import


def _main_calls_and_constants(mod) -> tuple[list[str], list[np.ndarray]]:
    """Kernel kinds of the ``call_tir`` calls in ``main`` (``""`` for TVM's functions),
    and the values of every constant ``main`` uses."""
    kinds, constants = [], []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(_CALL_TIR):
            kinds.append(kernels.kernel_kind(mod[expr.args[0]]))
        elif isinstance(expr, tvm.ir.Constant) and hasattr(expr.value, "numpy"):
            constants.append(expr.value.numpy())  # tensor constants (not scalars)

    relax.analysis.post_order_visit(mod["main"], visit)
    return kinds, constants


def _tile_op_count(gm: torch.fx.GraphModule) -> int:
    return sum(
        1 for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("tbn.")
    )


def _tiled_weights(model: nn.Module, gm: torch.fx.GraphModule) -> list[np.ndarray]:
    """The float weights of the layers that the rewrite tiled (the plain ``weight`` of a
    module is gone from ``gm`` when the layer is tiled)."""
    kept = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    return [
        p.detach().numpy()
        for name, p in model.named_parameters()
        if name.endswith("weight") and p.dim() >= 2 and name not in kept
    ]


@pytest.mark.parametrize(
    "name,config",
    [
        ("mlp", TBNConfig(p=4, min_numel=0)),
        ("cnn", TBNConfig(p=2, min_numel=0, layers={"fc": 4})),
        ("gpt2", TBNConfig(p=2, min_numel=0, layers={"c_attn": 3})),
        ("tied", TBNConfig(p=4, min_numel=0)),
    ],
)
def test_import_has_one_call_per_tile_op_and_no_dense_weight(name, config) -> None:
    model, inputs = zoo()[name]
    gm = rewrite(model, inputs, config)
    tile_ops = _tile_op_count(gm)
    assert tile_ops > 0
    kinds, constants = _main_calls_and_constants(import_graph(gm, inputs).mod)
    assert sum(1 for k in kinds if k in TILE_KINDS) == tile_ops
    weights = _tiled_weights(model, gm)
    assert weights
    smallest = min(w.size for w in weights)
    # tiled layers bring packed tiles (uint32) and p alphas: no float constant as large
    # as a tiled weight (dense, reconstructed or transposed) may appear
    large = [c.shape for c in constants if c.dtype.kind == "f" and c.size >= smallest]
    assert not large, f"float constants as large as a tiled weight: {large}"


# --------------------------------------------------------------------------- rules


RULE_CASES = [
    # kernel, CPU rule, CUDA rule, MCU rule
    (lambda: kernels.tiled_linear_primfunc(2, 1024, 64, 4, False, True), cpu.WordsProduct,
     cuda.WarpRowTableProduct, mcu.McuTileKernel),  # a few rows: sign-select per bit
    (lambda: kernels.tiled_linear_primfunc(2, 64, 32, 4, False, True), cpu.WordsProduct,
     cuda.OneOutputPerThread, mcu.McuTileKernel),  # 2 words per row: too few for a warp
    (lambda: kernels.tiled_linear_primfunc(2, 50, 20, 2, False, True), cpu.ParallelOutputs,
     cuda.OneOutputPerThread, mcu.McuTileKernel),  # bit-serial: no sign table
    (lambda: kernels.tiled_linear_primfunc(2, 64, 32, 4, True, True), cpu.ColumnTableProduct,
     cuda.OneOutputPerThread, mcu.McuTileKernel),
    (lambda: kernels.tiled_linear_primfunc(2, 512, 13, 8, False, True), cpu.RowTableProduct,
     cuda.WarpRowTableProduct, mcu.McuTileKernel),  # realigned words (13 bits a row)
    (lambda: kernels.tiled_linear_primfunc(64, 256, 64, 4, False, True), cpu.PanelProduct,
     cuda.WarpRowTableProduct, mcu.McuTileKernel),  # many rows: unpacked panel
    (lambda: kernels.tiled_conv_primfunc((1, 32, 6, 6), (8, 32, 3, 3), 1, 1, 1, 1, 4, True),
     cpu.PanelProduct, cuda.WarpRowTableProduct, mcu.McuTileKernel),  # direct, no im2col
    (lambda: kernels.tiled_conv_primfunc((2, 6, 8, 8), (6, 1, 3, 3), 1, 1, 1, 6, 2, True),
     cpu.DirectConv, cuda.OneOutputPerThread, mcu.McuTileKernel),  # depthwise
]  # fmt: skip


def _first_rule(func, target, rules):
    return next(type(r) for r in rules if r.apply(func, target) is not None)


@pytest.mark.parametrize("build,cpu_rule,cuda_rule,mcu_rule", RULE_CASES)
def test_rules_are_chosen_from_the_kernel_structure(build, cpu_rule, cuda_rule, mcu_rule):
    func = build()
    assert _first_rule(func, HOST, cpu.CPU_RULES) is cpu_rule
    assert _first_rule(func, CUDA, cuda.CUDA_RULES) is cuda_rule
    assert _first_rule(func, None, mcu.MCU_RULES) is mcu_rule


def test_a_kernel_with_checks_stays_serial_on_cpu() -> None:
    """The checked gather's assert must not run inside a parallel task."""
    model = nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3]])
    gm = rewrite(model, (ids,), TBNConfig())
    mod = import_graph(gm, (ids,)).mod
    gathers = [f for f in mod.functions.values() if kernels.kernel_kind(f) == "gather"]
    assert gathers
    for func in gathers:
        assert _first_rule(func, HOST, cpu.CPU_RULES) is cpu.ChecksStaySerial
        assert "T.parallel" not in schedule_rules.schedule_for(func, HOST).script()
        assert "T.Assert" not in schedule_rules.schedule_for(func, CUDA).script()


@pytest.mark.parametrize("target", [HOST, CUDA, None], ids=["cpu", "cuda", "mcu"])
def test_schedules_leave_their_input_untouched(target) -> None:
    for build in (
        lambda: kernels.tiled_linear_primfunc(3, 8, 3, 2, False, True),
        lambda: kernels.tiled_conv_primfunc((1, 8, 9, 9), (8, 8, 3, 3), 1, 1, 1, 1, 4, True),
    ):
        func = build()
        before = func.script()
        if target is None:
            mcu.schedule_mcu(func)
        else:
            schedule_rules.schedule_for(func, target)
        assert func.script() == before


def test_schedule_for_refuses_a_function_that_is_not_a_kernel() -> None:
    func = kernels.tiled_linear_primfunc(2, 64, 32, 4, False, True).without_attr("tbn_kernel")
    with pytest.raises(ValueError, match="kernel kind"):
        schedule_rules.schedule_for(func, HOST)


# --------------------------------------------------------------------------- pipelines


def test_tuned_pipeline_without_records_schedules_like_the_default(tmp_path) -> None:
    """What a tuning database misses gets the default build's schedules, so with an empty
    database the tuned CPU pipeline's result is the default pipeline's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(8, 64)
    gm = rewrite(model, (x,), TBNConfig(p=4, min_numel=0, keep_first=True))
    target = tuning.with_num_cores(HOST)
    with target:
        default = pipelines.cpu(target)(import_graph(gm, (x,)).mod)
    database = tuning.open_database(tuning.Tuning(trials=0, database=tmp_path))
    with target, database:
        tuned = pipelines.tuned(target)(import_graph(gm, (x,)).mod)
    tvm.ir.assert_structural_equal(tuned, default)
    dense = [f for gv, f in tuned.functions.items() if "matmul" in gv.name_hint]
    assert dense and all("T.parallel" in f.script() for f in dense)
