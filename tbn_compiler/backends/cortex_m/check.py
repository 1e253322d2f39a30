"""Compile check of the generated C, and C compiler errors traced back to the model.

:func:`syntax_check` compiles the library sources with the host C compiler
(``-fsyntax-only``, the same headers and warnings-as-errors as the project's Makefile);
it is the check ``tbn.compile`` falls back to when ``arm-none-eabi-gcc`` is missing.

:func:`explain_build_log` turns a compiler log into a message that names, for every
error, the kernel it is in and the program step(s) that call it: the Relax function (named
after the ops it computes, e.g. ``fused_add_clip_multiply_divide`` for a Hardswish), the
model layer whose weights it uses and the steps its inputs come from, each with its layer.
Where each step's code is comes from the step table (``lines``: generated file -> first
and last line of the step's kernel declaration, kernel definition and call, recorded when
the files were written), not from reading the C.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .toolchain import DEBIAN_PACKAGES, BuildError, ToolchainError

__all__ = ["HOST_COMPILERS", "SYNTAX_FLAGS", "explain_build_log", "host_compiler", "syntax_check"]

HOST_COMPILERS = ("cc", "gcc", "clang")
SYNTAX_FLAGS = ("-std=gnu11", "-fsyntax-only", "-Wall", "-Werror=implicit-function-declaration")
_LIBRARY_SOURCES = ("src/tbn_kernels.c", "src/tbn_model.c")
_ERROR = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: (?P<msg>.*)$")
_KERNEL_FILES = ("src/tbn_kernels.c", "src/tbn_kernels.h")
_MODEL_FILE = "src/tbn_model.c"
_GENERATED_FILES = (*_KERNEL_FILES, _MODEL_FILE, "include/tbn_model.h")


def host_compiler() -> str | None:
    """The first host C compiler on PATH (see :data:`HOST_COMPILERS`), or None."""
    return next((c for c in HOST_COMPILERS if shutil.which(c)), None)


def syntax_check(sources: Mapping[str, str]) -> str:
    """Compile the library sources of ``sources`` (relative path -> text) with the host
    C compiler, syntax only; returns the compiler's name. :class:`.toolchain.BuildError`
    with the log when they do not compile, :class:`.toolchain.ToolchainError` when no host
    C compiler exists either."""
    cc = host_compiler()
    if cc is None:
        raise ToolchainError(
            "cannot check the generated C: neither arm-none-eabi-gcc nor a host C compiler "
            f"({', '.join(HOST_COMPILERS)}) is installed; on Debian/Ubuntu install "
            f"{DEBIAN_PACKAGES}"
        )
    with tempfile.TemporaryDirectory(prefix="tbn_cm_check_") as tmp:
        root = Path(tmp)
        for rel, text in sources.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        proc = subprocess.run(
            [cc, *SYNTAX_FLAGS, "-Iinclude", "-Isrc", *_LIBRARY_SOURCES],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise BuildError(f"{cc} -fsyntax-only failed:\n{proc.stdout}\n{proc.stderr}")
    return cc


def _origin(steps: Sequence[Mapping[str, Any]], source: str) -> str:
    if not source.startswith("step "):
        return {"input": "the model input", "const": "a constant"}.get(source, source)
    k = int(source.split()[1])
    layer = steps[k].get("layer")
    return f"step {k}" + (f" (layer {layer!r})" if layer else f" ({steps[k]['func']})")


def describe_step(steps: Sequence[Mapping[str, Any]], i: int) -> str:
    """One line: what step ``i`` computes and where its inputs come from."""
    row = steps[i]
    text = f"step {i}: {row['func']}"
    if row.get("layer"):
        text += f" with the weights of layer {row['layer']!r}"
    sources = [s for s in row.get("inputs", []) if s != "const"]
    if sources:
        text += ", on " + ", ".join(_origin(steps, s) for s in dict.fromkeys(sources))
    return text


def _steps_at(steps: Sequence[Mapping[str, Any]], rel: str, line: int) -> list[int]:
    """The steps whose code in generated file ``rel`` spans 1-based ``line``."""
    found = []
    for i, row in enumerate(steps):
        span = row.get("lines", {}).get(rel)
        if span is not None and span[0] <= line <= span[1]:
            found.append(i)
    return found


def _where(steps: Sequence[Mapping[str, Any]], file: str, line: int) -> str:
    """What the compiler error at ``file:line`` belongs to, in model terms."""
    rel = next((r for r in _GENERATED_FILES if file.endswith(r)), None)
    calls = _steps_at(steps, rel, line) if rel else []
    if rel in _KERNEL_FILES:
        if not calls:
            return "the kernel support code"
        kernel = steps[calls[0]]["kernel"]
        return f"kernel {kernel} ({'; '.join(describe_step(steps, i) for i in calls)})"
    if rel == _MODEL_FILE:
        if calls:
            step = calls[0]
            return f"the call of kernel {steps[step]['kernel']} ({describe_step(steps, step)})"
        return "the weights / entry point"
    return rel or file


def explain_build_log(log: str, steps: Sequence[Mapping[str, Any]], target: str) -> str:
    """The message of a failed build of the C generated for ``target``, whose program
    steps are ``steps`` (see module doc)."""
    lines = []
    for raw in log.splitlines():
        m = _ERROR.match(raw.strip())
        if m:
            where = _where(steps, m.group("file"), int(m.group("line")))
            lines.append(f"  in {where}: {m.group('msg')}")
    head = f"the C generated for target {target!r} does not compile"
    if not lines:
        return f"{head}:\n{log}"
    unique = list(dict.fromkeys(lines))
    return (
        f"{head}; the failing code, by kernel and the model step it computes:\n"
        + "\n".join(unique)
        + "\nThis is a compiler defect for that op: report it, or keep the op off the "
        "microcontroller. Compiler output:\n" + log
    )
