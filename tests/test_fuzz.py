"""Differential fuzzer: random small nets (tests/fuzz_nets.py) rewritten and compiled.

For each seed: the rewritten graph against the independent numpy reconstruction (and
the report's decisions against the config), the llvm build against the rewritten graph,
and for every 10th seed the mps2-an386 build in QEMU. ``FUZZ_SEED`` (default 0) and
``FUZZ_N`` (default 60) choose the seeds; ``make fuzz N=1000 SEED=...`` runs more.
A failure names its seed and the command that replays it.

The tests after the fuzzer are regressions for defects it found, each minimal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn
from fuzz_nets import assert_close, check_rewrite, make_case, replay_hint
from reference import reference_model

import tbn_compiler as tbn

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
FUZZ_N = int(os.environ.get("FUZZ_N", "60"))
SEEDS = range(FUZZ_SEED, FUZZ_SEED + FUZZ_N)
QEMU_EVERY = 10


def _arm_toolchain_missing() -> str | None:
    from tbn_compiler.backends.cortex_m import ToolchainError, require_toolchain

    try:
        require_toolchain(qemu=True)
    except ToolchainError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _replayable(seed: int, case=None) -> Iterator[None]:
    """Add the seed, the replay command and the net to any failure."""
    try:
        yield
    except Exception as exc:
        exc.add_note(case.describe() if case is not None else replay_hint(seed))
        raise


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_fuzz_net_llvm(seed: int) -> None:
    """rewrite vs the numpy reconstruction, then llvm vs the rewritten graph."""
    with _replayable(seed):
        case = make_case(seed)
    with _replayable(seed, case):
        gm = check_rewrite(case)
        cm = tbn.compile_graph(gm, case.inputs, target="llvm")
        with torch.no_grad():
            assert_close(cm(*case.inputs), gm(*case.inputs), "llvm vs rewrite")


@pytest.mark.parametrize(
    "seed", [s for s in SEEDS if s % QEMU_EVERY == 0], ids=lambda s: f"seed{s}"
)
def test_fuzz_net_cortex_m(seed: int) -> None:
    """rewrite vs the numpy reconstruction, then mps2-an386 in QEMU vs the rewritten graph."""
    missing = _arm_toolchain_missing()
    if missing:
        pytest.skip(f"Arm toolchain / QEMU: {missing}")
    with _replayable(seed):
        case = make_case(seed)
    with _replayable(seed, case):
        gm = check_rewrite(case)
        cm = tbn.compile_graph(gm, case.inputs, target="mps2-an386")
        try:
            with torch.no_grad():
                assert_close(cm(*case.inputs), gm(*case.inputs), "mps2-an386 vs rewrite")
        finally:
            cm.close()


def test_seed_gives_the_same_net_config_and_input() -> None:
    a, b = make_case(12345), make_case(12345)
    assert str(a.model) == str(b.model) and a.config_kwargs == b.config_kwargs
    assert torch.equal(a.inputs[0], b.inputs[0])
    for (na, pa), (nb, pb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert na == nb and torch.equal(pa, pb)


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


class _FunctionalTiedToLinear(nn.Module):
    """One weight owned first by a plain module (used through F.linear), then tied into
    an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.fc = nn.Linear(8, 8, bias=False)
        self.fc.weight = self.proj.weight
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.relu(nn.functional.linear(x, self.proj.weight))))


def test_exclude_by_type_matches_any_module_owning_a_tied_weight() -> None:
    """exclude=[nn.Linear] keeps a weight dense when an nn.Linear owns it, even if the
    first module that owns it is not a Linear (only the first owner's type was checked)."""
    torch.manual_seed(0)
    model, x = _FunctionalTiedToLinear().eval(), torch.randn(2, 8)
    gm = tbn.rewrite(model, (x,), tbn.TBNConfig(p=2, min_numel=0, exclude=[nn.Linear]))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert {r.name: r.status for r in tbn.inspect(gm).layers} == {
        "proj": "skipped",
        "head": "skipped",
    }


def _features(seed: int) -> set[str]:
    """What one generated net and config exercise, by name."""
    case = make_case(seed)
    cfg = case.config_kwargs
    found = {type(m).__name__ for m in case.model.modules()}
    for m in case.model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            found |= {f"padding_mode={m.padding_mode}", f"padding={m.padding}"}
            found |= {"depthwise"} if m.groups == m.in_channels > 1 else set()
            found |= {"grouped"} if 1 < m.groups < m.in_channels else set()
            found |= {"stride"} if max(m.stride) > 1 else set()
            found |= {"dilation"} if max(m.dilation) > 1 else set()
    found |= {"tied weights"} if any(n.startswith("tied") for n in case.notes) else set()
    found |= {f"p={cfg['p']}", f"alpha={cfg['alpha']}"}
    found |= {k for k in ("keep_first", "keep_last", "strict", "layers") if cfg.get(k)}
    found |= {"min_numel"} if cfg["min_numel"] else set()
    found |= {"exclude type" if isinstance(e, type) else "exclude name" for e in case.excludes}
    return found


def test_default_seeds_cover_every_feature() -> None:
    """The 60 nets `make test` runs exercise every layer form, block and config option."""
    found = set().union(*(_features(s) for s in range(60)))
    wanted = {
        *("Linear", "Conv1d", "Conv2d", "FunctionalLinear", "FunctionalConv", "Matmul"),
        *("BatchNorm1d", "BatchNorm2d", "ReLU", "GELU", "SiLU", "Act"),
        *("Residual", "Concat", "Pool", "Reshape", "Flatten", "Twice", "tied weights"),
        *("depthwise", "grouped", "stride", "dilation", "padding=same", "padding=valid"),
        *(f"padding_mode={m}" for m in ("zeros", "reflect", "replicate", "circular")),
        *(f"p={p}" for p in range(1, 9)),
        *("alpha=per_tile", "alpha=single", "keep_first", "keep_last", "strict", "layers"),
        *("min_numel", "exclude type", "exclude name"),
    }
    assert wanted <= found, f"not covered: {sorted(wanted - found)}"
