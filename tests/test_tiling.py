"""Tile math against the numpy reference (property tests)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import np_alphas, np_pack, np_reconstruct, np_tile

from tbn_compiler import tiling


@st.composite
def weight_and_p(draw):
    p = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    length = draw(st.integers(1, 100))  # includes L not a multiple of 32
    rows = draw(st.sampled_from([1, 2, 3, 5]))
    numel = p * length
    if numel % rows:
        rows = 1
    seed = draw(st.integers(0, 2**16))
    w = np.random.default_rng(seed).standard_normal(numel).astype(np.float32)
    return torch.from_numpy(w.reshape(rows, numel // rows)), p


@settings(max_examples=60, deadline=None)
@given(weight_and_p())
def test_tile_and_alphas_match_numpy(case):
    w, p = case
    signs = tiling.binarize(tiling.fold(w, p))
    np.testing.assert_array_equal(signs.numpy(), np_tile(w.numpy(), p))
    for mode in ("per_tile", "single"):
        np.testing.assert_allclose(
            tiling.compute_alphas(w, p, mode).numpy(), np_alphas(w.numpy(), p, mode), rtol=1e-5
        )


@settings(max_examples=60, deadline=None)
@given(weight_and_p())
def test_pack_unpack_reconstruct_match_numpy(case):
    w, p = case
    packed = tiling.tile_weight(w, w, p)
    assert packed.words.dtype == torch.uint32
    np.testing.assert_array_equal(
        packed.words.view(torch.int32).numpy().view(np.uint32), np_pack(np_tile(w.numpy(), p))
    )
    np.testing.assert_array_equal(packed.signs().numpy(), np_tile(w.numpy(), p))
    np.testing.assert_allclose(
        packed.weight(w.shape).numpy(),
        np_reconstruct(w.numpy(), w.numpy(), p),
        rtol=1e-5,
        atol=1e-7,
    )


def test_zero_folds_to_minus_one():
    w = torch.tensor([1.0, -1.0, -1.0, 2.0])  # p=2: folded = [0, 1]
    assert tiling.binarize(tiling.fold(w, 2)).tolist() == [-1.0, 1.0]
    assert tiling.binarize(torch.tensor([0.0, 0.5, -0.5])).tolist() == [-1.0, 1.0, -1.0]


def test_unused_high_bits_are_zero():
    words = tiling.pack_bits(torch.ones(33))
    assert tiling.words_as_int64(words).tolist() == [2**32 - 1, 1]


def test_alignment():
    # Linear (N=8, K=5): p=4 -> L=10 = 2 rows; p=3 does not divide
    assert tiling.is_aligned(40, 4, 5)
    assert not tiling.is_aligned(24, 8, 2)  # N=12, K=2, p=8: L=3 not a multiple of 2
    assert not tiling.is_aligned(60, 4, 6)  # N=10, p=4: L=15 not a multiple of 6
    assert tiling.row_length((4, 3, 3, 3)) == 27
    assert tiling.row_length((32, 96), weight_in_out=True) == 96


def test_errors():
    with pytest.raises(ValueError, match="not divisible by p=3"):
        tiling.fold(torch.zeros(10), 3)
    with pytest.raises(ValueError, match="p must be >= 1"):
        tiling.fold(torch.zeros(10), 0)
    with pytest.raises(ValueError, match="unknown alpha mode"):
        tiling.compute_alphas(torch.zeros(10), 2, "median")
    with pytest.raises(ValueError, match="needs 1 uint32 words"):
        tiling.unpack_bits(tiling.pack_bits(torch.ones(40)), 20)


def test_tbn_bytes_is_tile_bits_alphas_bias():
    # MNIST fc1 of the paper: 128x784 at p=4 -> 3136 bytes of tile
    assert tiling.tbn_bytes(128 * 784, 4, 0) == 3136 + 16
    assert tiling.tbn_bytes(10 * 128, 1, 10) == 160 + 4 + 40
