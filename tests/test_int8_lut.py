"""The table-lookup form of int8 linears at a batch of a few rows (backends.int8_lut).

The LUT layout is checked against the documented nibble positions, the kernel against
the numpy int8 reference (same quantization, exact integer sums) including the inputs
that make the int16 partial sums largest, the applicability rules, and the build: the
pass rewrites only what it may (static batch below LUT_MAX_ROWS, a constant tile, tile
rows a multiple of 16, AVX-512BW), and compiled modules match the reference and
survive save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

tvm = pytest.importorskip("tvm")

from int8_reference import assert_tight as _tight  # noqa: E402
from int8_reference import edge_rows, int8_reference, random_layer  # noqa: E402
from kernel_run import as_numpy, build_kernel  # noqa: E402
from tvm import relax, tirx  # noqa: E402

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler import tiling  # noqa: E402
from tbn_compiler.backends import int8_lut, kernels, relax_import, schedule_rules  # noqa: E402
from tbn_compiler.backends.int8_kernels import (  # noqa: E402
    COLUMNS,
    PRECISION_ATTR,
    TILE_LAYOUT_ATTR,
    mark_precision,
)
from tbn_compiler.backends.schedule_rules import int8_cpu  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = schedule_rules.host_target()
HAS_AVX512BW = tvm.target.codegen.target_has_features("avx512bw", HOST)
needs_avx512bw = pytest.mark.skipif(not HAS_AVX512BW, reason="this CPU has no AVX-512BW")


def _marked(m, k: int, n: int, p: int, bias: bool) -> tirx.PrimFunc:
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, bias)
    return func.with_attr(PRECISION_ATTR, "int8")


def _run_lut(x: torch.Tensor, words, alphas, bias, n: int, p: int, lib=None) -> np.ndarray:
    """The LUT kernel (``lib``, else built for ``x``'s batch) on ``x`` and a tile."""
    m, k = x.shape
    if lib is None:
        lib = _build_lut(m, k, n, p, bias is not None)
    lut_words = int8_lut.lut_tile_words(as_numpy(words), n // p, k)
    arrays = [x.numpy(), lut_words, alphas.numpy()] + ([bias.numpy()] if bias is not None else [])
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


def test_layout_puts_each_nibble_where_documented():
    rows, k = 32, 96
    bits = np.random.default_rng(0).integers(0, 2, (rows, k))
    words = as_numpy(tiling.pack_bits(torch.from_numpy(bits * 2.0 - 1)))
    laid = int8_lut.lut_tile_words(words, rows, k).view(np.uint8)
    assert laid.size == words.size * 4
    units = k // int8_lut.UNIT_INPUTS
    for r in range(rows):
        for g in range(k // 4):
            unit, slot = divmod(g, 8)
            half, lane = divmod(slot, 4)
            byte = laid[((r // 16) * units + unit) * 64 + 16 * lane + r % 16]
            nibble = (int(byte) >> (4 * half)) & 15
            expected = sum(int(bits[r, 4 * g + j]) << j for j in range(4))
            assert nibble == expected, (r, g)


def test_restore_kernel_inverts_the_layout_into_columns():
    rows, k = 48, 128
    words, *_ = random_layer(k, rows, 1, False, seed=5)
    std = as_numpy(words)
    lut = int8_lut.lut_tile_words(std, rows, k)
    func = int8_lut.restore_columns_primfunc(rows, k)
    lib = build_kernel(func)
    out = tvm.runtime.tensor(np.zeros_like(std))
    lib["main"](tvm.runtime.tensor(lut), out)
    np.testing.assert_array_equal(out.numpy(), std.reshape(rows, k // 32).T.reshape(-1))


def test_layout_refuses_shapes_it_cannot_hold():
    words = np.zeros(8, np.uint32)
    with pytest.raises(ValueError, match="rows % 16"):
        int8_lut.lut_tile_words(words, 8, 32)
    with pytest.raises(ValueError, match="expected"):
        int8_lut.lut_tile_words(np.zeros(3, np.uint32), 16, 32)


LUT_CASES = [
    # m, in, out, p, bias
    (1, 32, 16, 1, False),
    (1, 256, 128, 4, True),
    (2, 96, 48, 1, True),  # 3 units: flushed in one chunk of 3
    (3, 512, 256, 2, False),
    (9, 128, 64, 2, True),
    (1, 4096, 1024, 8, True),  # 128 units: 4 tasks of 32; 8 row blocks: 1 register block
    (1, 1024, 2048, 4, False),  # 32 units: 1 task; 32 row blocks: 4 register blocks
]


@needs_avx512bw
@pytest.mark.parametrize("m,k,n,p,bias", LUT_CASES)
def test_lut_kernel_matches_quantized_reference(m, k, n, p, bias):
    words, signs, alphas, b = random_layer(k, n, p, bias, seed=k + n)
    x = torch.randn(m, k) * 3
    got = _run_lut(x, words, alphas, b, n, p)
    _tight(got, int8_reference(x.numpy(), signs, alphas, b, p))


def _build_lut(m, k: int, n: int, p: int, bias: bool):
    func = int8_lut.int8_lut_primfunc(_marked(m, k, n, p, bias))
    return build_kernel(func)


@needs_avx512bw
def test_lut_kernel_symbolic_batch_loops_over_rows():
    k, n, p = 256, 128, 2
    words, signs, alphas, b = random_layer(k, n, p, True, seed=7)
    lib = _build_lut(tirx.Var("m", "int64"), k, n, p, True)
    for m in (1, 7, 15):
        x = torch.randn(m, k)
        got = _run_lut(x, words, alphas, b, n, p, lib)
        _tight(got, int8_reference(x.numpy(), signs, alphas, b, p))


@needs_avx512bw
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lut_kernel_largest_sums_do_not_overflow(sign):
    """Every input at +-amax and every tile bit alike: each table value is +-508 and each
    int16 partial sum reaches 32 x 2 x 508 = 32,512 before its flush; the result is
    exact (127 x in)."""
    k, n, p = 2048, 32, 2
    signs = torch.full((n // p * k,), sign)
    words = tiling.pack_bits(signs)
    alphas = torch.tensor([1.0, 0.5])
    x = torch.full((1, k), 2.0)
    got = _run_lut(x, words, alphas, None, n, p)
    ref = int8_reference(x.numpy(), signs.reshape(n // p, k), alphas, None, p)
    _tight(got, ref)
    assert got[0, 0] == pytest.approx(sign * 2.0 * k, rel=1e-6)


@needs_avx512bw
def test_lut_kernel_edge_rows():
    """A zero row gives the bias; a row with one large value keeps it (amax scale)."""
    k, n, p = 128, 64, 2
    words, signs, alphas, b = random_layer(k, n, p, True, seed=2)
    x = edge_rows(3, k)
    got = _run_lut(x, words, alphas, b, n, p)
    np.testing.assert_array_equal(got[1], b.numpy())
    _tight(got, int8_reference(x.numpy(), signs, alphas, b, p))


def test_applies_only_where_the_layout_and_cpu_allow():
    skylake = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert int8_lut.lut_applies(_marked(1, 256, 128, 4, True), skylake)
    assert int8_lut.lut_applies(_marked(31, 256, 128, 4, True), skylake)
    assert not int8_lut.lut_applies(_marked(32, 256, 128, 4, True), skylake)  # panel form
    assert not int8_lut.lut_applies(_marked(1, 256, 128, 16, True), skylake)  # 8 tile rows
    assert not int8_lut.lut_applies(_marked(1, 256, 128, 4, True), haswell)  # no AVX-512BW
    huge = 1 << 16  # 65536 x 65536 at p=1: a 512 MiB tile is fine, four times that is not
    assert int8_lut.lut_applies(_marked(1, huge, huge, 1, False), skylake)
    assert not int8_lut.lut_applies(_marked(1, 2 * huge, 2 * huge, 1, False), skylake)
    assert int8_lut.lut_applies(_marked(tirx.Var("m", "int64"), 256, 128, 4, True), skylake)
    float32 = kernels.tiled_linear_primfunc(1, 256, 128, 4, False, True)
    assert not int8_lut.lut_applies(float32, skylake)
    assert not int8_lut.lut_applies(_marked(1, 256, 128, 4, True), tvm.target.Target("cuda"))


class _TwoLayers(nn.Module):
    """A layer the LUT form takes (512 -> 256, p=4: 64 tile rows) and one it does not
    (256 -> 40 at p=4: 10 tile rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(512, 256)
        self.fc2 = nn.Linear(256, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _imported(model: nn.Module, x: torch.Tensor, cfg, dynamic: bool = False):
    gm = tbn.rewrite(model, (x,), cfg)
    return relax_import.import_graph(gm, (x,), dynamic).mod


def test_pass_rewrites_only_the_layers_it_can():
    torch.manual_seed(0)
    model, x, cfg = _TwoLayers(), torch.randn(1, 512), tbn.TBNConfig(p=4)
    skylake = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    mod = mark_precision(_imported(model, x, cfg), "int8")
    new = int8_lut.relayout_lut_tiles(mod, skylake)
    lut = [gv.name_hint for gv, f in new.functions.items() if "int8-lut" in str(f.attrs or "")]
    assert len(lut) == 1
    tiled = [f for f in new.functions.values() if kernels.kernel_kind(f) == "linear_aligned"]
    assert len(tiled) == 2  # fc1's float-layout kernel is gone, fc2 keeps its own
    # float32 builds, a static batch from LUT_MAX_ROWS on and targets without
    # AVX-512BW are left alone
    float_mod = _imported(model, x, cfg)
    assert int8_lut.relayout_lut_tiles(float_mod, skylake).same_as(float_mod)
    many = mark_precision(_imported(model, torch.randn(32, 512), cfg), "int8")
    assert int8_lut.relayout_lut_tiles(many, skylake).same_as(many)
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert int8_lut.relayout_lut_tiles(mod, haswell).same_as(mod)


def _two_layer_reference(gm, x: torch.Tensor) -> np.ndarray:
    """numpy reference of the two int8 layers, from the rewritten layers' own tiles."""
    hidden = np.maximum(_layer_reference(gm.fc1, x.numpy()), 0)
    return _layer_reference(gm.fc2, hidden)


@needs_avx512bw
@pytest.mark.parametrize("batch", [1, 5])
def test_compiled_static_batch_matches_reference_and_survives_save(batch, tmp_path):
    torch.manual_seed(1)
    model, cfg = _TwoLayers().eval(), tbn.TBNConfig(p=4)
    x = torch.randn(batch, 512)
    cm = tbn.compile(model, (x,), target="llvm", config=cfg, precision="int8", dynamic_batch=False)
    got = cm(x).numpy()
    _tight(got, _two_layer_reference(tbn.rewrite(model, (x,), cfg), x))
    path = tmp_path / "m.tbn"
    cm.save(path)
    np.testing.assert_array_equal(tbn.load(path)(x).numpy(), got)


@needs_avx512bw
def test_compiled_symbolic_batch_matches_reference_at_every_batch():
    """A symbolic batch: the LUT form below 32 rows, the tile restored to words in column
    layout for the panel form from 32 rows on."""
    torch.manual_seed(2)
    model, cfg = _TwoLayers().eval(), tbn.TBNConfig(p=4)
    cm = tbn.compile(model, (torch.randn(1, 512),), target="llvm", config=cfg, precision="int8")
    assert cm.static_batch is None
    gm = tbn.rewrite(model, (torch.randn(1, 512),), cfg)
    for batch in (1, 3, 16, 31, 32, 40):
        x = torch.randn(batch, 512)
        _tight(cm(x).numpy(), _two_layer_reference(gm, x))


def _layer_reference(layer: nn.Module, x: np.ndarray) -> np.ndarray:
    """The int8 result of a rewritten tiled linear (its packed tile, alphas, bias)."""
    p = layer.alphas.numel()
    n, k = layer.bias.numel(), x.shape[1]
    signs = tiling.unpack_bits(layer.tile, n // p * k).reshape(n // p, k)
    return int8_reference(x.astype(np.float32), signs, layer.alphas, layer.bias.detach(), p)


@pytest.mark.parametrize("form", ["panel", "bits"])
def test_int8_forms_read_the_column_layout(form):
    """The forms the symbolic-batch LUT build falls back on from 32 rows (panel), and the
    bits form, built for a tile in column layout (word w of row r at w * rows + r)."""
    if form == "bits" and int8_cpu._dot_intrinsic(HOST) != int8_cpu.VNNI_DOT:
        pytest.skip("the bits form needs AVX-512 VNNI")
    m, k, n, p = tirx.Var("m", "int64"), 256, 128, 2
    func = _marked(m, k, n, p, True).with_attr(TILE_LAYOUT_ATTR, COLUMNS)
    if form == "panel":
        built = int8_cpu._column_panel_form(func, HOST)
    else:
        built = int8_cpu._bits_scheduled(func, int8_cpu.BITS_BLOCK_ROWS)
    lib = build_kernel(built)
    words, signs, alphas, b = random_layer(k, n, p, True, seed=8)
    columns = as_numpy(words).reshape(n // p, k // 32).T.reshape(-1).copy()
    for rows in (4, 40):
        x = torch.randn(rows, k)
        out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
        args = [x.numpy(), columns, alphas.numpy(), b.numpy()]
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        _tight(out.numpy(), int8_reference(x.numpy(), signs, alphas, b, p))


class _SameLayerTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


def _uint32_constants(mod: tvm.IRModule) -> list:
    """The distinct uint32 constant nodes of ``main`` (the packed tiles)."""
    found: list = []

    def visit(e) -> None:
        is_tile = isinstance(e, tvm.ir.Constant) and getattr(e.ty, "dtype", "") == "uint32"
        if is_tile and not any(e.same_as(f) for f in found):
            found.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_pass_lays_out_a_shared_tile_once():
    torch.manual_seed(3)
    model, x, cfg = _SameLayerTwice().eval(), torch.randn(2, 256), tbn.TBNConfig(p=4)
    skylake = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    mod = mark_precision(_imported(model, x, cfg), "int8")
    new = int8_lut.relayout_lut_tiles(mod, skylake)
    before, after = _uint32_constants(mod), _uint32_constants(new)
    assert len(after) == len({c.value.numpy().tobytes() for c in before}) == 1
    expected = int8_lut.lut_tile_words(before[0].value.numpy(), 64, 256)
    np.testing.assert_array_equal(after[0].value.numpy(), expected)
