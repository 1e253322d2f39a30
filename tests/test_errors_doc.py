"""docs/errors.md is true: every row's bad input raises that exception with that message.

Each row id maps to a trigger below; a row without a trigger, or a trigger without a row,
fails the test. Triggers also check that the bad input changed nothing where that applies.
"""

from __future__ import annotations

import copy
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def doc_rows() -> dict[str, tuple[str, str]]:
    """Row id -> (exception name, message) from the table in docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("id", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = (cells[3].strip("`"), cells[4])
    return rows


def message_pattern(message: str) -> str:
    """The documented message as a regex: '…' matches any text."""
    return ".*?".join(re.escape(part.strip()) for part in message.split("…"))


# --------------------------------------------------------------------------- triggers

X = torch.randn(2, 16)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16)).eval()


def _unchanged(model: nn.Module, fn: Callable[[], object]) -> Callable[[], object]:
    """Run ``fn`` and check afterwards (also when it raised) that ``model`` is unchanged."""

    def run():
        before = copy.deepcopy(model.state_dict())
        try:
            return fn()
        finally:
            after = model.state_dict()
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before)

    return run


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


_COMPILED: dict[str, object] = {}


def _compiled():
    if "cm" not in _COMPILED:
        _COMPILED["cm"] = tbn.compile(_linear(), X, config=tbn.TBNConfig(p=4, min_numel=0))
    return _COMPILED["cm"]


def _saved(tmp: Path) -> Path:
    return _compiled().save(tmp / "model.tbn")


def _edited(tmp: Path) -> Path:
    src = _saved(tmp)
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["metadata.json"] = members["metadata.json"].replace(b'"float32"', b'"float64"')
    dst = tmp / "edited.tbn"
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _truncated(tmp: Path) -> Path:
    src = _saved(tmp)
    dst = tmp / "truncated.tbn"
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _save_under_file(tmp: Path):
    (tmp / "file").write_text("x")
    _compiled().save(tmp / "file" / "model.tbn")


def _strict_indivisible():
    model = nn.Sequential(nn.Linear(7, 10)).eval()
    return _unchanged(
        model,
        lambda: tbn.rewrite(model, torch.randn(2, 7), tbn.TBNConfig(p=4, min_numel=0, strict=True)),
    )()


class _Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def _bad_embedding_id():
    ids = torch.randint(0, 50, (2, 5))
    cm = tbn.compile(_Embedded().eval(), ids, config=tbn.TBNConfig(p=4, min_numel=0))
    ids[0, 0] = 50
    cm(ids)


class _Table(nn.Module):
    """``torch.gather`` by ``rows``, or ``table[rows, cols]`` given ``cols``."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, rows, cols=None):
        if cols is None:
            return torch.gather(self.table, 0, rows[:, None].expand(-1, 4))
        return self.table[rows, cols]


def _bad_table_id(*ids: torch.Tensor):
    cm = tbn.compile(_Table().eval(), ids)
    ids[-1][0] = 10 if len(ids) == 1 else 4
    cm(*ids)


class _Dropped(nn.Module):
    def forward(self, q):
        return nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


class _FFT(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()


class _Sorted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.sort(self.fc(x), dim=-1).values


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


def _wrong_relu():
    """Compile with a relu converter that scales by 1.5 (a simulated compiler defect)."""
    from tbn_compiler.backends import relax_import

    convert = relax_import.SEMANTIC_CONVERTERS["relu.default"]

    def wrong(node, importer):
        out = convert(node, importer)
        scale = relax_import.relax.const(1.5, "float32")
        return importer.block_builder.emit(relax_import.relax.op.multiply(out, scale))

    relax_import.SEMANTIC_CONVERTERS["relu.default"] = wrong
    try:
        tbn.compile(nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval(), X)
    finally:
        relax_import.SEMANTIC_CONVERTERS["relu.default"] = convert


def _cuda_module():
    return tbn.compile(_linear(), X, target="cuda:sm_90", config=tbn.TBNConfig(p=4, min_numel=0))


def _needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found")


def _cortex_m(target: str = "mps2-an386"):
    return tbn.compile(_linear(), X, target=target, config=tbn.TBNConfig(p=4, min_numel=0))


def _export_into_non_empty(tmp: Path):
    (tmp / "keep.txt").write_text("mine")
    try:
        _cortex_m().export(tmp)
    finally:
        assert sorted(p.name for p in tmp.iterdir()) == ["keep.txt"]


def _no_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    _needs("nvcc")


def _qat_model() -> nn.Module:
    return tbn.prepare(_linear(), tbn.TBNConfig(p=4, min_numel=0))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X, torch.tensor([0, 1]))]


def _fit(loader: object = None, **kwargs: object) -> object:
    """``qat.fit`` of a prepared model; the model's weights must not change on an error."""
    model = _qat_model()
    data = _batches() if loader is None else loader
    return _unchanged(model, lambda: tbn.qat.fit(model, data, epochs=1, progress=False, **kwargs))()


def _tune_without_tracker(tmp: Path) -> object:
    """Tuning through a tracker nobody listens on; its database folder is not created."""
    tune = tbn.Tuning(trials=1, rpc="127.0.0.1:1:cpu", progress=False, database=tmp / "db")
    try:
        return tbn.compile(_linear(), X, tune=tune)
    finally:
        assert not (tmp / "db").exists()


def _torch_compiled(options: dict) -> object:
    compiled = torch.compile(_linear(), backend="tbn", options=options)
    with torch.no_grad():
        return compiled(X)


TRIGGERS: dict[str, Callable[[Path], object]] = {
    "model-not-module": lambda tmp: tbn.rewrite(lambda x: x, X),
    "prepare-not-module": lambda tmp: tbn.prepare(lambda x: x),
    "config-not-config": lambda tmp: tbn.rewrite(_linear(), X, {"p": 4}),
    "config-p": lambda tmp: tbn.TBNConfig(p=0),
    "config-layers": lambda tmp: tbn.TBNConfig(layers="fc"),
    "config-alpha": lambda tmp: tbn.TBNConfig(alpha="mean"),
    "config-exclude": lambda tmp: tbn.TBNConfig(exclude=[3]),
    "strict-indivisible": lambda tmp: _strict_indivisible(),
    "strict-unused-pattern": lambda tmp: tbn.rewrite(
        _linear(), X, tbn.TBNConfig(min_numel=0, strict=True, exclude=["nope.*"])
    ),
    "inputs-type": lambda tmp: tbn.rewrite(_linear(), "x"),
    "untraceable": lambda tmp: tbn.rewrite(_DataDependent(), X),
    "inspect-type": lambda tmp: tbn.inspect(nn.Linear(2, 2)),
    "target-unknown": lambda tmp: tbn.compile(_linear(), X, target="mps2-an368"),
    "tune-cortex-m": lambda tmp: tbn.compile(
        _linear(), X, target="mps2-an386", tune=tbn.Tuning(trials=1)
    ),
    "precision-unknown": lambda tmp: tbn.compile(_linear(), X, precision="fp16"),
    "precision-target": lambda tmp: tbn.compile(
        _linear(), X, target="mps2-an386", precision="int8"
    ),
    "precision-tune": lambda tmp: tbn.compile(
        _linear(), X, precision="int8", tune=tbn.Tuning(trials=1)
    ),
    "call-count": lambda tmp: _compiled()(X, X),
    "call-shape": lambda tmp: _compiled()(torch.randn(2, 17)),
    "call-dtype": lambda tmp: _compiled()(X.double()),
    "call-not-tensor": lambda tmp: _compiled()([1.0] * 16),
    "save-directory": lambda tmp: _compiled().save(tmp),
    "save-unwritable": _save_under_file,
    "load-missing": lambda tmp: tbn.load(tmp / "nope.tbn"),
    "load-not-archive": lambda tmp: tbn.load(Path(shutil.copy(__file__, tmp / "x.tbn"))),
    "load-edited": lambda tmp: tbn.load(_edited(tmp)),
    "load-truncated": lambda tmp: tbn.load(_truncated(tmp)),
    "embedding-id": lambda tmp: _bad_embedding_id(),
    "gather-id": lambda tmp: _bad_table_id(torch.tensor([1, 2, 3])),
    "indexing-id": lambda tmp: _bad_table_id(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])),
    "sdpa-dropout": lambda tmp: tbn.compile(_Dropped(), torch.randn(1, 2, 4, 8)),
    "random-op": lambda tmp: tbn.compile(_Noisy(), X),
    "validation-mismatch": lambda tmp: _wrong_relu(),
    "op-unsupported": lambda tmp: tbn.compile(_FFT(), torch.randn(2, 8)),
    "cuda-no-gpu": lambda tmp: (_no_gpu(), _cuda_module()(X)),
    "cuda-load-no-gpu": lambda tmp: (_no_gpu(), tbn.load(_cuda_module().save(tmp / "c.tbn"))),
    "qat-no-teacher": lambda tmp: _fit(alpha=0.5),
    "qat-loader-len": lambda tmp: _fit(loader=(b for b in _batches())),
    "qat-empty-loader": lambda tmp: _fit(loader=[]),
    "tuning-rpc-form": lambda tmp: tbn.Tuning(rpc="127.0.0.1:9190"),
    "tuning-rpc-unreachable": lambda tmp: _tune_without_tracker(tmp),
    "torch-compile-option": lambda tmp: _torch_compiled(options={"p": 4}),
    "cm-no-c-lowering": lambda tmp: tbn.compile(_Sorted().eval(), X, target="mps2-an386"),
    "cm-input": lambda tmp: (_needs("arm-none-eabi-gcc"), _cortex_m()(X.double())),
    "cm-not-emulated": lambda tmp: (_needs("arm-none-eabi-gcc"), _cortex_m("stm32f746g-disco")(X)),
    "cm-export-not-empty": lambda tmp: (_needs("arm-none-eabi-gcc"), _export_into_non_empty(tmp)),
}


def test_every_row_has_a_trigger_and_every_trigger_a_row():
    assert set(doc_rows()) == set(TRIGGERS)


@pytest.mark.parametrize("row", sorted(doc_rows()))
def test_row_is_true(row, tmp_path):
    exc_name, message = doc_rows()[row]
    if row not in TRIGGERS:
        pytest.fail(f"no trigger for row {row!r}")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(Exception) as info:  # noqa: B017,PT011 - the type is checked below
        TRIGGERS[row](tmp_path)
    names = [cls.__name__ for cls in type(info.value).__mro__]
    assert exc_name == type(info.value).__name__, f"{row}: raised {names[0]}: {info.value}"
    assert re.search(message_pattern(message), str(info.value), re.S), (
        f"{row}: message {str(info.value)!r} does not match {message!r}"
    )
    if row.startswith("save-"):  # a failed save leaves nothing behind
        after = sorted(p.name for p in tmp_path.iterdir())
        assert after == before + (["file"] if row == "save-unwritable" else [])
    if row == "cuda-load-no-gpu":  # the saved file is kept; nothing else is written
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tbn"]
