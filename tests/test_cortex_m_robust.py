"""Cortex-M robustness: generated C that builds for every op, build errors at compile time
naming the kernel and its model step, thread safety, export safety, bounds-checked
gathers. References are plain PyTorch (layers kept float with ``exclude=["*"]``)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tbn_compiler as tbn
from tbn_compiler.backends.cortex_m import (
    BuildError,
    ToolchainError,
    check,
    driver,
    qemu,
    toolchain,
)

try:
    toolchain.require_toolchain(qemu=True)
    _MISSING = None
except ToolchainError as exc:
    _MISSING = str(exc)

needs_toolchain = pytest.mark.skipif(_MISSING is not None, reason=f"Arm toolchain: {_MISSING}")
needs_host_cc = pytest.mark.skipif(check.host_compiler() is None, reason="no host C compiler")

BOARD = "mps2-an386"
FLOAT = tbn.TBNConfig(exclude=["*"])  # every layer stays float: the reference is plain torch
TILED = tbn.TBNConfig(p=4, min_numel=0)  # Linear -> tile kernel (step 0), Hardswish -> step 1


class MaskedLinear(nn.Module):
    """A constant boolean mask (a ``bool`` kernel argument in C) after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("mask", torch.rand(1, 16) > 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).masked_fill(self.mask, 0.0)


class EmbeddingOfInput(nn.Module):
    """Embedding ids computed in the graph from the float input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x.long())


def _hardswish() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Hardswish()).eval(), torch.randn(1, 16)


@pytest.fixture(scope="module")
def hardswish():
    model, x = _hardswish()
    cm = tbn.compile(model, (x,), target=BOARD, config=FLOAT)
    yield cm, model
    cm.close()


@needs_toolchain
def test_hardswish_builds_and_matches_torch(hardswish) -> None:
    cm, model = hardswish
    x = 4 * torch.randn(1, 16)  # reaches both clip bounds of hardswish
    torch.testing.assert_close(cm(x), model(x).detach(), rtol=1e-5, atol=1e-6)


@needs_toolchain
def test_boolean_mask_builds_and_matches_torch() -> None:
    torch.manual_seed(0)
    model, x = MaskedLinear().eval(), torch.randn(1, 16)
    cm = tbn.compile(model, (x,), target=BOARD, config=FLOAT)
    try:
        torch.testing.assert_close(cm(x), model(x).detach(), rtol=1e-5, atol=1e-6)
    finally:
        cm.close()


def _break_second_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the generated C of the kernel called second invalid (an undeclared name)."""
    original = driver.c_kernels.c_kernels

    def broken(mod):
        kernels = original(mod)
        name = next(n for n in kernels if n.startswith("tbn_k1_"))
        code = kernels[name].code
        body = code.index(") {\n") + len(") {\n")
        code = code[:body] + "  tbn_no_such_name = 1;\n" + code[body:]
        kernels[name] = dataclasses.replace(kernels[name], code=code)
        return kernels

    monkeypatch.setattr(driver.c_kernels, "c_kernels", broken)


def _assert_names_kernel_and_step(message: str) -> None:
    assert "tbn_no_such_name" in message
    line = next(ln for ln in message.splitlines() if "tbn_no_such_name" in ln and "in kernel" in ln)
    # the kernel, its step, the fused ops it computes and the layer feeding it
    assert "kernel tbn_k1_" in line and "step 1:" in line
    assert "on step 0 (layer '0')" in line


@needs_toolchain
def test_compile_fails_with_the_kernel_when_c_does_not_build(monkeypatch) -> None:
    model, x = _hardswish()
    _break_second_kernel(monkeypatch)
    with pytest.raises(BuildError) as err:
        tbn.compile(model, (x,), target=BOARD, config=TILED)
    _assert_names_kernel_and_step(str(err.value))


@needs_host_cc
def test_without_arm_gcc_the_host_compiler_checks_the_c(monkeypatch) -> None:
    model, x = _hardswish()
    monkeypatch.setattr(toolchain, "has_toolchain", lambda qemu=False: False)
    cm = tbn.compile(model, (x,), target=BOARD, config=TILED)  # good C passes the check
    assert cm.check_build() == check.host_compiler()
    _break_second_kernel(monkeypatch)
    with pytest.raises(BuildError) as err:
        tbn.compile(model, (x,), target=BOARD, config=TILED)
    _assert_names_kernel_and_step(str(err.value))


def test_without_any_c_compiler_compile_refuses(monkeypatch) -> None:
    model, x = _hardswish()
    monkeypatch.setattr(toolchain, "has_toolchain", lambda qemu=False: False)
    monkeypatch.setattr(check, "host_compiler", lambda: None)
    with pytest.raises(ToolchainError, match="gcc-arm-none-eabi"):
        tbn.compile(model, (x,), target=BOARD, config=FLOAT)


@needs_toolchain
def test_concurrent_calls_from_threads() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh()).eval()
    cm = tbn.compile(model, (torch.randn(1, 16),), target=BOARD, config=FLOAT)
    inputs = [[torch.randn(1, 16) for _ in range(2)] for _ in range(4)]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    cm.close()  # every thread finds the module unbuilt: the lazy build races too

    def work(t: int) -> None:
        try:
            for c, x in enumerate(inputs[t]):
                results[t, c] = cm(x)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cm.close()
    assert not errors, errors
    for (t, c), y in results.items():
        torch.testing.assert_close(y, model(inputs[t][c]).detach(), rtol=1e-5, atol=1e-6)
    assert len(results) == 8 and cm.last_run["instructions"] > 0


def test_export_refuses_a_non_empty_directory(hardswish, tmp_path: Path) -> None:
    cm, _ = hardswish
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        cm.export(tmp_path)
    with pytest.raises(FileExistsError, match="not a C project exported"):
        cm.export(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_overwrite_leaves_no_stale_output(hardswish, tmp_path: Path) -> None:
    cm, _ = hardswish
    root = cm.export(tmp_path / "proj")
    (root / "build").mkdir()
    (root / "build" / "tbn_model.o").write_bytes(b"old object")
    (root / "src" / "old_kernels.c").write_text("/* from an older export */")
    (root / "src" / "tbn_kernels.c").write_text("/* stale */")
    cm.export(root, overwrite=True)
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert files == set(cm.files)
    assert (root / "src" / "tbn_kernels.c").read_text() == cm.files["src/tbn_kernels.c"]
    assert not [p for p in tmp_path.iterdir() if p.name != "proj"]  # no staging left


def _check_bad_ids(cm, model: nn.Module, good: torch.Tensor, expect: str) -> None:
    """Good ids match torch; each bad id raises in torch and a KernelError here whose
    message holds ``expect`` (formatted with the id); the next good call works again."""
    torch.testing.assert_close(cm(good), model(good).detach())
    for bad in (10.0, 300000.0, -3.0):
        x_bad = torch.tensor([[1.0, bad, 2.0]])
        with pytest.raises(IndexError):
            model(x_bad)
        with pytest.raises(qemu.KernelError) as err:
            cm(x_bad)
        assert expect.format(id=int(bad)) in str(err.value), str(err.value)
    torch.testing.assert_close(cm(good), model(good).detach())  # the error flag is reset


@needs_toolchain
def test_embedding_ids_out_of_range_raise() -> None:
    torch.manual_seed(0)
    model, x = EmbeddingOfInput().eval(), torch.tensor([[1.0, 2.0, 9.0]])
    cm = tbn.compile(model, (x,), target=BOARD, config=FLOAT)
    try:
        _check_bad_ids(cm, model, x, "layer 'emb'")
    finally:
        cm.close()


class IndexSelectOfInput(nn.Module):
    """A gather by ids computed in the graph: rows of a table picked by ``index_select``
    (TVM's own lowering is an unchecked ``take``; the import uses the checked gather)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, x.long().flatten())


@needs_toolchain
def test_gather_index_out_of_range_raises_and_never_reads_outside() -> None:
    torch.manual_seed(0)
    model, x = IndexSelectOfInput().eval(), torch.tensor([[1.0, 2.0, 9.0]])
    cm = tbn.compile(model, (x,), target=BOARD, config=FLOAT)
    try:
        _check_bad_ids(cm, model, x, "index_select 'index_select' along dim 0 of size 10")
    finally:
        cm.close()


class DictOutput(nn.Module):
    """Returns its logits in a dict, as many classification heads do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": torch.relu(self.fc(x))}


@needs_toolchain
def test_output_structure_and_saved_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = DictOutput().eval(), torch.randn(1, 8)
    cm = tbn.compile(model, (x,), target=BOARD, config=FLOAT)
    loaded = None
    try:
        y = cm(x)
        assert isinstance(y, dict) and list(y) == ["logits"]
        torch.testing.assert_close(y["logits"], model(x)["logits"].detach())
        path = cm.save(tmp_path / "model.tbn")
        assert [p.name for p in tmp_path.iterdir()] == ["model.tbn"]
        loaded = tbn.load(path)
        assert type(loaded) is type(cm) and loaded.target == cm.target
        x2 = torch.randn(1, 8)
        y2 = loaded(x2)
        assert list(y2) == ["logits"]
        torch.testing.assert_close(y2["logits"], model(x2)["logits"].detach())
        assert loaded.files == cm.files and loaded.info.steps == cm.info.steps
        assert loaded.report == str(cm.report)
        mem, mem2 = cm.memory, loaded.memory
        assert mem2 == mem
        root = loaded.export(tmp_path / "proj")
        assert (root / "src" / "tbn_model.c").read_text() == cm.files["src/tbn_model.c"]
    finally:
        cm.close()
        if loaded is not None:
            loaded.close()


def test_saved_module_with_an_edited_source_is_refused(hardswish, tmp_path: Path) -> None:
    import zipfile

    from tbn_compiler.backends.archive import ArtifactError

    cm, _ = hardswish
    path = cm.save(tmp_path / "m.tbn")
    edited = tmp_path / "edited.tbn"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(edited, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "sources/src/tbn_model.c":
                data = data.replace(b"return 0;", b"return 1;")
            dst.writestr(item, data)
    with pytest.raises(ArtifactError, match="checksum mismatch for 'sources/src/tbn_model.c'"):
        tbn.load(edited)


@needs_toolchain
def test_library_refuses_fast_math(hardswish, tmp_path: Path) -> None:
    cm, _ = hardswish
    root = cm.export(tmp_path / "proj")
    ok = subprocess.run(["make", "-s", "-C", str(root), "lib"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        ["make", "-s", "-C", str(root), "-B", "lib", "OPT=-O2 -ffast-math"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "without -ffast-math" in bad.stderr


class NanOps(nn.Module):
    """The ops whose NaN results torch defines: clamps, extremes, max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        pooled = F.max_pool1d(x.unsqueeze(1), 2).flatten(1)
        return torch.cat(
            [
                F.relu(y),
                F.hardtanh(x, 0.0, 100.0),
                F.relu6(x),
                x.clamp(-0.5, 0.5),
                torch.maximum(x, y),
                torch.minimum(y, x),
                pooled,
                x.amax(dim=1, keepdim=True),
                x.amin(dim=1, keepdim=True),
            ],
            1,
        )


@needs_toolchain
@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an385"])  # hard and soft float
def test_nan_follows_torch(board: str) -> None:
    torch.manual_seed(0)
    model, x = NanOps().eval(), torch.randn(1, 8)
    cm = tbn.compile(model, (x,), target=board, config=FLOAT)
    try:
        for nan_at in ([1, 4], [0, 1, 2, 3, 4, 5, 6, 7]):
            x_nan = torch.randn(1, 8)
            x_nan[0, nan_at] = math.nan
            ref = model(x_nan).detach()
            assert ref.isnan().any()
            torch.testing.assert_close(cm(x_nan), ref, equal_nan=True)
    finally:
        cm.close()


@needs_toolchain
def test_nan_through_a_tiled_linear_and_relu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval()
    x = torch.randn(1, 16)
    x[0, 3] = math.nan
    gm = tbn.rewrite(model, (x,), TILED)
    cm = tbn.compile(model, (x,), target=BOARD, config=TILED)
    try:
        ref = gm(x).detach()
        assert ref.isnan().all()  # every output mixes in the NaN input
        torch.testing.assert_close(cm(x), ref, equal_nan=True)
    finally:
        cm.close()
