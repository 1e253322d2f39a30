"""Toolchain checks, builds with the project's own Makefile, sizes, and QEMU runs.

* :func:`require_toolchain` raises :class:`ToolchainError` naming the Debian packages when
  ``arm-none-eabi-gcc`` / newlib (``librdimon``) / ``qemu-system-arm`` are missing.
* :func:`build` runs ``make`` in an exported project directory.
* :func:`section_sizes` sums ``arm-none-eabi-size -A`` sections of the library objects.
* :func:`run_firmware` runs a firmware image under QEMU with ``-icount shift=10`` in a
  private working directory holding its ``input.bin`` (so concurrent runs of one image do
  not share files) and returns outputs (bit-exact) plus instruction count and wall time.
  Instructions = CMSDK timer ticks / (0.025 * 2**shift) = ticks / 25.6. A run whose
  ``tbn_model_run`` reported invalid data raises :class:`KernelError`.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ToolchainError",
    "BuildError",
    "RunError",
    "KernelError",
    "RunResult",
    "DEBIAN_PACKAGES",
    "ICOUNT_SHIFT",
    "require_toolchain",
    "has_toolchain",
    "build",
    "section_sizes",
    "firmware_sizes",
    "run_firmware",
]

DEBIAN_PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
ICOUNT_SHIFT = 10
_TICKS_PER_INSN = 0.025 * 2**ICOUNT_SHIFT


class ToolchainError(RuntimeError):
    """The Arm cross toolchain or QEMU is missing."""


class BuildError(RuntimeError):
    """Compiling or linking the generated C project failed."""


class RunError(RuntimeError):
    """The firmware did not run to completion under QEMU."""


class KernelError(RunError):
    """``tbn_model_run`` stopped: the kernel of ``step`` met invalid data (e.g. an index out
    of range: ``detail`` = (index, bound)); ``reason`` is the firmware's message."""

    def __init__(self, message: str, step: int, reason: str, detail: tuple[int, int]) -> None:
        super().__init__(message)
        self.step, self.reason, self.detail = step, reason, detail


@dataclass
class RunResult:
    """One QEMU run: outputs as float32, instruction count (None without timer), wall time."""

    output: np.ndarray
    instructions: int | None
    ticks: int | None
    wall_s: float
    machine: str

    def to_dict(self) -> dict[str, object]:
        return {
            "instructions": self.instructions,
            "ticks": self.ticks,
            "wall_s": self.wall_s,
            "machine": self.machine,
        }


@functools.lru_cache(maxsize=4)
def _missing(qemu: bool) -> tuple[str, ...]:
    tools = ["arm-none-eabi-gcc", "arm-none-eabi-ar", "arm-none-eabi-size", "make"]
    if qemu:
        tools.append("qemu-system-arm")
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        lib = subprocess.run(
            ["arm-none-eabi-gcc", "-print-file-name=librdimon.a"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if not Path(lib).is_absolute() or not Path(lib).exists():
            missing.append("newlib (librdimon.a)")
    return tuple(missing)


def has_toolchain(qemu: bool = False) -> bool:
    """True when the cross toolchain (and QEMU if asked) is installed."""
    return not _missing(qemu)


def require_toolchain(qemu: bool = False) -> None:
    """Raise :class:`ToolchainError` if the cross toolchain (and QEMU if asked) is missing."""
    missing = _missing(qemu)
    if missing:
        raise ToolchainError(
            f"missing {', '.join(missing)}; on Debian/Ubuntu install them with: "
            f"apt-get install -y {DEBIAN_PACKAGES}"
        )


def build(directory: Path, targets: tuple[str, ...] = ("lib",), jobs: int = 1) -> None:
    """``make <targets>`` in the project directory; :class:`BuildError` with the log."""
    require_toolchain()
    proc = subprocess.run(
        ["make", "-s", f"-j{jobs}", "-C", str(directory), *targets],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"building {directory} failed:\n{proc.stdout}\n{proc.stderr}")


def section_sizes(objects: list[Path]) -> dict[str, int]:
    """Bytes per section class over ``objects``: text, rodata, data, bss."""
    proc = subprocess.run(
        ["arm-none-eabi-size", "-A", *map(str, objects)],
        capture_output=True,
        text=True,
        check=True,
    )
    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        name = parts[0]
        for key in sizes:
            if name == f".{key}" or name.startswith(f".{key}."):
                sizes[key] += int(parts[1])
    return sizes


def firmware_sizes(elf: Path) -> dict[str, int]:
    """text / data / bss of a linked image (berkeley format of arm-none-eabi-size)."""
    out = subprocess.run(
        ["arm-none-eabi-size", str(elf)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    text, data, bss = (int(v) for v in out[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def _parse(stdout: str, n_out: int) -> tuple[np.ndarray, int | None, int | None]:
    words, ticks, rc, reason, detail = [], None, None, "", (-1, -1)
    for line in stdout.splitlines():
        if line.startswith("TBN_OUT "):
            words.append(int(line.split()[1], 16))
        elif line.startswith("TBN_TICKS "):
            ticks = int(line.split()[1])
        elif line.startswith("TBN_RC "):
            rc = int(line.split()[1])
        elif line.startswith("TBN_ERROR_DETAIL "):
            detail = (int(line.split()[1]), int(line.split()[2]))
        elif line.startswith("TBN_ERROR "):
            reason = line.split(" ", 1)[1]
    if rc is not None and rc > 0 and reason:
        raise KernelError(
            f"the kernel of step {rc - 1} stopped the model: {reason}", rc - 1, reason, detail
        )
    if rc != 0 or len(words) != n_out:
        raise RunError(f"firmware run failed (rc={rc}, {len(words)}/{n_out} outputs):\n{stdout}")
    out = np.array(words, dtype=np.uint32).view(np.float32)
    insns = None if ticks is None else int(round(ticks / _TICKS_PER_INSN))
    return out, ticks, insns


def run_firmware(
    elf: Path, machine: str, cpu: str, x: np.ndarray, n_out: int, timeout: float = 120
) -> RunResult:
    """Run the firmware image ``elf`` under QEMU on input ``x`` (float32); safe to call
    from several threads at once (each run has its own working directory)."""
    require_toolchain(qemu=True)
    cmd = [
        "qemu-system-arm",
        "-M",
        machine,
        "-cpu",
        cpu,
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        "none",
        "-semihosting-config",
        "enable=on,target=native",
        "-icount",
        f"shift={ICOUNT_SHIFT},align=off,sleep=off",
        "-kernel",
        str(Path(elf).resolve()),
    ]
    with tempfile.TemporaryDirectory(prefix="tbn_cm_run_") as cwd:
        np.ascontiguousarray(x, dtype="<f4").tofile(Path(cwd) / "input.bin")
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RunError(f"QEMU ({machine}) did not finish within {timeout} s") from exc
        wall = time.perf_counter() - start
    if proc.returncode != 0 and "TBN_RC " not in proc.stdout:
        raise RunError(
            f"QEMU ({machine}) exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    out, ticks, insns = _parse(proc.stdout, n_out)
    return RunResult(out, insns, ticks, wall, machine)
