"""Running a firmware image under QEMU: one command line, outputs read back bit-exact.

* :func:`qemu_command` is THE command line (the exported Makefile's ``make run`` uses it
  too): semihosting on, serial and monitor off, ``-icount shift=ICOUNT_SHIFT`` so the
  CMSDK timer counts instructions.
* :func:`run_firmware` runs an image in a private working directory holding its
  ``input.bin`` (every input's raw bytes in order, little endian; so concurrent runs of
  one image do not share files) and returns the output tensors (bit-exact, each as its
  dtype) plus instruction count and wall time. Instructions = CMSDK timer ticks /
  (0.025 * 2**ICOUNT_SHIFT) = ticks / 25.6. A run whose ``tbn_model_run`` reported
  invalid data raises :class:`KernelError`. A profiling image (``make profile``) also
  gives the instructions of each step, less the timer read it adds to each.

Checking for and driving the cross toolchain (``make``, ``size``) is :mod:`.toolchain`.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .toolchain import require_toolchain

__all__ = [
    "ICOUNT_SHIFT",
    "KernelError",
    "RunError",
    "RunResult",
    "input_bytes",
    "qemu_command",
    "run_firmware",
]

ICOUNT_SHIFT = 10
_TICKS_PER_INSN = 0.025 * 2**ICOUNT_SHIFT


class RunError(RuntimeError):
    """The firmware did not run to completion under QEMU."""


class KernelError(RunError):
    """``tbn_model_run`` stopped: the kernel of ``step`` met invalid data (e.g. an index out
    of range: ``detail`` = (index, bound)); ``reason`` is the firmware's message."""

    def __init__(self, message: str, step: int, reason: str, detail: tuple[int, int]) -> None:
        super().__init__(message)
        self.step, self.reason, self.detail = step, reason, detail


OutputSpec = tuple[tuple[int, ...], str]
"""Shape and numpy dtype name of one output tensor."""


@dataclass
class RunResult:
    """One QEMU run: the output tensors (numpy, each of its shape and dtype), instruction
    count (None without timer), wall time, and for a profiling image the instructions of
    each step (else None)."""

    outputs: list[np.ndarray]
    instructions: int | None
    ticks: int | None
    wall_s: float
    machine: str
    step_instructions: list[int] | None = None

    @property
    def output(self) -> np.ndarray:
        """The first output tensor."""
        return self.outputs[0]

    def same_bits(self, other: RunResult) -> bool:
        """Whether both runs wrote the same bytes to every output."""
        return len(self.outputs) == len(other.outputs) and all(
            a.tobytes() == b.tobytes() for a, b in zip(self.outputs, other.outputs, strict=True)
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "instructions": self.instructions,
            "ticks": self.ticks,
            "wall_s": self.wall_s,
            "machine": self.machine,
        }


def qemu_command(machine: str, cpu: str, kernel: str) -> list[str]:
    """The ``qemu-system-arm`` command line that runs the firmware image ``kernel`` on
    ``machine`` / ``cpu`` (see module doc)."""
    return [
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
        kernel,
    ]


def _insns(ticks: int) -> int:
    return int(round(ticks / _TICKS_PER_INSN))


def _step_instructions(lines: list[str]) -> list[int] | None:
    """Instructions per step of a profiling run (each step's ticks less one timer read)."""
    overhead = [int(line.split()[1]) for line in lines if line.startswith("TBN_STEP_OVERHEAD ")]
    steps = [line.split() for line in lines if line.startswith("TBN_STEP ")]
    if not overhead or not steps:
        return None
    by_step = dict(sorted((int(k), int(t)) for _, k, t in steps))
    return [max(_insns(t - overhead[0]), 0) for t in by_step.values()]


def _split_outputs(words: list[int], outputs: Sequence[OutputSpec]) -> list[np.ndarray]:
    """The printed words (see :mod:`.project`: each tensor's bytes, the last word of a
    tensor zero-padded) as one array per output."""
    arrays, at = [], 0
    for shape, dtype in outputs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        n_words = -(-nbytes // 4)
        raw = np.array(words[at : at + n_words], dtype="<u4").tobytes()[:nbytes]
        arrays.append(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape))
        at += n_words
    return arrays


def _words(outputs: Sequence[OutputSpec]) -> int:
    return sum(
        -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // 4)
        for shape, dtype in outputs
    )


def _parse(
    stdout: str, outputs: Sequence[OutputSpec]
) -> tuple[list[np.ndarray], int | None, int | None]:
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
    n_words = _words(outputs)
    if rc != 0 or len(words) != n_words:
        raise RunError(
            f"firmware run failed (rc={rc}, {len(words)}/{n_words} output words):\n{stdout}"
        )
    insns = None if ticks is None else _insns(ticks)
    return _split_outputs(words, outputs), ticks, insns


def input_bytes(inputs: Sequence[np.ndarray]) -> bytes:
    """The contents of ``input.bin``: every input's raw bytes in order, little endian."""
    return b"".join(
        np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
        for x in inputs
    )


def run_firmware(
    elf: Path,
    machine: str,
    cpu: str,
    inputs: Sequence[np.ndarray],
    outputs: Sequence[OutputSpec],
    timeout: float = 120,
) -> RunResult:
    """Run the firmware image ``elf`` under QEMU on ``inputs`` (numpy arrays of the
    model's input dtypes, in order) and read back ``outputs`` (shape and dtype of each
    output tensor); safe to call from several threads at once (each run has its own
    working directory)."""
    require_toolchain(qemu=True)
    cmd = qemu_command(machine, cpu, str(Path(elf).resolve()))
    with tempfile.TemporaryDirectory(prefix="tbn_cm_run_") as cwd:
        (Path(cwd) / "input.bin").write_bytes(input_bytes(inputs))
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
    out, ticks, insns = _parse(proc.stdout, outputs)
    steps = _step_instructions(proc.stdout.splitlines())
    return RunResult(out, insns, ticks, wall, machine, steps)
