"""``tbnc``: command-line access to inspect, compile and the deploy bundle.

A model is named as ``package.module:factory`` (a callable returning an
``nn.Module``, or an ``nn.Module`` instance), importable from the current directory;
example inputs are random float tensors of the given shapes::

    tbnc inspect mypkg.models:resnet18 --shape 1,3,32,32 --p 4 --json report.json
    tbnc compile mypkg.models:resnet18 --shape 1,3,32,32 --target llvm -o model.tbn
    tbnc compile mypkg.models:resnet18 --shape 1,3,32,32 --target mps2-an386 -o model.tbn
    tbnc deploy-bundle bundle/ --archive    # what a host needs beside torch to run artifacts

Before the (slow) rewrite and compile, ``tbnc`` checks what it can cheaply: the
arguments, the target name, that every output path can be written (its directory is
created, as saving would), that the model imports, and that it runs once in eager
mode on the given shapes.

Errors and exit codes
---------------------
Every error is ONE line on stderr, ``tbnc: error: <what is wrong>``; no traceback.

* ``0``: success.
* ``2``: a user error, i.e. something the user can fix: bad arguments (argparse's
  own errors included), a model spec that cannot be imported or called, a ``--shape``
  the model cannot take, a configuration the rewrite refuses (``--strict`` with a
  layer ``p`` does not divide), an unknown target (with the closest known names),
  an output that cannot be written, a model the compiler cannot capture or import,
  a missing toolchain, a deploy bundle that cannot be written. These are the exception
  classes of :func:`user_error_types`: :class:`UsageError`, ``ValueError`` (so also
  ``ArtifactError``, ``InputError``, ``ModelTooLargeError``), ``TypeError``,
  ``ImportError``, ``OSError``, :class:`~tbn_compiler.capture.CaptureError`,
  ``GraphImportError``, ``ToolchainError`` and ``BundleError``.
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
import os
import sys
import tempfile
import textwrap
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from .capture import CaptureError
from .config import TBNConfig
from .inspect import inspect
from .passes import rewrite
from .targets import closest_targets, known_targets, resolve_target

__all__ = [
    "UsageError",
    "build_parser",
    "check_target",
    "check_writable",
    "load_model",
    "main",
    "parse_shape",
    "user_error_types",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_MESSAGE_LIMIT = 800  # characters of an error message shown on the one line

# Backend errors that mean "the user can fix this", by module and class name: the CLI
# must not import TVM just to classify an error (see user_error_types).
_BACKEND_USER_ERRORS = (
    ("tbn_compiler.backends.relax_import", "GraphImportError"),
    ("tbn_compiler.backends.cortex_m.toolchain", "ToolchainError"),
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


_INSPECT_EXAMPLE = """\
example:
  tbnc inspect mypkg.models:resnet18 --shape 1,3,32,32 --p 4 --json report.json --dot graph.dot

The model is package.module:factory, importable from the current directory;
inputs are random float tensors of the --shape given (once per model input)."""

_COMPILE_EXAMPLE = """\
examples:
  tbnc compile mypkg.models:resnet18 --shape 1,3,32,32 --target llvm -o model.tbn
  tbnc compile mypkg.models:mlp --shape 1,64 --target mps2-an386 -o mlp_m4.tbn

{targets}"""

_BUNDLE_EXAMPLE = """\
example:
  tbnc deploy-bundle bundle/ --archive
  # on the GPU host (Python, torch and numpy installed; an NVIDIA driver, no CUDA toolkit):
  . bundle/env.sh && python -c "import tbn_compiler as tbn; print(tbn.load('model.tbn'))"

DIR holds TVM's runtime (no compiler) with its CUDA runtime, apache-tvm-ffi for this
Python, and tbn_compiler's load/call part."""


def build_parser() -> argparse.ArgumentParser:
    """The ``tbnc`` parser: subcommands ``inspect``, ``compile`` and ``deploy-bundle``."""
    parser = _Parser(prog="tbnc", description="Tiled Bit Network compiler")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{inspect,compile,deploy-bundle}"
    )
    for name, fn, doc, epilog in [
        (
            "inspect",
            cmd_inspect,
            "rewrite a model and print its per-layer report",
            _INSPECT_EXAMPLE,
        ),
        ("compile", cmd_compile, "compile a model and save the artifact", _COMPILE_EXAMPLE),
    ]:
        if name == "compile":
            names = ", ".join(known_targets())
            epilog = epilog.format(targets=textwrap.fill(f"targets: {names}", width=88))
        p = sub.add_parser(
            name,
            help=doc,
            description=doc,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common_arguments(p)
        p.set_defaults(fn=fn)
    inspect_p, compile_p = sub.choices["inspect"], sub.choices["compile"]
    inspect_p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    inspect_p.add_argument("--dot", metavar="PATH", help="write the graph as Graphviz DOT")
    compile_p.add_argument("--target", default="llvm", help="target name (default: llvm)")
    compile_p.add_argument("-o", "--output", metavar="PATH", required=True, help="artifact file")
    _add_bundle_parser(sub)
    return parser


def _add_bundle_parser(sub: argparse._SubParsersAction) -> None:
    doc = "write what a host needs beside torch to load and run artifacts (TVM's runtime only)"
    p = sub.add_parser(
        "deploy-bundle",
        help=doc,
        description=doc,
        epilog=_BUNDLE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", metavar="DIR", help="where to write it (new or empty)")
    p.add_argument("--archive", action="store_true", help="also write DIR.tar.xz")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    p.set_defaults(fn=cmd_deploy_bundle)


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="package.module:factory")
    p.add_argument(
        "--shape",
        action="append",
        required=True,
        type=parse_shape,
        help="input shape, e.g. 1,3,32,32 (once per model input)",
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
    # SUPPRESS: `tbnc --debug compile ...` must not be reset by the subcommand's default
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )


# --------------------------------------------------------------------------- checks


def load_model(spec: str) -> torch.nn.Module:
    """Resolve ``package.module:attr`` to a module in eval mode (calling ``attr`` if it is
    a factory). The current directory is importable. Raises :class:`UsageError`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"model must be given as package.module:factory, got {spec!r}")
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


def example_inputs(model: torch.nn.Module, shapes: Sequence[tuple[int, ...]]) -> tuple:
    """Random float inputs of ``shapes``, checked by one eager run of ``model``: a shape
    the model cannot take is a :class:`UsageError` naming the shapes, before capture."""
    inputs = tuple(torch.randn(*shape) for shape in shapes)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        given = " ".join(f"--shape {','.join(map(str, s))}" for s in shapes)
        raise UsageError(
            f"{type(model).__name__} cannot run on {given}: {_describe(e)}; "
            "give one --shape per model input, in order"
        ) from e
    return inputs


def check_target(name: str) -> None:
    """Raise :class:`UsageError` for an unknown target, suggesting the closest names."""
    try:
        resolve_target(name)
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


# --------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace) -> TBNConfig:
    return TBNConfig(
        p=args.p,
        min_numel=args.min_numel,
        layers=dict(args.layer),
        exclude=args.exclude,
        strict=args.strict,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    """Rewrite the model, print its report, write the JSON / DOT files asked for."""
    for path, flag in ((args.json, "--json"), (args.dot, "--dot")):
        if path:
            check_writable(path, flag)
    config = _config(args)
    model = load_model(args.model)
    gm = rewrite(model, example_inputs(model, args.shape), config)
    report = inspect(gm)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    if args.dot:
        Path(args.dot).write_text(report.to_dot())
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the model for ``--target`` and save the artifact to ``-o`` (every target)."""
    check_target(args.target)
    check_writable(args.output, "-o")
    config = _config(args)
    model = load_model(args.model)
    inputs = example_inputs(model, args.shape)
    from . import compile as compile_model  # the TVM backend is imported only here

    cm = compile_model(model, inputs, target=args.target, config=config)
    print(cm.report)
    cm.save(args.output)
    print(f"wrote {args.output}")
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
    except user_error_types() as e:
        _report(args, f"tbnc: error: {_one_line(str(e) or type(e).__name__)}")
        return EXIT_USAGE
    except Exception as e:
        _report(
            args,
            f"tbnc: internal error: {_one_line(_describe(e))} (run with --debug for the traceback)",
        )
        return EXIT_INTERNAL


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
