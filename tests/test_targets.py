"""Target registry: names, CUDA architectures, pass-through, errors, no TVM import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tbn_compiler import targets
from tbn_compiler.backends.protocol import backend_for
from tbn_compiler.targets import BoardInfo, TargetSpec, register_target, resolve_target

HAS_TVM = importlib.util.find_spec("tvm") is not None

REPO = Path(__file__).resolve().parents[1]


def test_default_is_llvm() -> None:
    spec = resolve_target(None)
    assert spec.name == "llvm" and spec.kind == "llvm"
    assert spec.tvm_target == {"kind": "llvm"}
    assert resolve_target("cpu") == spec == resolve_target("host")


def test_llvm_generic() -> None:
    spec = resolve_target("llvm-generic")
    assert spec.kind == "llvm" and "mcpu" not in spec.tvm_target


def test_cuda_default_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = resolve_target("cuda")
    assert spec.kind == "cuda"
    assert spec.arch == (targets.local_cuda_arch() or targets.DEFAULT_CUDA_ARCH)
    assert spec.tvm_host == {"kind": "llvm"}
    assert spec.name == f"cuda:{spec.arch}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a", "sm_86"])
def test_cuda_named_arch(arch: str) -> None:
    spec = resolve_target(f"cuda:{arch}")
    assert spec.arch == arch
    assert spec.tvm_target == {"kind": "cuda", "arch": arch}


@pytest.mark.parametrize("bad", ["cuda:80", "llvmx", "cortex-m99", "cuda:sm_", ""])
def test_unknown_names_list_known(bad: str) -> None:
    with pytest.raises(ValueError, match="known targets:.*llvm.*cuda"):
        resolve_target(bad)


def test_wrong_type() -> None:
    with pytest.raises(TypeError, match="target must be"):
        resolve_target(42)


def test_spec_passes_through_and_round_trips() -> None:
    spec = resolve_target("cuda:sm_80")
    assert resolve_target(spec) is spec
    assert TargetSpec.from_dict(spec.to_dict()) == spec


def test_tvm_target_passed_through() -> None:
    tvm = pytest.importorskip("tvm")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_86"}, host="llvm")
    spec = resolve_target(target)
    assert spec.tvm_object is target
    assert spec.kind == "cuda" and spec.arch == "sm_86"
    again = TargetSpec.from_dict(spec.to_dict())
    assert again.arch == "sm_86" and again.tvm_host["kind"] == "llvm"
    rebuilt = tvm.target.Target(dict(again.tvm_target), host=dict(again.tvm_host))
    assert rebuilt.arch == "sm_86"


def test_register_board_preset() -> None:
    board = BoardInfo(
        cpu="cortex-m4",
        fpu_flags=("-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
        flash_kib=1024,
        ram_kib=192,
        qemu_machine="mps2-an386",
    )
    spec = TargetSpec(
        "test-board-an386",
        "cortex-m",
        {"kind": "c", "mcpu": "cortex-m4", "keys": ["arm_cpu", "cpu"]},
        board=board,
    )
    register_target("test-board-an386", spec, aliases=("test-an386",))
    assert resolve_target("test-an386") is spec
    assert "test-board-an386" in targets.known_targets()
    assert TargetSpec.from_dict(spec.to_dict()) == spec
    if HAS_TVM:  # the Cortex-M backend runs boards that QEMU emulates
        assert backend_for("cortex-m").runnable_here(spec) is None
    with pytest.raises(ValueError, match="already registered"):
        register_target("test-board-an386", spec)


@pytest.mark.skipif(not HAS_TVM, reason="the backends need apache-tvm")
def test_device_comes_from_the_backend() -> None:
    def device(name):
        spec = resolve_target(name)
        return backend_for(spec.kind).device(spec).type

    assert device(None) == device("llvm-generic") == "cpu"
    assert device("cuda") == device("cuda:sm_80") == "cuda"
    assert device("mps2-an386") == "cpu"


@pytest.mark.skipif(not HAS_TVM, reason="the backends need apache-tvm")
def test_runnable_here() -> None:
    def reason(spec):
        return backend_for(spec.kind).runnable_here(spec)

    assert reason(resolve_target("llvm")) is None
    foreign = TargetSpec("x", "llvm", {"kind": "llvm", "mtriple": "powerpc64le-linux-gnu"})
    assert "powerpc64le" in reason(foreign)
    cuda = reason(resolve_target("cuda:sm_80"))
    assert (cuda is None) == (targets.local_cuda_arch() is not None)
    assert "build only" in reason(resolve_target("stm32f746g-disco"))
    with pytest.raises(ValueError, match="no backend builds target kind 'fpga'"):
        backend_for("fpga")


def test_import_does_not_load_tvm() -> None:
    code = (
        "import sys, tbn_compiler.targets as t; t.resolve_target('cuda:sm_80'); "
        "t.resolve_target('llvm'); assert 'tvm' not in sys.modules, 'tvm imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_target_suggests_the_closest_names():
    with pytest.raises(
        ValueError, match=r"unknown target 'mps2-an368' \(did you mean 'mps2-an386'"
    ):
        resolve_target("mps2-an368")
    with pytest.raises(ValueError, match=r"\(did you mean 'llvm'\?\)"):
        resolve_target("LLVM")
    with pytest.raises(ValueError, match=r"unknown target 'zzz'; known targets"):
        resolve_target("zzz")
