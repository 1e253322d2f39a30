"""Lookup-table tile kernels (tbn_compiler.backends.lut_kernels) against numpy / torch.

The kernels are built with their Cortex-M schedule and run on the host CPU (LLVM), and
compared with float64 references computed from the unpacked tile; on Cortex-M the MNIST
MLP must use them and stay within its instruction budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")

from models import MnistMLP  # noqa: E402
from reference import np_pack  # noqa: E402

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import kernels, lut_kernels, schedule_rules  # noqa: E402
from tbn_compiler.backends.cortex_m import ToolchainError, toolchain  # noqa: E402
from tbn_compiler.backends.schedule_rules import mcu  # noqa: E402

RTOL = 1e-4
HOST = schedule_rules.host_target()


def _case(numel: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random tile signs (numel / p of them), their packed words and alphas."""
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random(numel // p) > 0.5, 1.0, -1.0)
    return signs, np_pack(signs), (rng.random(p) + 0.5).astype(np.float32)


def _weight(signs: np.ndarray, alphas: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """W[e] = alpha[e // L] * sign[e % L] (float64, flat row-major in ``shape``)."""
    e = np.arange(int(np.prod(shape)))
    length = signs.size
    return (alphas.astype(np.float64)[e // length] * signs[e % length]).reshape(shape)


def _run(func, inputs: list[np.ndarray], out_shape) -> np.ndarray:
    """Build ``func`` (already scheduled) for the host and run it."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    fn = tvm.compile(mod, target=HOST)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(tuple(out_shape), np.float32), dev)
    fn["main"](*args, out)
    return out.numpy()


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("row_len", [1, 3, 4, 9, 12, 36, 48, 100, 128, 288, 784, 1000, 1024])
def test_chunking_covers_each_row_once(row_len: int) -> None:
    """Chunks x nibbles cover ceil(row_len / 4) groups exactly; blocks respect the table
    budget (or are one chunk); word mode only for whole-word rows, shift mode only where
    a chunk can never straddle two words."""
    ch = lut_kernels.chunking(row_len)
    assert ch.chunks * ch.per_chunk == -(-row_len // 4)
    assert ch.chunks % ch.block == 0
    assert ch.block == 1 or ch.table_bytes <= lut_kernels.MAX_TABLE_BYTES
    if ch.mode == "word":
        assert row_len % 32 == 0 and ch.per_chunk == 8
    if ch.mode == "shift":
        bits = 4 * ch.per_chunk
        starts = {(r * row_len + c * bits) % 32 for r in range(64) for c in range(ch.chunks)}
        assert all(s + bits <= 32 for s in starts)


# --------------------------------------------------------------------------- linear

LINEAR_CASES = [
    # m, in, out, p, bias: chunk modes word (in % 32 == 0), shift, funnel, padded rows
    (1, 784, 128, 4, True),  # the MNIST MLP's fc1: rows start mid-word (funnel)
    (1, 128, 10, 1, False),  # its fc2: p = 1, whole words
    (3, 64, 32, 2, True),
    (2, 48, 16, 8, False),  # shift mode, one word holds several chunks
    (2, 1024, 16, 8, True),  # blocks of two chunks
    (4, 9, 32, 1, True),  # a row of 9: the last group padded with zeros
    (1, 10, 6, 2, False),
    (2, 1, 8, 4, True),  # one weight per row
]


@pytest.mark.parametrize("m,k,n,p,bias", LINEAR_CASES)
def test_linear_lut_matches_numpy(m: int, k: int, n: int, p: int, bias: bool) -> None:
    rng = np.random.default_rng(k * n + p)
    signs, words, alphas = _case(k * n, p, seed=k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    func = lut_kernels.tiled_linear_lut_primfunc(m, k, n, p, bias)
    assert kernels.kernel_kind(func) == "linear_lut"
    ref = x.astype(np.float64) @ _weight(signs, alphas, (n, k)).T + (b if bias else 0.0)
    inputs = [x, words, alphas] + ([b] if bias else [])
    _close(_run(mcu.schedule_mcu(func), inputs, (m, n)), ref)


def test_linear_lut_unscheduled_matches_scheduled() -> None:
    """The schedule only reorders the loops: unscheduled and scheduled agree bitwise."""
    m, k, n, p = 2, 100, 12, 3
    signs, words, alphas = _case(k * n, p, seed=1)
    x = np.random.default_rng(2).standard_normal((m, k)).astype(np.float32)
    func = lut_kernels.tiled_linear_lut_primfunc(m, k, n, p, False)
    plain = _run(func, [x, words, alphas], (m, n))
    np.testing.assert_array_equal(plain, _run(mcu.schedule_mcu(func), [x, words, alphas], (m, n)))
    _close(plain, x.astype(np.float64) @ _weight(signs, alphas, (n, k)).T)


def test_linear_lut_keeps_infinities_and_nans() -> None:
    """An infinite input gives +-inf in every output (its sign the weight's), a NaN input
    NaN everywhere, as the plain sum does (no table entry subtracts an input from
    itself, so no inf - inf appears)."""
    m, k, n, p = 2, 40, 8, 2
    signs, words, alphas = _case(k * n, p, seed=3)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    x[0, 13] = np.inf
    x[1, 38] = np.nan
    got = _run(
        mcu.schedule_mcu(lut_kernels.tiled_linear_lut_primfunc(m, k, n, p, False)),
        [x, words, alphas],
        (m, n),
    )
    w = _weight(signs, alphas, (n, k))
    np.testing.assert_array_equal(got[0], np.where(w[:, 13] > 0, np.inf, -np.inf))
    assert np.isnan(got[1]).all()


# --------------------------------------------------------------------------- conv

CONV_CASES = [
    # x shape, weight shape, stride, padding, dilation, p, bias
    ((1, 32, 8, 8), (64, 32, 3, 3), (1, 1), (1, 1), (1, 1), 4, False),  # digits CNN conv2
    ((1, 1, 8, 8), (32, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),  # conv1: rows of 9
    ((2, 3, 9, 7), (8, 3, 3, 2), (2, 1), (1, 0), (1, 2), 2, True),
    ((2, 8, 9), (4, 8, 3), (2,), (2,), (2,), 2, False),  # conv1d
    ((1, 4, 5, 6, 7), (4, 4, 1, 3, 2), (1, 2, 1), (0, 1, 1), (1, 1, 2), 2, True),  # conv3d
]


def _torch_conv(x, w, b, stride, padding, dilation) -> np.ndarray:
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.ndim]
    bias = None if b is None else torch.from_numpy(b).double()
    y = fn(torch.from_numpy(x).double(), torch.from_numpy(w), bias, stride, padding, dilation)
    return y.numpy()


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,p,bias", CONV_CASES)
def test_conv_lut_matches_torch(x_shape, w_shape, stride, padding, dilation, p, bias) -> None:
    rng = np.random.default_rng(int(np.prod(w_shape)))
    numel = int(np.prod(w_shape))
    signs, words, alphas = _case(numel, p, seed=numel)
    x = rng.standard_normal(x_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if bias else None
    geo = lut_kernels.ConvGeometry(x_shape, w_shape, stride, padding, dilation)
    func = lut_kernels.tiled_conv_lut_primfunc(geo, p, bias)
    assert kernels.kernel_kind(func) == "conv_lut"
    ref = _torch_conv(x, _weight(signs, alphas, w_shape), b, stride, padding, dilation)
    inputs = [x, words, alphas] + ([b] if bias else [])
    _close(_run(mcu.schedule_mcu(func), inputs, ref.shape), ref)


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,p,bias", CONV_CASES)
def test_conv_variant_reads_the_geometry(x_shape, w_shape, stride, padding, dilation, p, bias):
    """The geometry read back from a conv_aligned kernel (im2col or direct) is the one it
    was built with, and its variant is the LUT kernel of that geometry."""
    func = kernels.tiled_conv_primfunc(x_shape, w_shape, stride, padding, dilation, 1, p, bias)
    shapes = lut_kernels._buffer_shapes(func)
    geo = lut_kernels._conv_geometry(func, shapes)
    assert geo == lut_kernels.ConvGeometry(x_shape, w_shape, stride, padding, dilation)
    variant = lut_kernels.lut_variant(func, kernels.kernel_kind(func))
    assert variant is not None and kernels.kernel_kind(variant) == "conv_lut"


def test_variant_computes_what_the_kernel_computes() -> None:
    """schedule_mcu replaces an aligned linear kernel by its LUT variant: same buffers,
    same result (within rounding) as the table-free kernel."""
    m, k, n, p = 2, 96, 24, 4
    _, words, alphas = _case(k * n, p, seed=5)
    x = np.random.default_rng(6).standard_normal((m, k)).astype(np.float32)
    b = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, True)
    lut = mcu.schedule_mcu(func)
    plain = mcu.schedule_mcu(func, lut=False)
    assert kernels.kernel_kind(lut) == "linear_lut"
    assert kernels.kernel_kind(plain) == "linear_aligned"
    inputs = [x, words, alphas, b]
    _close(_run(lut, inputs, (m, n)), _run(plain, inputs, (m, n)).astype(np.float64))


@pytest.mark.parametrize(
    "func",
    [
        pytest.param(lambda: kernels.tiled_linear_primfunc(1, 30, 7, 3, False, True), id="general"),
        pytest.param(lambda: kernels.tiled_linear_primfunc(2, 64, 32, 4, True, True), id="in_out"),
        pytest.param(lambda: kernels.tiled_linear_primfunc(3, 96, 1, 1, False, False), id="1row"),
        pytest.param(
            lambda: kernels.tiled_conv_primfunc((1, 4, 6, 6), (8, 2, 3, 3), 1, 1, 1, 2, 2, False),
            id="grouped",
        ),
    ],
)
def test_no_variant_where_no_table_is_shared(func) -> None:
    """Unaligned, (in, out) and grouped kernels keep their kernels, and so does a single
    tile row (nothing would share its tables)."""
    f = func()
    assert lut_kernels.lut_variant(f, kernels.kernel_kind(f)) is None


# --------------------------------------------------------------------------- Cortex-M


def _toolchain_missing() -> str | None:
    try:
        toolchain.require_toolchain(qemu=True)
    except ToolchainError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_toolchain_missing() is not None, reason="Arm toolchain and QEMU needed")
def test_mnist_mlp_on_cortex_m4_uses_tables_within_budget() -> None:
    """The paper's MNIST MLP (fc1 p=4, fc2 p=1) on the Cortex-M4: both layers are LUT
    kernels whose tables live in the arena (no more RAM than the table-free build: 1 KiB
    arena, a small stack), the output matches the rewritten graph (rtol 1e-4), the weights
    are the ideal bytes (tile bits / 8, 4 bytes per alpha and bias), one inference takes
    at most 65,000 instructions (the table-free kernels took about 192,700), and the
    profile's per-kernel counts add up to the measured total."""
    torch.manual_seed(0)
    model, x = MnistMLP().eval(), torch.randn(1, 784)
    cfg = tbn.TBNConfig(layers={"fc1": 4, "fc2": 1})
    gm = tbn.rewrite(model, (x,), cfg)
    cm = tbn.compile(model, (x,), target="mps2-an386", config=cfg)
    try:
        with torch.no_grad():
            ref = gm(x)
        torch.testing.assert_close(cm(x), ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))
        assert cm.sources["src/tbn_kernels.c"].count("float* table = ") == 2
        mem = cm.memory
        ideal = 784 * 128 // 4 // 8 + 128 * 10 // 8 + 4 * (4 + 1) + 4 * (128 + 10)
        assert mem["weights_bytes"] == ideal
        assert mem["arena_bytes"] == 2 * 128 * 4  # fc1's output and the ReLU's
        assert mem["stack_bytes"] < 256
        steps = cm.profile(x)
        total = cm.last_run["instructions"]
        assert total <= 65_000
        assert [row["layer"] for row in steps] == ["fc1", None, "fc2"]
        assert total - 10 * len(steps) <= sum(row["instructions"] for row in steps) <= total
    finally:
        cm.close()
