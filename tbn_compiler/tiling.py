"""Tile math on tensors: fold, binarize, alphas, pack/unpack, reconstruct, alignment.

Everything here is a pure function of tensors (no modules, no graphs). The formats
are the project's own and are shared by every backend:

* A layer with ``numel`` weights and compression factor ``p`` is split, flat and
  row-major in its stored layout, into ``p`` chunks of ``L = numel // p`` elements.
  Chunk ``i`` covers flat positions ``[i * L, (i + 1) * L)``.
* The tile ``t`` has ``L`` entries in ``{-1, +1}``; the weight is rebuilt as
  ``W_hat[e] = alpha[e // L] * t[e % L]``.
* Packed tile: ``uint32`` words, ``ceil(L / 32)`` of them; tile element ``j`` is bit
  ``j % 32`` of word ``j // 32``; bit 1 means ``+1``. Unused high bits of the last
  word are 0.
* Alphas: ``float32[p]``. In "single" mode all ``p`` entries hold the same value, so
  kernels never need to know the mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALPHA_MODES = ("per_tile", "single")
WORD_BITS = 32


def check_divisible(numel: int, p: int, what: str = "weight") -> int:
    """Return ``L = numel // p``; raise ``ValueError`` if ``p`` does not divide ``numel``."""
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if numel % p != 0:
        raise ValueError(
            f"{what} has {numel} elements, which is not divisible by p={p}; "
            f"choose a p that divides {numel} or keep the layer dense"
        )
    return numel // p


def fold(scores: torch.Tensor, p: int) -> torch.Tensor:
    """Sum the ``p`` flat row-major chunks of ``scores``: returns shape ``(L,)``."""
    length = check_divisible(scores.numel(), p)
    return scores.reshape(p, length).sum(dim=0)


def binarize(folded: torch.Tensor) -> torch.Tensor:
    """Sign with 0 mapped to -1: ``+1`` where ``folded > 0``, else ``-1`` (same dtype)."""
    one = torch.ones((), dtype=folded.dtype, device=folded.device)
    return torch.where(folded > 0, one, -one)


def compute_alphas(weight: torch.Tensor, p: int, mode: str = "per_tile") -> torch.Tensor:
    """Scale factors, ``float32[p]``: mean ``|chunk i|`` of ``weight`` (``"per_tile"``),
    or the mean ``|weight|`` repeated ``p`` times (``"single"``). Differentiable."""
    if mode not in ALPHA_MODES:
        raise ValueError(f"unknown alpha mode {mode!r}; expected one of {ALPHA_MODES}")
    length = check_divisible(weight.numel(), p)
    chunks = weight.reshape(p, length).abs()
    if mode == "per_tile":
        return chunks.mean(dim=1)
    return chunks.mean().expand(p)


def n_words(length: int) -> int:
    """Packed ``uint32`` words of a tile of ``length`` elements: ``ceil(length / 32)``."""
    return (length + WORD_BITS - 1) // WORD_BITS


def pack_bits(tile: torch.Tensor) -> torch.Tensor:
    """Pack a ``{-1,+1}`` (or boolean, True = +1) tile of ``L`` entries into
    ``uint32[ceil(L / 32)]`` words (format in the module docstring)."""
    bits = (tile.detach().reshape(-1) > 0).to(torch.int64).cpu()
    length = bits.numel()
    words_needed = n_words(length)
    padded = torch.zeros(words_needed * WORD_BITS, dtype=torch.int64)
    padded[:length] = bits
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.int64), torch.arange(WORD_BITS))
    words = (padded.reshape(words_needed, WORD_BITS) * weights).sum(dim=1)
    # int64 values in [0, 2**32) -> the same bits as int32 -> reinterpret as uint32.
    as_int32 = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return as_int32.view(torch.uint32)


def words_as_int64(words: torch.Tensor) -> torch.Tensor:
    """Packed ``uint32`` (or bit-identical ``int32``) words as non-negative ``int64``.

    torch implements few ops for ``uint32`` on CPU, so all bit work goes through int64."""
    if words.dtype not in (torch.uint32, torch.int32):
        raise TypeError(f"packed tile must be uint32 (or int32) words, got {words.dtype}")
    return words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def unpack_bits(
    words: torch.Tensor, length: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(length,)`` tensor of ``+1/-1`` in ``dtype``."""
    if words.numel() != n_words(length):
        raise ValueError(
            f"a tile of {length} elements needs {n_words(length)} uint32 words, got {words.numel()}"
        )
    shifts = torch.arange(WORD_BITS, device=words.device)
    bits = (words_as_int64(words.reshape(-1))[:, None] >> shifts) & 1
    bits = bits.reshape(-1)[:length]
    return (bits * 2 - 1).to(dtype)


def reconstruct(tile: torch.Tensor, alphas: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Full weight ``W_hat`` of ``shape`` from a ``{-1,+1}`` tile ``(L,)`` and ``alphas (p,)``:
    ``W_hat[e] = alphas[e // L] * tile[e % L]`` (flat row-major)."""
    p = alphas.numel()
    return (alphas.reshape(p, 1) * tile.reshape(1, -1)).reshape(tuple(shape))


def row_length(shape: Sequence[int], weight_in_out: bool = False) -> int:
    """Elements per output row of a stored weight: ``K`` for Linear ``(N, K)``,
    ``Cin/g * kh * kw`` for conv; for an ``(in, out)`` matmul weight it is ``out``."""
    if weight_in_out:
        return int(shape[-1])
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


def is_aligned(numel: int, p: int, row_len: int) -> bool:
    """True when every chunk is a whole number of stored rows (``L % row_len == 0``)."""
    return numel % p == 0 and (numel // p) % row_len == 0


@dataclass(frozen=True)
class PackedTile:
    """One layer's inference representation."""

    words: torch.Tensor  # uint32[ceil(L/32)]
    alphas: torch.Tensor  # float32[p]
    length: int  # L

    @property
    def p(self) -> int:
        return self.alphas.numel()

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack_bits(self.words, self.length, dtype)

    def weight(self, shape: Sequence[int]) -> torch.Tensor:
        return reconstruct(self.signs(self.alphas.dtype), self.alphas, shape)


def tile_weight(
    scores: torch.Tensor, weight: torch.Tensor, p: int, alpha_mode: str = "per_tile"
) -> PackedTile:
    """The paper's construction: tile from the folded ``scores``, alphas from ``weight``.

    For post-training tiling pass the float weight as both arguments."""
    if scores.shape != weight.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and weight {tuple(weight.shape)} differ")
    with torch.no_grad():
        signs = binarize(fold(scores.float(), p))
        alphas = compute_alphas(weight.float(), p, alpha_mode).contiguous().clone()
    return PackedTile(pack_bits(signs), alphas.to(torch.float32), signs.numel())


def tbn_bytes(numel: int, p: int, bias_numel: int = 0) -> int:
    """Storage of a tiled layer: packed tile words + 4 bytes per alpha + float32 bias."""
    length = numel // p
    return 4 * ((length + WORD_BITS - 1) // WORD_BITS) + 4 * p + 4 * bias_numel
