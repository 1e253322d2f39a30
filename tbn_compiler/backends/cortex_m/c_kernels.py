"""Lowered TIR kernels -> C: what each kernel needs (read from the TIR) and its C text.

Contract:

* :func:`c_kernels` takes the module of :func:`.lower.lower_kernels` (C name -> PrimFunc
  with one pointer parameter per buffer, inputs then outputs) and returns one
  :class:`CKernel` per function, in order. The facts the entry point needs come from the
  TIR, before code generation: the C type of each parameter (its pointer's dtype), the
  workspace it allocates (the ``TVMBackendAllocWorkspace`` calls ``LowerTVMBuiltin``
  made of intermediates over 1 KiB), and whether it can fail (an assert, or a call of
  :data:`..pipelines.INDEX_ERROR_FN`, which :func:`kernels_c_file` defines).
* Each kernel is ``int32_t <name>(float *a, uint32_t *b, ..., float *out)`` and returns 0,
  or -1 right after a failed check: TVM's C printer writes ``return -1;`` for a failed
  assert or workspace allocation, so the kernels return ``int32_t`` as it expects. The
  entry point tests ``tbn_kernel_error``, which both failure paths set, not the value.
* Non-finite float constants are written as calls of ``tbn_inff()`` / ``tbn_nanf()``
  (float64: ``tbn_inf()`` / ``tbn_nan()``; ``0 - tbn_inff()`` for minus infinity), which
  the support code defines: TVM's C printer writes ``inff`` / ``nanf``, which are not C,
  so these constants are replaced in the TIR before printing.
* :func:`kernels_c_file` joins the kernels with the support code (the error flag, the
  workspace allocator, the IEEE guard) into ``src/tbn_kernels.c`` and records the lines
  of each kernel. The text is deterministic (same module -> byte-identical text).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import tirx

from ..pipelines import INDEX_ERROR_FN

__all__ = [
    "C_TYPES",
    "WS_ALIGN",
    "CFile",
    "CKernel",
    "c_kernels",
    "c_type",
    "kernels_c_file",
]

WS_ALIGN = 8
"""Alignment (bytes) of every workspace block and arena buffer."""

C_TYPES = {  # tensor dtype -> C element type
    "float32": "float",
    "float64": "double",
    "int8": "int8_t",
    "uint8": "uint8_t",
    "int16": "int16_t",
    "uint16": "uint16_t",
    "int32": "int32_t",
    "uint32": "uint32_t",
    "int64": "int64_t",
    "uint64": "uint64_t",
    "bool": "bool",
}
_NONFINITE_CALLS = {  # dtype -> (infinity, NaN): functions of the support code
    "float32": ("tbn_inff", "tbn_nanf"),
    "float64": ("tbn_inf", "tbn_nan"),
}


def c_type(dtype: str) -> str:
    """The C type of a tensor element of ``dtype``; :class:`TypeError` if there is none."""
    ctype = C_TYPES.get(str(dtype))
    if ctype is None:
        raise TypeError(f"dtype {dtype} has no C type in the Cortex-M backend")
    return ctype


@dataclass(frozen=True)
class CKernel:
    """One kernel: C name, parameters (C pointer types and names, in call order), bytes of
    workspace it allocates (each block rounded up to :data:`WS_ALIGN`), whether it can set
    the error flag, and its C text (TVM's declaration and definition)."""

    name: str
    param_types: tuple[str, ...]
    param_names: tuple[str, ...]
    workspace_bytes: int
    fallible: bool
    code: str

    def prototype(self) -> str:
        """``int32_t <name>(<type> <param>, ...);``"""
        params = ", ".join(
            f"{t} {n}" for t, n in zip(self.param_types, self.param_names, strict=True)
        )
        return f"int32_t {self.name}({params});"


@dataclass(frozen=True)
class CFile:
    """A generated C file and the lines (1-based, first and last) that belong to each
    kernel (by C name) or program step (by index)."""

    text: str
    lines: dict[str | int, tuple[int, int]] = field(default_factory=dict)


class _LineWriter:
    """Builds a C file from chunks, remembering which lines each keyed chunk holds."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.next_line = 1
        self.lines: dict[str | int, tuple[int, int]] = {}

    def add(self, text: str, key: str | int | None = None) -> None:
        """Append ``text`` (whole lines, each ending in a newline)."""
        n = text.count("\n")
        if key is not None:
            self.lines[key] = (self.next_line, self.next_line + n - 1)
        self.chunks.append(text)
        self.next_line += n

    def file(self) -> CFile:
        return CFile("".join(self.chunks), dict(self.lines))


# --------------------------------------------------------------------------- facts


def _param_types(name: str, func: tirx.PrimFunc) -> tuple[str, ...]:
    types = []
    for param in func.params:
        dtype = str(param.ty.element_type.dtype)
        try:
            types.append(c_type(dtype) + "*")
        except TypeError as exc:
            raise TypeError(f"kernel {name}, parameter {param.name}: {exc}") from None
    return tuple(types)


def _param_names(func: tirx.PrimFunc) -> tuple[str, ...]:
    """Parameter names for the prototypes, made unique."""
    names: list[str] = []
    for param in func.params:
        base, n = param.name, 1
        while (candidate := base if n == 1 else f"{base}_{n}") in names:
            n += 1
        names.append(candidate)
    return tuple(names)


def _calls(func: tirx.PrimFunc) -> list[tvm.ir.Call]:
    found: list[tvm.ir.Call] = []
    tvm_ffi.structural_walk(func.body, [(tvm.ir.Call, found.append)])
    return found


def _has_assert(func: tirx.PrimFunc) -> bool:
    found: list[tirx.AssertStmt] = []
    tvm_ffi.structural_walk(func.body, [(tirx.AssertStmt, found.append)])
    return bool(found)


def _op_name(call: tvm.ir.Call) -> str:
    return str(getattr(call.op, "name", ""))


def _workspace_bytes(calls: list[tvm.ir.Call]) -> int:
    """Sum of the (aligned) blocks the kernel takes from ``TVMBackendAllocWorkspace``."""
    total = 0
    for call in calls:
        if _op_name(call) == "tirx.TVMBackendAllocWorkspace":
            nbytes = int(call.args[2].value)
            total += (nbytes + WS_ALIGN - 1) // WS_ALIGN * WS_ALIGN
    return total


def _calls_index_error(calls: list[tvm.ir.Call]) -> bool:
    return any(
        _op_name(c) == "tirx.call_extern" and str(c.args[0].value) == INDEX_ERROR_FN for c in calls
    )


# --------------------------------------------------------------------------- C text


def _nonfinite_call(imm: tirx.FloatImm) -> tirx.PrimExpr:
    """``imm`` as a C call when it is infinite or NaN, else ``imm``."""
    value = float(imm.value)
    if math.isfinite(value):
        return imm
    dtype = str(imm.ty)
    if dtype not in _NONFINITE_CALLS:
        raise TypeError(f"a non-finite {dtype} constant has no C spelling here")
    inf, nan = _NONFINITE_CALLS[dtype]
    call = tirx.call_pure_extern(dtype, inf if math.isinf(value) else nan)
    return call if math.copysign(1.0, value) > 0 else tirx.FloatImm(dtype, 0.0) - call


def _for_c(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` returning ``int32_t`` 0 at its end (see module doc), with its non-finite
    constants as C calls."""
    func = tvm_ffi.structural_map(func, [(tirx.FloatImm, _nonfinite_call)])
    body = tirx.SeqStmt([func.body, tirx.Return(tirx.IntImm("int32", 0))])
    return tirx.PrimFunc(func.params, body, ret_type=tvm.ir.PrimType("int32"), attrs=func.attrs)


_TVM_PREAMBLE = (
    "// tvm target:",
    "#define TVM_EXPORTS",
    "#include ",
    "void* __tvm_ffi__library_ctx = NULL;",
)


def _without_tvm_preamble(src: str) -> str:
    """The C text of ``target.build.c`` without its leading preamble.

    TVM's C code generator always starts its output with a target comment, the TVM
    runtime headers and a library context variable, which a program without the TVM
    runtime cannot compile, and it has no option to leave them out. This is the one
    place where generated C text is edited: the leading lines that start with one of
    :data:`_TVM_PREAMBLE` are dropped (``kernels_c_file`` includes ``math.h`` and
    ``stdbool.h`` itself). A runtime reference left anywhere else is an error."""
    lines = src.splitlines(keepends=True)
    start = 0
    while start < len(lines) and (
        not lines[start].strip() or lines[start].startswith(_TVM_PREAMBLE)
    ):
        start += 1
    code = "".join(lines[start:])
    for leftover in ('#include "tvm/', "__tvm_ffi__library_ctx"):
        if leftover in code:
            raise RuntimeError(
                f"TVM's C output changed: {leftover!r} after its preamble; the Cortex-M "
                "backend cannot build it without the TVM runtime"
            )
    return code


def _kernel_code(name: str, func: tirx.PrimFunc) -> str:
    """TVM's C text of one kernel (declaration and definition), for the C target the
    function is bound to."""
    target = func.attrs["target"]
    built = tvm.get_global_func("target.build.c")(tvm.IRModule({name: _for_c(func)}), target)
    return _without_tvm_preamble(str(built.inspect_source())).strip("\n") + "\n"


def c_kernels(mod: tvm.IRModule) -> dict[str, CKernel]:
    """C name -> :class:`CKernel` for every function of ``mod`` (see module doc), in the
    module's order."""
    kernels: dict[str, CKernel] = {}
    for gv, func in mod.functions.items():
        name = gv.name_hint
        calls = _calls(func)
        kernels[name] = CKernel(
            name=name,
            param_types=_param_types(name, func),
            param_names=_param_names(func),
            workspace_bytes=_workspace_bytes(calls),
            fallible=_has_assert(func) or _calls_index_error(calls),
            code=_kernel_code(name, func),
        )
    return kernels


_HEAD = """\
/* Generated by tbn_compiler: model kernels, plain C pointer convention. */
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <math.h>
#include "tbn_kernels.h"

/* NaN must propagate as in PyTorch (x != x tests, compare-and-select clamps). */
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "tbn_model needs IEEE float semantics: build it without -ffast-math / -ffinite-math-only"
#endif

"""

_SUPPORT = """\
/* Kernel errors: a kernel that meets invalid data (an index out of range, a failed
 * check) sets tbn_kernel_error and returns early; tbn_model_run tests the flag. */
int tbn_kernel_error;
const char *tbn_kernel_error_text;
long long tbn_kernel_error_detail[2];

__attribute__((unused)) static int32_t INDEX_ERROR_FN(int64_t index, int64_t bound) {
  if (!tbn_kernel_error) {
    tbn_kernel_error = 1;
    tbn_kernel_error_text = "index out of range";
    tbn_kernel_error_detail[0] = index;
    tbn_kernel_error_detail[1] = bound;
  }
  return 0;
}

__attribute__((unused)) static void TVMFFIErrorSetRaisedFromCStrParts(const char *kind,
                                                                      const char **parts,
                                                                      int32_t n) {
  (void)kind;
  if (!tbn_kernel_error) {
    tbn_kernel_error = 1;
    tbn_kernel_error_text = n > 0 ? parts[0] : "check failed";
    tbn_kernel_error_detail[0] = tbn_kernel_error_detail[1] = -1;
  }
}

/* Non-finite constants of the kernels (C has no literal for them). */
__attribute__((unused)) static inline float tbn_inff(void) { return __builtin_inff(); }
__attribute__((unused)) static inline float tbn_nanf(void) { return __builtin_nanf(""); }
__attribute__((unused)) static inline double tbn_inf(void) { return __builtin_inf(); }
__attribute__((unused)) static inline double tbn_nan(void) { return __builtin_nan(""); }

/* Workspace for kernel intermediates over 1 KiB: a LIFO bump allocator inside the
 * static arena (tbn_model.c points tbn_workspace_ptr at the kernel's block). */
uint8_t *tbn_workspace_ptr;

__attribute__((unused)) static void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes,
                                                             int dtype_code, int dtype_bits) {
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  uint8_t *p = tbn_workspace_ptr;
  tbn_workspace_ptr += (nbytes + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
  return p;
}

__attribute__((unused)) static int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  (void)device_type; (void)device_id;
  tbn_workspace_ptr = (uint8_t *)ptr;
  return 0;
}
""".replace("INDEX_ERROR_FN", INDEX_ERROR_FN).replace("WS_ALIGN", str(WS_ALIGN))


def kernels_c_file(kernels: Iterable[CKernel]) -> CFile:
    """``src/tbn_kernels.c``: the support code, then every kernel; ``lines`` maps each
    kernel's C name to the lines of its declaration and definition."""
    out = _LineWriter()
    out.add(_HEAD + _SUPPORT + "\n")
    for i, kernel in enumerate(kernels):
        out.add("\n" if i else "")
        out.add(kernel.code, key=kernel.name)
    return out.file()
