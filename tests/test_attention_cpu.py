"""The CPU attention kernel (:mod:`tbn_compiler.backends.schedule_rules.attention_cpu`).

Models whose attention imports as ``R.nn.attention`` (``F.scaled_dot_product_attention``,
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) are compiled for the host
and compared with plain torch math in float64: ``softmax(Q K^T * scale) V``, or torch's
own layer run in float64. Sequence lengths that are not multiples of the kernel's row
block (1, 7, 197), several head dims (32, 64, 80), an explicit ``scale``, cross
attention with more keys than queries, and batches 1 and 3 of one module built with a
symbolic batch. A structural check makes sure the kernel is the one the build used.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax, tirx  # noqa: E402

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import pipelines  # noqa: E402
from tbn_compiler.backends.schedule_rules import host_target  # noqa: E402
from tbn_compiler.backends.schedule_rules.attention_cpu import (  # noqa: E402
    ATTENTION_ATTR,
    schedule_attention,
)

DENSE = tbn.TBNConfig(layers={"*": None})
"""No layer tiled: the compiled model computes exactly the torch model's math."""


class Attend(nn.Module):
    """``F.scaled_dot_product_attention`` of three (batch, heads, seq, dim) inputs."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


def reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` in float64 (scale ``1/sqrt(dim)`` by default)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def _qkv(batch: int, heads: int, seq: int, dim: int, keys: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = seq if keys is None else keys
    q = torch.randn(batch, heads, seq, dim, generator=gen)
    k = torch.randn(batch, heads, keys, dim, generator=gen)
    v = torch.randn(batch, heads, keys, dim, generator=gen)
    return q, k, v


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("heads", "seq", "dim", "scale"),
    [(3, 197, 64, None), (2, 7, 32, None), (1, 1, 80, None), (4, 64, 64, 0.3), (2, 17, 80, 1.7)],
)
def test_sdpa_equals_float64_math_at_batch_1_and_3(heads, seq, dim, scale) -> None:
    example = _qkv(3, heads, seq, dim)
    cm = tbn.compile(Attend(scale), example, target="llvm", config=DENSE)
    assert cm.dynamic_batch
    for batch in (1, 3):
        q, k, v = _qkv(batch, heads, seq, dim, seed=batch)
        _close(cm(q, k, v), reference(q, k, v, scale))


def test_small_attention_is_serial_below_the_batch_worth_a_fork_parallel_above() -> None:
    """7 tokens x 2 heads x 32: under 11 the symbolic batch runs the serial loop nest,
    from 11 the parallel one; both are exact."""
    mod = _attention_module(tirx.Var("batch", "int64"), 7, 2, 32)
    with host_target():
        func = relax.transform.LegalizeOps(pipelines.CPU_LEGALIZATIONS)(mod)["attention"]
    script = schedule_attention(func).script()
    assert script.count("T.parallel") == 1 and "if batch < T.int64(11)" in script
    cm = tbn.compile(Attend(), _qkv(3, 2, 7, 32), target="llvm", config=DENSE)
    for batch in (1, 16):
        q, k, v = _qkv(batch, 2, 7, 32, seed=batch)
        _close(cm(q, k, v), reference(q, k, v))


def test_cross_attention_with_more_keys_than_queries() -> None:
    q, k, v = _qkv(2, 3, 7, 32, keys=197)
    cm = tbn.compile(Attend(), (q, k, v), target="llvm", config=DENSE)
    _close(cm(q, k, v), reference(q, k, v))


def test_large_scores_stay_finite_and_exact() -> None:
    """The softmax subtracts the row maximum: scores far beyond ``exp``'s float32 range
    (up to ~200 here) give the same probabilities as float64."""
    q, k, v = _qkv(1, 2, 33, 64)
    q = q * 12.0
    cm = tbn.compile(Attend(), (q, k, v), target="llvm", config=DENSE)
    got = cm(q, k, v)
    assert torch.isfinite(got).all()
    _close(got, reference(q, k, v))


@pytest.mark.parametrize("seq", [7, 50])
def test_multihead_attention_equals_torch_float64(seq: int) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(96, 3, batch_first=True).eval()

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    model = SelfAttention().eval()
    x = torch.randn(3, seq, 96)
    cm = tbn.compile(model, (x,), target="llvm", config=DENSE)
    want = model.double()(x.double())
    for batch in (1, 3):
        _close(cm(x[:batch]), want[:batch])


def test_transformer_encoder_layer_equals_torch_float64() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 2, 256, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 197, 128)
    cm = tbn.compile(layer, (x,), target="llvm", config=DENSE)
    want = layer.double()(x.double())
    for batch in (1, 3):
        _close(cm(x[:batch]), want[:batch])


# --------------------------------------------------------------------------- structure


def _attention_module(
    batch: object, seq: int, heads: int, dim: int, dtype: str = "float32"
) -> tvm.IRModule:
    """A Relax module calling ``R.nn.attention`` once on (batch, seq, heads, dim) inputs."""
    bb = relax.BlockBuilder()
    ty = relax.TensorType((batch, seq, heads, dim), dtype)
    q, k, v = (relax.Var(name, ty) for name in "qkv")
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.attention(q, k, v))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("batch", [1, tirx.Var("batch", "int64")])
def test_the_cpu_pipeline_gives_attention_its_kernel(batch) -> None:
    target = host_target()
    built = pipelines.cpu(target)(_attention_module(batch, 197, 3, 64))
    funcs = [f for f in built.functions.values() if isinstance(f, tirx.PrimFunc) and f.attrs]
    attention = [f for f in funcs if ATTENTION_ATTR in f.attrs]
    assert len(attention) == 1
    assert attention[0].attrs["tirx.is_scheduled"]


def test_functions_that_do_not_fit_keep_the_generic_schedule() -> None:
    """Only the legalized float32 attention gets the kernel: not a function without the
    attribute, not float16 attention."""
    legalized = {}
    for dtype in ("float32", "float16"):
        mod = _attention_module(1, 7, 2, 32, dtype)
        with host_target():
            mod = relax.transform.LegalizeOps(pipelines.CPU_LEGALIZATIONS)(mod)
        legalized[dtype] = mod["attention"]
    assert schedule_attention(legalized["float32"]) is not None
    assert schedule_attention(legalized["float32"].without_attr(ATTENTION_ATTR)) is None
    assert schedule_attention(legalized["float16"]) is None


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_at_each_vector_width_equals_float64_math(lanes: int, batch: int) -> None:
    """The kernel built alone for AVX2 (8 lanes) and AVX-512 (16): 13 tokens (a row
    tail at either width), head dim 40 (a column chunk and a tail of ``P V`` at 8);
    serial at batch 1 (less work than a fork is worth), parallel at batch 2."""
    mod = _attention_module(batch, 13, 3, 40)
    with host_target():
        func = relax.transform.LegalizeOps(pipelines.CPU_LEGALIZATIONS)(mod)["attention"]
    kernel = schedule_attention(func, lanes).with_attr("global_symbol", "attention")
    assert ("T.parallel" in kernel.script()) == (batch > 1)
    built = tvm.compile(tvm.IRModule({"attention": kernel}), host_target())
    q, k, v = _qkv(batch, 3, 13, 40)
    as_blhd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # (batch, seq, heads, dim)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(t.numpy(), dev) for t in as_blhd]
    out = tvm.runtime.tensor(np.zeros((batch, 13, 3, 40), "float32"), dev)
    built.mod["attention"](*args, out)
    got = torch.from_numpy(out.numpy()).transpose(1, 2)
    _close(got, reference(q, k, v))
