"""Panel and words forms of the aligned tile kernels (kernels.panel_primfunc,
kernels.words_primfunc) and the CPU rules that use them (schedule_rules.cpu.PanelProduct,
WordsProduct): exact against the tbn_compiler.ops reference (plain torch math), the panel
form from PANEL_MIN_ROWS rows on, the words (linear) or table form below, and both
inside one kernel when the batch is symbolic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from kernel_run import as_numpy, run_kernel  # noqa: E402
from tvm import tirx  # noqa: E402

from tbn_compiler import ops, tiling  # noqa: E402
from tbn_compiler.backends import kernels, schedule_rules  # noqa: E402
from tbn_compiler.backends.schedule_rules import cpu  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = schedule_rules.host_target()
RTOL, ATOL = 1e-4, 1e-4


def _tile(numel: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(numel // p, generator=g) > 0.5, 1.0, -1.0)
    return tiling.pack_bits(signs), torch.rand(p, generator=g) + 0.5


def _close(got: np.ndarray, ref: torch.Tensor) -> None:
    np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=ATOL * float(ref.abs().max()))


def _is_panel(func: tirx.PrimFunc) -> bool:
    return str((func.attrs or {}).get(kernels.FORM_ATTR, "")) == "panel"


def _conv_ref(x, words, alphas, b, ws, stride, pad, dil):
    nd = len(ws) - 2
    fn = ops.tiled_conv1d if nd == 1 else ops.tiled_conv2d
    return fn(x, words, alphas, b, list(ws), [stride] * nd, [pad] * nd, [dil] * nd, 1)


LINEAR_CASES = [
    # m, in, out, p, bias
    (32, 64, 64, 4, True),
    (48, 96, 24, 8, False),  # 3 tile rows
    (40, 50, 20, 2, True),  # inputs not a multiple of 8
    (64, 520, 128, 4, True),  # inputs in blocks of 8 (520 = 65 * 8)
    (40, 64, 8, 8, True),  # one tile row: no vector
    (197, 192, 576, 8, True),  # ViT: rows in blocks of 16 (208), 72 tile rows as 80
    (45, 96, 120, 3, False),  # 40 tile rows as 48, 45 rows as 48
    (70, 50, 90, 5, True),  # 18 tile rows as 32 from bits that span words
    (50, 256, 768, 8, True),  # CLIP's 50 tokens: 56 rows (96 tile rows give the tasks)
]


@pytest.mark.parametrize("m,n,rows", [(50, 768, 56), (197, 576, 208), (197, 768, 200)])
def test_linear_panel_pads_input_rows_to_blocks_the_tasks_need(m, n, rows, monkeypatch):
    """Input rows are padded to one register block (8) unless the product splits them
    over the (2) cores (tile rows giving too few tasks: 576 / 8 = 72 tile rows, 5 tasks)."""
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    func = kernels.tiled_linear_primfunc(m, 192, n, 8, False, True)
    scheduled = schedule_rules.schedule_for(func, HOST)
    assert f"small = T.sblock_alloc_buffer((T.int64({rows})," in scheduled.script()


@pytest.mark.parametrize("m,k,n,p,bias", LINEAR_CASES)
def test_linear_panel_form_matches_reference(m, k, n, p, bias):
    words, alphas = _tile(k * n, p, seed=k + n)
    x, b = torch.randn(m, k), torch.randn(n) if bias else None
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, bias)
    panel = kernels.panel_primfunc(func)
    assert panel is not None and kernels.kernel_kind(panel) == "linear_aligned"
    assert [buf.shape for buf in panel.params] == [buf.shape for buf in func.params]
    scheduled = schedule_rules.schedule_for(func, HOST)
    assert _is_panel(scheduled)
    got = run_kernel(scheduled, [x, words, alphas] + ([b] if bias else []), (m, n))
    _close(got, ops.tiled_linear(x, words, alphas, b, n, k, False))
    unscheduled = run_kernel(panel, [x, words, alphas] + ([b] if bias else []), (m, n))
    _close(unscheduled, ops.tiled_linear(x, words, alphas, b, n, k, False))


CONV_CASES = [
    # x shape, weight shape, stride, padding, dilation, p, bias
    ((1, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1, 1, True),
    ((2, 8, 9, 9), (8, 8, 3, 3), 1, 1, 1, 4, True),  # 2 filters, width 9
    ((1, 3, 12, 12), (24, 3, 3, 3), 1, 1, 1, 2, False),  # 27 taps, 12 filters
    ((1, 16, 16, 16), (32, 16, 3, 3), 2, 1, 1, 8, True),  # stride 2
    ((1, 8, 12, 12), (16, 8, 1, 1), 2, 0, 1, 1, True),  # 1x1 stride 2
    ((2, 4, 11, 10), (8, 4, 3, 3), 1, 2, 2, 2, False),  # dilation
    ((2, 8, 40), (32, 8, 3), 1, 1, 1, 4, True),  # 1-D
    ((1, 64, 6, 6), (128, 64, 3, 3), 1, 1, 1, 8, True),  # 16 filters of 576 weights
    ((1, 16, 5, 5), (8, 16, 1, 1), 1, 0, 1, 8, True),  # one filter
]


@pytest.mark.parametrize("xs,ws,stride,pad,dil,p,bias", CONV_CASES)
def test_conv_panel_form_matches_reference(xs, ws, stride, pad, dil, p, bias):
    numel = int(np.prod(ws))
    words, alphas = _tile(numel, p, seed=numel)
    x, b = torch.randn(*xs), torch.randn(ws[0]) if bias else None
    ref = _conv_ref(x, words, alphas, b, ws, stride, pad, dil)
    func = kernels.tiled_conv_primfunc(xs, ws, stride, pad, dil, 1, p, bias)
    assert kernels.kernel_kind(func) == "conv_aligned"
    scheduled = schedule_rules.schedule_for(func, HOST)
    rows = xs[0] * int(np.prod(ref.shape[2:]))
    assert _is_panel(scheduled) == (rows >= cpu.PANEL_MIN_ROWS["conv_aligned"])
    _close(run_kernel(scheduled, [x, words, alphas] + ([b] if bias else []), ref.shape), ref)


def test_only_aligned_kernels_with_a_spec_have_a_panel_form():
    general = kernels.tiled_linear_primfunc(2, 30, 7, 3, False, True)
    in_out = kernels.tiled_linear_primfunc(2, 64, 32, 4, True, True)
    grouped = kernels.tiled_conv_primfunc((1, 8, 9, 9), (6, 4, 3, 3), 1, 1, 1, 2, 2, False)
    assert all(kernels.panel_primfunc(f) is None for f in (general, in_out, grouped))
    aligned = kernels.tiled_linear_primfunc(64, 64, 32, 4, False, True)
    assert kernels.panel_primfunc(aligned.without_attr(kernels.SPEC_ATTR)) is None
    # without a spec the table rules schedule it, still exact
    assert not _is_panel(schedule_rules.schedule_for(aligned.without_attr(kernels.SPEC_ATTR), HOST))


def test_few_rows_do_not_take_the_panel_form():
    rows = cpu.PANEL_MIN_ROWS["linear_aligned"] - 1
    func = kernels.tiled_linear_primfunc(rows, 64, 64, 4, False, True)
    assert not _is_panel(schedule_rules.schedule_for(func, HOST))


@pytest.mark.parametrize("batch", [1, 3, 4, 33, 64, 197])
def test_symbolic_linear_batch_runs_table_below_and_panel_from_min_rows(batch):
    """One kernel for every batch: the table form below PANEL_MIN_ROWS rows (32: the
    branch taken at batch 1, 3, 4), the panel form from there (33, 64, 197: rows in
    whole blocks, past the batch never written), both exact."""
    k, n, p = 128, 96, 4
    m = tirx.Var("m", "int64")
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, True)
    scheduled = schedule_rules.schedule_for(func, HOST)
    script = scheduled.script()
    assert "panel" in script and "sign_lut" not in script  # panel and words forms inside
    words, alphas = _tile(k * n, p, seed=1)
    x, b = torch.randn(batch, k), torch.randn(n)
    got = run_kernel(scheduled, [x, words, alphas, b], (batch, n))
    _close(got, ops.tiled_linear(x, words, alphas, b, n, k, False))


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_symbolic_conv_batch(batch):
    """A conv of 9 output positions per image: the table form for one image, the panel
    form from two images (18 rows, PANEL_MIN_ROWS is 16) on."""
    xs, ws = (4, 8, 3, 3), (16, 8, 3, 3)
    n = tirx.Var("n", "int64")
    func = kernels.tiled_conv_primfunc((n, *xs[1:]), ws, 1, 1, 1, 1, 2, True)
    scheduled = schedule_rules.schedule_for(func, HOST)
    script = scheduled.script()
    assert "panel" in script and "sign_lut" in script
    words, alphas = _tile(int(np.prod(ws)), 2, seed=2)
    x, b = torch.randn(batch, *xs[1:]), torch.randn(ws[0])
    ref = _conv_ref(x, words, alphas, b, ws, 1, 1, 1)
    _close(run_kernel(scheduled, [x, words, alphas, b], ref.shape), ref)


def test_vector_lanes_follow_the_target():
    assert cpu._vector_lanes(tvm.target.Target("llvm")) == 8
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert cpu._vector_lanes(avx512) == 16
    # generic x86-64 builds the same panel schedule with 8 lanes, exact
    words, alphas = _tile(64 * 64, 4, seed=3)
    x, b = torch.randn(40, 64), torch.randn(64)
    func = kernels.tiled_linear_primfunc(40, 64, 64, 4, False, True)
    target = tvm.target.Target("llvm")
    scheduled = schedule_rules.schedule_for(func, target)
    assert _is_panel(scheduled)
    lib = tvm.compile(
        tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target
    )
    out = tvm.runtime.tensor(np.zeros((40, 64), np.float32))
    lib["main"](*[tvm.runtime.tensor(as_numpy(t)) for t in (x, words, alphas, b)], out)
    _close(out.numpy(), ops.tiled_linear(x, words, alphas, b, 64, 64, False))


@pytest.mark.parametrize("m", [64, tirx.Var("m", "int64")])
def test_rebuilt_kernel_keeps_the_attributes_of_the_kernel(m):
    """The panel form is a new PrimFunc: it keeps what the pipelines set on the kernel
    (the opaque op pattern that keeps FuseOps from fusing into a scheduled kernel)."""
    func = kernels.tiled_linear_primfunc(m, 64, 64, 4, False, True).with_attr("op_pattern", 8)
    scheduled = schedule_rules.schedule_for(func, HOST)
    assert int(scheduled.attrs["op_pattern"]) == 8
    assert kernels.kernel_kind(scheduled) == "linear_aligned" and _is_panel(scheduled)


def _parallel_loops(stmt) -> int:
    found = int(isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL)
    for name in ("body", "block", "then_case", "else_case"):
        child = getattr(stmt, name, None)
        if isinstance(child, tirx.Stmt):
            found += _parallel_loops(child)
    return found + sum(_parallel_loops(c) for c in getattr(stmt, "seq", None) or [])


def test_small_elementwise_passes_of_a_parallel_kernel_stay_serial():
    """A batch-1 linear large enough for a parallel product keeps its 1024-output
    epilogue serial (one parallel loop, not two); still exact."""
    words, alphas = _tile(2048 * 1024, 2, seed=4)
    x, b = torch.randn(1, 2048), torch.randn(1024)
    func = kernels.tiled_linear_primfunc(1, 2048, 1024, 2, False, True)
    scheduled = schedule_rules.schedule_for(func, HOST)
    assert _parallel_loops(scheduled.body) == 1
    got = run_kernel(scheduled, [x, words, alphas, b], (1, 1024))
    _close(got, ops.tiled_linear(x, words, alphas, b, 1024, 2048, False))


def _form(func: tirx.PrimFunc) -> str:
    return str((func.attrs or {}).get(kernels.FORM_ATTR, ""))


@pytest.mark.parametrize(
    "m,k,n,p,bias,form",
    [
        (1, 4096, 512, 8, True, "words"),
        (3, 64, 40, 4, False, "words"),  # 10 tile rows
        (31, 96, 8, 8, True, "words"),  # one tile row, 3 words
        (2, 40, 16, 4, True, ""),  # rows not whole words: table form
        (2, 64, 32, 4, True, ""),  # (in, out) weight: no words form
    ],
)
def test_words_form_for_few_rows_matches_reference(m, k, n, p, bias, form):
    io = (k, n) == (64, 32)
    words, alphas = _tile(k * n, p, seed=k + n + m)
    x, b = torch.randn(m, k), torch.randn(n) if bias else None
    func = kernels.tiled_linear_primfunc(m, k, n, p, io, bias)
    scheduled = schedule_rules.schedule_for(func, HOST)
    assert _form(scheduled) == form
    got = run_kernel(scheduled, [x, words, alphas] + ([b] if bias else []), (m, n))
    _close(got, ops.tiled_linear(x, words, alphas, b, n, k, io))
    if form:
        raw = kernels.words_primfunc(func)
        unscheduled = run_kernel(raw, [x, words, alphas] + ([b] if bias else []), (m, n))
        _close(unscheduled, ops.tiled_linear(x, words, alphas, b, n, k, io))
