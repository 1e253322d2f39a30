"""Schedules of the tile-op kernels of :mod:`..kernels`, written as rules.

Each rule says from an analysis of the PrimFunc (:mod:`.base`) whether it applies;
rules are tried in order and the first that applies schedules the kernel:

* :mod:`.cpu`: :data:`~.cpu.CPU_RULES` (``llvm``/``c`` targets) and
  :func:`~.cpu.parallelize_generic`, the CPU schedule of TVM's own functions;
* :mod:`.cuda`: :data:`~.cuda.CUDA_RULES`;
* :mod:`.mcu`: :data:`~.mcu.MCU_RULES` and :func:`~.mcu.schedule_mcu` (Cortex-M).

:func:`schedule_for` schedules one kernel for a TVM target; :func:`schedule_kernels`
does it for every kernel of a Relax module (a stage of :mod:`..pipelines`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.target import Target

from ..kernels import KERNEL_ATTR, kernel_kind
from .base import (
    KINDS,
    ScheduleRule,
    apply_first,
    is_kernel,
    is_scheduled,
    is_symbolic_move,
    mark_opaque,
)
from .cpu import CPU_RULES, host_target, parallelize_generic
from .cuda import CUDA_RULES, finish_cuda
from .mcu import MCU_RULES, inline_elementwise, schedule_mcu

__all__ = [
    "CPU_RULES",
    "CUDA_RULES",
    "KINDS",
    "MCU_RULES",
    "ScheduleRule",
    "host_target",
    "inline_elementwise",
    "is_kernel",
    "is_scheduled",
    "is_symbolic_move",
    "mark_opaque",
    "parallelize_generic",
    "rules_for",
    "schedule_for",
    "schedule_kernels",
    "schedule_mcu",
]


@dataclass(frozen=True)
class _TargetRules:
    rules: tuple[ScheduleRule, ...]
    finish: Callable[[tirx.PrimFunc], tirx.PrimFunc] = lambda func: func


_BY_TARGET_KIND = {
    "llvm": _TargetRules(CPU_RULES),
    "c": _TargetRules(CPU_RULES),
    "cuda": _TargetRules(CUDA_RULES, finish_cuda),
}


def rules_for(target: Target) -> tuple[ScheduleRule, ...]:
    """The kernel rules for a TVM target (ValueError for a target kind without any)."""
    return _target_rules(target).rules


def _target_rules(target: Target) -> _TargetRules:
    name = target.kind.name
    if name not in _BY_TARGET_KIND:
        raise ValueError(f"no tbn schedules for target kind {name!r}")
    return _BY_TARGET_KIND[name]


def schedule_for(func: tirx.PrimFunc, target: Target | str | dict) -> tirx.PrimFunc:
    """Schedule a kernel built by :mod:`..kernels` for ``target`` with the first rule of
    :func:`rules_for` that applies. Returns the scheduled PrimFunc (attributes kept);
    the input is not modified. ValueError for a function that is not one of our kernels
    (its ``tbn_kernel`` attribute is not one of :data:`KINDS`) or that no rule takes."""
    target = target if isinstance(target, Target) else Target(target)
    kind = kernel_kind(func)
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    chosen = _target_rules(target)
    scheduled = apply_first(func, target, chosen.rules)
    if scheduled is None:
        raise ValueError(f"no {target.kind.name} schedule rule applies to this {kind} kernel")
    return chosen.finish(scheduled)


def schedule_kernels(
    mod: tvm.IRModule, target: Target, skip_scheduled: bool = False
) -> tvm.IRModule:
    """A copy of ``mod`` whose tbn kernels are scheduled for ``target``, marked
    ``tirx.is_scheduled`` and opaque. ``skip_scheduled`` leaves already scheduled kernels
    (e.g. from a tuning database) alone. A kernel whose schedule fails is left to the
    default schedules (LLVM: the generic one; CUDA: DLight), with a warning."""
    mod = mark_opaque(mod)
    for gv, func in list(mod.functions.items()):
        if not is_kernel(func) or (skip_scheduled and is_scheduled(func)):
            continue
        try:
            func = schedule_for(func, target).with_attr("tirx.is_scheduled", True)
        except Exception as exc:  # keep the build going; the kernel is still exact
            warnings.warn(
                f"tbn kernel {gv.name_hint} ({func.attrs[KERNEL_ATTR]}): schedule failed for "
                f"{target.kind.name} ({type(exc).__name__}: {exc}); using the default schedule",
                RuntimeWarning,
                stacklevel=2,
            )
        mod[gv] = func
    return mod
