"""Cortex-M backend: parity in QEMU, exported project, memory, determinism, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tbn_compiler as tbn
from tbn_compiler.backends.cortex_m import (
    CortexMModule,
    ModelTooLargeError,
    NotEmulatedError,
    ToolchainError,
    toolchain,
)
from tbn_compiler.targets import resolve_target

sys.path.insert(0, str(Path(__file__).parent))
from models import MLP, MnistMLP, ResidualCNN, TimeSeriesNet, randomize_batchnorm  # noqa: E402

try:
    toolchain.require_toolchain(qemu=True)
    _MISSING = None
except ToolchainError as exc:
    _MISSING = str(exc)

needs_toolchain = pytest.mark.skipif(_MISSING is not None, reason=f"Arm toolchain: {_MISSING}")

BOARDS = ["mps2-an386", "mps2-an500", "mps2-an385"]


class SmallCNN(nn.Module):
    """conv + BN + ReLU + max pool, conv + BN + ReLU, average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor, tbn.TBNConfig]]:
    torch.manual_seed(0)
    small = tbn.TBNConfig(p=4, min_numel=0)
    return {
        "mlp": (MLP().eval(), torch.randn(1, 64), small),
        "cnn": (
            randomize_batchnorm(SmallCNN(), affine=True),
            torch.randn(1, 1, 8, 8),
            tbn.TBNConfig(p=2, min_numel=0),
        ),
        "conv1d": (TimeSeriesNet().eval(), torch.randn(1, 4, 32), small),
        "mnist": (
            MnistMLP().eval(),
            torch.randn(1, 784),
            tbn.TBNConfig(layers={"fc1": 4, "fc2": 1}),
        ),
    }


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[CortexMModule, torch.Tensor, torch.Tensor]]:
    """Each case compiled once (for mps2-an386) with its torch reference output."""
    out = {}
    for name, (model, x, cfg) in _cases().items():
        ref = tbn.rewrite(model, (x,), cfg)(x)
        out[name] = (tbn.compile(model, (x,), target="mps2-an386", config=cfg), x, ref)
    yield out
    for cm, _, _ in out.values():
        cm.close()


@needs_toolchain
@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("case", ["mlp", "cnn", "conv1d", "mnist"])
def test_parity_in_qemu(compiled, case: str, board: str) -> None:
    cm, x, ref = compiled[case]
    cm = cm if board == "mps2-an386" else cm.retarget(board)
    try:
        y = cm(x)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        assert cm.last_run["instructions"] > 0
        assert cm.last_run["wall_s"] > 0
    finally:
        if board != "mps2-an386":
            cm.close()


@needs_toolchain
def test_compile_directly_for_m3_and_residual_net() -> None:
    torch.manual_seed(1)
    model, x = randomize_batchnorm(ResidualCNN(channels=8), affine=True), torch.randn(1, 3, 8, 8)
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    cm = tbn.compile(model, (x,), target="mps2-an385", config=cfg)
    try:
        torch.testing.assert_close(cm(x), tbn.rewrite(model, (x,), cfg)(x), rtol=1e-4, atol=1e-5)
    finally:
        cm.close()


def test_mnist_weights_are_ideal(compiled) -> None:
    cm = compiled["mnist"][0]
    tile_bytes = 784 * 128 // 4 // 8 + 128 * 10 // 8
    ideal = tile_bytes + 4 * (4 + 1) + 4 * (128 + 10)
    assert cm.info.weights_bytes == ideal == 3868


@needs_toolchain
def test_memory_report(compiled) -> None:
    mem = compiled["mnist"][0].memory
    for key in ("weights_bytes", "code_bytes", "arena_bytes", "flash_bytes", "ram_bytes"):
        assert mem[key] > 0, key
    assert mem["flash_bytes"] >= mem["weights_bytes"] + mem["code_bytes"]
    assert mem["ram_bytes"] >= mem["arena_bytes"]
    assert sum(r["weights_bytes"] for r in mem["per_layer"]) == mem["weights_bytes"]
    # the paper's MNIST MLP: fc1 tile at p=4 + 4 alphas + bias, fc2 binary + 1 alpha + bias
    by_layer = {r["layer"]: r["weights_bytes"] for r in mem["per_layer"]}
    assert by_layer == {"fc1": 784 * 128 // 4 // 8 + 4 * 4 + 4 * 128, "fc2": 160 + 4 + 4 * 10}
    assert mem["firmware_flash_bytes"] > mem["flash_bytes"]


@needs_toolchain
def test_export_builds_with_own_makefile_and_no_heap(compiled, tmp_path: Path) -> None:
    cm = compiled["cnn"][0]
    root = cm.export(tmp_path / "proj")
    for rel in (
        "include/tbn_model.h",
        "src/tbn_kernels.c",
        "src/tbn_model.c",
        "Makefile",
        "CMakeLists.txt",
        "harness/startup.c",
        "harness/link.ld",
        "harness/main.c",
    ):
        assert (root / rel).is_file(), rel
    subprocess.run(["make", "-s", "-C", str(root)], check=True, capture_output=True)
    lib = root / "build" / "libtbn_model.a"
    assert lib.is_file() and (root / "build" / "firmware.elf").is_file()
    nm = subprocess.run(["arm-none-eabi-nm", str(lib)], check=True, capture_output=True, text=True)
    symbols = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert "tbn_model_run" in symbols
    assert not symbols & {"malloc", "free", "calloc", "realloc", "_sbrk", "_malloc_r"}
    header = (root / "include" / "tbn_model.h").read_text()
    assert "int tbn_model_run(const float *input, float *output);" in header


@needs_toolchain
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_export_builds_with_cmake(compiled, tmp_path: Path) -> None:
    root = compiled["mlp"][0].retarget("nucleo-f446re").export(tmp_path / "proj")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(root), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    assert (build / "libtbn_model.a").is_file()


def test_sources_are_deterministic() -> None:
    model, x, cfg = _cases()["cnn"]
    a = tbn.compile(model, (x,), target="mps2-an386", config=cfg)
    b = tbn.compile(model, (x,), target="mps2-an386", config=cfg)
    assert a.files == b.files


def test_too_big_model_names_both_sizes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    x = torch.randn(1, 256)
    with pytest.raises(ModelTooLargeError) as err:
        tbn.compile(model, (x,), target="lm3s6965evb", config=tbn.TBNConfig(exclude=["*"]))
    msg = str(err.value)
    assert "flash" in msg and "262144" in msg and "lm3s6965evb" in msg
    need = int(msg.split("needs ")[1].split()[0])
    assert need > 262144


def test_build_only_board_exports_but_does_not_run(compiled, tmp_path: Path) -> None:
    cm, x, _ = compiled["mlp"]
    cm = cm.retarget("nucleo-f446re")
    with pytest.raises(NotEmulatedError, match="build only"):
        cm(x)
    root = cm.export(tmp_path / "f446")
    assert (root / "Makefile").is_file() and not (root / "harness").exists()
    assert "-mcpu=cortex-m4" in (root / "Makefile").read_text()


def test_board_presets() -> None:
    m4 = resolve_target("mps2-an386").board
    assert m4.cpu == "cortex-m4" and "-mfpu=fpv4-sp-d16" in m4.fpu_flags
    assert resolve_target("mps2-an500").board.cpu == "cortex-m7"
    assert resolve_target("mps2-an385").board.fpu_flags == ("-mfloat-abi=soft",)
    rp = resolve_target("rp2040")
    assert (
        rp.kind == "cortex-m" and rp.board.cpu == "cortex-m0plus" and rp.board.qemu_machine is None
    )
    assert resolve_target("STM32F746G-DISCO").board.flash_kib == 1024
    assert resolve_target("cortex-m4").board.flash_kib is None


def test_missing_toolchain_names_packages(monkeypatch) -> None:
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    toolchain._missing.cache_clear()
    try:
        with pytest.raises(
            ToolchainError, match="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
        ):
            toolchain.require_toolchain(qemu=True)
    finally:
        monkeypatch.undo()
        toolchain._missing.cache_clear()
