"""Cortex-M schedules of functions that are not tile kernels (schedule_rules.mcu), run on
the host CPU and compared with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from tbn_compiler.backends import kernels, schedule_rules  # noqa: E402
from tbn_compiler.backends.schedule_rules import mcu  # noqa: E402

HOST = schedule_rules.host_target()


def _pool_func(shape, kernel, stride, padding):
    x = te.placeholder(shape, "float32", name="x")
    y = kernels.max_pool_te(x, kernel, stride, padding, (1, 1), False)
    return te.create_prim_func([x, y]), [int(d) for d in y.shape]


def _run(func, x: np.ndarray, out_shape) -> np.ndarray:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    fn = tvm.compile(mod, target=HOST)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), tvm.cpu())
    fn["main"](tvm.runtime.tensor(x, tvm.cpu()), out)
    return out.numpy()


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (0, 0))],
)
def test_mcu_max_pool_matches_torch_with_nans(kernel, stride, padding) -> None:
    """Unrolled windows with a scalar accumulator (and, unpadded, no copy of the input)
    compute torch's max pooling, NaN and -inf included."""
    shape = (1, 3, 8, 8)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 4:6, 4:6] = -np.inf
    func, out_shape = _pool_func(shape, kernel, stride, padding)
    scheduled = mcu.schedule_mcu(func)
    assert "T.unroll" in scheduled.script()
    if not any(padding):
        assert '"pad"' not in scheduled.script()  # the copy is gone
    ref = F.max_pool2d(torch.from_numpy(x), kernel, stride, padding).numpy()
    np.testing.assert_array_equal(_run(scheduled, x, out_shape), ref)


def test_large_windows_keep_their_loops() -> None:
    """A window over more than MAX_UNROLLED_WINDOW elements is not unrolled."""
    func, out_shape = _pool_func((1, 2, 10, 10), (5, 5), (5, 5), (0, 0))
    scheduled = mcu.schedule_mcu(func)
    assert "T.unroll" not in scheduled.script()
    x = np.random.default_rng(1).standard_normal((1, 2, 10, 10)).astype(np.float32)
    ref = F.max_pool2d(torch.from_numpy(x), 5, 5).numpy()
    np.testing.assert_array_equal(_run(scheduled, x, out_shape), ref)


def test_per_channel_parameters_are_read_once_per_channel() -> None:
    """An inference BatchNorm + ReLU (per-channel parameters) reads each parameter once
    per channel into a local scalar, and computes what torch does."""
    shape = (1, 4, 5, 6)
    x = te.placeholder(shape, "float32", name="x")
    mean = te.placeholder((4, 1, 1), "float32", name="mean")
    scale = te.placeholder((4, 1, 1), "float32", name="scale")
    y = te.compute(
        shape,
        lambda n, c, h, w: tvm.tirx.max(
            (x[n, c, h, w] - mean[c, 0, 0]) * scale[c, 0, 0], tvm.tirx.const(0.0, "float32")
        ),
        name="y",
    )
    scheduled = mcu.schedule_mcu(te.create_prim_func([x, mean, scale, y]))
    text = scheduled.script()
    assert "mean_global" in text and "scale_global" in text
    rng = np.random.default_rng(2)
    xs, ms, ss = (rng.standard_normal(s).astype(np.float32) for s in (shape, (4, 1, 1), (4, 1, 1)))
    mod = tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")})
    fn = tvm.compile(mod, target=HOST)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(shape, np.float32), dev)
    fn["main"](*(tvm.runtime.tensor(a, dev) for a in (xs, ms, ss)), out)
    ref = torch.relu((torch.from_numpy(xs) - torch.from_numpy(ms)) * torch.from_numpy(ss))
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
