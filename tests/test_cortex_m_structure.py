"""Cortex-M program structure: one static arena and no heap in the built library, kernel
facts read from the TIR (workspace, parameters, failure paths), the step table's source
lines, and the one place where TVM's C text is edited."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tbn_compiler as tbn
from tbn_compiler.backends.cortex_m import ToolchainError, c_kernels, toolchain

try:
    toolchain.require_toolchain()
    _MISSING = None
except ToolchainError as exc:
    _MISSING = str(exc)

needs_toolchain = pytest.mark.skipif(_MISSING is not None, reason=f"Arm toolchain: {_MISSING}")

BOARD = "mps2-an386"
HEAP_SYMBOLS = {"malloc", "free", "calloc", "realloc", "_sbrk", "_malloc_r", "_free_r", "sbrk"}
# RAM the library holds besides the arena: the kernel error state and the workspace pointer
STATE_SYMBOLS = {
    "tbn_kernel_error",
    "tbn_kernel_error_text",
    "tbn_kernel_error_detail",
    "tbn_workspace_ptr",
}


class PoolNet(nn.Module):
    """conv (a tile kernel with an im2col workspace) + max pooling (a padded copy in the
    workspace, an -inf constant) + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def pool_net():
    torch.manual_seed(0)
    model, x = PoolNet().eval(), torch.randn(1, 2, 8, 8)
    cm = tbn.compile(model, (x,), target=BOARD, config=tbn.TBNConfig(p=2, min_numel=0))
    yield cm, model, x
    cm.close()


def _nm(objects: list[Path], *flags: str) -> list[list[str]]:
    out = subprocess.run(
        ["arm-none-eabi-nm", *flags, *map(str, objects)], check=True, capture_output=True, text=True
    ).stdout
    return [line.split() for line in out.splitlines() if line.strip() and ":" not in line]


@needs_toolchain
def test_library_has_one_arena_and_no_heap(pool_net) -> None:
    cm, _, _ = pool_net
    build = cm.build()
    objects = [build / "tbn_kernels.o", build / "tbn_model.o"]
    undefined = {row[-1] for row in _nm(objects, "-u")}
    assert not undefined & HEAP_SYMBOLS, undefined
    # every RAM object of the library (.bss / .data: nm types b, B, d, D) with its size
    ram = {
        row[3]: int(row[1], 16) for row in _nm(objects, "-S") if len(row) == 4 and row[2] in "bBdD"
    }
    assert set(ram) == STATE_SYMBOLS | {"tbn_arena"}, ram
    assert ram["tbn_arena"] == cm.info.arena_bytes
    assert all(ram[s] <= 16 for s in STATE_SYMBOLS)
    header = cm.sources["include/tbn_model.h"]
    assert f"#define TBN_ARENA_BYTES {cm.info.arena_bytes} " in header


@needs_toolchain
def test_workspace_lives_in_the_arena_and_results_match(pool_net) -> None:
    cm, model, x = pool_net
    steps_with_workspace = [
        row for row in cm.info.steps if "tbn_workspace_ptr = tbn_arena" in _call_text(cm, row)
    ]
    assert steps_with_workspace, "the conv and the pooling need a workspace"
    ref = tbn.rewrite(model, (x,), tbn.TBNConfig(p=2, min_numel=0))(x)
    torch.testing.assert_close(cm(x), ref, rtol=1e-4, atol=1e-5)


def _call_text(cm, row: dict) -> str:
    first, last = row["lines"]["src/tbn_model.c"]
    return "\n".join(cm.sources["src/tbn_model.c"].splitlines()[first - 1 : last])


def test_step_lines_locate_each_kernel_and_call(pool_net) -> None:
    cm, _, _ = pool_net
    for i, row in enumerate(cm.info.steps):
        kernel = row["kernel"]
        assert f"  {kernel}(" in _call_text(cm, row), i
        first, last = row["lines"]["src/tbn_kernels.c"]
        definition = cm.sources["src/tbn_kernels.c"].splitlines()[first - 1 : last]
        assert sum(f"int32_t {kernel}(" in line and line.endswith("{") for line in definition) == 1
        assert definition[-1] == "}"
        (decl,) = set(row["lines"]["src/tbn_kernels.h"])
        assert (
            cm.sources["src/tbn_kernels.h"].splitlines()[decl - 1].startswith(f"int32_t {kernel}(")
        )


def _lowered(script_func) -> object:
    """A TVMScript kernel through the Cortex-M TIR lowering."""
    from tbn_compiler.backends.cortex_m import lower

    return lower.lower_kernels({"tbn_k0_probe": script_func})


def test_kernel_facts_come_from_the_tir() -> None:
    pytest.importorskip("tvm")
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def probe(
        x: T.Buffer((600,), "float32"),
        ids: T.Buffer((4,), "int64"),
        mask: T.Buffer((600,), "bool"),
        out: T.Buffer((600,), "float32"),
    ):
        tmp = T.alloc_buffer((600,), "float32")  # 2400 bytes: over 1 KiB, a workspace
        for i in range(600):
            with T.sblock("copy"):
                v = T.axis.spatial(600, i)
                tmp[v] = T.if_then_else(mask[v], x[v], T.float32("-inf"))
        for i in range(600):
            with T.sblock("out"):
                v = T.axis.spatial(600, i)
                out[v] = T.if_then_else(x[v] > T.float32(0), tmp[v], T.float32("nan"))

    (kernel,) = c_kernels.c_kernels(_lowered(probe)).values()
    assert kernel.param_types == ("float*", "int64_t*", "bool*", "float*")
    assert kernel.workspace_bytes == 2400  # 600 float32, a multiple of the 8-byte alignment
    assert not kernel.fallible
    code = kernel.code
    assert "(0.000000e+00f - tbn_inff())" in code and "tbn_nanf()" in code
    assert "inff;" not in code and "nanf;" not in code and "return;" not in code
    assert kernel.prototype().startswith("int32_t tbn_k0_probe(float* x, int64_t* ids,")


def test_kernels_with_a_check_are_fallible() -> None:
    pytest.importorskip("tvm")
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def checked(ids: T.Buffer((4,), "int64"), out: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("out"):
                v = T.axis.spatial(4, i)
                assert ids[v] >= T.int64(0), ("IndexError", ["negative id"])
                out[v] = ids[v]

    (kernel,) = c_kernels.c_kernels(_lowered(checked)).values()
    assert kernel.fallible and kernel.workspace_bytes == 0
    assert "return -1;" in kernel.code  # TVM's failure path, valid in an int32_t kernel


def test_a_checked_take_is_fallible() -> None:
    pytest.importorskip("tvm")
    from tvm import te

    from tbn_compiler.backends.pipelines import INDEX_ERROR_FN, checked_take

    data = te.placeholder((10, 4), "float32", name="data")
    ids = te.placeholder((3,), "int64", name="ids")
    func = te.create_prim_func([data, ids, checked_take(data, ids, 0)])
    (kernel,) = c_kernels.c_kernels(_lowered(func)).values()
    assert kernel.fallible and f"{INDEX_ERROR_FN}(" in kernel.code
    assert kernel.param_types == ("float*", "int64_t*", "float*")


def test_only_tvm_preamble_is_dropped_from_its_c() -> None:
    strip = c_kernels._without_tvm_preamble
    tvm_text = (
        '// tvm target: {"kind":"c"}\n#define TVM_EXPORTS\n#include "tvm/runtime/base.h"\n'
        "#include <math.h>\nvoid* __tvm_ffi__library_ctx = NULL;\nint32_t f(void) {\n"
        "  return 0;\n}\n"
    )
    assert strip(tvm_text) == "int32_t f(void) {\n  return 0;\n}\n"
    with pytest.raises(RuntimeError, match="TVM's C output changed"):
        strip('int32_t f(void);\n#include "tvm/ffi/c_api.h"\n')


@needs_toolchain
def test_build_error_in_a_call_names_its_step(monkeypatch) -> None:
    from tbn_compiler.backends.cortex_m import BuildError, emit

    original = emit._call_lines

    def broken(i, step, kernel, plan):
        lines = original(i, step, kernel, plan)
        return [*lines, "  tbn_no_such_call();"] if i == 1 else lines

    monkeypatch.setattr(emit, "_call_lines", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Hardswish()).eval()
    with pytest.raises(BuildError) as err:
        tbn.compile(
            model, (torch.randn(1, 16),), target=BOARD, config=tbn.TBNConfig(p=4, min_numel=0)
        )
    line = next(
        ln for ln in str(err.value).splitlines() if "tbn_no_such_call" in ln and "in the" in ln
    )
    assert "the call of kernel tbn_k1_" in line and "step 1:" in line
