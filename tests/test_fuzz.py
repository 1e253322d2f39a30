"""Regressions for defects found by the differential fuzzer, each minimal."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from reference import reference_model

import tbn_compiler as tbn

# --------------------------------------------------------------------------- regressions


class _CalledTwice(nn.Module):
    """``l`` is both the first and (through its second call) a middle layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.l(torch.relu(self.l(x))))


class _LastCalledTwice(nn.Module):
    """``l`` is called first in the middle and again as the last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.l = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(torch.relu(self.l(self.stem(x))))


class _TiedConvSameEvenKernel(nn.Module):
    """Two convs share a weight; the second uses padding='same' with an even kernel,
    which the tile ops cannot compute."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 4, 2)
        self.b = nn.Conv1d(4, 4, 2, padding="same")
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _statuses(gm) -> list[tuple[str, str]]:
    return sorted((r.name, r.status) for r in tbn.inspect(gm).layers)


@pytest.mark.parametrize(
    ("model_cls", "x_shape", "cfg", "tiled"),
    [
        (_CalledTwice, (2, 8), dict(keep_first=True), {"head.weight": 2}),
        (_LastCalledTwice, (2, 4), dict(keep_last=True), {"stem.weight": 2}),
        (_TiedConvSameEvenKernel, (1, 4, 9), {}, {}),
    ],
    ids=["keep_first-module-called-twice", "keep_last-module-called-twice", "tied-same-even"],
)
def test_one_decision_per_weight_for_every_call(model_cls, x_shape, cfg, tiled) -> None:
    """A weight used by several calls is tiled in all of them or kept dense in all of
    them (it was dense in its first call and tiled in the others, or tiled with a
    padding the tile op cannot take), and the report has one row for it."""
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(*x_shape)
    gm = tbn.rewrite(model, (x,), tbn.TBNConfig(p=2, min_numel=0, **cfg))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference_model(model, tiled)(x), rtol=1e-5, atol=1e-5)
    rows = _statuses(gm)
    assert len({name for name, _ in rows}) == len(rows), rows
    assert {n for n, s in rows if s == "tiled"} == {k.rpartition(".")[0] for k in tiled}
