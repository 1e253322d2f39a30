"""Compile check of the generated C, and C compiler errors traced back to the model.

:func:`syntax_check` compiles the library sources with the host C compiler
(``-fsyntax-only``, the same headers and warnings-as-errors as the project's Makefile);
it is the check ``tbn.compile`` falls back to when ``arm-none-eabi-gcc`` is missing.

:func:`explain_build_log` turns a compiler log into a message that names, for every
error, the kernel it is in and the program step(s) that call it: the Relax function (named
after the ops it computes, e.g. ``fused_add_clip_multiply_divide`` for a Hardswish), the
model layer whose weights it uses and the steps its inputs come from, each with its layer.
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
_KERNEL_LINE = re.compile(r"^TVM_DLL void (\w+)\(")
_STEP_LINE = re.compile(r"^  /\* step (\d+): ")


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


def _kernel_at(text: str, line: int) -> str | None:
    """The kernel declared on, or defined around, 1-based ``line`` of ``text``."""
    current = None
    for number, content in enumerate(text.splitlines(), start=1):
        m = _KERNEL_LINE.match(content)
        if m and content.endswith("{"):
            current = m.group(1)
        if number == line:
            return current or (m.group(1) if m else None)
        if content == "}":
            current = None
    return None


def _step_at(text: str, line: int) -> int | None:
    """The program step whose call holds 1-based ``line`` of ``src/tbn_model.c``."""
    found = None
    for content in text.splitlines()[:line]:
        m = _STEP_LINE.match(content)
        if m:
            found = int(m.group(1))
    return found


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


def _where(
    sources: Mapping[str, str], steps: Sequence[Mapping[str, Any]], file: str, line: int
) -> str:
    """What the compiler error at ``file:line`` belongs to, in model terms."""
    rel = next((r for r in sources if file.endswith(r)), None)
    if rel in ("src/tbn_kernels.c", "src/tbn_kernels.h"):
        kernel = _kernel_at(sources[rel], line)
        if kernel is None:
            return "the kernel support code"
        calls = [i for i, row in enumerate(steps) if row["kernel"] == kernel]
        if not calls:
            return f"kernel {kernel}"
        return f"kernel {kernel} ({'; '.join(describe_step(steps, i) for i in calls)})"
    if rel == "src/tbn_model.c":
        step = _step_at(sources[rel], line)
        if step is not None and step < len(steps):
            return f"the call of kernel {steps[step]['kernel']} ({describe_step(steps, step)})"
        return "the weights / entry point"
    return rel or file


def explain_build_log(
    log: str, sources: Mapping[str, str], steps: Sequence[Mapping[str, Any]], target: str
) -> str:
    """The message of a failed build of ``sources`` for ``target`` (see module doc)."""
    lines = []
    for raw in log.splitlines():
        m = _ERROR.match(raw.strip())
        if m:
            where = _where(sources, steps, m.group("file"), int(m.group("line")))
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
