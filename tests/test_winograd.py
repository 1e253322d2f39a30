"""Winograd form of aligned 3x3 stride-1 convs (backends.winograd) and its CPU rule
(schedule_rules.winograd_cpu.WinogradProduct): the transform matrices against a direct
correlation in numpy, the kernels against F.conv2d with the unpacked +-1 filters times
the alphas (plain torch), the rule's choices, and a residual block compiled whole
against the rewritten graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")

from kernel_run import run_kernel  # noqa: E402
from tvm import tirx  # noqa: E402

from tbn_compiler import tiling  # noqa: E402
from tbn_compiler.backends import kernels, schedule_rules, winograd  # noqa: E402
from tbn_compiler.backends.build import compile as tbn_compile  # noqa: E402
from tbn_compiler.backends.schedule_rules import cpu, winograd_cpu  # noqa: E402
from tbn_compiler.config import TBNConfig  # noqa: E402
from tbn_compiler.passes import rewrite  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = schedule_rules.host_target()
LANES = cpu._vector_lanes(HOST)


def _tile(numel: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed words, alphas, the +-1 tile as floats)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(numel // p, generator=g) > 0.5, 1.0, -1.0)
    return tiling.pack_bits(signs), torch.rand(p, generator=g) + 0.5, signs


def _reference(x, signs, alphas, bias, ws, padding) -> torch.Tensor:
    """F.conv2d with weight ``e`` = ``alphas[e // L] * signs[e % L]`` (float64)."""
    p = alphas.numel()
    weight = (alphas.double().repeat_interleave(signs.numel()) * signs.double().repeat(p)).view(ws)
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), weight, b, padding=padding).float()


def _close(got: np.ndarray, ref: torch.Tensor) -> None:
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def _form(func: tirx.PrimFunc) -> str:
    return str((func.attrs or {}).get(kernels.FORM_ATTR, ""))


@pytest.mark.parametrize("m", winograd.WINOGRAD_TILES)
def test_matrices_give_the_valid_correlation_of_a_tile(m):
    a, b, g = winograd.winograd_matrices(m)
    rng = np.random.default_rng(m)
    d, w = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    got = a.T @ ((g @ w @ g.T) * (b.T @ d @ b)) @ a
    direct = np.array([[np.sum(d[i : i + 3, j : j + 3] * w) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(got, direct, rtol=1e-12, atol=1e-12)


KERNEL_CASES = [
    # x shape, cout, padding, p, bias
    ((1, 16, 8, 8), 16, 1, 1, True),  # even, whole tiles of 2 and 4
    ((2, 16, 11, 9), 32, 1, 2, False),  # odd sizes: tile grid padded at the bottom/right
    ((1, 24, 7, 13), 48, 0, 3, True),  # no padding (5 x 11 outputs), 16 filters
    ((1, 8, 6, 6), 64, 1, 8, True),  # 8 filters (half a vector), 8 input channels
    ((3, 32, 10, 10), 64, 2, 4, True),  # padding 2: 12 x 12 outputs
]


@pytest.mark.parametrize("m", winograd.WINOGRAD_TILES)
@pytest.mark.parametrize("xs,cout,pad,p,bias", KERNEL_CASES)
def test_winograd_form_matches_torch(m, xs, cout, pad, p, bias):
    ws = (cout, xs[1], 3, 3)
    words, alphas, signs = _tile(int(np.prod(ws)), p, seed=cout + m)
    x, b = torch.randn(*xs), torch.randn(cout) if bias else None
    ref = _reference(x, signs, alphas, b, ws, pad)
    func = kernels.tiled_conv_primfunc(xs, ws, 1, pad, 1, 1, p, bias)
    form = winograd.winograd_primfunc(func, m)
    assert form is not None and _form(form) == "winograd"
    assert kernels.kernel_kind(form) == "conv_aligned"
    assert [buf.shape for buf in form.params] == [buf.shape for buf in func.params]
    inputs = [x, words, alphas] + ([b] if bias else [])
    _close(run_kernel(winograd_cpu.schedule_winograd(form, LANES), inputs, ref.shape), ref)
    _close(run_kernel(form, inputs, ref.shape), ref)  # unscheduled: the same numbers


def test_only_eligible_convs_have_a_winograd_form():
    def conv(ws, stride=1, dil=1, groups=1, xs=(1, 16, 12, 12)):
        return kernels.tiled_conv_primfunc(xs, ws, stride, 1, dil, groups, 1, True)

    eligible = conv((16, 16, 3, 3))
    assert winograd.winograd_primfunc(eligible) is not None
    for func in (
        conv((16, 16, 3, 3), stride=2),
        conv((16, 16, 3, 3), dil=2),
        conv((16, 16, 1, 1)),
        conv((16, 16, 5, 5)),
        conv((16, 8, 3, 3), groups=2),  # conv_general
        kernels.tiled_conv_primfunc((1, 16, 40), (16, 16, 3), 1, 1, 1, 1, 1, True),  # 1-D
        kernels.tiled_linear_primfunc(4, 64, 64, 1, False, True),
        eligible.without_attr(kernels.SPEC_ATTR),
    ):
        assert winograd.winograd_primfunc(func) is None


def _chosen(func: tirx.PrimFunc) -> str:
    return _form(schedule_rules.schedule_for(func, HOST))


@pytest.mark.parametrize(
    "xs,ws,stride,p,form",
    [
        ((1, 64, 32, 32), (64, 64, 3, 3), 1, 1, "winograd"),  # ResNet-18-CIFAR's 64-ch convs
        ((1, 16, 12, 12), (16, 16, 3, 3), 1, 1, "winograd"),  # 144 positions
        ((1, 16, 8, 8), (16, 16, 3, 3), 1, 1, "panel"),  # 64 positions: too few
        ((2, 16, 8, 8), (16, 16, 3, 3), 1, 1, "winograd"),  # 128 positions over the batch
        ((16, 16, 4, 4), (16, 16, 3, 3), 1, 1, "winograd"),  # 256 positions over the batch
        ((1, 64, 32, 32), (64, 64, 3, 3), 2, 1, "panel"),  # stride 2
        ((1, 64, 32, 32), (64, 64, 1, 1), 1, 1, "panel"),  # 1x1
        ((1, 8, 32, 32), (64, 8, 3, 3), 1, 1, "panel"),  # 8 input channels
        ((1, 64, 32, 32), (64, 64, 3, 3), 1, 8, "panel"),  # 8 filters
        ((64, 16, 2, 2), (16, 16, 3, 3), 1, 1, "panel"),  # one tile a row
    ],
)
def test_rule_applies_where_it_pays(xs, ws, stride, p, form):
    func = kernels.tiled_conv_primfunc(xs, ws, stride, 1, 1, 1, p, True)
    assert _chosen(func) == form


def test_schedule_refuses_rows_of_one_tile():
    func = kernels.tiled_conv_primfunc((4, 16, 2, 2), (16, 16, 3, 3), 1, 1, 1, 1, 1, True)
    with pytest.raises(ValueError, match="two tiles a row"):
        winograd_cpu.schedule_winograd(winograd.winograd_primfunc(func, 2), LANES)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size,kernels_in", [(8, 1), (12, 2), (16, 1)])
def test_symbolic_batch(batch, size, kernels_in):
    """One kernel for every batch. 8x8 (64 positions an image): the panel form for one
    image, Winograd F(4x4) from two on; 12x12: F(2x2) for one image, F(4x4) from two
    on; 16x16: F(4x4) at every batch."""
    xs, ws, p = (4, 32, size, size), (32, 32, 3, 3), 2
    n = tirx.Var("n", "int64")
    func = kernels.tiled_conv_primfunc((n, *xs[1:]), ws, 1, 1, 1, 1, p, True)
    scheduled = schedule_rules.schedule_for(func, HOST)
    assert _form(scheduled) == "winograd"
    script = scheduled.script()
    assert script.count('T.sblock("prod_update")') == kernels_in
    assert ("small" in script) == (size == 8)
    words, alphas, signs = _tile(int(np.prod(ws)), p, seed=size)
    x, b = torch.randn(batch, *xs[1:]), torch.randn(ws[0])
    ref = _reference(x, signs, alphas, b, ws, 1)
    _close(run_kernel(scheduled, [x, words, alphas, b], ref.shape), ref)


def test_rebuilt_kernel_keeps_the_attributes_of_the_kernel():
    func = kernels.tiled_conv_primfunc((1, 16, 16, 16), (16, 16, 3, 3), 1, 1, 1, 1, 1, True)
    scheduled = schedule_rules.schedule_for(func.with_attr("op_pattern", 8), HOST)
    assert int(scheduled.attrs["op_pattern"]) == 8 and _form(scheduled) == "winograd"
    assert scheduled.attrs[kernels.SPEC_ATTR] == func.attrs[kernels.SPEC_ATTR]


class _Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, identity shortcut, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


@pytest.mark.parametrize("size", [12, 11])
def test_residual_block_compiles_to_winograd_and_matches_rewrite(size, monkeypatch):
    torch.manual_seed(size)
    model = _Block(32).eval()
    for bn in (model.bn1, model.bn2):  # statistics of a trained net, not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 32, size, size)
    cfg = TBNConfig(p=2, min_numel=0, layers={"conv2": 1})
    built = []
    schedule = winograd_cpu.schedule_winograd
    monkeypatch.setattr(
        winograd_cpu, "schedule_winograd", lambda *a, **k: built.append(1) or schedule(*a, **k)
    )
    cm = tbn_compile(model, (x,), target="llvm", config=cfg)
    # both convs (p=2: 16 filters; p=1: 32); 12x12: F(2x2) for one image and F(4x4)
    # from two on; 11x11 (121 positions): the panel form for one image, F(4x4) from two on
    assert len(built) == (4 if size == 12 else 2)
    gm = rewrite(model, (x,), cfg)
    for batch in (1, 3):
        xb = torch.randn(batch, 32, size, size)
        with torch.no_grad():
            ref = gm(xb)
        torch.testing.assert_close(cm(xb), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
