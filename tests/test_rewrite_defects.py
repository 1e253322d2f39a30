"""Regression tests for rewrite defects found by trying the project as a new user would.

Each test compares with an independent reference: the numpy reconstruction of the
paper's formulas (``reference_model``) or the decisions a config must give."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_model

import tbn_compiler as tbn

CFG = tbn.TBNConfig(p=4, min_numel=0)


def _rows(gm) -> dict[str, dict]:
    return {r["name"]: r for r in tbn.inspect(gm).to_dict()["layers"]}


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 16)

    def forward(self, x):
        return self.l(self.l(x))


class _MatmulThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(16, 16))
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x @ self.W)


class _LinearThenConv(nn.Module):
    """A Linear over the last axis feeding a Conv2d directly."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.fc(x))


# name -> (model, input, weights tiled at p=4)
CHAINS = {
    "linear-linear": (
        lambda: nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)),
        (2, 16),
        ["0.weight", "1.weight"],
    ),
    "conv-conv": (
        lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3)),
        (2, 4, 8, 8),
        ["0.weight", "1.weight"],
    ),
    "linear-conv": (_LinearThenConv, (2, 4, 8, 8), ["fc.weight", "conv.weight"]),
    "matmul-linear": (_MatmulThenLinear, (2, 16), ["W", "fc.weight"]),
    "same-module-twice": (_Twice, (2, 16), ["l.weight"]),
}


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("trace", ["export", "symbolic_trace"])
def test_tiled_layer_feeding_tiled_layer(name, trace, monkeypatch):
    factory, shape, weights = CHAINS[name]
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(*shape)
    if trace == "symbolic_trace":
        monkeypatch.setattr(torch.export, "export", _refuse)
    gm = tbn.rewrite(model, x, CFG)
    assert gm.meta["tbn_capture"] == ("torch.export" if trace == "export" else "symbolic_trace")
    ref = reference_model(model, dict.fromkeys(weights, 4))
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all(r["status"] == "tiled" for r in _rows(gm).values())


def _refuse(*args, **kwargs):
    raise RuntimeError("torch.export disabled for this test")


def test_single_string_exclude_is_one_pattern():
    cfg = tbn.TBNConfig(exclude="fc")
    assert cfg.exclude == ("fc",)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 16))
    model.add_module("f", nn.Linear(16, 16))
    rows = _rows(
        tbn.rewrite(model.eval(), torch.randn(2, 16), tbn.TBNConfig(p=4, min_numel=0, exclude="fc"))
    )
    assert rows["fc"]["status"] == "skipped" and rows["f"]["status"] == "tiled"
    assert tbn.TBNConfig(exclude=nn.Linear).exclude == (nn.Linear,)


def test_layers_must_be_a_mapping():
    with pytest.raises(TypeError, match=r"TBNConfig.layers must map .* got str 'fc'"):
        tbn.TBNConfig(layers="fc")
    with pytest.raises(TypeError, match="TBNConfig.layers must map"):
        tbn.TBNConfig(layers=["fc"])


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 16)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(F.relu(self.enc(x)))


@pytest.mark.parametrize("alias", ["enc", "dec"])
def test_tied_weight_excluded_by_any_alias(alias):
    model, x = _Tied().eval(), torch.randn(2, 16)
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=4, min_numel=0, exclude=[alias]))
    (row,) = tbn.inspect(gm).to_dict()["layers"]
    assert row["status"] == "skipped" and row["reason"] == f"excluded by {alias!r}"
    assert sorted(row["aliases"]) == ["dec", "enc"]
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("alias", ["enc", "dec"])
def test_tied_weight_layer_rule_by_any_alias(alias):
    model, x = _Tied().eval(), torch.randn(2, 16)
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=4, min_numel=0, layers={alias: 8}))
    report = tbn.inspect(gm)
    (row,) = report.to_dict()["layers"]
    assert row["status"] == "tiled" and row["p"] == 8 and row["uses"] == 2
    assert sorted(row["aliases"]) == ["dec", "enc"]
    assert "enc (= dec)" in str(report)
    ref = reference_model(model, {"enc.weight": 8})
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alias", ["enc", "dec"])
def test_prepare_honours_every_alias(alias):
    prepared = tbn.prepare(_Tied(), tbn.TBNConfig(p=4, min_numel=0, exclude=[alias]))
    assert type(prepared.enc) is nn.Linear and type(prepared.dec) is nn.Linear
    assert prepared.enc.weight is prepared.dec.weight


def test_plain_function_is_refused_with_a_type_error():
    def f(x):
        return x * 2

    with pytest.raises(TypeError, match=r"expects a torch.nn.Module, got function 'f'"):
        tbn.rewrite(f, torch.randn(2, 3))
    with pytest.raises(TypeError, match="cfg must be a TBNConfig"):
        tbn.rewrite(nn.Linear(3, 3), torch.randn(2, 3), {"p": 4})


@pytest.mark.parametrize("trace", ["export", "symbolic_trace"])
def test_exclude_by_module_type(trace, monkeypatch):
    class Head(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), Head(16, 16)).eval()
    if trace == "symbolic_trace":
        monkeypatch.setattr(torch.export, "export", _refuse)
    x = torch.randn(2, 16)
    rows = _rows(tbn.rewrite(model, x, tbn.TBNConfig(p=4, min_numel=0, exclude=[nn.Linear])))
    assert [r["status"] for r in rows.values()] == ["skipped", "skipped"]
    assert rows["0"]["reason"] == "excluded by 'Linear'"
    rows = _rows(tbn.rewrite(model, x, tbn.TBNConfig(p=4, min_numel=0, exclude=[Head])))
    assert rows["0"]["status"] == "tiled" and rows["2"]["reason"] == "excluded by 'Head'"


class _WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1))
        self.up = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.up(self.pos(x)).transpose(1, 2))


@pytest.mark.parametrize("trace", ["export", "symbolic_trace"])
def test_every_linear_and_conv_is_reported(trace, monkeypatch):
    if trace == "symbolic_trace":
        monkeypatch.setattr(torch.export, "export", _refuse)
    model, x = _WeightNormed().eval(), torch.randn(2, 8, 10)
    gm = tbn.rewrite(model, x, CFG)
    rows = _rows(gm)
    assert set(rows) == {"pos", "up", "fc"}
    assert rows["fc"]["status"] == "tiled"
    assert rows["pos"]["status"] == "skipped" and "parametrization" in rows["pos"]["reason"]
    assert rows["up"]["status"] == "skipped" and "no tile op" in rows["up"]["reason"]
    ref = reference_model(model, {"fc.weight": 4})
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)


_KEPT: list[torch.Tensor] = []  # outside the module: deepcopy refuses non-leaf tensors


class _KeepEvery(nn.Module):
    """A parametrization whose every result stays alive: each access of the weight is a
    new tensor with an id never seen before."""

    def forward(self, weight):
        out = weight * 1
        _KEPT.append(out)
        return out


def test_a_weight_computed_anew_at_each_access_is_reported(monkeypatch):
    """The rewrite tells weights apart by identity; a parametrized weight is a new tensor
    at every access (it used to raise KeyError whenever two accesses differed)."""
    monkeypatch.setattr(torch.export, "export", _refuse)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    nn.utils.parametrize.register_parametrization(model[0], "weight", _KeepEvery())
    x = torch.randn(2, 8)
    gm = tbn.rewrite(model, x, CFG)
    rows = _rows(gm)
    assert rows["0"]["status"] == "skipped" and "parametrization" in rows["0"]["reason"]
    assert rows["2"]["status"] == "tiled"
    torch.testing.assert_close(gm(x), reference_model(model, {"2.weight": 4})(x))


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_failed_capture_reports_only_through_the_error(capfd):
    with pytest.raises(tbn.CaptureError, match="torch.export failed"):
        tbn.rewrite(_DataDependent(), torch.randn(2, 3))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_batch_of_one_capture_is_quiet(capfd):
    model, x = nn.Sequential(nn.Linear(16, 16)).eval(), torch.randn(1, 16)
    gm = tbn.rewrite(model, x, CFG)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    ref = reference_model(model, {"0.weight": 4})
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
