"""TIR PrimFuncs -> ONE C file of kernels with a plain pointer convention.

Contract:

* The input is a module from :func:`..pipelines.cortex_m`: its ``main`` is a flat
  sequence of ``call_tir`` bindings on tensors and constants, every PrimFunc scheduled
  for the MCU.
* :func:`kernels_c_source` lowers the called PrimFuncs to C. Each kernel becomes
  ``void <name>(float *a, uint32_t *b, ..., float *out)``: one pointer per buffer, inputs
  then outputs, no packed API, no TVM runtime. Intermediates of more than 1 KiB go through
  ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace``, which the file defines as
  a LIFO bump allocator over ``tbn_workspace_ptr`` (the entry point points it into the
  static arena before each call); :func:`workspace_bytes` says how much each kernel needs.
  The source is deterministic (same module -> byte-identical text).
* Kernels can fail on bad data: a TIR assert (kept, not stripped) and the bounds check of
  :func:`..pipelines.checked_take` set ``tbn_kernel_error`` (with
  ``tbn_kernel_error_text`` and, for an index, ``tbn_kernel_error_detail`` = {index,
  bound}) and the kernel returns early; the entry point tests the flag after each kernel
  for which :func:`fallible_kernels` says so.
* ``take`` with TVM's unchecked ("fast") mode, which reads out of bounds on a bad index
  (e.g. an embedding id computed in the graph), is legalized by
  :func:`..pipelines.checked_take`: the read is clamped into the table and an id outside
  ``[0, n)`` raises the error flag.
* The file refuses to compile under ``-ffast-math`` / ``-ffinite-math-only`` (``#error``):
  they break the NaN checks and compare-and-select clamps that give torch's NaN results.
* Non-finite float constants are written as ``__builtin_inff()`` / ``__builtin_nanf("")``
  (TVM's C printer writes ``inff`` / ``nanf``, which are not C).
"""

from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx

__all__ = [
    "lower_kernels",
    "kernels_c_source",
    "workspace_bytes",
    "fallible_kernels",
    "WS_ALIGN",
]

WS_ALIGN = 8
"""Alignment (bytes) of every workspace block and arena buffer."""

_C_TARGET = {"kind": "c"}


def _tir_passes() -> list[tvm.transform.Pass]:
    """The s_tir default lowering minus GPU passes, vectorization and the packed API."""
    return [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(False),
        tirx.transform.StorageRewrite(),
        s_tir.transform.HoistIfThenElse(),
        tirx.transform.UnrollLoop(),
        s_tir.transform.RenormalizeSplitPattern(),
        tirx.transform.StmtSimplify(),
        tirx.transform.RemoveNoOp(),
        s_tir.transform.RewriteUnsafeSelect(),
        tirx.transform.CommonSubexprElim(),
    ]


def _to_plain_pointers(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Buffer parameters -> typed pointer parameters bound by DeclBuffer; host device attrs."""
    buffers = list(func.params)
    ptrs = [tirx.Var(b.name, tvm.ir.PointerType(tvm.ir.PrimType(b.dtype))) for b in buffers]
    decls = [tirx.DeclBuffer(b, data=v) for b, v in zip(buffers, ptrs, strict=True)]
    body = tirx.AttrStmt(tvm.runtime.convert("default"), "device_id", 0, func.body)
    body = tirx.AttrStmt(tvm.runtime.convert("default"), "device_type", 1, body)
    return tirx.PrimFunc(ptrs, tirx.SeqStmt([*decls, body]), attrs=func.attrs)


_DEF = re.compile(r"^TVM_DLL void (\w+)\(.*\) \{$", re.MULTILINE)
_ALLOC = re.compile(r"TVMBackendAllocWorkspace\(\d+, \d+, \(uint64_t\)(\d+)ULL")


def workspace_bytes(kernels_c: str) -> dict[str, int]:
    """Kernel name -> sum of its (aligned) workspace allocations, from the C text."""
    return {
        name: sum((int(n) + WS_ALIGN - 1) // WS_ALIGN * WS_ALIGN for n in _ALLOC.findall(body))
        for name, body in _function_bodies(kernels_c).items()
    }


def lower_kernels(funcs: dict[str, tirx.PrimFunc]) -> tvm.IRModule:
    """Lower PrimFuncs (C name -> func, in emission order) to host C-ready TIR."""
    target = tvm.target.Target(_C_TARGET)
    mod = tvm.IRModule(
        {
            name: f.with_attr("global_symbol", name).without_attr("tirx.is_entry_func")
            for name, f in funcs.items()
        }
    )
    mod = tirx.transform.BindTarget(target)(mod)
    with tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(_tir_passes())(mod)
        mod = tvm.IRModule({gv: _to_plain_pointers(f) for gv, f in mod.functions.items()})
        mod = tirx.transform.LowerTVMBuiltin()(mod)
        mod = tirx.transform.LowerIntrin()(mod)
    return mod


_IEEE_GUARD = """\
/* NaN must propagate as in PyTorch (x != x tests, compare-and-select clamps). */
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "tbn_model needs IEEE float semantics: build it without -ffast-math / -ffinite-math-only"
#endif

"""

_SHIM = """\
/* Kernel errors: a kernel that meets invalid data (an index out of range, a failed
 * check) sets tbn_kernel_error and returns early; tbn_model_run tests the flag. */
int tbn_kernel_error;
const char *tbn_kernel_error_text;
long long tbn_kernel_error_detail[2];

__attribute__((unused)) static int32_t tbn_index_error(int64_t index, int64_t bound) {
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

/* Workspace for kernel intermediates over 1 KiB: a LIFO bump allocator inside the
 * static arena (tbn_model.c points tbn_workspace_ptr at the kernel's block). */
uint8_t *tbn_workspace_ptr;

__attribute__((unused)) static void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes,
                                                             int dtype_code, int dtype_bits) {
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  uint8_t *p = tbn_workspace_ptr;
  tbn_workspace_ptr += (nbytes + ALIGN - 1) / ALIGN * ALIGN;
  return p;
}

__attribute__((unused)) static int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  (void)device_type; (void)device_id;
  tbn_workspace_ptr = (uint8_t *)ptr;
  return 0;
}
""".replace("ALIGN", str(WS_ALIGN))

_DROP = re.compile(
    r'^(#define TVM_EXPORTS|#include "tvm/.*"|void\* __tvm_ffi__library_ctx = NULL;)\n',
    re.MULTILINE,
)


# TVM prints a non-finite float32 as inff / nanf (float64: inf / nan), optionally negated;
# string literals (assert messages) are matched first and kept as they are.
_NONFINITE = re.compile(r'("(?:[^"\\\n]|\\.)*")|(?<![\w.])(inf|nan)(f?)(?![\w.])')
_C_NONFINITE = {
    "inf": "__builtin_inf()",
    "inff": "__builtin_inff()",
    "nan": '__builtin_nan("")',
    "nanf": '__builtin_nanf("")',
}


def _c_nonfinite(match: re.Match[str]) -> str:
    string, what, suffix = match.groups()
    return string if string is not None else _C_NONFINITE[what + suffix]


def _function_bodies(kernels_c: str) -> dict[str, str]:
    """Kernel name -> its C text (definition up to the next definition)."""
    defs = list(_DEF.finditer(kernels_c))
    return {
        m.group(1): kernels_c[m.end() : defs[i + 1].start() if i + 1 < len(defs) else None]
        for i, m in enumerate(defs)
    }


def fallible_kernels(kernels_c: str) -> set[str]:
    """Names of the kernels that can set ``tbn_kernel_error`` (see module doc)."""
    signals = ("tbn_index_error(", "TVMFFIErrorSetRaisedFromCStrParts(")
    return {
        name
        for name, body in _function_bodies(kernels_c).items()
        if any(s in body for s in signals)
    }


def kernels_c_source(mod: tvm.IRModule) -> str:
    """C text of all kernels of ``mod`` (from :func:`lower_kernels`), standalone."""
    target = tvm.target.Target(_C_TARGET)
    built = tvm.get_global_func("target.build.c")(mod, target)
    src = str(built.inspect_source())
    src = _DROP.sub("", src)
    src = re.sub(r"^// tvm target:.*\n", "", src, flags=re.MULTILINE)
    # Every kernel is `void`; the error paths of the workspace calls return nothing.
    src = src.replace("return -1;", "return;")
    src = _NONFINITE.sub(_c_nonfinite, src)
    head = (
        "/* Generated by tbn_compiler: model kernels, plain C pointer convention. */\n"
        "#include <stdint.h>\n#include <stdbool.h>\n#include <math.h>\n"
        '#include "tbn_kernels.h"\n\n' + _IEEE_GUARD + _SHIM + "\n"
    )
    return head + src.lstrip()
