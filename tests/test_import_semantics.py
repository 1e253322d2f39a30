"""Relax import: ops whose TVM converters break torch's semantics, against plain torch.

select with a negative index, whole powers, concatenation with an empty operand (the
empty key/value cache of Hugging Face decoders), dropout and random ops, and the dtype
of float32 arithmetic with 0-d float64 tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from emulated import host_and_board

import tbn_compiler as tbn
from tbn_compiler.backends.relax_import import UnsupportedOpError

DENSE = tbn.TBNConfig(exclude=["*"])  # compare with the float model itself


class Selects(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x[:, -1], x[-2], x[:, 0, -3], x.select(2, 1)


class Powers(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x**2, x**3, x**5, x**8, x**2.5, x**-1


class EmptyCache(nn.Module):
    """``torch.cat`` of a 1-D empty tensor (skipped by torch whatever the rank) and of an
    empty slice, as a key/value cache does on its first step."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([torch.tensor([]), self.proj(x)], dim=-2)
        values = torch.cat([x[:, :0], x, x[:, :0]], dim=1)
        return keys * 2, values


class ZeroDimDouble(nn.Module):
    """float32 with 0-d float64 tensors (torch keeps float32) and with a 1-D float64
    tensor (torch promotes to float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.5, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor([0.25, -0.5, 2.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x * self.scale, x / self.scale - self.scale, x + self.shift


def _compiled_matches(model: nn.Module, x: torch.Tensor) -> None:
    cm = tbn.compile(model, x, config=DENSE)
    expected, got = model(x), cm(x)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_select_counts_negative_indices_from_the_end() -> None:
    _compiled_matches(Selects(), torch.randn(4, 5, 6))


def test_whole_powers_match_torch_also_for_negative_bases() -> None:
    x = torch.linspace(-3.0, 3.0, 24).reshape(4, 6)
    _compiled_matches(Powers(), x)


def test_zero_dim_float64_operands_keep_torchs_result_dtype() -> None:
    model, x = ZeroDimDouble(), torch.randn(4, 3)
    assert [t.dtype for t in model(x)] == [torch.float32, torch.float32, torch.float64]
    _compiled_matches(model, x)  # assert_close also compares the dtypes


def test_concatenation_skips_empty_operands_of_any_rank() -> None:
    torch.manual_seed(0)
    _compiled_matches(EmptyCache().eval(), torch.randn(2, 3, 8))


class Dropout(nn.Module):
    def __init__(self, training: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.training_flag = training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), 0.25, training=self.training_flag)


def test_dropout_that_drops_is_refused_and_inactive_dropout_is_the_identity() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(UnsupportedOpError, match=r"drops at random \(p=0.25, train=True\)"):
        tbn.compile(Dropout(training=True), x, config=DENSE)
    model = Dropout(training=False)
    torch.testing.assert_close(
        tbn.compile(model, x, config=DENSE)(x), model(x), rtol=1e-5, atol=1e-6
    )


class Noise(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "randn_like":
            return x + torch.randn_like(x)
        if self.op == "randn":
            return x + torch.randn(x.shape)
        return torch.bernoulli(torch.sigmoid(x))


@pytest.mark.parametrize("op", ["randn_like", "randn", "bernoulli"])
def test_random_ops_are_refused_not_frozen(op: str) -> None:
    with pytest.raises(UnsupportedOpError, match="draws random numbers at every call"):
        tbn.compile(Noise(op), torch.randn(2, 4), config=DENSE)


class SliceScatters(nn.Module):
    """``slice_scatter`` along several axes, with steps, a negative start and an open end
    (swin_t's shifted-window masks write such slices)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            torch.slice_scatter(x, y[:, :2], dim=1, start=1, end=5, step=2),
            torch.slice_scatter(x, y[:3], dim=0, start=-3),
            torch.slice_scatter(x, y[:, :, :2] * 2, dim=2, start=0, end=4, step=3),
        )


@pytest.mark.parametrize("target", host_and_board())
def test_slice_scatter_writes_torchs_slices_and_warns_nothing(target: str, capfd) -> None:
    x, y = torch.randn(6, 7, 5), torch.randn(6, 7, 5)
    model = SliceScatters()
    cm = tbn.compile(model, (x, y), target=target, config=DENSE)
    for e, g in zip(model(x, y), cm(x, y), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert "Fast mode" not in capfd.readouterr().err
