"""docs/extending.md is true: its Python blocks run, in order, in a fresh process."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def doc_code() -> str:
    """Every ```python block of the page, joined in order."""
    return "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S))


def test_extending_examples_run():
    pytest.importorskip("tvm")
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        pytest.skip("the board example needs arm-none-eabi-gcc and qemu-system-arm")
    code = doc_code()
    assert all(f"{kind}(" in code for kind in ("register_target", "register_backend"))
    assert "register_tile_op(" in code
    # a fresh process: the examples register a board, a target kind and a tile op for good
    done = subprocess.run(
        [sys.executable, "-c", code + "\nprint('examples ok')"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("examples ok")
