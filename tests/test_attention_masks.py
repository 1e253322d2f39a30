"""Attention rows that a mask hides entirely return zeros, as in torch.

``F.scaled_dot_product_attention`` gives 0 for a query row whose boolean mask holds no
True, or whose float mask is -inf everywhere (left padding under a causal mask: the
first rows). The reference is torch's own function on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from emulated import host_and_board

import tbn_compiler as tbn


class Attend(nn.Module):
    """Self-attention of ``x`` (1, 2 heads, 5, 8) under a mask given as an input."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x * 0.5, x + 1.0, attn_mask=mask)


def _masks(kind: str) -> torch.Tensor:
    """A causal mask whose first two query rows see nothing (left padding)."""
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed[:, :2] = False
    if kind == "bool":
        return allowed
    return torch.zeros(5, 5).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("target", host_and_board())
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_zero(kind: str, target: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x, mask = torch.randn(1, 2, 5, 8, generator=gen), _masks(kind)
    ref = F.scaled_dot_product_attention(x, x * 0.5, x + 1.0, attn_mask=mask)
    assert torch.equal(ref[..., :2, :], torch.zeros_like(ref[..., :2, :]))  # torch's rule
    cm = tbn.compile(Attend(), (x, mask), target=target, dynamic_batch=False)
    try:
        got = cm(x, mask)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    finally:
        getattr(cm, "close", lambda: None)()
