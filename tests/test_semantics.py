"""Compiled modules keep torch's semantics: NaN propagation, checked ids of every gather
and scatter (embedding, indexing, torch.gather, scatter, index_put, ...), every argument
of scaled_dot_product_attention, refused schedule steps, TVM names.

Each test compares a compiled module with plain torch on the same inputs.
"""

from __future__ import annotations

import ast
import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import kernels, schedule_rules  # noqa: E402
from tbn_compiler.backends.relax_import import (  # noqa: E402
    UnsupportedOpError,
    check_index_inputs,
    import_graph,
)

pytestmark = pytest.mark.tvm

PACKAGE = Path(tbn.__file__).resolve().parent
NAN = float("nan")


def _assert_same(got, ref) -> None:
    """Equal to fp32 rounding, NaN exactly where torch has NaN; indices exact."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), type(got)
        assert got.shape == ref.shape
        if ref.dtype.is_floating_point:
            torch.testing.assert_close(got, ref.detach(), rtol=1e-4, atol=1e-5, equal_nan=True)
        else:
            assert torch.equal(got, ref), (got, ref)
        return
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        _assert_same(g, r)


def _with_nans(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: max(2, flat.numel() // 16)]] = NAN
    flat[-1] = float("inf")
    return x


# --------------------------------------------------------------------------- NaN


def test_linear_relu_and_hardtanh_keep_nan() -> None:
    """The issue's repro: Linear+ReLU gave 0 and Hardtanh(0, 100) gave 100 for NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Hardtanh(0, 100), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    x[0, 3] = NAN
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    cm = tbn.compile(model.eval(), x, target="llvm", config=cfg)
    with torch.no_grad():
        ref = tbn.rewrite(model, (x,), cfg)(x)
    assert ref[0].isnan().all() and not ref[1:].isnan().any()
    _assert_same(cm(x), ref)


class NanOps(nn.Module):
    """Every op whose NaN handling the import fixes, one output each."""

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        img = x.reshape(2, 2, 6, 8)
        return (
            F.relu(x),
            F.relu6(x * 4),
            F.hardtanh(x, 0.0, 100.0),
            x.clamp(-0.5, 0.5),
            x.clamp(min=0.2),
            x.clamp(max=-0.2),
            x.clamp(min=y),
            torch.clamp(x, min=1.0, max=-1.0),  # torch: max wins
            torch.maximum(x, y),
            torch.minimum(x, y),
            torch.max(x, y),
            torch.min(x, y),
            x.amax(-1),
            x.amin(0, keepdim=True),
            x.amax((0, 1)),
            x.max(),
            y.min(),
            x.max(dim=-1),
            x.min(dim=0, keepdim=True),
            y.max(dim=1),
            F.max_pool2d(img, 3, 2, 1),
            F.max_pool2d(img, 2, ceil_mode=True, dilation=1),
            F.max_pool2d(img, (2, 3), (1, 2), (1, 1), dilation=(2, 1)),
            F.max_pool1d(x.reshape(4, 6, 8), 3, 2, 1, ceil_mode=True),
        )


def test_nan_propagates_like_torch() -> None:
    x, y = _with_nans(12, 16, seed=1), _with_nans(12, 16, seed=2)
    x[3, 5:9] = 2.5  # ties: the first index wins, as in torch
    cm = tbn.compile_graph(NanOps(), (x, y), "llvm")
    _assert_same(cm(x, y), NanOps()(x, y))
    clean_x, clean_y = torch.randn(12, 16), torch.randn(12, 16)
    _assert_same(cm(clean_x, clean_y), NanOps()(clean_x, clean_y))


def test_max_pool_indices_output_is_refused() -> None:
    class WithIndices(nn.Module):
        def forward(self, x):
            values, indices = F.max_pool2d(x, 2, return_indices=True)
            return values + indices

    with pytest.raises(UnsupportedOpError, match="max_pool2d_with_indices.*indices output"):
        tbn.compile_graph(WithIndices(), (torch.randn(1, 1, 4, 4),), "llvm")


# --------------------------------------------------------------------------- embedding


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("bad", [50, -1, 10**8, 2**32 + 3])
def test_embedding_bad_ids_raise_index_error(embedded, bad: int) -> None:
    model, cm, ids = embedded
    ids = ids.clone()
    ids[1, 2] = bad
    with pytest.raises(IndexError, match="index out of range in self"):
        model(ids)  # torch's behaviour, for reference
    with pytest.raises(IndexError, match=r"index out of range.*'emb'.*50 rows"):
        cm(ids)


def test_embedding_good_ids_after_a_bad_call(embedded) -> None:
    model, cm, ids = embedded
    bad = ids.clone()
    bad[0, 0] = 50
    with pytest.raises(IndexError):
        cm(bad)
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    with torch.no_grad():
        ref = tbn.rewrite(model, (ids,), cfg)(ids)
    _assert_same(cm(ids), ref)


@pytest.fixture(scope="module")
def embedded():
    torch.manual_seed(0)
    model = Embed().eval()
    ids = torch.randint(0, 50, (2, 5))
    cm = tbn.compile(model, ids, target="llvm", config=tbn.TBNConfig(p=4, min_numel=0))
    return model, cm, ids


def _run_kernel(func, args, out_shape, dtype: str = "float32") -> np.ndarray:
    """``func`` built for llvm WITHOUT asserts (as for CUDA kernels and bare-metal C)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        lib = tvm.compile(mod, "llvm")
    out = tvm.runtime.empty(out_shape, dtype)
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


def _ids_along(axis: int, n: int, size: int, wrap: bool = False) -> kernels.IdTensor:
    return kernels.IdTensor((n,), "int64", (axis,), size, wrap, "bad id")


def test_gather_kernel_without_asserts_stays_in_bounds() -> None:
    """Where asserts are compiled out (CUDA kernels, bare-metal C), the gather clamps its
    read and gives NaN rows for bad ids instead of reading outside the table."""
    weight = np.arange(40, dtype="float32").reshape(10, 4)
    ids = np.array([3, 10, -1, 10**9, 9], dtype="int64")
    index = kernels.IndexMap((10, 4), (5, 4), (_ids_along(0, 5, 10), 1))
    got = _run_kernel(kernels.gather_primfunc(index, "float32"), [weight, ids], (5, 4))
    np.testing.assert_array_equal(got[[0, 4]], weight[[3, 9]])
    assert np.isnan(got[1:4]).all()


def test_scatter_kernel_without_asserts_drops_bad_writes() -> None:
    """Without asserts a scatter writes nothing for a bad id (it is never clamped onto
    a valid row) and adds duplicates in order; every other row keeps its value."""
    data = np.arange(40, dtype="float32").reshape(10, 4)
    ids = np.array([3, 10, -11, -1, 3], dtype="int64")
    values = np.random.default_rng(0).standard_normal((5, 4)).astype("float32")
    index = kernels.IndexMap((10, 4), (5, 4), (_ids_along(0, 5, 10, wrap=True), 1))
    added = _run_kernel(
        kernels.scatter_primfunc(index, "float32", True), [data, ids, values], (10, 4)
    )
    ref = torch.tensor(data).index_put(
        (torch.tensor([3, 9, 3]),), torch.tensor(values[[0, 3, 4]]), True
    )
    np.testing.assert_array_equal(added, ref.numpy())
    put = _run_kernel(
        kernels.scatter_primfunc(index, "float32", False), [data, ids, values], (10, 4)
    )
    expected = data.copy()
    expected[[9, 3]] = values[[3, 4]]  # the last write to row 3 wins
    np.testing.assert_array_equal(put, expected)


class Gathers(nn.Module):
    """``index_select`` along a middle dim and ``x[ids]`` / ``x[:, ids]`` indexing
    (negative ids count from the end there)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 10, 4))

    def forward(self, ids: torch.Tensor, pick: torch.Tensor):
        return self.table.index_select(1, ids), self.table[:, pick], self.table[pick % 3]


def test_index_select_and_indexing_check_ids() -> None:
    model = Gathers().eval()
    ids, pick = torch.tensor([0, 9, 4]), torch.tensor([[1, -10], [-1, 9]])
    cm = tbn.compile_graph(model, (ids, pick), "llvm")
    _assert_same(cm(ids, pick), model(ids, pick))
    for bad_ids, bad_pick in (([0, 10, 1], [[1, 2], [3, 4]]), ([0, 1, 2], [[1, -11], [3, 4]])):
        args = (torch.tensor(bad_ids), torch.tensor(bad_pick))
        with pytest.raises((IndexError, RuntimeError)):  # torch's index_select: RuntimeError
            model(*args)
        with pytest.raises(IndexError, match=r"index out of (range|bounds).*dim 1 of size 10"):
            cm(*args)


class OnTable(nn.Module):
    """``op(table, *inputs)`` on a 10 x 4 parameter table (ids are the first input)."""

    def __init__(self, op) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))
        self.op = op

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.op(self.table, *inputs)


def _set_columns(t: torch.Tensor, j: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u = t.clone()
    u[:, j] = v
    return u


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values)


_V = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
_COLUMNS = torch.randn(10, 2, generator=torch.Generator().manual_seed(2))

# name -> (op on the table, inputs (ids first), the exception torch raises for a bad id,
# bad ids put at the last element of the ids). Negative ids wrap where torch wraps them.
INDEXING_OPS = {
    "gather": (
        lambda t, i: torch.gather(t, 0, i[:, None].expand(-1, 4)),
        (_ids(1, 9, 0),),
        RuntimeError,
        (10, -1),
    ),
    "gather_middle_dim": (
        lambda t, i: torch.gather(t.reshape(2, 5, 4), 1, i.reshape(2, 1, 2).expand(-1, 3, -1)),
        (_ids(0, 4, 2, 3),),
        RuntimeError,
        (5, -1),
    ),
    "index_two_tensors": (
        lambda t, i, j: t[i, j],
        (_ids(1, -2, 9), _ids(0, 3, -1)),
        IndexError,
        (10, -11),
    ),
    "index_broadcast_apart": (
        lambda t, i, j: t.reshape(2, 5, 4)[i[:, None], :, j],
        (_ids(0, -1), _ids(0, 3, -4)),
        IndexError,
        (2, -3),
    ),
    "index_negative_ids": (lambda t, i: t[i], (_ids(-1, 2, -10),), IndexError, (10, -11)),
    "take": (lambda t, i: torch.take(t, i), (_ids(1, -2, 39),), IndexError, (40, -41)),
    "scatter": (
        lambda t, i, v: t.scatter(0, i[:, None].expand(-1, 4), v),
        (_ids(1, 2, 9), _V),
        RuntimeError,
        (10, -1),
    ),
    "scatter_value": (
        lambda t, i: t.scatter(1, i.reshape(2, 1), 1.5),
        (_ids(0, 3),),
        RuntimeError,
        (4, -1),
    ),
    "scatter_add": (
        lambda t, i, v: t.scatter_add(0, i[:, None].expand(-1, 4), v),
        (_ids(1, 1, 9), _V),
        RuntimeError,
        (10, -1),
    ),
    "index_put": (
        lambda t, i, v: t.index_put((i,), v),
        (_ids(1, 2, -1), _V),
        IndexError,
        (10, -11),
    ),
    "index_put_accumulate": (
        lambda t, i, v: t.index_put((i,), v, accumulate=True),
        (_ids(1, -9, 9), _V),
        IndexError,
        (10, -11),
    ),
    "index_put_two_tensors": (
        lambda t, i, j, v: t.index_put((i, j), v[:, 0]),
        (_ids(1, 2, 9), _ids(0, 3, -1), _V),
        IndexError,
        (10, -11),
    ),
    "setitem_columns": (
        _set_columns,
        (_ids(0, 3), _COLUMNS),
        IndexError,
        (4, -5),
    ),
    "index_add": (
        lambda t, i, v: t.index_add(0, i, v),
        (_ids(1, 1, 9), _V),
        RuntimeError,
        (10, -1),
    ),
    "index_copy": (
        lambda t, i, v: t.index_copy(0, i, v),
        (_ids(1, 2, 9), _V),
        IndexError,
        (10, -1),
    ),
    "index_fill": (lambda t, i: t.index_fill(1, i, 2.0), (_ids(0, -1),), IndexError, (4, -5)),
}


@pytest.mark.parametrize("name", sorted(INDEXING_OPS))
def test_indexing_matches_torch_and_raises_its_error(name: str) -> None:
    """Every indexing op TVM imports: equal to torch for good ids; for a bad id the
    exception torch raises, naming the node (it read or wrote out of bounds before)."""
    op, inputs, error, bad_ids = INDEXING_OPS[name]
    model = OnTable(op).eval()
    cm = tbn.compile_graph(model, inputs, "llvm")
    with torch.no_grad():
        assert torch.equal(cm(*inputs), model(*inputs))
    for bad in bad_ids:
        ids = inputs[0].clone()
        ids.view(-1)[-1] = bad
        with pytest.raises(error) as from_torch:
            model(ids, *inputs[1:])
        with pytest.raises(error, match=r"index out of bounds: \w+ '\w+'.* of size") as info:
            cm(ids, *inputs[1:])
        assert type(info.value) is type(from_torch.value)


@pytest.mark.parametrize(
    ("op", "inputs", "node"),
    [
        (
            lambda t, i: F.embedding_bag(i, t, mode="sum"),
            (torch.tensor([[1, 2], [9, 4]]),),
            "_embedding_bag",
        ),
        (
            lambda t, i: t.scatter_reduce(0, i[:, None].expand(-1, 4), t[:3], "amax"),
            (_ids(1, 2, 9),),
            "scatter_reduce",
        ),
    ],
)
def test_indexing_ops_without_a_converter_are_refused(op, inputs, node: str) -> None:
    with pytest.raises(UnsupportedOpError, match=rf"node '{node}'.*{node}"):
        import_graph(OnTable(op).eval(), inputs)


class WrappedIds(nn.Module):
    """Ids reshaped before one embedding, computed (always valid) for another."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.pos = nn.Embedding(7, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids.view(-1, 5)) + self.pos(ids.reshape(-1, 5) % 7)


def test_index_input_checks_raise_where_torch_raises() -> None:
    """Targets whose kernels cannot raise (CUDA) check id inputs before the call: the
    check raises exactly when torch does, with the kernel's message."""
    model, ids = WrappedIds().eval(), torch.randint(0, 50, (10,))
    checks = import_graph(model, (ids,)).index_checks
    assert [(c["input"], c["low"], c["high"]) for c in checks] == [("ids", 0, 50)]  # not pos
    check_index_inputs(checks, {"ids": ids})
    for bad in (50, -1, 10**8):
        ids_bad = ids.clone()
        ids_bad[7] = bad
        with pytest.raises(IndexError, match="index out of range in self"):
            model(ids_bad)
        with pytest.raises(IndexError, match=r"index out of range.*'emb'.*50 rows"):
            check_index_inputs(checks, {"ids": ids_bad})


class InputIds(nn.Module):
    """Ids given as inputs to ``torch.gather`` and to two-tensor indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        picked = torch.gather(self.table, 0, rows[:, None].expand(-1, 4))
        return picked + self.table[rows, cols][:, None]


def test_index_input_checks_raise_torchs_exception() -> None:
    """The input checks raise what torch raises: RuntimeError for gather, IndexError for
    indexing (negative ids wrap there, not in gather)."""
    model, rows, cols = InputIds().eval(), torch.tensor([0, 9, 4]), torch.tensor([3, -4, 0])
    checks = import_graph(model, (rows, cols)).index_checks
    found = sorted((c["input"], c["low"], c["high"], c["error"]) for c in checks)
    assert found == [
        ("cols", -4, 4, "IndexError"),
        ("rows", -10, 10, "IndexError"),
        ("rows", 0, 10, "RuntimeError"),
    ]
    check_index_inputs(checks, {"rows": rows, "cols": cols})
    for bad_rows, bad_cols in (
        ([0, 10, 1], [0, 1, 2]),
        ([0, -1, 1], [0, 1, 2]),
        ([0, 1, 2], [4, 0, 0]),
    ):
        args = (torch.tensor(bad_rows), torch.tensor(bad_cols))
        with pytest.raises((IndexError, RuntimeError)) as from_torch:
            model(*args)
        with pytest.raises(type(from_torch.value), match="index out of bounds") as info:
            check_index_inputs(checks, dict(zip(("rows", "cols"), args, strict=True)))
        assert type(info.value) is type(from_torch.value)


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """``F.scaled_dot_product_attention`` in each argument combination torch allows."""

    def forward(self, q, k, v, q6, mask4, mask2, bmask, q3, k3, mask3):
        sdpa = F.scaled_dot_product_attention
        return (
            sdpa(q, k, v),
            sdpa(q, k, v, scale=1.0),
            sdpa(q, k, v, scale=0.3),
            sdpa(q, k, v, is_causal=True),  # L < S: top-left diagonal
            sdpa(k, q, q, is_causal=True, scale=2.0),  # L > S
            sdpa(q6, k, v, enable_gqa=True),
            sdpa(q, k, v, attn_mask=mask4),
            sdpa(q, k, v, attn_mask=mask2, scale=0.5),
            sdpa(q, k, v, attn_mask=mask4[:, :1, :1]),  # broadcast over heads and queries
            sdpa(q, k, v, attn_mask=bmask),
            sdpa(q3, k3, k3, attn_mask=mask3),
            sdpa(q3[0], k3[0], k3[0], scale=1.0),
        )


def _attention_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    bmask = torch.rand(5, 7, generator=g) > 0.3
    bmask[:, 0] = True  # every query attends to something
    return (
        r(2, 3, 5, 8),  # q
        r(2, 3, 7, 8),  # k
        r(2, 3, 7, 4),  # v (head dim 4)
        r(2, 6, 5, 8),  # 6 query heads over 3 key/value heads
        r(2, 3, 5, 7),
        r(5, 7),
        bmask,
        r(2, 5, 8),
        r(2, 7, 8),
        r(2, 5, 7),
    )


def test_sdpa_honours_every_argument() -> None:
    inputs = _attention_inputs()
    cm = tbn.compile_graph(Attention(), inputs, "llvm")
    _assert_same(cm(*inputs), Attention()(*inputs))


def test_sdpa_dropout_is_refused_naming_the_node() -> None:
    class Dropped(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    with pytest.raises(UnsupportedOpError, match="scaled_dot_product_attention.*dropout_p=0.1"):
        tbn.compile_graph(Dropped(), (torch.randn(1, 2, 4, 8),), "llvm")


def test_huggingface_t5_encoder_matches_torch() -> None:
    """T5 passes scale=1.0 (and a relative-position bias mask); it was 25% off."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32, vocab_size=500, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 500, (2, 8))
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    cm = tbn.compile(model, ids, target="llvm", config=cfg)
    with torch.no_grad():
        ref = tbn.rewrite(model, (ids,), cfg)(ids)["last_hidden_state"]
    _assert_same(cm(ids)["last_hidden_state"], ref)


# --------------------------------------------------------------------------- CUDA source


class CudaMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(self.emb(ids))) + F.hardtanh(x, 0, 100) + torch.maximum(x, -x)
        h = F.max_pool1d(h, 2)
        a = F.scaled_dot_product_attention(h[None], h[None], h[None], scale=1.0, is_causal=True)
        return a.amax(-1) + h.max(-1).values


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
def test_cuda_source_with_checked_and_nan_ops_compiles() -> None:
    """Device code cannot raise: the gather's range assert is left out of the CUDA
    kernels (which stay in bounds), and the NaN-keeping forms compile with nvcc."""
    from tvm.support import nvcc

    inputs = (torch.randint(0, 50, (4,)), torch.randn(4, 16))
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    cm = tbn.compile(CudaMix().eval(), inputs, target="cuda:sm_90", config=cfg)
    src = cm.cuda_source()
    assert "tbn_gather" in src and "TVMFFIError" not in src
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm"):
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch="sm_90", compiler="nvcc")
    assert len(cubin) > 0


class CudaIndexing(nn.Module):
    """The checked gathers and scatters of several ids tensors, for the CUDA build."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, rows: torch.Tensor, cols: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        picked = (
            torch.gather(self.table, 0, rows[:, None].expand(-1, 4))
            + self.table[rows, cols][:, None]
        )
        put = self.table.index_put((rows,), v, accumulate=True).scatter(
            0, rows[:, None].expand(-1, 4), v
        )
        return picked.sum() + put


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
def test_cuda_source_with_checked_scatters_compiles() -> None:
    """Gathers by several id tensors and scatters (one output column per thread, no
    assert) build for CUDA and compile with nvcc."""
    from tvm.support import nvcc

    inputs = (torch.tensor([0, 9, 4]), torch.tensor([3, -4, 0]), torch.randn(3, 4))
    cm = tbn.compile_graph(CudaIndexing().eval(), inputs, "cuda:sm_90")
    src = cm.cuda_source()
    assert "tbn_scatter" in src and "tbn_gather" in src and "TVMFFIError" not in src
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm"):
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch="sm_90", compiler="nvcc")
    assert len(cubin) > 0


# --------------------------------------------------------------------------- schedules


@tvm.script.tirx.prim_func(s_tir=True)
def _horner(
    a: tvm.script.tirx.Buffer((64, 64), "float32"), b: tvm.script.tirx.Buffer((64,), "float32")
):
    for i, k in tvm.script.tirx.grid(64, 64):
        with tvm.script.tirx.sblock("b"):
            vi, vk = tvm.script.tirx.axis.remap("SR", [i, k])
            with tvm.script.tirx.init():
                b[vi] = tvm.script.tirx.float32(0)
            b[vi] = b[vi] * tvm.script.tirx.float32(0.5) + a[vi, vk]


def test_generic_schedule_skips_a_refused_step() -> None:
    """``rfactor`` refuses a reduction that is not a plain sum/max: the step is skipped
    (it raised AttributeError on ``tvm.TVMError`` before) and the result stays exact."""
    func = schedule_rules.parallelize_generic(_horner)
    lib = tvm.compile(tvm.IRModule({"main": func}), "llvm")
    a = np.random.default_rng(0).standard_normal((64, 64)).astype("float32")
    out = tvm.runtime.empty((64,), "float32")
    lib["main"](tvm.runtime.tensor(a), out)
    ref = np.zeros(64)
    for k in range(64):
        ref = ref * 0.5 + a[:, k]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5)


# --------------------------------------------------------------------------- TVM names


def _import_bindings(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted path, for every import of ``tvm`` / ``tvm_ffi`` in a file."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("tvm", "tvm_ffi"):
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            "tvm",
            "tvm_ffi",
        ):
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside annotations: never evaluated here (``from __future__
    import annotations``), so a stale name there cannot fail at run time."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            roots.append(node.returns)
        elif isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation:
            roots.append(node.annotation)
    return {id(n) for root in roots for n in ast.walk(root)}


def _dotted_uses(tree: ast.AST, names: dict[str, str]) -> set[str]:
    """Every ``name.attr.attr...`` chain rooted at an imported TVM name, fully dotted
    (annotations left out, see :func:`_annotation_nodes`)."""
    uses = set(names.values())
    skip = _annotation_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if chain and isinstance(node, ast.Name) and node.id in names:
            uses.add(".".join([names[node.id], *reversed(chain)]))
    return uses


def _resolve(dotted: str) -> None:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))


def test_every_tvm_name_the_package_uses_exists() -> None:
    """``tvm.TVMError`` (gone in TVM 0.27) hid in an ``except`` clause; resolve every
    dotted TVM name in the package against the installed TVM."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for dotted in sorted(_dotted_uses(tree, _import_bindings(tree))):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError):
                missing.append(f"{path.relative_to(PACKAGE.parent)}: {dotted}")
    assert not missing, "names missing from the installed TVM:\n" + "\n".join(missing)
