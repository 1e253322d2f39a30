"""Independent numpy re-implementation of the paper's tile math, for the tests."""

from __future__ import annotations

import copy

import numpy as np
import torch


def np_tile(scores: np.ndarray, p: int) -> np.ndarray:
    """sign(sum of p flat chunks), 0 -> -1."""
    flat = scores.astype(np.float64).reshape(-1)
    length = flat.size // p
    folded = sum(flat[i * length : (i + 1) * length] for i in range(p))
    return np.where(folded > 0, 1.0, -1.0)


def np_alphas(weight: np.ndarray, p: int, mode: str = "per_tile") -> np.ndarray:
    flat = np.abs(weight.astype(np.float64).reshape(-1))
    length = flat.size // p
    if mode == "single":
        return np.full(p, flat.mean())
    return np.array([flat[i * length : (i + 1) * length].mean() for i in range(p)])


def np_reconstruct(
    scores: np.ndarray, weight: np.ndarray, p: int, mode: str = "per_tile"
) -> np.ndarray:
    """W_hat[e] = alpha[e // L] * t[e % L], in the weight's shape."""
    t = np_tile(scores, p)
    a = np_alphas(weight, p, mode)
    length = t.size
    e = np.arange(weight.size)
    return (a[e // length] * t[e % length]).reshape(weight.shape)


def np_pack(signs: np.ndarray) -> np.ndarray:
    """uint32 words; element j is bit j % 32 of word j // 32; 1 means +1."""
    n_words = (signs.size + 31) // 32
    words = np.zeros(n_words, dtype=np.uint64)
    for j, s in enumerate(signs.reshape(-1)):
        if s > 0:
            words[j // 32] |= np.uint64(1) << np.uint64(j % 32)
    return words.astype(np.uint32)


def reference_model(
    model: torch.nn.Module, tiled: dict[str, int], mode: str = "per_tile"
) -> torch.nn.Module:
    """Copy of ``model`` with each named parameter replaced by its post-training
    reconstruction at the given p (tied parameters are replaced once)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        done = set()
        for name, p in tiled.items():
            param = params[name]
            if id(param) in done:
                continue
            w = param.detach().double().numpy()
            param.copy_(torch.from_numpy(np_reconstruct(w, w, p, mode)))
            done.add(id(param))
    return ref
