"""CPU schedules of what is not a tile kernel (schedule_rules.cpu.parallelize_generic)
and of small tile kernels: exact against numpy or the rewritten graph, parallel where
the work pays for it (one parallel loop per function: a ``parallel`` ForKind in the
scheduled TIR), serial where it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax, te, tirx, topi  # noqa: E402

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import kernels, pipelines, schedule_rules  # noqa: E402
from tbn_compiler.backends.relax_import import import_graph  # noqa: E402
from tbn_compiler.backends.schedule_rules import cpu  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = schedule_rules.host_target()
RNG = np.random.default_rng(0)


def _loops(stmt) -> list:
    """Every For loop of a TIR statement, outermost first."""
    found = []
    if isinstance(stmt, tirx.For):
        found.append(stmt)
    for name in ("body", "block", "init", "then_case", "else_case"):
        child = getattr(stmt, name, None)
        if isinstance(child, tirx.Stmt):
            found += _loops(child)
    for child in getattr(stmt, "seq", None) or []:
        found += _loops(child)
    return found


def _parallel_loops(func: tirx.PrimFunc) -> int:
    return sum(1 for loop in _loops(func.body) if loop.kind == tirx.ForKind.PARALLEL)


def _vector_loops(func: tirx.PrimFunc) -> int:
    return sum(1 for loop in _loops(func.body) if loop.kind == tirx.ForKind.VECTORIZED)


def _run(func: tirx.PrimFunc, inputs: list[np.ndarray], out_shape) -> np.ndarray:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, HOST)
    out = tvm.runtime.empty(out_shape, "float32")
    lib["main"](*[tvm.runtime.tensor(a) for a in inputs], out)
    return out.numpy()


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


# --------------------------------------------------------------------------- cases


def _softmax(rows: int, cols: int):
    x = te.placeholder((rows, cols), name="x")
    func = te.create_prim_func([x, topi.nn.softmax(x, axis=1)])
    a = _rand(rows, cols)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return func, [a], e / e.sum(axis=1, keepdims=True)


def _layer_norm(rows: int, cols: int):
    x = te.placeholder((rows, cols), name="x")
    g, b = te.placeholder((cols,), name="g"), te.placeholder((cols,), name="b")
    func = te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[1], epsilon=1e-5)])
    a, ga, be = _rand(rows, cols), _rand(cols), _rand(cols)
    mean, var = a.mean(axis=1, keepdims=True), a.var(axis=1, keepdims=True)
    return func, [a, ga, be], (a - mean) / np.sqrt(var + 1e-5) * ga + be


def _matmul_bias_relu(m: int, k: int, n: int):
    x, w = te.placeholder((m, k), name="x"), te.placeholder((k, n), name="w")
    bias = te.placeholder((n,), name="bias")
    r = te.reduce_axis((0, k), name="r")
    mm = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="mm")
    out = te.compute((m, n), lambda i, j: tirx.max(mm[i, j] + bias[j], 0.0), name="out")
    a, wa, ba = _rand(m, k), _rand(k, n), _rand(n)
    return te.create_prim_func([x, w, bias, out]), [a, wa, ba], np.maximum(a @ wa + ba, 0)


def _elementwise_chain(*shape: int):
    """(x * 2 + 1) transposed, then ReLU: three blocks that should become one pass."""
    x = te.placeholder(shape, name="x")
    scaled = te.compute(shape, lambda *i: x[i] * 2.0 + 1.0, name="scaled")
    moved = topi.transpose(scaled, [0, 2, 1])
    out = topi.nn.relu(moved)
    a = _rand(*shape)
    return te.create_prim_func([x, out]), [a], np.maximum(a * 2 + 1, 0).transpose(0, 2, 1)


def _attention(batch: int, seq: int, heads: int, dim: int):
    """TVM's legalized ``R.nn.attention`` (layout changes, two batch matmuls, softmax)."""
    shape = relax.TensorType((batch, seq, heads, dim), "float32")
    q, k, v = (relax.Var(n, shape) for n in "qkv")
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v]):
        bb.emit_func_output(bb.emit(relax.op.nn.attention(q, k, v)))
    mod = relax.transform.LegalizeOps()(bb.get())
    func = next(f for gv, f in mod.functions.items() if gv.name_hint != "main")
    qa, ka, va = (_rand(batch, seq, heads, dim) for _ in range(3))
    scores = np.einsum("bshd,bthd->bhst", qa, ka) / np.sqrt(dim)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return func, [qa, ka, va], np.einsum("bhst,bthd->bshd", p, va)


# name, case, parallel loops expected (0: serial, the work is too small to pay)
CASES = [
    ("softmax rows", lambda: _softmax(256, 512), 1),
    ("softmax small", lambda: _softmax(4, 64), 0),
    ("layer norm", lambda: _layer_norm(512, 256), 1),
    ("matmul + bias + relu", lambda: _matmul_bias_relu(64, 256, 128), 1),
    ("attention", lambda: _attention(2, 64, 4, 32), 1),
    ("elementwise chain, large", lambda: _elementwise_chain(64, 128, 128), 1),
    ("elementwise chain, small", lambda: _elementwise_chain(4, 32, 16), 0),
]


@pytest.mark.parametrize("name, case, parallel", CASES, ids=[c[0] for c in CASES])
def test_generic_schedule_is_exact_and_parallel_once_where_it_pays(name, case, parallel):
    func, inputs, want = case()
    scheduled = cpu.parallelize_generic(func)
    assert _parallel_loops(scheduled) == parallel, scheduled.script()
    assert _vector_loops(scheduled) >= 1, scheduled.script()
    np.testing.assert_allclose(_run(scheduled, inputs, want.shape), want, rtol=1e-4, atol=1e-5)


def test_layout_and_cheap_producers_are_inlined_costly_ones_kept():
    """An elementwise chain leaves one block (no intermediate buffer); softmax keeps its
    exponentials (computed once) and its two row reductions."""
    func, _, _ = _elementwise_chain(8, 16, 16)
    assert "alloc_buffer" not in cpu.parallelize_generic(func).script()
    func, _, _ = _softmax(256, 512)
    script = cpu.parallelize_generic(func).script()
    assert script.count("T.exp(") == 1 and "T_softmax_exp" in script


def test_small_tile_kernels_stay_serial_large_ones_parallel():
    small = kernels.tiled_linear_primfunc(1, 64, 64, 1, False, True)
    large = kernels.tiled_linear_primfunc(16, 512, 512, 8, False, True)
    assert _parallel_loops(schedule_rules.schedule_for(small, HOST)) == 0
    assert _parallel_loops(schedule_rules.schedule_for(large, HOST)) >= 1


def test_transformer_layer_parity_and_one_parallel_loop_per_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 32, 64)
    gm = tbn.rewrite(layer, (x,), tbn.TBNConfig(p=4, min_numel=0))
    with HOST:
        mod = pipelines.cpu(HOST)(import_graph(gm, (x,)).mod)
    attention = [f for gv, f in mod.functions.items() if "attention" in gv.name_hint]
    assert attention and all(_parallel_loops(f) == 1 for f in attention)
    cm = tbn.compile_graph(gm, (x,), "llvm")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), gm(x), rtol=1e-4, atol=1e-5)


def test_cpu_softmax_and_attention_use_a_vector_exp_within_float32_rounding():
    """The CPU pipeline legalizes softmax and attention with a polynomial exp (no call
    per element to the C library); outputs stay within a few float32 ulp of numpy."""
    x_type = relax.TensorType((8, 64, 4, 32), "float32")
    q, k, v = (relax.Var(n, x_type) for n in "qkv")
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            att = bb.emit(relax.op.nn.attention(q, k, v))
            out = bb.emit_output(relax.op.nn.softmax(att, axis=-1))
        bb.emit_func_output(out)
    with HOST:
        legal = tvm.transform.Sequential(pipelines.legalize_and_fuse(HOST))(bb.get())
    funcs = [f for f in legal.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert funcs and not any("T.exp(" in f.script() for f in funcs)
    exe = tvm.compile(bb.get(), HOST, relax_pipeline=pipelines.cpu(HOST))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    qa, ka, va = (_rand(8, 64, 4, 32) * 3 for _ in range(3))
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (qa, ka, va)]).numpy()
    scores = np.einsum("bshd,bthd->bhst", qa, ka) / np.sqrt(32)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att = np.einsum("bhst,bthd->bshd", p / p.sum(axis=-1, keepdims=True), va)
    e = np.exp(att - att.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
