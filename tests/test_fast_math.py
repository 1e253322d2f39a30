"""The CPU generic schedule's vectorizable math and index simplification, against torch.

* :func:`fast_math.with_fast_math`: ``erf`` and ``sigmoid`` (GELU, SiLU, QuickGELU) as
  TOPI's polynomials, checked against float64 torch over a wide range;
* :func:`cpu.without_batch_modulo`: a reshape of a symbolic batch inlined into a
  reduction leaves ``% n`` indices, which it drops where provable; the scheduled function
  still computes torch's result at several batch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx, topi

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


def _batch_reshape_sum(rows: int, width: int) -> tirx.PrimFunc:
    """``y[b * rows + r] = sum_k x[b, r * width + k]`` for a symbolic batch ``b``: a
    reshape inlined into a reduction, whose indices carry ``% n``."""
    n = tirx.Var("n", "int64")
    x = te.placeholder((n, rows * width), "float32", name="x")
    flat = topi.reshape(x, (n * rows, width))
    k = te.reduce_axis((0, width), name="k")
    y = te.compute((n * rows,), lambda i: te.sum(flat[i, k], axis=k), name="y")
    return te.create_prim_func([x, y])


def test_batch_modulo_dropped_and_results_kept():
    func = _batch_reshape_sum(197, 64)
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root")
    cpu.inline_producers(sch, root)
    assert "% n" in sch.mod["main"].script()
    assert "% n" not in cpu.without_batch_modulo(sch.mod["main"]).script()
    scheduled = cpu.parallelize_generic(func)
    for batch in (1, 3):
        xs = np.random.default_rng(batch).normal(size=(batch, 197 * 64)).astype("float32")
        want = xs.reshape(batch * 197, 64).astype("float64").sum(axis=1)
        got = _run(scheduled, [xs], (batch * 197,))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_division_and_modulo_by_a_symbolic_size_dropped_where_provable():
    """``i // n`` and ``i % n`` for ``i < n`` become ``0`` and ``i``; ``i % 5`` stays."""
    n = tirx.Var("n", "int64")
    x = te.placeholder((1, n), "float32", name="x")
    y = te.compute((n,), lambda i: x[i // n, i % n] + tirx.Cast("float32", i % 5), name="y")
    script = cpu.without_batch_modulo(te.create_prim_func([x, y])).script()
    assert "// n" not in script and "% n" not in script and "% T.int64(5)" in script
