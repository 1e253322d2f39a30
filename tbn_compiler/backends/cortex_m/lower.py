"""Relax -> TIR PrimFuncs -> ONE C file of kernels with a plain pointer convention.

Contract:

* :func:`legalize` turns an imported Relax module (tbn kernels + TVM frontend ops) into a
  module whose ``main`` is a flat sequence of ``call_tir`` bindings on tensors and
  constants: BatchNorm is decomposed for inference, every other op is legalized to TIR,
  constant subgraphs are folded, and (optionally) elementwise chains are fused into the
  kernels around them (our tile kernels stay opaque, never fused).
* :func:`kernels_c_source` lowers the called PrimFuncs to C. Each kernel becomes
  ``void <name>(float *a, uint32_t *b, ..., float *out)``: one pointer per buffer, inputs
  then outputs, no packed API, no TVM runtime. Intermediates of more than 1 KiB go through
  ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace``, which the file defines as
  a LIFO bump allocator over ``tbn_workspace_ptr`` (the entry point points it into the
  static arena before each call); :func:`workspace_bytes` says how much each kernel needs.
  The source is deterministic (same module -> byte-identical text).
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, s_tir, tirx

from ..build import mark_opaque

__all__ = ["legalize", "lower_kernels", "kernels_c_source", "workspace_bytes", "WS_ALIGN"]

WS_ALIGN = 8
"""Alignment (bytes) of every workspace block and arena buffer."""

_C_TARGET = {"kind": "c"}


def legalize(mod: tvm.IRModule, fuse: bool = True) -> tvm.IRModule:
    """Relax module with only ``call_tir`` on tensors/constants in ``main`` (see module doc)."""
    mod = mark_opaque(mod)
    seq = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]
    if fuse:
        seq += [relax.transform.FuseOps(), relax.transform.FuseTIR()]
    seq += [relax.transform.DeadCodeElimination()]
    with tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(seq)(mod)


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
    defs = list(_DEF.finditer(kernels_c))
    result = {}
    for i, m in enumerate(defs):
        end = defs[i + 1].start() if i + 1 < len(defs) else len(kernels_c)
        sizes = [int(n) for n in _ALLOC.findall(kernels_c, m.end(), end)]
        result[m.group(1)] = sum((n + WS_ALIGN - 1) // WS_ALIGN * WS_ALIGN for n in sizes)
    return result


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
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        mod = tvm.transform.Sequential(_tir_passes())(mod)
        mod = tvm.IRModule({gv: _to_plain_pointers(f) for gv, f in mod.functions.items()})
        mod = tirx.transform.LowerTVMBuiltin()(mod)
        mod = tirx.transform.LowerIntrin()(mod)
    return mod


_SHIM = """\
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


def kernels_c_source(mod: tvm.IRModule) -> str:
    """C text of all kernels of ``mod`` (from :func:`lower_kernels`), standalone."""
    target = tvm.target.Target(_C_TARGET)
    built = tvm.get_global_func("target.build.c")(mod, target)
    src = str(built.inspect_source())
    src = _DROP.sub("", src)
    src = re.sub(r"^// tvm target:.*\n", "", src, flags=re.MULTILINE)
    # Every kernel is `void`; the error paths of the workspace calls return nothing.
    src = src.replace("return -1;", "return;")
    head = (
        "/* Generated by tbn_compiler: model kernels, plain C pointer convention. */\n"
        "#include <stdint.h>\n#include <stdbool.h>\n#include <math.h>\n"
        '#include "tbn_kernels.h"\n\n' + _SHIM + "\n"
    )
    return head + src.lstrip()
