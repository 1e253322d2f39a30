"""``tbnc``: command-line access to inspect, compile, run, bench and export.

A model is ``package.module:factory`` (a callable returning an ``nn.Module``, or an
``nn.Module`` instance, importable from the current directory) or a program saved with
``torch.export.save`` (a ``.pt2`` file)::

    tbnc inspect mypkg.models:resnet18 --shape 1,3,32,32 --p 4 --html report.html
    tbnc inspect resnet18.pt2 --json report.json
    tbnc compile resnet18.pt2 --target llvm -o model.tbn
    tbnc compile mypkg.models:mlp --shape 1,64 --target mps2-an386 -o mlp_c/ --html mlp.html
    tbnc run model.tbn --input x.npy -o y.npz
    tbnc bench model.tbn --model resnet18.pt2
    tbnc export mlp_m4.tbn project/ --target nucleo-f446re
    tbnc targets
    tbnc deploy-bundle bundle/ --archive    # what a host needs beside torch to run artifacts

Example inputs: for ``module:factory``, random float tensors of the ``--shape`` given
(once per model input). For a ``.pt2`` program, the example inputs saved with it
(``ExportedProgram.example_inputs``); a program without them gets tensors shaped after
its input placeholders' fake tensors (``meta["val"]`` of the ``graph_signature``'s user
inputs; a dynamic dimension takes its size hint), random for floating dtypes and zeros
otherwise. ``--input-shape`` (same as ``--shape``) overrides them, one per input: its
static dimensions must be the program's. The program runs as exported (train/eval mode
and batch dynamics were fixed by ``torch.export``).

Outputs: ``compile -o`` writes the artifact (``tbn.load`` reads it), except that for a
Cortex-M target a path not ending in ``.tbn`` is the directory of the C project
(``cm.export``). ``run`` reads ``.npy`` / ``.npz`` inputs (arrays matched to the
artifact's inputs by name when a ``.npz`` has all of them, else in order; converted to the
input's dtype within the same kind: float to float, int to int) and writes every output
tensor to one ``.npz``, named after the artifact's outputs.

Before the (slow) rewrite and compile, ``tbnc`` checks what it can cheaply: the
arguments, the target name, that every output path can be written (its directory is
created, as saving would), that the model imports, and that it runs once in eager
mode on the example inputs.

Errors and exit codes
---------------------
Every error is ONE line on stderr, ``tbnc: error: <what is wrong>``; no traceback.

* ``0``: success.
* ``2``: a user error, i.e. something the user can fix: bad arguments (argparse's
  own errors included), a model spec that cannot be imported or called, a program file
  that is missing or is no ``torch.export`` program, a ``--shape`` the model cannot take,
  a configuration the rewrite refuses (``--strict`` with a layer ``p`` does not divide),
  an unknown target (with the closest known names), an output that cannot be written, a
  model the compiler cannot capture or import, a missing or corrupt artifact, inputs that
  do not fit the artifact, a missing toolchain, a deploy bundle that cannot be written.
  These are the exception classes of :func:`user_error_types`: :class:`UsageError`,
  ``ValueError`` (so also ``ArtifactError``, ``InputError``, ``ModelTooLargeError``),
  ``TypeError``, ``ImportError``, ``OSError``, :class:`~tbn_compiler.capture.CaptureError`,
  ``GraphImportError``, ``ToolchainError``, ``NotEmulatedError``, ``KernelError`` and
  ``BundleError``.
* ``1``: any other exception, an internal error: one line naming the exception,
  then ``run with --debug for the traceback``.
* ``130``: interrupted (Ctrl-C).

``--debug`` prints the traceback before that line; the exit code stays the same.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from tabulate import tabulate

from .capture import CaptureError
from .config import TBNConfig
from .inspect import inspect
from .passes import rewrite
from .targets import TargetSpec, closest_targets, known_targets, resolve_target

__all__ = [
    "UsageError",
    "build_parser",
    "check_target",
    "check_writable",
    "load_model",
    "load_model_and_inputs",
    "main",
    "parse_shape",
    "program_example_inputs",
    "read_inputs",
    "user_error_types",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that went away
_MESSAGE_LIMIT = 800  # characters of an error message shown on the one line
ARTIFACT_SUFFIX = ".tbn"
PROGRAM_SUFFIX = ".pt2"

# Backend errors that mean "the user can fix this", by module and class name: the CLI
# must not import TVM just to classify an error (see user_error_types).
_BACKEND_USER_ERRORS = (
    ("tbn_compiler.backends.relax_import", "GraphImportError"),
    ("tbn_compiler.backends.cortex_m.toolchain", "ToolchainError"),
    ("tbn_compiler.backends.cortex_m.module", "NotEmulatedError"),
    ("tbn_compiler.backends.cortex_m.qemu", "KernelError"),  # the inputs' data, in `run`
    ("tbn_compiler.backends.deploy", "BundleError"),
)


class UsageError(Exception):
    """A mistake in the command line that ``tbnc`` reports as one line, exit code 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes reported as user errors (exit code 2, no traceback).

    Backend classes are looked up only in modules already imported: an error of a
    backend that was never imported cannot have been raised."""
    types: list[type[BaseException]] = [
        UsageError,
        ValueError,
        TypeError,
        ImportError,
        OSError,
        CaptureError,
    ]
    for module_name, class_name in _BACKEND_USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


# --------------------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _bounded_int(text, 1)


def layer_rule(text: str) -> tuple[str, int | None]:
    """argparse type: ``NAME=P`` (``P`` an int >= 1, or ``dense``) -> ``(name, p or None)``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"expected NAME=P, e.g. fc=2 or 'layers.*=dense', got {text!r}"
        )
    if value == "dense":
        return name, None
    return name, _bounded_int(value, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """argparse type: ``"1,3,32,32"`` -> ``(1, 3, 32, 32)``, every dim >= 1."""
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,3,32,32, got {text!r}"
        ) from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return dims


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line, like every other tbnc error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"tbnc: error: {message} (see '{self.prog} --help')\n")


_MODEL_HELP = """\
MODEL is package.module:factory, importable from the current directory (inputs: random
float tensors of the --shape given, once per model input), or a torch.export.save file
(.pt2; inputs: the program's own example inputs, or --input-shape overrides)."""

_INSPECT_EXAMPLE = f"""\
examples:
  tbnc inspect mypkg.models:resnet18 --shape 1,3,32,32 --p 4 --json report.json --dot graph.dot
  tbnc inspect resnet18.pt2 --html report.html

{_MODEL_HELP}"""

_COMPILE_EXAMPLE = f"""\
examples:
  tbnc compile mypkg.models:resnet18 --shape 1,3,32,32 --target llvm -o model.tbn
  tbnc compile resnet18.pt2 --target cuda -o model_gpu.tbn
  tbnc compile mypkg.models:mlp --shape 1,64 --target mps2-an386 -o mlp_m4.tbn
  tbnc compile mypkg.models:mlp --shape 1,64 --target nucleo-f446re -o mlp_c/ --html mlp.html

-o writes the artifact; for a Cortex-M target, a path not ending in {ARTIFACT_SUFFIX} is
the C project's directory. --html writes the report page (with the flash/RAM split
for Cortex-M targets).

{_MODEL_HELP}

{{targets}}"""

_RUN_EXAMPLE = """\
example:
  tbnc run model.tbn --input x.npy -o y.npz
  python -c "import numpy as np; print(np.load('y.npz')['output0'])"

Inputs: one .npy per model input, or a .npz holding them (by input name, else in
order). Arrays are converted to the input's dtype within the same kind (float64 to
float32, int32 to int64); shapes must be the compiled ones. Every output tensor goes
into the .npz under the artifact's output name."""

_BENCH_EXAMPLE = """\
examples:
  tbnc bench model.tbn --model mypkg.models:resnet18
  tbnc bench model.tbn --model resnet18.pt2 --repeat 100 --json bench.json

Times calls of the artifact and, with --model, of the same model in torch eager mode on
the same inputs (random, or --input files): medians, minimums and the speedup (eager
median / artifact median). Cortex-M artifacts run in QEMU: their instructions per
inference are reported, not compared with torch."""

_EXPORT_EXAMPLE = """\
examples:
  tbnc export mlp_m4.tbn mlp_project/
  tbnc export mlp_m4.tbn nucleo_project/ --target nucleo-f446re

Writes the C project (sources, Makefile, CMakeLists.txt) of a Cortex-M artifact, for its
board or, with --target, for another Cortex-M board (the same C, no recompilation).
To go from a model straight to a project: tbnc compile MODEL --target BOARD -o DIR/"""

_TARGETS_EXAMPLE = """\
examples:
  tbnc targets
  tbnc targets --json targets.json"""

_BUNDLE_EXAMPLE = """\
example:
  tbnc deploy-bundle bundle/ --archive
  # on the GPU host (Python, torch and numpy installed; an NVIDIA driver, no CUDA toolkit):
  . bundle/env.sh && python -c "import tbn_compiler as tbn; print(tbn.load('model.tbn'))"

DIR holds TVM's runtime (no compiler) with its CUDA runtime, apache-tvm-ffi for this
Python, and tbn_compiler's load/call part."""

_COMMANDS = ("inspect", "compile", "run", "bench", "export", "targets", "deploy-bundle")


def build_parser() -> argparse.ArgumentParser:
    """The ``tbnc`` parser: one subcommand of :data:`_COMMANDS`."""
    parser = _Parser(prog="tbnc", description="Tiled Bit Network compiler")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(_COMMANDS) + "}"
    )
    _add_inspect_parser(sub)
    _add_compile_parser(sub)
    _add_run_parser(sub)
    _add_bench_parser(sub)
    _add_export_parser(sub)
    _add_targets_parser(sub)
    _add_bundle_parser(sub)
    return parser


def _subcommand(
    sub: argparse._SubParsersAction, name: str, doc: str, epilog: str, fn: Callable
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=doc,
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: `tbnc --debug compile ...` must not be reset by the subcommand's default
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    p.set_defaults(fn=fn)
    return p


def _add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    doc = "rewrite a model and print its per-layer report"
    p = _subcommand(sub, "inspect", doc, _INSPECT_EXAMPLE, cmd_inspect)
    _add_model_arguments(p)
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    p.add_argument("--dot", metavar="PATH", help="write the graph as Graphviz DOT")
    p.add_argument("--html", metavar="PATH", help="write the report as an HTML page")


def _add_compile_parser(sub: argparse._SubParsersAction) -> None:
    doc = "compile a model and save the artifact (or a Cortex-M C project)"
    names = ", ".join(known_targets())
    epilog = _COMPILE_EXAMPLE.format(targets=textwrap.fill(f"targets: {names}", width=88))
    p = _subcommand(sub, "compile", doc, epilog, cmd_compile)
    _add_model_arguments(p)
    p.add_argument("--target", default="llvm", help="target name (default: llvm; see tbnc targets)")
    p.add_argument(
        "-o", "--output", metavar="PATH", required=True, help="artifact file, or C project dir"
    )
    p.add_argument("--html", metavar="PATH", help="write the report as an HTML page")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a C project written before at -o"
    )
    p.add_argument(
        "--precision",
        choices=("float32", "int8"),
        default="float32",
        help="int8: tiled linears with int8 activations, approximate (llvm only; default: float32)",
    )


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    doc = "run a saved artifact on inputs from .npy/.npz files; outputs to a .npz"
    p = _subcommand(sub, "run", doc, _RUN_EXAMPLE, cmd_run)
    p.add_argument("artifact", metavar="ARTIFACT", help="a file written by tbnc compile")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        required=True,
        metavar="FILE",
        help=".npy or .npz file of inputs (repeat for several)",
    )
    p.add_argument("-o", "--output", metavar="PATH", required=True, help="output .npz file")


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    doc = "time an artifact, and the same model in torch eager mode"
    p = _subcommand(sub, "bench", doc, _BENCH_EXAMPLE, cmd_bench)
    p.add_argument("artifact", metavar="ARTIFACT", help="a file written by tbnc compile")
    p.add_argument("--model", help="package.module:factory or .pt2 to compare with (eager)")
    p.add_argument(
        "--input", "-i", action="append", metavar="FILE", help="inputs (default: random)"
    )
    p.add_argument("--repeat", type=positive_int, default=50, help="timed calls each (default: 50)")
    p.add_argument(
        "--warmup", type=non_negative_int, default=5, help="untimed calls first (default: 5)"
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    doc = "write the C project of a Cortex-M artifact (for its board or another)"
    p = _subcommand(sub, "export", doc, _EXPORT_EXAMPLE, cmd_export)
    p.add_argument("artifact", metavar="ARTIFACT", help="a Cortex-M artifact (tbnc compile)")
    p.add_argument("directory", metavar="DIR", help="the project directory (new or empty)")
    p.add_argument("--target", help="another Cortex-M board to package the same C for")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a project exported there before"
    )


def _add_targets_parser(sub: argparse._SubParsersAction) -> None:
    doc = "list the targets with their descriptions"
    p = _subcommand(sub, "targets", doc, _TARGETS_EXAMPLE, cmd_targets)
    p.add_argument("--json", metavar="PATH", help="write the list as JSON ('-': stdout)")


def _add_bundle_parser(sub: argparse._SubParsersAction) -> None:
    doc = "write what a host needs beside torch to load and run artifacts (TVM's runtime only)"
    p = _subcommand(sub, "deploy-bundle", doc, _BUNDLE_EXAMPLE, cmd_deploy_bundle)
    p.add_argument("directory", metavar="DIR", help="where to write it (new or empty)")
    p.add_argument("--archive", action="store_true", help="also write DIR.tar.xz")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", metavar="MODEL", help=f"package.module:factory or a {PROGRAM_SUFFIX} file"
    )
    p.add_argument(
        "--shape",
        "--input-shape",
        dest="shape",
        action="append",
        type=parse_shape,
        help="input shape, e.g. 1,3,32,32 (once per model input; "
        f"required for module:factory, overrides a {PROGRAM_SUFFIX} program's)",
    )
    p.add_argument("--p", type=positive_int, default=4, help="tile reuse factor (default: 4)")
    p.add_argument(
        "--min-numel",
        type=non_negative_int,
        default=64_000,
        help="smaller layers use p=1 (default: 64000)",
    )
    p.add_argument("--exclude", action="append", default=[], help="layer name or glob kept dense")
    p.add_argument(
        "--layer",
        action="append",
        default=[],
        type=layer_rule,
        metavar="NAME=P",
        help="p for one layer name or glob (P 'dense' keeps it dense); repeatable",
    )
    p.add_argument("--strict", action="store_true", help="fail on layers p does not divide")


# --------------------------------------------------------------------------- models


def load_model(spec: str) -> torch.nn.Module:
    """Resolve ``package.module:attr`` to a module in eval mode (calling ``attr`` if it is
    a factory). The current directory is importable. Raises :class:`UsageError`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"model must be given as package.module:factory or a {PROGRAM_SUFFIX} file, "
            f"got {spec!r}"
        )
    _make_cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"cannot import {module_name!r} for model {spec!r}: {_describe(e)}") from e
    if not hasattr(module, attr):
        raise UsageError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
    obj = getattr(module, attr)
    if isinstance(obj, torch.nn.Module):
        return obj.eval()
    if not callable(obj):
        raise UsageError(f"{spec} is neither an nn.Module nor a factory returning one")
    try:
        model = obj()
    except Exception as e:
        raise UsageError(f"calling {spec}() failed: {_describe(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec}() did not give a torch.nn.Module but {type(model).__name__}")
    return model.eval()


def _make_cwd_importable() -> None:
    # A console script's sys.path starts with its own bin directory, not the current one.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def is_program_file(spec: str) -> bool:
    """True when ``spec`` names a saved program: a ``.pt2`` path, or an existing file."""
    return spec.endswith(PROGRAM_SUFFIX) or Path(spec).is_file()


def load_program(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load(path)``; :class:`UsageError` for a missing or unreadable file."""
    if not Path(path).is_file():
        raise UsageError(f"no such file: {path} (a program written by torch.export.save)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(path)
    except Exception as e:
        raise UsageError(
            f"cannot read {path} as a torch.export program (torch.export.save): {_describe(e)}"
        ) from e


def load_model_and_inputs(
    spec: str, shapes: Sequence[tuple[int, ...]] | None
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model named by ``spec`` (``module:factory`` or a ``.pt2`` program) and example
    inputs it runs on (checked by one eager run): see the module docstring."""
    if is_program_file(spec):
        program = load_program(spec)
        inputs = program_example_inputs(program, shapes, spec)
        model = program.module()
        _check_runs(model, inputs, Path(spec).name, shapes, "--input-shape")
        return model, inputs
    if not shapes:
        raise UsageError(
            f"--shape is required for the model {spec!r}: give one per model input, "
            "e.g. --shape 1,3,32,32"
        )
    model = load_model(spec)
    return model, example_inputs(model, shapes)


def example_inputs(model: torch.nn.Module, shapes: Sequence[tuple[int, ...]]) -> tuple:
    """Random float inputs of ``shapes``, checked by one eager run of ``model``: a shape
    the model cannot take is a :class:`UsageError` naming the shapes, before capture."""
    inputs = tuple(torch.randn(*shape) for shape in shapes)
    _check_runs(model, inputs, type(model).__name__, shapes, "--shape")
    return inputs


def _check_runs(
    model: torch.nn.Module,
    inputs: tuple,
    label: str,
    shapes: Sequence[tuple[int, ...]] | None,
    flag: str,
) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        shown = shapes or [tuple(t.shape) for t in inputs]
        given = " ".join(f"{flag} {','.join(map(str, s))}" for s in shown)
        raise UsageError(
            f"{label} cannot run on {given}: {_describe(e)}; "
            f"give one {flag} per model input, in order"
        ) from e


def program_example_inputs(
    program: torch.export.ExportedProgram,
    shapes: Sequence[tuple[int, ...]] | None,
    where: str = "the program",
) -> tuple[torch.Tensor, ...]:
    """Example inputs of a saved program (see the module docstring): its saved example
    inputs, or tensors shaped after its user-input placeholders, ``shapes`` overriding."""
    placeholders = _user_input_values(program, where)
    saved = _saved_example_inputs(program, len(placeholders), where)
    if shapes is not None and len(shapes) != len(placeholders):
        raise UsageError(
            f"{where} takes {len(placeholders)} input(s) ({_describe_inputs(placeholders)}); "
            f"{len(shapes)} --input-shape given"
        )
    inputs = []
    for i, (name, fake) in enumerate(placeholders):
        example = saved[i] if saved is not None else None
        if shapes is None:
            shape = (
                tuple(example.shape) if example is not None else _hinted_shape(name, fake, where)
            )
        else:
            shape = _checked_override(name, fake, shapes[i], where)
        if example is not None and tuple(example.shape) == shape:
            inputs.append(example)
        else:
            inputs.append(_fresh_tensor(shape, fake.dtype))
    return tuple(inputs)


def _user_input_values(
    program: torch.export.ExportedProgram, where: str
) -> list[tuple[str, torch.Tensor]]:
    """(name, fake tensor) of each user input placeholder, in order."""
    user_inputs = list(program.graph_signature.user_inputs)
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    values = []
    for name in user_inputs:
        node = by_name.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor):
            raise UsageError(
                f"{where}: input {name!r} is not a tensor ({type(value).__name__}); tbnc "
                "passes tensors only: export the model with tensor inputs"
            )
        values.append((name, value))
    return values


def _saved_example_inputs(
    program: torch.export.ExportedProgram, count: int, where: str
) -> list[torch.Tensor] | None:
    saved = getattr(program, "example_inputs", None)
    if saved is None:
        return None
    args, kwargs = saved
    if kwargs:
        raise UsageError(
            f"{where} takes keyword inputs ({', '.join(kwargs)}), which tbnc cannot pass: "
            "export the model with positional inputs"
        )
    if len(args) != count or not all(isinstance(a, torch.Tensor) for a in args):
        return None  # nested or non-tensor inputs: shapes come from the placeholders
    return list(args)


def _hinted_shape(name: str, fake: torch.Tensor, where: str) -> tuple[int, ...]:
    dims = []
    for d, size in enumerate(fake.shape):
        if isinstance(size, int):
            dims.append(size)
            continue
        hint = getattr(getattr(size, "node", None), "hint", None)
        if not isinstance(hint, int):
            raise UsageError(
                f"{where}: dimension {d} of input {name!r} is dynamic ({size}) with no "
                "example size; give --input-shape"
            )
        dims.append(hint)
    return tuple(dims)


def _checked_override(
    name: str, fake: torch.Tensor, shape: tuple[int, ...], where: str
) -> tuple[int, ...]:
    """``shape`` when it keeps every static dimension of the placeholder, else UsageError."""
    given = ",".join(map(str, shape))
    if len(shape) != fake.dim():
        raise UsageError(
            f"{where}: input {name!r} has {fake.dim()} dimensions "
            f"({_shape_text(fake)}), --input-shape {given} has {len(shape)}"
        )
    for d, (want, got) in enumerate(zip(fake.shape, shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise UsageError(
                f"{where}: dimension {d} of input {name!r} is {want} in the program "
                f"({_shape_text(fake)}), --input-shape {given} gives {got}"
            )
    return shape


def _fresh_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random normal floats; zeros for integer and bool inputs (a valid id for any table)."""
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _shape_text(fake: torch.Tensor) -> str:
    return f"{str(fake.dtype).removeprefix('torch.')}[{', '.join(map(str, fake.shape))}]"


def _describe_inputs(placeholders: Sequence[tuple[str, torch.Tensor]]) -> str:
    return ", ".join(f"{name}: {_shape_text(fake)}" for name, fake in placeholders)


# --------------------------------------------------------------------------- checks


def check_target(name: str) -> TargetSpec:
    """The target's spec; :class:`UsageError` for an unknown name, suggesting the closest."""
    try:
        return resolve_target(name)
    except ValueError as e:
        raise UsageError(unknown_target_message(name)) from e


def unknown_target_message(name: str) -> str:
    """``unknown target 'x'; did you mean ...?`` (or the known names when none is close)."""
    quoted = [repr(n) for n in closest_targets(name)]
    if quoted:
        options = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        return f"unknown target {name!r}; did you mean {options}?"
    return f"unknown target {name!r}; known targets: {', '.join(known_targets())}"


def check_writable(path: str, flag: str) -> None:
    """Fail early (before compiling) if ``path`` cannot be written: it is a directory, or
    its directory cannot be created or written. The directory is created, as saving would."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    _check_parent_writable(target, path, flag)


def check_project_dir(path: str, flag: str, overwrite: bool) -> None:
    """Fail early if a C project cannot be written at ``path``: a file is there, or a
    non-empty directory and not ``overwrite``, or its parent cannot be written."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory for the C project")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UsageError(
            f"{flag} {path}: the directory is not empty; pass --overwrite to replace a "
            "project written there before, or pick a new directory"
        )
    _check_parent_writable(target, path, flag)


def _check_parent_writable(target: Path, path: str, flag: str) -> None:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from e


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, for messages about a failure of user code."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- artifacts


def load_artifact(path: str) -> Any:
    """``tbn.load(path)`` (imports the backends); a missing file is a :class:`UsageError`."""
    if not Path(path).is_file():
        raise UsageError(f"no such file: {path} (an artifact written by tbnc compile)")
    from . import load  # the TVM runtime is imported only here

    return load(path)


def read_inputs(paths: Sequence[str], specs: Sequence[Any], device: torch.device) -> tuple:
    """Tensors for the artifact's input ``specs`` (``TensorSpec``) from ``.npy`` / ``.npz``
    files, on ``device``: matched by name when one ``.npz`` has every input, else in
    order; converted to the input's dtype within the same kind. :class:`UsageError` for
    a file that cannot be read, a wrong count, shape or kind."""
    arrays = [item for path in paths for item in _read_array_file(path)]
    names = {name for name, _, _ in arrays}
    if len(paths) == 1 and paths[0].endswith(".npz") and all(s.name in names for s in specs):
        by_name = {name: (name, arr, src) for name, arr, src in arrays}
        arrays = [by_name[s.name] for s in specs]
    if len(arrays) != len(specs):
        want = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in specs)
        raise UsageError(
            f"the artifact takes {len(specs)} input(s) ({want}); "
            f"the --input files hold {len(arrays)} array(s)"
        )
    return tuple(
        _input_tensor(arr, spec, source).to(device)
        for (_, arr, source), spec in zip(arrays, specs, strict=True)
    )


def _read_array_file(path: str) -> list[tuple[str, np.ndarray, str]]:
    """(name, array, where it came from) of each array in a ``.npy`` or ``.npz`` file."""
    if not Path(path).is_file():
        raise UsageError(f"--input {path}: no such file")
    if not path.endswith((".npy", ".npz")):
        raise UsageError(f"--input {path}: expected a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return [("", loaded, path)]
        with loaded:
            return [(k, loaded[k], f"{path}[{k!r}]") for k in loaded.files]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"--input {path}: cannot read it as a numpy file ({_describe(e)})") from e


def _input_tensor(arr: np.ndarray, spec: Any, source: str) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(
            f"input {spec.name!r} has dtype {spec.dtype}, which numpy files cannot hold"
        )
    if not _fits_dims(tuple(arr.shape), tuple(getattr(spec, "dims", spec.shape))):
        raise UsageError(
            f"input {spec.name!r}: the artifact takes shape {_dims_label(spec)}, "
            f"{source} holds {tuple(arr.shape)}"
        )
    if _dtype_kind(arr.dtype) != _torch_kind(dtype):
        raise UsageError(
            f"input {spec.name!r}: expected {spec.dtype} values, {source} holds {arr.dtype}"
        )
    # a fresh tensor: numpy's buffer (e.g. inside a .npz) need not be aligned as TVM wants
    return torch.from_numpy(arr).to(dtype, copy=True).contiguous()


def _fits_dims(shape: tuple[int, ...], dims: tuple[int | str, ...]) -> bool:
    """Whether ``shape`` fits an input's dims: a named dim (the batch) takes any size;
    the module itself checks that inputs sharing a name agree."""
    return len(shape) == len(dims) and all(
        isinstance(d, str) or d == n for d, n in zip(dims, shape, strict=True)
    )


def _dims_label(spec: Any) -> str:
    return "(" + ", ".join(str(d) for d in getattr(spec, "dims", spec.shape)) + ")"


def _dtype_kind(dtype: np.dtype) -> str:
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(dtype.kind, dtype.kind)


def _torch_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def output_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensors in tuples, lists and dicts), in the order
    compiled modules list them (``torch.utils._pytree`` order; constants dropped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in output_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    return []


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (exactly that name) atomically: a temporary file in
    the same directory, then a rename."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _module_device(cm: Any) -> torch.device:
    return getattr(cm, "device", torch.device("cpu"))


def random_inputs(specs: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Inputs for ``specs``: random normal floats, zeros for integer and bool inputs."""
    return tuple(_fresh_tensor(tuple(s.shape), getattr(torch, s.dtype)).to(device) for s in specs)


# --------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace) -> TBNConfig:
    return TBNConfig(
        p=args.p,
        min_numel=args.min_numel,
        layers=dict(args.layer),
        exclude=args.exclude,
        strict=args.strict,
    )


def _check_output_files(args: argparse.Namespace, flags: Sequence[str]) -> None:
    for flag in flags:
        path = getattr(args, flag.lstrip("-"))
        if path and path != "-":
            check_writable(path, flag)


def _emit_json(path: str, data: Any) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Rewrite the model, print its report, write the JSON / DOT / HTML files asked for."""
    _check_output_files(args, ("--json", "--dot", "--html"))
    config = _config(args)
    model, inputs = load_model_and_inputs(args.model, args.shape)
    report = inspect(rewrite(model, inputs, config))
    json_to_stdout = args.json == "-"  # then stdout holds the JSON alone
    if not json_to_stdout:
        print(report)
    if args.dot:
        Path(args.dot).write_text(report.to_dot())
    if args.html:
        report.to_html(args.html, title=f"{args.model}: Tiled Bit Network report")
        if not json_to_stdout:
            print(f"wrote {args.html}")
    if args.json:
        _emit_json(args.json, report.to_dict())
    return EXIT_OK


def writes_project(spec: TargetSpec, output: str) -> bool:
    """Whether ``compile -o output`` writes a C project: a Cortex-M target and a path
    that does not end in ``.tbn``."""
    return spec.kind == "cortex-m" and not output.endswith(ARTIFACT_SUFFIX)


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the model for ``--target``; save the artifact (or the C project) to ``-o``."""
    spec = check_target(args.target)
    project = writes_project(spec, args.output)
    if project:
        check_project_dir(args.output, "-o", args.overwrite)
    else:
        check_writable(args.output, "-o")
    _check_output_files(args, ("--html",))
    if args.html and spec.kind == "cortex-m":
        from .backends.cortex_m.toolchain import require_toolchain

        require_toolchain()  # the flash/RAM split comes from the real build
    config = _config(args)
    model, inputs = load_model_and_inputs(args.model, args.shape)
    from . import compile as compile_model  # the TVM backend is imported only here

    cm = compile_model(model, inputs, target=spec, config=config, precision=args.precision)
    print(cm.report)
    if project:
        cm.export(args.output, overwrite=args.overwrite)
        print(f"wrote the C project for {spec.name} to {args.output}")
    else:
        cm.save(args.output)
        print(f"wrote {args.output}")
    if args.html:
        memory = cm.memory if spec.kind == "cortex-m" else None
        cm.report.to_html(args.html, memory=memory, title=f"{args.model} for {spec.name}")
        print(f"wrote {args.html}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the artifact once on the ``--input`` arrays; write its outputs to ``-o``."""
    check_writable(args.output, "-o")
    cm = load_artifact(args.artifact)
    inputs = read_inputs(args.input, cm.input_specs, _module_device(cm))
    with torch.no_grad():
        outputs = output_tensors(cm(*inputs))
    specs = cm.output_specs
    names = (
        [s.name for s in specs]
        if len(specs) == len(outputs)
        else [f"output{i}" for i in range(len(outputs))]
    )
    arrays = {name: t.detach().cpu().numpy() for name, t in zip(names, outputs, strict=True)}
    write_npz(args.output, arrays)
    rows = [[name, str(a.dtype), "x".join(map(str, a.shape))] for name, a in arrays.items()]
    print(tabulate(rows, headers=["output", "dtype", "shape"]))
    print(f"wrote {args.output}")
    return EXIT_OK


def time_calls(
    fn: Callable[[], Any], warmup: int, repeat: int, device: torch.device
) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones (the
    GPU is synchronised around each timed call on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _timing(name: str, times: Sequence[float]) -> dict[str, Any]:
    return {
        "name": name,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "calls": len(times),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the artifact (and ``--model`` in torch eager mode) on the same inputs."""
    _check_output_files(args, ("--json",))
    cm = load_artifact(args.artifact)
    cortex_m = cm.target.kind == "cortex-m"
    if cortex_m and args.model:
        raise UsageError(
            f"{args.artifact} runs in QEMU (target {cm.target.name}), whose wall time is not "
            "the board's: bench it without --model and compare instructions per inference"
        )
    device = _module_device(cm)
    if args.input:
        inputs = read_inputs(args.input, cm.input_specs, device)
    else:
        inputs = random_inputs(cm.input_specs, device)
    model = _eager_model(args.model, cm.input_specs, inputs, device) if args.model else None

    def timed(name: str, fn: Callable[[], Any]) -> dict[str, Any]:
        return _timing(name, time_calls(fn, args.warmup, args.repeat, device))

    with torch.no_grad():
        rows = [timed(f"tbn ({cm.target.name})", lambda: cm(*inputs))]
        if cortex_m:
            rows[0]["instructions"] = (cm.last_run or {}).get("instructions")
        if model is not None:
            rows.append(timed(f"torch eager ({device.type})", lambda: model(*inputs)))
    result: dict[str, Any] = {
        "artifact": args.artifact,
        "target": cm.target.name,
        "inputs": [
            {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in cm.input_specs
        ],
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    if model is not None:
        result["speedup"] = rows[1]["median_ms"] / rows[0]["median_ms"]
    if args.json != "-":
        print(_bench_table(result))
    if args.json:
        _emit_json(args.json, result)
    return EXIT_OK


def _eager_model(
    spec: str, input_specs: Sequence[Any], inputs: tuple, device: torch.device
) -> torch.nn.Module:
    """The model to compare with, on ``device``, checked to run on the artifact's inputs."""
    model = load_program(spec).module() if is_program_file(spec) else load_model(spec)
    model = model.to(device)
    label = Path(spec).name if is_program_file(spec) else type(model).__name__
    shapes = [tuple(s.shape) for s in input_specs]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        shown = " ".join("x".join(map(str, s)) for s in shapes)
        raise UsageError(
            f"--model {label} cannot run on the artifact's inputs ({shown}): {_describe(e)}"
        ) from e
    return model


def _bench_table(result: Mapping[str, Any]) -> str:
    rows = result["results"]
    headers = ["what", "median ms", "min ms", "calls"]
    has_insns = any("instructions" in r for r in rows)
    if has_insns:
        headers.append("instructions")
    table = []
    for r in rows:
        row = [r["name"], f"{r['median_ms']:.4f}", f"{r['min_ms']:.4f}", r["calls"]]
        if has_insns:
            row.append(r.get("instructions", ""))
        table.append(row)
    text = tabulate(table, headers=headers)
    if "speedup" in result:
        s = result["speedup"]
        word = "faster" if s >= 1 else "slower"
        factor = s if s >= 1 else (1 / s if s > 0 else math.inf)
        text += f"\nspeedup (eager median / tbn median): {s:.2f} ({factor:.2f}x {word})"
    elif has_insns:
        text += "\n(QEMU wall time, not the board's: compare instructions per inference)"
    return text


def cmd_export(args: argparse.Namespace) -> int:
    """Write the C project of a Cortex-M artifact (retargeted with ``--target``)."""
    check_project_dir(args.directory, "directory", args.overwrite)
    spec = check_target(args.target) if args.target else None
    if spec is not None and spec.kind != "cortex-m":
        raise UsageError(f"--target {args.target} is not a Cortex-M board; see tbnc targets")
    cm = load_artifact(args.artifact)
    if cm.target.kind != "cortex-m":
        raise UsageError(
            f"{args.artifact} was compiled for {cm.target.name}; export writes C projects of "
            "Cortex-M artifacts: compile with --target <board> (see tbnc targets)"
        )
    if spec is not None and spec.name != cm.target.name:
        cm = cm.retarget(spec)
    root = cm.export(args.directory, overwrite=args.overwrite)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    print(f"wrote the C project for {cm.target.name} to {root} ({len(files)} files)")
    return EXIT_OK


def target_rows() -> list[dict[str, Any]]:
    """One dict per known target name (aliases included, marked): ``name``, ``kind``,
    ``description``, ``alias_of``, ``flash_kib``, ``ram_kib``, ``runs`` (where modules
    for it run: host CPU, GPU, QEMU, or build only)."""
    rows: list[dict[str, Any]] = []
    seen: list[tuple[TargetSpec, str]] = []  # specs are unhashable (dict fields)
    for name in known_targets():
        try:
            spec = resolve_target(name)
        except ValueError:  # the "cuda:sm_XX (e.g. cuda:sm_80)" pattern
            rows.append(_target_row(name, "cuda", "NVIDIA GPU of that architecture", "GPU"))
            continue
        alias_of = next((first for other, first in seen if other == spec), None)
        row = _target_row(name, spec.kind, spec.description, _where_it_runs(spec), alias_of)
        if spec.board is not None:
            row.update(flash_kib=spec.board.flash_kib, ram_kib=spec.board.ram_kib)
        rows.append(row)
        seen.append((spec, name))
    return rows


def _target_row(
    name: str, kind: str, description: str, runs: str, alias_of: str | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "description": description,
        "alias_of": alias_of,
        "flash_kib": None,
        "ram_kib": None,
        "runs": runs,
    }


def _where_it_runs(spec: TargetSpec) -> str:
    if spec.board is not None:
        if spec.board.qemu_machine:
            return f"QEMU ({spec.board.qemu_machine})"
        return "build only" if spec.board.flash_kib else "library only"
    return {"cuda": "GPU"}.get(spec.kind, "host CPU")


def cmd_targets(args: argparse.Namespace) -> int:
    """Print the targets; ``--json`` writes them."""
    _check_output_files(args, ("--json",))
    rows = target_rows()
    if args.json != "-":
        table = [
            [
                r["name"],
                r["kind"],
                r["runs"],
                "" if r["flash_kib"] is None else r["flash_kib"],
                "" if r["ram_kib"] is None else r["ram_kib"],
                f"alias of {r['alias_of']}" if r["alias_of"] else r["description"],
            ]
            for r in rows
        ]
        print(
            tabulate(
                table, headers=["target", "kind", "runs", "flash KiB", "RAM KiB", "description"]
            )
        )
    if args.json:
        _emit_json(args.json, rows)
    return EXIT_OK


def cmd_deploy_bundle(args: argparse.Namespace) -> int:
    """Write the deploy bundle into ``DIR`` and print its size (and the archive's)."""
    from .backends.deploy import write_bundle  # no TVM import: only files are copied

    print(write_bundle(args.directory, archive=args.archive).summary())
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tbnc`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or an argument error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    return run_reporting_errors(args.fn, args)


def run_reporting_errors(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``fn(args)``, with every exception turned into one stderr line and an exit code."""
    try:
        with _quiet_torch(enabled=not getattr(args, "debug", False)):
            return fn(args)
    except KeyboardInterrupt:
        _report(args, "tbnc: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tbnc targets | head`: the reader has all it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except user_error_types() as e:
        _report(args, f"tbnc: error: {_one_line(str(e) or type(e).__name__)}")
        return EXIT_USAGE
    except Exception as e:
        _report(
            args,
            f"tbnc: internal error: {_one_line(_describe(e))} (run with --debug for the traceback)",
        )
        return EXIT_INTERNAL


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe does
    not print a second BrokenPipeError at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by an object without a descriptor
        pass
    finally:
        os.close(devnull)


@contextlib.contextmanager
def _quiet_torch(enabled: bool) -> Iterator[None]:
    """Hide torch's log warnings and FutureWarnings (internal deprecations, not the
    user's business) unless debugging; restores both afterwards."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _report(args: argparse.Namespace, line: str) -> None:
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(line, file=sys.stderr)


def _one_line(text: str) -> str:
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(line) > _MESSAGE_LIMIT:
        line = line[: _MESSAGE_LIMIT - 3] + "..."
    return line


if __name__ == "__main__":
    sys.exit(main())
