"""The int8 computation of ``precision="int8"`` in numpy, and random tiled layers (test
helpers shared by the int8 kernel tests)."""

from __future__ import annotations

import numpy as np
import torch

from tbn_compiler import tiling


def random_layer(k: int, n: int, p: int, bias: bool, seed: int = 0):
    """Packed tile words, the +-1 tile (rows, k), alphas and bias of a random layer."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(n // p * k, generator=g) > 0.5, 1.0, -1.0)
    alphas = torch.rand(p, generator=g) + 0.5
    b = torch.randn(n, generator=g) if bias else None
    return tiling.pack_bits(signs), signs.reshape(n // p, k), alphas, b


def int8_reference(x: np.ndarray, signs, alphas, bias, p: int) -> np.ndarray:
    """The documented int8 computation in numpy: float32 scales, exact int64 sums."""
    amax = np.abs(x).max(axis=1)
    safe = np.where(amax > 0, amax, np.float32(1))
    inv = np.where(amax > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    q = np.rint(x * inv[:, None]).astype(np.int64)
    exact = (q @ signs.numpy().astype(np.int64).T).astype(np.float32)
    small = (amax / np.float32(127)).astype(np.float32)[:, None] * exact
    out = np.concatenate([alphas.numpy()[c] * small for c in range(p)], axis=1)
    return out if bias is None else out + bias.numpy()


def edge_rows(rows: int, k: int) -> torch.Tensor:
    """``rows`` (>= 3) random input rows, row 1 all zeros (the output is the bias) and row
    2 with one value of 1e4 (it sets the row's scale and keeps its value)."""
    x = torch.randn(rows, k)
    x[1] = 0
    x[2, 5] = 1e4
    return x


def assert_tight(got: np.ndarray, ref: np.ndarray) -> None:
    """Integer sums are exact; only the float32 scaling may round differently (an ulp)."""
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
