"""CPU tile ops against the dense computation with the numpy-reconstructed weight."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import np_reconstruct

from tbn_compiler import ops, tiling


def _packed(shape, p, seed):
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    pt = tiling.tile_weight(w, w, p)
    ref = torch.from_numpy(np_reconstruct(w.numpy(), w.numpy(), p)).float()
    return pt, ref


LINEAR_CASES = [
    # (N, K, p, weight_in_out) - aligned and unaligned, odd sizes
    (8, 5, 4, False),
    (10, 6, 4, False),
    (6, 10, 4, False),
    (1, 1, 1, False),
    (1, 7, 7, False),
    (7, 1, 7, False),
    (33, 3, 3, False),
    (64, 96, 8, False),
    (12, 16, 8, False),
    (8, 6, 2, True),
    (6, 4, 4, True),
    (10, 6, 4, True),
    (1, 1, 1, True),
    (96, 32, 2, True),
]


@pytest.mark.parametrize("n,k,p,io", LINEAR_CASES)
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_tiled_linear(n, k, p, io, batch, bias):
    pt, w = _packed((k, n) if io else (n, k), p, seed=n * 31 + k)
    x = torch.randn(*batch, k)
    b = torch.randn(n) if bias else None
    y = ops.tiled_linear(x, pt.words, pt.alphas, b, n, k, io)
    ref = x @ w if io else F.linear(x, w)
    if bias:
        ref = ref + b
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


CONV2D_CASES = [
    # (cout, cin, groups, k, p, stride, padding, dilation)
    (8, 4, 1, 3, 4, 1, 1, 1),
    (6, 4, 1, 3, 4, 2, 0, 1),
    (5, 3, 1, 3, 5, 1, 1, 2),
    (8, 8, 8, 3, 2, 1, 1, 1),
    (6, 4, 2, 3, 3, 1, 2, 2),
    (4, 4, 1, 1, 8, 1, 0, 1),
    (1, 1, 1, 1, 1, 1, 0, 1),
]


@pytest.mark.parametrize("cout,cin,groups,k,p,stride,padding,dilation", CONV2D_CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_tiled_conv2d(cout, cin, groups, k, p, stride, padding, dilation, batch):
    shape = (cout, cin // groups, k, k)
    pt, w = _packed(shape, p, seed=cout * 7 + cin)
    x = torch.randn(batch, cin, 9, 8)
    b = torch.randn(cout)
    y = ops.tiled_conv2d(
        x, pt.words, pt.alphas, b, list(shape), [stride] * 2, [padding] * 2, [dilation] * 2, groups
    )
    torch.testing.assert_close(
        y, F.conv2d(x, w, b, stride, padding, dilation, groups), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "cout,cin,groups,k,p", [(8, 4, 1, 5, 4), (6, 4, 2, 3, 4), (4, 4, 4, 3, 2), (3, 5, 1, 1, 3)]
)
def test_tiled_conv1d(cout, cin, groups, k, p):
    shape = (cout, cin // groups, k)
    pt, w = _packed(shape, p, seed=cout + cin * 3)
    x = torch.randn(2, cin, 17)
    y = ops.tiled_conv1d(x, pt.words, pt.alphas, None, list(shape), [2], [1], [1], groups)
    torch.testing.assert_close(y, F.conv1d(x, w, None, 2, 1, 1, groups), rtol=1e-5, atol=1e-5)


def test_op_errors_name_the_problem():
    pt, _ = _packed((8, 4), 4, 0)
    with pytest.raises(ValueError, match="input has 5 features, layer expects 4"):
        ops.tiled_linear(torch.randn(2, 5), pt.words, pt.alphas, None, 8, 4, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.tiled_linear(torch.randn(2, 4), pt.words, pt.alphas, torch.zeros(3), 8, 4, False)
    with pytest.raises(ValueError, match="packed uint32 words"):
        ops.tiled_linear(torch.randn(2, 4), pt.words[:0], pt.alphas, None, 8, 4, False)
    with pytest.raises(ValueError, match="channels"):
        ops.tiled_conv2d(
            torch.randn(1, 3, 5, 5),
            pt.words,
            pt.alphas,
            None,
            [8, 4, 1, 1],
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        )


def test_ops_export_with_fake_impls():
    pt, w = _packed((16, 8), 4, 1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("tile", pt.words)
            self.register_buffer("alphas", pt.alphas)

        def forward(self, x):
            return torch.ops.tbn.tiled_linear(x, self.tile, self.alphas, None, 16, 8, False)

    ep = torch.export.export(M(), (torch.randn(3, 8),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.tbn.tiled_linear.default in targets
    x = torch.randn(3, 8)
    torch.testing.assert_close(ep.module()(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
