"""The Arm cross toolchain: presence checks, ``make`` in an exported project, section sizes.

* :func:`require_toolchain` raises :class:`ToolchainError` naming the Debian packages when
  ``arm-none-eabi-gcc`` / newlib (``librdimon``) / ``make`` (and, when asked,
  ``qemu-system-arm``) are missing; :func:`has_toolchain` says the same as a bool.
* :func:`run_make` runs the project's own ``Makefile``; a failed build is a
  :class:`BuildError` holding the compiler log.
* :func:`section_sizes` sums ``arm-none-eabi-size -A`` sections of object files;
  :func:`firmware_sizes` reads text / data / bss of a linked image;
  :func:`stack_frames` reads the frames gcc's ``-fstack-usage`` wrote.

Running a firmware image under QEMU is :mod:`.qemu`.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "DEBIAN_PACKAGES",
    "BuildError",
    "ToolchainError",
    "firmware_sizes",
    "has_toolchain",
    "require_toolchain",
    "run_make",
    "section_sizes",
    "stack_frames",
]

DEBIAN_PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"


class ToolchainError(RuntimeError):
    """The Arm cross toolchain or QEMU is missing."""


class BuildError(RuntimeError):
    """Compiling or linking the generated C project failed."""


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


def run_make(directory: Path, targets: tuple[str, ...] = ("lib",), jobs: int = 1) -> None:
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


def stack_frames(su_files: list[Path]) -> dict[str, int | None]:
    """Function name -> stack frame in bytes from gcc ``.su`` files (``-fstack-usage``);
    None for a frame gcc could not bound (``dynamic``; ``dynamic,bounded`` keeps its bound)."""
    frames: dict[str, int | None] = {}
    for path in su_files:
        for line in Path(path).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            name = parts[0].rsplit(":", 1)[-1]
            frames[name] = None if parts[2].strip() == "dynamic" else int(parts[1])
    return frames
