"""The tbnc command line: inspect / compile / run / bench / export / targets, model
files (torch.export programs), and one clear line for every user error.

The model factories below are what the commands load, as ``test_cli:<factory>``
(tests/ is on sys.path; a subprocess runs in tests/, which tbnc makes importable).
Outputs are checked against plain PyTorch (the tile math of tests/reference.py), the
library's own API called directly, and the target registry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def run_artifact(
    capsys: pytest.CaptureFixture, artifact: Path, inputs: Path, out: Path
) -> tuple[torch.Tensor, str, list[str]]:
    """``tbnc run artifact --input inputs -o out``, which must succeed: its ``output0``,
    its stdout and the names in ``out``."""
    code, stdout, err = run_tbnc(
        capsys, "run", str(artifact), "--input", str(inputs), "-o", str(out)
    )
    assert code == 0, err
    with np.load(out) as y:
        return torch.from_numpy(y["output0"]), stdout, list(y.files)


def assert_one_error_line(err: str, *needles: str) -> str:
    """stderr is exactly one ``tbnc: error:`` line containing every needle."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tbnc: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


MLP_ARGS = ("test_cli:seeded_mlp", "--shape", "2,64")
TILED_P2 = ("--p", "2", "--min-numel", "0")  # every MLP layer tiled at p=2
PROGRAM_EXAMPLE = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))


def reference_mlp() -> nn.Module:
    """seeded_mlp with every weight replaced by its p=2 tile reconstruction (numpy)."""
    return reference_model(seeded_mlp(), {f"layers.{i}.weight": 2 for i in range(3)})


def reference_report() -> dict:
    """Report.to_dict of seeded_mlp rewritten at p=2, as JSON gives it back."""
    import tbn_compiler as tbn

    gm = tbn.rewrite(seeded_mlp(), torch.randn(2, 64), tbn.TBNConfig(p=2, min_numel=0))
    return json.loads(json.dumps(tbn.inspect(gm).to_dict()))


@pytest.fixture(scope="module")
def mlp_program(tmp_path_factory) -> Path:
    """seeded_mlp saved by torch.export.save with a dynamic batch; example batch 3."""
    path = tmp_path_factory.mktemp("program") / "mlp.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(seeded_mlp(), (PROGRAM_EXAMPLE,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def llvm_artifact(mlp_program, tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, HTML report) of ``tbnc compile mlp.pt2 --target llvm --html``."""
    pytest.importorskip("tvm")
    out_dir = tmp_path_factory.mktemp("llvm")
    artifact, page = out_dir / "mlp.tbn", out_dir / "mlp.html"
    argv = ["compile", str(mlp_program), *TILED_P2, "-o", str(artifact), "--html", str(page)]
    assert cli.main(argv) == 0
    return artifact, page


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


def test_compile_program_writes_artifact_matching_reference(llvm_artifact):
    """The .pt2 program compiled with its own example inputs (batch 3), no --shape."""
    pytest.importorskip("tvm")
    import tbn_compiler as tbn

    artifact, _ = llvm_artifact
    loaded = tbn.load(artifact)
    assert [tuple(s.shape) for s in loaded.input_specs] == [tuple(PROGRAM_EXAMPLE.shape)]
    x = torch.randn(*PROGRAM_EXAMPLE.shape)
    torch.testing.assert_close(loaded(x), reference_mlp()(x).detach(), rtol=1e-4, atol=1e-5)


NO_ARM_GCC = shutil.which("arm-none-eabi-gcc") is None
NO_QEMU = shutil.which("qemu-system-arm") is None


@pytest.mark.skipif(NO_ARM_GCC, reason="no arm-none-eabi-gcc")
def test_cortex_m_artifact_runs_exports_and_benches(tmp_path, capsys):
    """compile -o x.tbn for a board; run it in QEMU (outputs = the reference), export its
    C project for its board and for another (same C), bench its instructions."""
    pytest.importorskip("tvm")
    import tbn_compiler as tbn

    out = tmp_path / "mlp_m4.tbn"
    code, stdout, err = run_tbnc(
        capsys, "compile", *MLP_ARGS, *TILED_P2, "--target", "mps2-an386", "-o", str(out)
    )
    assert code == 0, err
    assert f"wrote {out}" in stdout
    assert tbn.load(out).spec.name == "mps2-an386"
    for board, directory in (("mps2-an386", "own"), ("nucleo-f446re", "nucleo")):
        code, stdout, err = run_tbnc(
            capsys, "export", str(out), str(tmp_path / directory), "--target", board
        )
        assert code == 0, err
        assert f"wrote the C project for {board}" in stdout
    own, nucleo = (sorted((tmp_path / d / "src").iterdir()) for d in ("own", "nucleo"))
    assert [f.name for f in own] == [f.name for f in nucleo]
    assert all(a.read_text() == b.read_text() for a, b in zip(own, nucleo, strict=True))
    assert "cortex-m4" in (tmp_path / "nucleo" / "Makefile").read_text()
    code, _, err = run_tbnc(capsys, "bench", str(out), "--model", "test_cli:seeded_mlp")
    assert code == 2
    assert_one_error_line(err, "runs in QEMU", "compare instructions")
    if NO_QEMU:
        return
    x = torch.randn(2, 64)
    np.save(tmp_path / "x.npy", x.numpy())
    y_path = tmp_path / "y.npz"
    got, _, _ = run_artifact(capsys, out, tmp_path / "x.npy", y_path)
    torch.testing.assert_close(got, reference_mlp()(x).detach(), rtol=1e-4, atol=1e-5)
    code, stdout, err = run_tbnc(capsys, "bench", str(out), "--repeat", "2", "--warmup", "0",
                                 "--json", "-")  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(stdout)["results"]
    assert row["calls"] == 2 and isinstance(row["instructions"], int) and row["instructions"] > 0


@pytest.mark.skipif(NO_ARM_GCC, reason="no arm-none-eabi-gcc")
def test_compile_cortex_m_project_with_memory_report(tmp_path, capsys):
    """compile -o DIR for a board writes the C project; --html holds the flash/RAM split:
    flash weights = the report's TBN bytes, limits = the board's KiB."""
    pytest.importorskip("tvm")
    from tbn_compiler.targets import resolve_target

    project, page = tmp_path / "project", tmp_path / "m4.html"
    code, stdout, err = run_tbnc(
        capsys, "compile", *MLP_ARGS, *TILED_P2, "--target", "mps2-an386",
        "-o", str(project), "--html", str(page),
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote the C project for mps2-an386 to {project}" in stdout
    assert (project / "include" / "tbn_model.h").is_file()
    assert (project / "Makefile").is_file()
    text = page.read_text()
    tbn_total = sum(r["tbn_bytes"] for r in reference_report()["layers"])
    flash = table_row(text, "memory-flash")
    ram = table_row(text, "memory-ram")
    board = resolve_target("mps2-an386").board
    assert flash[0] == str(tbn_total)  # weights
    assert flash[5] == str(board.flash_kib * 1024) and ram[5] == str(board.ram_kib * 1024)
    assert int(ram[2]) > 0  # arena
    code, _, err = run_tbnc(
        capsys, "compile", *MLP_ARGS, "--target", "mps2-an386", "-o", str(project)
    )
    assert code == 2
    assert_one_error_line(err, f"-o {project}: the directory is not empty", "--overwrite")


def table_row(page: str, row_id: str) -> list[str]:
    """The data cells (<td>) of the table row with that id."""
    row = re.search(rf'<tr id="{row_id}">(.*?)</tr>', page, re.S).group(1)
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


@pytest.mark.parametrize(
    "command", ["inspect", "compile", "run", "bench", "export", "targets", "deploy-bundle"]
)
def test_help_shows_an_example(command, capsys):
    code, out, _ = run_tbnc(capsys, command, "--help")
    assert code == 0
    assert "example" in out
    assert f"\n  tbnc {command} " in out


# --------------------------------------------------------------------------- user errors


def test_bad_model_spec(capsys):
    code, _, err = run_tbnc(capsys, "inspect", "models", "--shape", "2,64")
    assert code == 2
    assert_one_error_line(err, "package.module:factory or a .pt2 file", "'models'")


def test_factory_needs_a_shape(capsys):
    code, _, err = run_tbnc(capsys, "compile", "test_cli:seeded_mlp", "-o", "unused.tbn")
    assert code == 2
    assert_one_error_line(err, "--shape is required for the model 'test_cli:seeded_mlp'")


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


def test_closed_stdout_pipe_is_silent():
    """`tbnc targets | head -1`: a reader that goes away ends tbnc quietly with the
    shell's SIGPIPE status, not an error line."""
    if not TBNC.exists():
        pytest.skip(f"console script not installed at {TBNC}")
    proc = subprocess.Popen(
        [str(TBNC), "targets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=TESTS
    )
    proc.stdout.close()  # no reader left: tbnc's first write meets a broken pipe
    _, err = proc.communicate(timeout=120)
    assert err.decode() == ""
    assert proc.returncode == 141


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


# --------------------------------------------------------------------------- model files


def test_program_example_inputs_and_overrides(mlp_program):
    program = cli.load_program(str(mlp_program))
    (x,) = cli.program_example_inputs(program, None)
    assert torch.equal(x, PROGRAM_EXAMPLE)  # the inputs saved with the program
    (x,) = cli.program_example_inputs(program, [(5, 64)])
    assert x.shape == (5, 64) and x.dtype == torch.float32
    with pytest.raises(cli.UsageError, match=r"dimension 1 of input 'x' is 64 .* gives 63"):
        cli.program_example_inputs(program, [(5, 63)])
    with pytest.raises(cli.UsageError, match=r"takes 1 input\(s\) \(x: float32\[s\w+, 64\]\)"):
        cli.program_example_inputs(program, [(5, 64), (5, 64)])
    program.example_inputs = None  # shapes then come from the placeholders' fake tensors
    (x,) = cli.program_example_inputs(program, None)
    assert x.shape == PROGRAM_EXAMPLE.shape and x.dtype == torch.float32


def test_inspect_json_equals_the_report_of_the_model(mlp_program, tmp_path, capsys):
    """From a factory and from a .pt2 program: the JSON is Report.to_dict of rewrite."""
    expected = reference_report()
    out_json = tmp_path / "r.json"
    code, _, err = run_tbnc(capsys, "inspect", *MLP_ARGS, *TILED_P2, "--json", str(out_json))
    assert code == 0, err
    assert json.loads(out_json.read_text()) == expected
    page = tmp_path / "r.html"
    code, stdout, err = run_tbnc(
        capsys, "inspect", str(mlp_program), *TILED_P2, "--json", "-", "--html", str(page)
    )
    assert code == 0, err
    assert json.loads(stdout) == expected
    text = page.read_text()
    for row in expected["layers"]:
        assert f"<td>{row['name']}</td>" in text
    assert f'<td class="num">{expected["totals"]["tbn_bytes"]}</td>' in text
    assert "data:image/png;base64," in text


def test_program_with_other_batch_and_bad_shapes(mlp_program, capsys):
    code, stdout, err = run_tbnc(
        capsys, "inspect", str(mlp_program), "--input-shape", "5,64", *TILED_P2
    )
    assert code == 0, err
    assert "layers.2" in stdout
    code, _, err = run_tbnc(capsys, "inspect", str(mlp_program), "--input-shape", "5,63")
    assert code == 2
    assert_one_error_line(err, "dimension 1 of input 'x' is 64 in the program")


def test_unreadable_program_files(tmp_path, capsys):
    missing = tmp_path / "missing.pt2"
    code, _, err = run_tbnc(capsys, "inspect", str(missing))
    assert code == 2
    assert_one_error_line(err, f"no such file: {missing}")
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a program")
    code, _, err = run_tbnc(capsys, "compile", str(garbage), "-o", str(tmp_path / "x.tbn"))
    assert code == 2
    assert_one_error_line(err, f"cannot read {garbage} as a torch.export program")


# --------------------------------------------------------------------------- run / bench


def test_run_writes_outputs_equal_to_the_artifact_and_reference(llvm_artifact, tmp_path, capsys):
    """float64 .npy and float32 .npz (by name) inputs; outputs = tbn.load(...)(x) and the
    p=2 reference model."""
    import tbn_compiler as tbn

    artifact, _ = llvm_artifact
    x = np.random.default_rng(0).standard_normal(tuple(PROGRAM_EXAMPLE.shape))  # float64
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", unused=np.zeros(3), x=x.astype(np.float32))
    x32 = torch.from_numpy(x.astype(np.float32))
    direct = tbn.load(artifact)(x32)
    reference = reference_mlp()(x32).detach()
    for name in ("x.npy", "x.npz"):
        out = tmp_path / f"y_{name}.npz"
        got, stdout, files = run_artifact(capsys, artifact, tmp_path / name, out)
        assert f"wrote {out}" in stdout
        assert files == ["output0"]
        torch.testing.assert_close(got, direct, rtol=0, atol=0)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_run_takes_another_batch_of_a_dynamic_artifact(llvm_artifact, tmp_path, capsys):
    artifact, _ = llvm_artifact
    x = np.random.default_rng(1).standard_normal((7, PROGRAM_EXAMPLE.shape[1]), np.float32)
    np.save(tmp_path / "x7.npy", x)
    out = tmp_path / "y7.npz"
    got, _, _ = run_artifact(capsys, artifact, tmp_path / "x7.npy", out)
    assert got.shape[0] == 7
    torch.testing.assert_close(
        got, reference_mlp()(torch.from_numpy(x)).detach(), rtol=1e-4, atol=1e-5
    )


def test_run_user_errors_are_one_line(llvm_artifact, tmp_path, capsys):
    artifact, _ = llvm_artifact
    shape = tuple(PROGRAM_EXAMPLE.shape)
    files = {
        "wrong_shape.npy": np.zeros((shape[0], 63), np.float32),
        "ints.npy": np.zeros(shape, np.int64),
        "two.npz": {"a": np.zeros(shape), "b": np.zeros(shape)},
    }
    for name, value in files.items():
        if isinstance(value, dict):
            np.savez(tmp_path / name, **value)
        else:
            np.save(tmp_path / name, value)
    (tmp_path / "garbage.npy").write_bytes(b"no numpy here")
    (tmp_path / "garbage.tbn").write_bytes(b"PK no artifact")
    good = ("-o", str(tmp_path / "y.npz"))
    cases = [
        ((str(artifact), "-i", str(tmp_path / "wrong_shape.npy")), "takes shape (batch, 64)"),
        ((str(artifact), "-i", str(tmp_path / "ints.npy")), "expected float32 values"),
        ((str(artifact), "-i", str(tmp_path / "two.npz")), "takes 1 input(s) (x: float32[3, 64])"),
        ((str(artifact), "-i", str(tmp_path / "garbage.npy")), "cannot read it as a numpy file"),
        ((str(artifact), "-i", str(tmp_path / "none.npy")), "none.npy: no such file"),
        ((str(tmp_path / "garbage.tbn"), "-i", str(tmp_path / "ints.npy")), "not a tbn_compiler"),
        ((str(tmp_path / "none.tbn"), "-i", str(tmp_path / "ints.npy")), "no such file"),
    ]
    for argv, needle in cases:
        code, _, err = run_tbnc(capsys, "run", *argv, *good)
        assert code == 2, (argv, err)
        assert_one_error_line(err, needle)
    assert not (tmp_path / "y.npz").exists()


def test_bench_times_the_artifact_and_eager_model(llvm_artifact, tmp_path, capsys):
    artifact, _ = llvm_artifact
    out = tmp_path / "bench.json"
    code, stdout, err = run_tbnc(
        capsys, "bench", str(artifact), "--model", "test_cli:seeded_mlp",
        "--repeat", "4", "--warmup", "1", "--json", str(out),
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    tbn_row, eager_row = result["results"]
    assert (tbn_row["name"], eager_row["name"]) == ("tbn (llvm)", "torch eager (cpu)")
    for row in (tbn_row, eager_row):
        assert row["calls"] == 4 and 0 < row["min_ms"] <= row["median_ms"]
    assert result["speedup"] == pytest.approx(eager_row["median_ms"] / tbn_row["median_ms"])
    assert result["inputs"] == [
        {"name": "x", "shape": list(PROGRAM_EXAMPLE.shape), "dtype": "float32"}
    ]
    assert "speedup (eager median / tbn median)" in stdout and "torch eager (cpu)" in stdout
    code, _, err = run_tbnc(capsys, "bench", str(artifact), "--model", "test_cli:wide_mlp")
    assert code == 2
    assert_one_error_line(err, "--model MLP cannot run on the artifact's inputs (3x64)")


def wide_mlp() -> nn.Module:
    """An MLP taking 65 features: not the model of the 64-feature artifact."""
    return MLP((65, 10))


def test_compile_html_of_a_host_target_has_no_memory_split(llvm_artifact):
    _, page = llvm_artifact
    text = page.read_text()
    assert 'id="memory"' not in text
    for row in reference_report()["layers"]:
        assert f"<td>{row['name']}</td>" in text


def test_export_refuses_a_host_artifact(llvm_artifact, tmp_path, capsys):
    artifact, _ = llvm_artifact
    code, _, err = run_tbnc(capsys, "export", str(artifact), str(tmp_path / "project"))
    assert code == 2
    assert_one_error_line(err, "was compiled for llvm; export writes C projects of Cortex-M")
    code, _, err = run_tbnc(
        capsys, "export", str(artifact), str(tmp_path / "p"), "--target", "llvm"
    )
    assert code == 2
    assert_one_error_line(err, "--target llvm is not a Cortex-M board")


# --------------------------------------------------------------------------- targets


def test_targets_lists_every_registered_target(capsys):
    from tbn_compiler.targets import known_targets, resolve_target

    code, stdout, err = run_tbnc(capsys, "targets", "--json", "-")
    assert code == 0, err
    rows = json.loads(stdout)
    assert [r["name"] for r in rows] == known_targets()
    for row in rows[:-1]:  # the last is the cuda:sm_XX pattern
        spec = resolve_target(row["name"])
        assert (row["kind"], row["description"]) == (spec.kind, spec.description)
        if spec.board is not None:
            assert (row["flash_kib"], row["ram_kib"]) == (spec.board.flash_kib, spec.board.ram_kib)
    aliases = {r["name"]: r["alias_of"] for r in rows if r["alias_of"]}
    assert aliases["cpu"] == "llvm" and aliases["qemu-m4"] == "mps2-an386"
    code, stdout, _ = run_tbnc(capsys, "targets")
    assert code == 0
    for row in rows:
        assert row["name"] in stdout


def test_cortex_m_html_without_toolchain_fails_before_compiling(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tvm")
    from tbn_compiler.backends.cortex_m import toolchain

    def no_compile(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(toolchain, "_missing", lambda qemu: ("arm-none-eabi-gcc",))
    monkeypatch.setattr(cli, "load_model", no_compile)
    code, _, err = run_tbnc(
        capsys, "compile", *MLP_ARGS, "--target", "mps2-an386", "-o", str(tmp_path / "p"),
        "--html", str(tmp_path / "m.html"),
    )  # fmt: skip
    assert code == 2
    assert_one_error_line(err, "missing arm-none-eabi-gcc", "apt-get install")
