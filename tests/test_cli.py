"""The tbnc command line: inspect / compile, and one clear line for every user error.

The model factories below are what the commands load, as ``test_cli:<factory>``
(tests/ is on sys.path; a subprocess runs in tests/, which tbnc makes importable)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import MLP
from reference import reference_model
from torch import nn

from tbn_compiler import cli

TESTS = Path(__file__).resolve().parent
TBNC = Path(sys.executable).parent / "tbnc"


# --------------------------------------------------------------------------- models


def seeded_mlp() -> nn.Module:
    """MLP 64-128-32-10 with fixed weights, so a test can rebuild what tbnc compiled."""
    torch.manual_seed(0)
    return MLP()


class DataDependent(nn.Module):
    """Runs eagerly, but its branch on a tensor value defeats both capture methods."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def broken_factory() -> nn.Module:
    raise RuntimeError("checkpoint missing")


def not_a_module() -> int:
    return 42


# --------------------------------------------------------------------------- helpers


def run_tbnc(capsys, *argv: str) -> tuple[int, str, str]:
    """``tbnc argv`` in-process: (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *needles: str) -> str:
    """stderr is exactly one ``tbnc: error:`` line containing every needle."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tbnc: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


MLP_ARGS = ("test_cli:seeded_mlp", "--shape", "2,64")


# --------------------------------------------------------------------------- success


def test_inspect_writes_json_and_dot(tmp_path, capsys):
    out_json, out_dot = tmp_path / "new_dir" / "r.json", tmp_path / "g.dot"
    code, out, err = run_tbnc(
        capsys,
        "inspect",
        "models:MLP",
        "--shape",
        "2,64",
        "--p",
        "2",
        "--min-numel",
        "0",
        "--json",
        str(out_json),
        "--dot",
        str(out_dot),
    )
    assert code == 0, err
    assert "layers.0" in out
    report = json.loads(out_json.read_text())
    assert [r["p"] for r in report["layers"]] == [2, 2, 2]
    assert out_dot.read_text().startswith("digraph")


def test_layer_rules_set_p_per_layer(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    args = ["inspect", "models:MLP", "--shape", "2,64", "--p", "2", "--min-numel", "0"]
    rules = ["--layer", "layers.1=8", "--layer", "layers.2=dense", "--json", str(out_json)]
    code, _, err = run_tbnc(capsys, *args, *rules)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["layers"]
    assert [(r["name"], r["p"]) for r in rows] == [
        ("layers.0", 2),
        ("layers.1", 8),
        ("layers.2", None),
    ]
    code, _, err = run_tbnc(capsys, *args, "--layer", "fc")
    assert code == 2 and "expected NAME=P" in err


def test_compile_llvm_writes_artifact_matching_reference(tmp_path, capsys):
    pytest.importorskip("tvm")
    import tbn_compiler as tbn

    out = tmp_path / "mlp.tbn"
    code, stdout, err = run_tbnc(
        capsys, "compile", *MLP_ARGS, "--p", "2", "--min-numel", "0", "-o", str(out)
    )
    assert code == 0, err
    assert f"wrote {out}" in stdout
    model = seeded_mlp()
    ref = reference_model(model, {f"layers.{i}.weight": 2 for i in range(3)})
    x = torch.randn(2, 64)
    torch.testing.assert_close(tbn.load(out)(x), ref(x).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="no arm-none-eabi-gcc")
def test_compile_cortex_m_writes_artifact_that_runs(tmp_path, capsys):
    pytest.importorskip("tvm")
    import tbn_compiler as tbn

    out = tmp_path / "mlp_m4.tbn"
    code, stdout, err = run_tbnc(
        capsys, "compile", *MLP_ARGS, "--p", "2", "--min-numel", "0", "--target", "mps2-an386",
        "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {out}" in stdout
    loaded = tbn.load(out)
    assert loaded.spec.name == "mps2-an386"
    if shutil.which("qemu-system-arm") is None:
        return
    ref = reference_model(seeded_mlp(), {f"layers.{i}.weight": 2 for i in range(3)})
    x = torch.randn(2, 64)
    try:
        torch.testing.assert_close(loaded(x), ref(x).detach(), rtol=1e-4, atol=1e-5)
    finally:
        loaded.close()


@pytest.mark.parametrize("command", ["inspect", "compile"])
def test_help_shows_an_example(command, capsys):
    code, out, _ = run_tbnc(capsys, command, "--help")
    assert code == 0
    assert "example" in out
    assert f"  tbnc {command} mypkg.models:" in out


# --------------------------------------------------------------------------- user errors


def test_bad_model_spec(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "models", "--shape", "2,64")
    assert code == 2
    assert_one_error_line(err, "package.module:factory", "'models'")


def test_missing_module(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "no_such_module_xyz:net", "--shape", "2,64")
    assert code == 2
    assert_one_error_line(err, "cannot import 'no_such_module_xyz'")


def test_missing_attribute(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "models:NoSuchNet", "--shape", "2,64")
    assert code == 2
    assert_one_error_line(err, "no attribute 'NoSuchNet'")


def test_failing_factory_and_non_module(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "test_cli:broken_factory", "--shape", "2,64")
    assert code == 2
    assert_one_error_line(err, "test_cli:broken_factory() failed", "checkpoint missing")
    code, _, err = run_tbnc(capsys, "inspect", "test_cli:not_a_module", "--shape", "2,64")
    assert code == 2
    assert_one_error_line(err, "not_a_module() did not give a torch.nn.Module but int")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--p", "0"), ("argument --p", ">= 1", "got 0")),
        (("--p", "two"), ("argument --p", "'two'")),
        (("--min-numel", "-1"), ("argument --min-numel", ">= 0")),
        (("--shape", "2,x"), ("argument --shape", "'2,x'")),
        (("--shape", "2,0"), ("argument --shape", ">= 1")),
    ],
)
def test_bad_argument_values(args, needles, capsys):
    code, _, err = run_tbnc(capsys, "inspect", *MLP_ARGS, *args)
    assert code == 2
    assert_one_error_line(err, *needles)


def test_missing_arguments_are_one_line(capsys):
    code, _, err = run_tbnc(capsys, "compile", *MLP_ARGS)
    assert code == 2
    assert_one_error_line(err, "-o/--output", "tbnc compile --help")
    code, _, err = run_tbnc(capsys)
    assert code == 2
    assert_one_error_line(err, "required")


def test_unknown_target_suggests_closest_before_loading_the_model(capsys):
    # the model does not exist: the target must be refused before it is loaded
    code, _, err = run_tbnc(
        capsys, "compile", "no_such_module_xyz:net", "--shape", "2,64", "--target", "mps2-an368",
        "-o", "unused.tbn",
    )  # fmt: skip
    assert code == 2
    line = assert_one_error_line(err, "unknown target 'mps2-an368'", "did you mean 'mps2-an386'")
    assert "no_such_module_xyz" not in line
    code, _, err = run_tbnc(capsys, "compile", *MLP_ARGS, "--target", "LLVM", "-o", "unused.tbn")
    assert code == 2
    assert_one_error_line(err, "did you mean 'llvm'")


def test_unknown_target_without_close_name_lists_known(capsys):
    code, _, err = run_tbnc(capsys, "compile", *MLP_ARGS, "--target", "zzqq", "-o", "unused.tbn")
    assert code == 2
    line = assert_one_error_line(err, "unknown target 'zzqq'; known targets:")
    for name in ("llvm", "cuda", "mps2-an386"):
        assert name in line


def test_strict_mismatch_names_the_layer(capsys):
    weights = [layer.weight.numel() for layer in seeded_mlp().layers]
    first_bad = next(i for i, n in enumerate(weights) if n % 3)
    code, _, err = run_tbnc(
        capsys, "inspect", *MLP_ARGS, "--p", "3", "--min-numel", "0", "--strict"
    )
    assert code == 2
    assert_one_error_line(err, f"'layers.{first_bad}'", f"{weights[first_bad]} weights", "p=3")


def test_shape_the_model_cannot_take(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "test_cli:seeded_mlp", "--shape", "2,65")
    assert code == 2
    assert_one_error_line(err, "MLP cannot run on --shape 2,65", "2x65")


def test_uncapturable_model_is_one_line(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "test_cli:DataDependent", "--shape", "2,64")
    assert code == 2
    line = err.strip().splitlines()[-1]  # torch.export itself prints the partial graph
    assert line.startswith("tbnc: error: could not capture DataDependent")
    assert "symbolic_trace failed" in line and "Traceback" not in err


@pytest.mark.parametrize(
    ("output", "needle"),
    [("/proc/nope/x.tbn", "cannot write there"), (None, "is a directory")],
)
def test_unwritable_output_fails_before_compiling(output, needle, tmp_path, capsys, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compile must not start")

    monkeypatch.setattr(cli, "load_model", no_compile)
    output = output or str(tmp_path)
    code, _, err = run_tbnc(capsys, "compile", *MLP_ARGS, "-o", output)
    assert code == 2
    assert_one_error_line(err, f"-o {output}", needle)
    code, _, err = run_tbnc(capsys, "inspect", *MLP_ARGS, "--json", output)
    assert code == 2
    assert_one_error_line(err, f"--json {output}", needle)


# --------------------------------------------------------------------------- internal errors


def _broken_inspect(gm):
    raise KeyError("node 7")


def test_internal_error_is_one_line_with_debug_hint(capsys, monkeypatch):
    monkeypatch.setattr(cli, "inspect", _broken_inspect)
    code, _, err = run_tbnc(capsys, "inspect", *MLP_ARGS)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines == [
        "tbnc: internal error: KeyError: 'node 7' (run with --debug for the traceback)"
    ]


@pytest.mark.parametrize("where", ["top", "sub"])
def test_debug_prints_the_traceback_and_keeps_the_code(where, capsys, monkeypatch):
    monkeypatch.setattr(cli, "inspect", _broken_inspect)
    argv = ["inspect", *MLP_ARGS]
    argv = ["--debug", *argv] if where == "top" else [*argv, "--debug"]
    code, _, err = run_tbnc(capsys, *argv)
    assert code == 1
    assert err.startswith("Traceback")
    assert "_broken_inspect" in err
    assert err.strip().splitlines()[-1].startswith("tbnc: internal error: KeyError")
    strict = ("--p", "3", "--min-numel", "0", "--strict")
    code, _, err = run_tbnc(capsys, "--debug", "inspect", *MLP_ARGS, *strict)
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tbnc: error: ")


def test_console_script_prints_one_line_and_exits_2():
    """The installed script, run from tests/: the model module is importable from the
    current directory, and a shape error is one stderr line with exit code 2."""
    if not TBNC.exists():
        pytest.skip(f"console script not installed at {TBNC}")
    proc = subprocess.run(
        [str(TBNC), "inspect", "test_cli:seeded_mlp", "--shape", "3,65"],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "MLP cannot run on --shape 3,65", "3x65")


@pytest.mark.parametrize(
    ("module_name", "class_name"),
    [
        ("tbn_compiler.backends.relax_import", "UnsupportedOpError"),
        ("tbn_compiler.backends.cortex_m.toolchain", "ToolchainError"),
    ],
)
def test_backend_user_errors_exit_2(module_name, class_name, capsys, monkeypatch):
    pytest.importorskip("tvm")
    import importlib

    error = getattr(importlib.import_module(module_name), class_name)

    def fail(gm):
        raise error(f"{class_name} raised for node 'fc'")

    monkeypatch.setattr(cli, "inspect", fail)
    code, _, err = run_tbnc(capsys, "inspect", *MLP_ARGS)
    assert code == 2
    assert_one_error_line(err, f"{class_name} raised for node 'fc'")
