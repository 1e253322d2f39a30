"""TIR kernels for the tile ops (tbn_compiler.backends.kernels + schedule_rules).

Each kernel is built for the host CPU (scheduled) and compared with the
``tbn_compiler.ops`` reference; CUDA builds are compiled to cubin with nvcc.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from tbn_compiler import ops, tiling  # noqa: E402
from tbn_compiler.backends import kernels, schedule_rules  # noqa: E402

RTOL, ATOL = 1e-4, 1e-4
HOST = schedule_rules.host_target()


def _tile(numel: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed tile (uint32 words) and alphas for a weight of ``numel`` elements."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(numel // p, generator=g) > 0.5, 1.0, -1.0)
    return tiling.pack_bits(signs), torch.rand(p, generator=g) + 0.5


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.uint32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.numpy()


def _run_cpu(func, inputs: list[torch.Tensor], out_shape, schedule: bool = True) -> np.ndarray:
    if schedule:
        func = schedule_rules.schedule_for(func, HOST)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    fn = tvm.compile(mod, target=HOST)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(_np(t), dev) for t in inputs]
    out = tvm.runtime.tensor(np.zeros(tuple(out_shape), np.float32), dev)
    fn["main"](*args, out)
    return out.numpy()


def _close(got: np.ndarray, ref: torch.Tensor) -> None:
    np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=ATOL * float(ref.abs().max()))


# --------------------------------------------------------------------------- linear

LINEAR_CASES = [
    # m, in, out, p, weight_in_out, bias, expected kind
    (1, 64, 32, 4, False, True, "linear_aligned"),
    (3, 64, 32, 4, False, False, "linear_aligned"),
    (5, 96, 24, 8, False, True, "linear_aligned"),
    (2, 50, 20, 2, False, True, "linear_aligned"),  # in % 8 != 0: bit-serial
    (2, 40, 16, 4, False, True, "linear_aligned"),  # in % 8 == 0: byte table, rows mid-word
    (3, 784, 8, 4, False, False, "linear_aligned"),
    (4, 1, 8, 4, False, True, "linear_aligned"),  # K = 1
    (3, 96, 1, 1, False, False, "linear_aligned"),  # N = 1, p = 1
    (2, 64, 1, 2, False, True, "linear_general"),  # N = 1, chunk < row
    (1, 30, 7, 3, False, True, "linear_general"),
    (6, 20, 12, 8, False, False, "linear_general"),
    (2, 64, 32, 4, True, True, "linear_in_out_aligned"),
    (1, 40, 30, 4, True, False, "linear_in_out_aligned"),
    (3, 8, 1, 4, True, True, "linear_in_out_aligned"),
    (5, 16, 64, 8, True, True, "linear_in_out_aligned"),
    (3, 64, 12, 8, False, True, "linear_general"),  # realigned words
    (5, 64, 13, 8, False, False, "linear_general"),  # words wrap mid-word (L % 32 = 8)
    (2, 12, 64, 8, True, True, "linear_general"),  # (in, out) realigned words
    (1, 13, 64, 8, True, False, "linear_general"),
    (2, 10, 21, 7, True, True, "linear_general"),
    (1, 9, 4, 6, True, False, "linear_general"),
]


@pytest.mark.parametrize("m,k,n,p,io,bias,kind", LINEAR_CASES)
def test_tiled_linear_cpu(m, k, n, p, io, bias, kind):
    words, alphas = _tile(k * n, p, seed=m + k + n)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    ref = ops.tiled_linear(x, words, alphas, b, n, k, io)
    func = kernels.tiled_linear_primfunc(m, k, n, p, io, bias)
    assert kernels.kernel_kind(func) == kind
    got = _run_cpu(func, [x, words, alphas] + ([b] if bias else []), (m, n))
    _close(got, ref)


@pytest.mark.parametrize("io", [False, True])
def test_unscheduled_linear_matches(io):
    words, alphas = _tile(64 * 32, 4)
    x = torch.randn(2, 64)
    b = torch.randn(32)
    func = kernels.tiled_linear_primfunc(2, 64, 32, 4, io, True)
    got = _run_cpu(func, [x, words, alphas, b], (2, 32), schedule=False)
    _close(got, ops.tiled_linear(x, words, alphas, b, 32, 64, io))


def test_generic_llvm_target_and_float64():
    """Plain ``llvm`` (no CPU named: SSE2) still builds the same schedules; other dtypes work."""
    words, alphas = _tile(64 * 13, 8)
    x, b = torch.randn(3, 64, dtype=torch.float64), torch.randn(13, dtype=torch.float64)
    target = tvm.target.Target("llvm")
    for dtype in ("float32", "float64"):
        xt, at, bt = (
            x.to(getattr(torch, dtype)),
            alphas.to(getattr(torch, dtype)),
            b.to(getattr(torch, dtype)),
        )
        func = schedule_rules.schedule_for(
            kernels.tiled_linear_primfunc(3, 64, 13, 8, False, True, dtype), target
        )
        fn = tvm.compile(
            tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
        )
        out = tvm.runtime.tensor(np.zeros((3, 13), dtype))
        fn["main"](*[tvm.runtime.tensor(_np(t)) for t in (xt, words, at, bt)], out)
        ref = ops.tiled_linear(x, words, alphas.double(), b, 13, 64, False)
        _close(out.numpy().astype(np.float64), ref)


def test_buffers_and_attrs():
    func = kernels.tiled_linear_primfunc(2, 64, 32, 4, False, True)
    names = [buf.name for buf in func.params]  # TIR params are buffers in TVM 0.27
    assert names == ["x", "tile", "alphas", "bias", "out"]
    assert func.params[1].dtype == "uint32"
    assert all(str(d.ty) == "int64" for d in func.params[0].shape)
    assert "global_symbol" not in (func.attrs or {})
    before = func.script()
    schedule_rules.schedule_for(func, HOST)
    assert func.script() == before  # input left untouched
    with pytest.raises(ValueError):
        schedule_rules.schedule_for(func.with_attr("tbn_kernel", "nope"), HOST)
    with pytest.raises(ValueError):
        kernels.tiled_linear_primfunc(1, 10, 3, 4, False, False)  # 30 % 4 != 0


# --------------------------------------------------------------------------- conv

CONV_CASES = [
    # x shape, weight shape, stride, padding, dilation, groups, p, bias, expected kind
    ((2, 8, 9, 9), (8, 8, 3, 3), 1, 1, 1, 1, 4, True, "conv_aligned"),  # im2col, bytes
    ((1, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, 2, True, "conv_aligned"),  # direct (27 taps)
    ((1, 4, 11, 10), (8, 4, 3, 3), 2, 2, 2, 1, 2, False, "conv_aligned"),
    ((1, 16, 5, 5), (8, 16, 1, 1), 1, 0, 1, 1, 8, True, "conv_aligned"),
    ((2, 32, 7, 6), (8, 32, 3, 3), 2, 1, 2, 1, 4, True, "conv_aligned"),  # im2col path
    ((1, 32, 5, 5), (12, 32, 1, 1), 1, 0, 1, 1, 3, False, "conv_aligned"),  # im2col 1x1
    ((2, 64, 9), (8, 64, 1), 1, 0, 1, 1, 2, True, "conv_aligned"),  # im2col 1-D
    ((1, 3, 7, 7), (5, 3, 2, 2), 1, 0, 1, 1, 4, True, "conv_general"),
    ((1, 8, 9, 9), (6, 4, 3, 3), 2, 1, 2, 2, 4, False, "conv_general"),
    ((1, 64, 5, 5), (4, 32, 3, 3), 1, 1, 1, 2, 2, True, "conv_general"),  # grouped, words
    ((2, 32, 4, 3), (5, 32, 1, 1), 1, 0, 1, 1, 2, False, "conv_general"),  # words, wraps
    ((2, 6, 8, 8), (6, 1, 3, 3), 1, 1, 1, 6, 2, True, "conv_general"),  # depthwise
    ((2, 4, 17), (8, 4, 3), 2, 2, 1, 1, 4, True, "conv_aligned"),
    ((1, 4, 12), (4, 1, 5), 1, 2, 2, 4, 2, False, "conv_general"),  # depthwise 1-D
    ((1, 3, 10), (5, 3, 2), 1, 0, 1, 1, 3, True, "conv_general"),
    ((3, 2, 1), (4, 2, 1), 1, 0, 1, 1, 2, True, "conv_aligned"),  # width 1
]


@pytest.mark.parametrize("xs,ws,stride,pad,dil,groups,p,bias,kind", CONV_CASES)
def test_tiled_conv_cpu(xs, ws, stride, pad, dil, groups, p, bias, kind):
    numel = int(np.prod(ws))
    words, alphas = _tile(numel, p, seed=numel)
    x = torch.randn(*xs)
    b = torch.randn(ws[0]) if bias else None
    nd = len(ws) - 2
    fn = ops.tiled_conv1d if nd == 1 else ops.tiled_conv2d
    ref = fn(x, words, alphas, b, list(ws), [stride] * nd, [pad] * nd, [dil] * nd, groups)
    func = kernels.tiled_conv_primfunc(xs, ws, stride, pad, dil, groups, p, bias)
    assert kernels.kernel_kind(func) == kind
    got = _run_cpu(func, [x, words, alphas] + ([b] if bias else []), ref.shape)
    _close(got, ref)


# --------------------------------------------------------------------------- CUDA source

CUDA_FUNCS = {
    "linear_aligned_warp": lambda: kernels.tiled_linear_primfunc(2, 1024, 64, 4, False, True),
    "linear_aligned_odd": lambda: kernels.tiled_linear_primfunc(3, 50, 20, 2, False, False),
    "linear_in_out": lambda: kernels.tiled_linear_primfunc(2, 64, 96, 4, True, True),
    "linear_general": lambda: kernels.tiled_linear_primfunc(1, 30, 7, 3, False, True),
    "linear_general_words": lambda: kernels.tiled_linear_primfunc(2, 512, 13, 8, False, True),
    "linear_general_in_out": lambda: kernels.tiled_linear_primfunc(2, 13, 64, 8, True, False),
    "conv2d_aligned": lambda: kernels.tiled_conv_primfunc(
        (2, 8, 9, 9), (8, 8, 3, 3), 1, 1, 1, 1, 4, True
    ),
    "conv2d_direct": lambda: kernels.tiled_conv_primfunc(
        (1, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, 2, True
    ),
    "conv2d_im2col": lambda: kernels.tiled_conv_primfunc(
        (1, 32, 6, 6), (8, 32, 3, 3), 1, 1, 1, 1, 4, True
    ),
    "conv2d_grouped_words": lambda: kernels.tiled_conv_primfunc(
        (1, 64, 5, 5), (4, 32, 3, 3), 1, 1, 1, 2, 2, True
    ),
    "conv2d_depthwise": lambda: kernels.tiled_conv_primfunc(
        (1, 6, 8, 8), (6, 1, 3, 3), 1, 1, 1, 6, 2, False
    ),
    "conv1d": lambda: kernels.tiled_conv_primfunc((2, 4, 17), (8, 4, 3), 2, 2, 1, 1, 4, True),
}


def _cuda_sources(module) -> list[str]:
    found = []
    if module.kind == "cuda":
        found.append(module.inspect_source("cuda"))
    for sub in module.imports:
        found += _cuda_sources(sub)
    return found


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("name", sorted(CUDA_FUNCS))
def test_cuda_build_compiles(name):
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    func = schedule_rules.schedule_for(CUDA_FUNCS[name](), target)
    with target:  # the arch for the kernel compile callback when TVM's CUDA runtime is loaded
        ex = tvm.compile(
            tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
        )
    sources = _cuda_sources(ex.mod)
    assert sources and "__global__" in sources[0]
    if name in ("linear_aligned_warp", "conv2d_im2col", "linear_general_words"):
        assert "__shfl" in sources[0]  # cross-thread (warp) reduction
    with target:
        for arch in ("sm_80", "sm_90"):
            cubin = tvm.support.nvcc.compile_cuda(
                "\n".join(sources), target_format="cubin", arch=arch, compiler="nvcc"
            )
            assert len(cubin) > 0
