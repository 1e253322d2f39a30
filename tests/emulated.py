"""Which targets a test can run here: the host always, an emulated Cortex-M board when
the Arm toolchain and QEMU are installed."""

from __future__ import annotations

from tbn_compiler.backends.cortex_m import ToolchainError, toolchain


def host_and_board(board: str = "mps2-an386") -> list[str]:
    """``["llvm", board]``, or ``["llvm"]`` without the Arm toolchain or QEMU."""
    try:
        toolchain.require_toolchain(qemu=True)
    except ToolchainError:
        return ["llvm"]
    return ["llvm", board]
