"""Attention masks: rows a mask hides entirely return zeros, as in torch, and a mask
that hides nothing whatever the inputs (built from sizes) is dropped.

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


class SizeMask(nn.Module):
    """Self-attention under a mask built from ``arange`` and the input's sizes, as
    Hugging Face models build theirs: ``kind`` "all" lets every query see every key,
    "causal" hides the future, "batch" is all True at batch 2 and below only, "values" reads x."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[2]
        keys = torch.arange(length, device=x.device)
        if self.kind == "causal":
            mask = keys[None, :] <= keys[:, None]
        elif self.kind == "batch":
            mask = torch.arange(batch, device=x.device)[:, None, None, None] < 2
            mask = mask | (keys[None, None, None, :] < 1)  # key 0 for every query
        elif self.kind == "values":
            mask = (x[:, :1, :, :1] > -10.0).expand(-1, -1, -1, length)
        else:
            mask = keys[None, :] >= 0
        mask = mask.expand(batch, 1, length, length)
        return F.scaled_dot_product_attention(x, x * 0.5, x + 1.0, attn_mask=mask)


def _masked_attentions(model: nn.Module, x: torch.Tensor) -> int:
    from tbn_compiler.backends import relax_import

    batch = {0: torch.export.Dim("batch", min=1, max=64)}
    ep = torch.export.export(model, (x,), dynamic_shapes=(batch,))
    relax_import.drop_attend_all_masks(ep, [x])
    return sum(
        1
        for n in ep.graph.nodes
        if n.target is torch.ops.aten.scaled_dot_product_attention.default
        and relax_import._sdpa_mask(n) is not None
    )


@pytest.mark.parametrize(
    "kind,dropped", [("all", True), ("causal", False), ("batch", False), ("values", False)]
)
def test_a_mask_that_hides_nothing_at_any_batch_is_dropped(kind: str, dropped: bool) -> None:
    """Only a mask that depends on the sizes alone and hides nothing (at the example's
    batch and at another) is dropped; the compiled model matches torch at batch 1 and 3
    either way."""
    model = SizeMask(kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 7, 8, generator=gen)
    assert _masked_attentions(model, x) == (0 if dropped else 1)
    cm = tbn.compile(model, (x,), target="llvm")
    for batch in (1, 3):
        xb = torch.randn(batch, 2, 7, 8, generator=gen)
        torch.testing.assert_close(cm(xb), model(xb), rtol=1e-5, atol=1e-5)
