"""Cortex-M board presets (plain data; registered on import).

Each preset is a :class:`TargetSpec` of kind ``"cortex-m"`` whose :class:`BoardInfo` holds
the CPU, the float ABI / FPU flags, flash and RAM sizes and, for boards QEMU emulates,
the QEMU machine. ``BoardInfo.extra`` carries:

* ``flash_origin`` / ``ram_origin``: memory map used by the firmware linker script;
* ``timer``: ``"cmsdk"`` when the board has the CMSDK timer at 0x40000000 (instruction
  counts under ``-icount``), else absent;
* ``fpu_enable``: True when the startup code must enable the FPU (CPACR).

Emulated: ``mps2-an386`` (M4F), ``mps2-an500`` (M7), ``mps2-an385`` and ``lm3s6965evb``
(M3, soft float). Build only: ``stm32f746g-disco``, ``nucleo-f446re``,
``arduino-nano-33-ble``, ``rp2040``. Library only (no board, no size limits):
``cortex-m0plus``, ``cortex-m3``, ``cortex-m4``, ``cortex-m7``.
"""

from __future__ import annotations

from typing import Any

from .registry import BoardInfo, TargetSpec, register_target

__all__ = ["BOARDS", "board_spec"]

_M4F = ("-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
_M7D = ("-mfloat-abi=hard", "-mfpu=fpv5-d16")
_M7S = ("-mfloat-abi=hard", "-mfpu=fpv5-sp-d16")
_SOFT = ("-mfloat-abi=soft",)


def _board(
    cpu: str,
    fpu: tuple[str, ...],
    flash_kib: int | None,
    ram_kib: int | None,
    qemu: str | None = None,
    **extra: Any,
) -> BoardInfo:
    extra.setdefault("flash_origin", 0x0)
    extra.setdefault("ram_origin", 0x20000000)
    extra.setdefault("fpu_enable", fpu != _SOFT and bool(fpu))
    return BoardInfo(cpu, fpu, flash_kib, ram_kib, qemu, extra)


BOARDS: dict[str, tuple[BoardInfo, str]] = {
    "mps2-an386": (
        _board("cortex-m4", _M4F, 1024, 192, "mps2-an386", timer="cmsdk"),
        "Arm MPS2 AN386 (Cortex-M4F), emulated by QEMU",
    ),
    "mps2-an500": (
        _board("cortex-m7", _M7D, 1024, 192, "mps2-an500", timer="cmsdk"),
        "Arm MPS2 AN500 (Cortex-M7, FPv5), emulated by QEMU",
    ),
    "mps2-an385": (
        _board("cortex-m3", _SOFT, 1024, 192, "mps2-an385", timer="cmsdk"),
        "Arm MPS2 AN385 (Cortex-M3, soft float), emulated by QEMU",
    ),
    "lm3s6965evb": (
        _board("cortex-m3", _SOFT, 256, 64, "lm3s6965evb"),
        "TI Stellaris LM3S6965 EVB (Cortex-M3, soft float), emulated by QEMU (no timer)",
    ),
    "stm32f746g-disco": (
        _board("cortex-m7", _M7S, 1024, 320, flash_origin=0x08000000),
        "STM32F746G-DISCO (Cortex-M7F), build only",
    ),
    "nucleo-f446re": (
        _board("cortex-m4", _M4F, 512, 128, flash_origin=0x08000000),
        "NUCLEO-F446RE (Cortex-M4F), build only",
    ),
    "arduino-nano-33-ble": (
        _board("cortex-m4", _M4F, 1024, 256),
        "Arduino Nano 33 BLE / nRF52840 (Cortex-M4F), build only",
    ),
    "rp2040": (
        _board("cortex-m0plus", _SOFT, 2048, 264, flash_origin=0x10000000),
        "Raspberry Pi RP2040 (Cortex-M0+, no FPU, external flash), build only",
    ),
    "cortex-m0plus": (_board("cortex-m0plus", _SOFT, None, None), "Cortex-M0+ library"),
    "cortex-m3": (_board("cortex-m3", _SOFT, None, None), "Cortex-M3 library"),
    "cortex-m4": (_board("cortex-m4", _M4F, None, None), "Cortex-M4F library"),
    "cortex-m7": (_board("cortex-m7", _M7D, None, None), "Cortex-M7 library"),
}
"""Preset name -> (board facts, description)."""

_ALIASES: dict[str, tuple[str, ...]] = {
    "mps2-an385": ("qemu-m3",),
    "mps2-an386": ("qemu-m4",),
    "mps2-an500": ("qemu-m7",),
    "stm32f746g-disco": ("STM32F746G-DISCO", "nucleo-f746zg"),
    "nucleo-f446re": ("NUCLEO-F446RE",),
    "arduino-nano-33-ble": ("nrf52840", "Arduino Nano 33 BLE"),
    "rp2040": ("RP2040", "raspberry-pi-pico"),
}


def board_spec(name: str) -> TargetSpec:
    """The :class:`TargetSpec` of preset ``name`` (kind ``"cortex-m"``; TVM target: C)."""
    board, description = BOARDS[name]
    tvm_target = {"kind": "c", "mcpu": board.cpu}
    return TargetSpec(name, "cortex-m", tvm_target, description=description, board=board)


def _register_all() -> None:
    for name in BOARDS:
        register_target(name, lambda n=name: board_spec(n), aliases=_ALIASES.get(name, ()))


_register_all()
