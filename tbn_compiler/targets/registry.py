"""Target registry: names -> :class:`TargetSpec` (plain data, no TVM import).

A :class:`TargetSpec` holds the dict that ``tvm.target.Target`` accepts (0.27 rejects flag
strings such as ``"cuda -arch=sm_90"``); backends build the TVM object lazily. Known names:

* ``"llvm"`` (aliases ``"cpu"``, ``"host"``): the host CPU, the default; code is tuned
  for this machine's CPU (``mcpu``). ``"llvm-generic"``: portable baseline code.
* ``"cuda"``: the local GPU's architecture when a GPU is visible (torch.cuda or
  ``nvidia-smi``), else ``sm_90``. ``"cuda:sm_80"`` style names pick the architecture.
* any name added with :func:`register_target` (Cortex-M board presets carry a
  :class:`BoardInfo`).

A ``tvm.target.Target`` object is passed through (recognised without importing TVM).
"""

from __future__ import annotations

import difflib
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = [
    "BoardInfo",
    "TargetSpec",
    "DEFAULT_CUDA_ARCH",
    "register_target",
    "known_targets",
    "resolve_target",
    "local_cuda_arch",
    "host_arch",
    "llvm_spec",
    "llvm_generic_spec",
    "cuda_spec",
]

DEFAULT_CUDA_ARCH = "sm_90"
_CUDA_NAME = re.compile(r"^cuda:(sm_\d+[a-z]?)$")


@dataclass(frozen=True)
class BoardInfo:
    """Facts about a microcontroller board (for Cortex-M presets)."""

    cpu: str  # e.g. "cortex-m4"
    fpu_flags: tuple[str, ...] = ()  # e.g. ("-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
    flash_kib: int | None = None
    ram_kib: int | None = None
    qemu_machine: str | None = None  # e.g. "mps2-an386"; None: build only
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "fpu_flags": list(self.fpu_flags),
            "flash_kib": self.flash_kib,
            "ram_kib": self.ram_kib,
            "qemu_machine": self.qemu_machine,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BoardInfo:
        return cls(
            cpu=data["cpu"],
            fpu_flags=tuple(data.get("fpu_flags", ())),
            flash_kib=data.get("flash_kib"),
            ram_kib=data.get("ram_kib"),
            qemu_machine=data.get("qemu_machine"),
            extra=dict(data.get("extra", {})),
        )


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target.

    name: canonical name ("llvm", "cuda:sm_90", a board name, or "tvm:<kind>").
    kind: "llvm", "cuda", "c" or "cortex-m" (decides the backend).
    tvm_target: dict for ``tvm.target.Target(tvm_target, host=tvm_host)``.
    tvm_host: host dict for device targets, else None.
    board: board facts for microcontroller presets, else None.
    tvm_object: a user-given ``tvm.target.Target`` (kept as is), else None.
    """

    name: str
    kind: str
    tvm_target: Mapping[str, Any]
    tvm_host: Mapping[str, Any] | None = None
    description: str = ""
    board: BoardInfo | None = None
    tvm_object: Any = field(default=None, compare=False, repr=False)

    @property
    def arch(self) -> str | None:
        """GPU architecture (``"sm_90"``) for CUDA targets, else None."""
        return self.tvm_target.get("arch") if self.kind == "cuda" else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the TVM object, if any, is represented by its dict)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "tvm_target": _jsonable(self.tvm_target),
            "tvm_host": _jsonable(self.tvm_host) if self.tvm_host is not None else None,
            "description": self.description,
            "board": self.board.to_dict() if self.board else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetSpec:
        board = data.get("board")
        return cls(
            name=data["name"],
            kind=data["kind"],
            tvm_target=dict(data["tvm_target"]),
            tvm_host=dict(data["tvm_host"]) if data.get("tvm_host") else None,
            description=data.get("description", ""),
            board=BoardInfo.from_dict(board) if board else None,
        )


_Factory = Callable[[], TargetSpec]
_REGISTRY: dict[str, _Factory] = {}
_ALIASES: dict[str, str] = {}


def register_target(
    name: str, factory: _Factory | TargetSpec, aliases: tuple[str, ...] = ()
) -> None:
    """Add a named target (a spec, or a zero-argument factory called on each lookup)."""
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"target {name!r} is already registered")
    _REGISTRY[name] = factory if callable(factory) else (lambda spec=factory: spec)
    for alias in aliases:
        _ALIASES[alias] = name


def known_targets() -> list[str]:
    """Registered names and aliases, plus the ``cuda:sm_XX`` pattern."""
    return sorted(_REGISTRY) + sorted(_ALIASES) + ["cuda:sm_XX (e.g. cuda:sm_80)"]


def resolve_target(target: Any = None) -> TargetSpec:
    """A :class:`TargetSpec` for a name, a spec, or a ``tvm.target.Target`` (None: "llvm").

    Raises ValueError for unknown names (listing the known ones), TypeError for other types."""
    if target is None:
        target = "llvm"
    if isinstance(target, TargetSpec):
        return target
    if _is_tvm_target(target):
        return _from_tvm_object(target)
    if not isinstance(target, str):
        raise TypeError(
            f"target must be a name, a TargetSpec or a tvm.target.Target, got {type(target).__name__}"
        )
    name = _ALIASES.get(target, target)
    if name in _REGISTRY:
        return _REGISTRY[name]()
    match = _CUDA_NAME.match(name)
    if match:
        return cuda_spec(match.group(1))
    raise ValueError(
        f"unknown target {target!r}{_did_you_mean(target)}; known targets: {', '.join(known_targets())}"
    )


def closest_targets(name: str, n: int = 3) -> list[str]:
    """The registered names and aliases closest to ``name`` (case-insensitive), best first."""
    by_lower = {k.lower(): k for k in [*_REGISTRY, *_ALIASES]}
    return [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=n)]


def _did_you_mean(name: str) -> str:
    """ " (did you mean 'a' or 'b'?)" for the closest known names, or ""."""
    close = closest_targets(name)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


# --------------------------------------------------------------------------- builtin targets


def llvm_spec() -> TargetSpec:
    """The host CPU through LLVM; backends add this machine's ``mcpu`` (native code)."""
    return TargetSpec("llvm", "llvm", {"kind": "llvm"}, description="host CPU (LLVM)")


def llvm_generic_spec() -> TargetSpec:
    """Portable host-architecture code (no ``mcpu``: baseline instruction set)."""
    return TargetSpec(
        "llvm-generic", "llvm", {"kind": "llvm"}, description="host architecture, baseline CPU"
    )


def cuda_spec(arch: str | None = None) -> TargetSpec:
    """NVIDIA GPU of architecture ``arch`` (default: the local GPU's, else sm_90)."""
    arch = arch or local_cuda_arch() or DEFAULT_CUDA_ARCH
    return TargetSpec(
        f"cuda:{arch}",
        "cuda",
        {"kind": "cuda", "arch": arch},
        tvm_host={"kind": "llvm"},
        description=f"NVIDIA GPU ({arch})",
    )


register_target("llvm", llvm_spec, aliases=("cpu", "host"))
register_target("llvm-generic", llvm_generic_spec)
register_target("cuda", cuda_spec, aliases=("gpu",))


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=1)
def local_cuda_arch() -> str | None:
    """``"sm_XY"`` of the first visible CUDA GPU, or None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"sm_{major}{minor}"
    except Exception:  # a broken CUDA setup counts as "no GPU"
        pass
    return _nvidia_smi_arch()


def _nvidia_smi_arch() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0].strip() if out.strip() else ""
    match = re.match(r"^(\d+)\.(\d+)$", first)
    return f"sm_{match.group(1)}{match.group(2)}" if match else None


def host_arch() -> str:
    """Normalised machine architecture of this host (``"x86_64"``, ``"aarch64"``, ...)."""
    return norm_arch(platform.machine())


def norm_arch(arch: str) -> str:
    """One name per CPU architecture (``amd64`` -> ``x86_64``, ``arm64`` -> ``aarch64``)."""
    arch = arch.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def _is_tvm_target(obj: Any) -> bool:
    return (
        type(obj).__module__.startswith("tvm") and hasattr(obj, "export") and hasattr(obj, "kind")
    )


def _from_tvm_object(target: Any) -> TargetSpec:
    exported = dict(target.export())
    host = exported.pop("host", None)
    kind = str(target.kind.name)
    return TargetSpec(
        name=f"tvm:{kind}",
        kind=kind,
        tvm_target=_jsonable(exported),
        tvm_host=_jsonable(host) if host is not None else None,
        description=f"user-given TVM target {target}",
        tvm_object=target,
    )


def _jsonable(value: Any) -> Any:
    """Convert TVM export output (tuples, TVM strings/ints, nested dicts) to plain JSON data."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "value") and isinstance(value.value, (int, float)):
        return value.value
    return str(value)
