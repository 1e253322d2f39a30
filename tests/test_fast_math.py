"""The CPU generic schedule's vectorizable math, against torch: ``erf`` and ``sigmoid``
(GELU, SiLU, QuickGELU) as TOPI's polynomials (:func:`fast_math.with_fast_math`),
checked against float64 torch over a wide range and inside the generic schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx

from tbn_compiler.backends.schedule_rules import cpu, fast_math, host_target

N = 4096


def _run(func: tirx.PrimFunc, inputs: list[np.ndarray], out_shape: tuple) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func}), host_target())
    args = [tvm.runtime.tensor(a) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*args, out)
    return out.numpy()


def _unary(name: str) -> tirx.PrimFunc:
    x = te.placeholder((N,), "float32", name="x")
    y = te.compute((N,), lambda i: getattr(tirx, name)(x[i]), name="y")
    return te.create_prim_func([x, y])


@pytest.mark.parametrize(
    "name, reference, low, high",
    [("erf", torch.erf, -10.0, 10.0), ("sigmoid", torch.sigmoid, -30.0, 30.0)],
)
def test_fast_calls_replace_the_library_call_within_1e6(name, reference, low, high):
    func = fast_math.with_fast_math(_unary(name))
    assert f"T.{name}(" not in func.script()
    xs = np.linspace(low, high, N, dtype="float32")
    got = _run(cpu.parallelize_generic(func), [xs], (N,))
    want = reference(torch.from_numpy(xs).double()).numpy()
    assert np.abs(got - want).max() < 1e-6


def test_gelu_in_the_generic_schedule_matches_torch():
    """GELU as Relax legalizes it (erf form) through parallelize_generic equals torch's."""
    x = te.placeholder((64, 256), "float32", name="x")
    erf = te.compute(x.shape, lambda i, j: tirx.erf(x[i, j] * (0.5**0.5)), name="erf")
    gelu = te.compute(x.shape, lambda i, j: x[i, j] * (0.5 + erf[i, j] * 0.5), name="gelu")
    func = te.create_prim_func([x, gelu])
    scheduled = cpu.parallelize_generic(func)
    assert "T.erf(" not in scheduled.script()
    xs = np.random.default_rng(0).normal(0, 3, (64, 256)).astype("float32")
    want = torch.nn.functional.gelu(torch.from_numpy(xs).double()).numpy()
    got = _run(scheduled, [xs], xs.shape)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


def test_other_calls_and_dtypes_stay():
    x = te.placeholder((N,), "float64", name="x")
    func = te.create_prim_func([x, te.compute((N,), lambda i: tirx.erf(x[i]), name="y")])
    assert "T.erf(" in fast_math.with_fast_math(func).script()
    assert "T.exp(" in fast_math.with_fast_math(_unary("exp")).script()
