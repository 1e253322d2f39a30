"""Scheduled TIR PrimFuncs -> TIR ready for C, with a plain pointer convention.

Contract:

* The input is the kernels called by a module from :func:`..pipelines.cortex_m` (whose
  ``main`` is a flat sequence of ``call_tir`` bindings on tensors and constants, every
  PrimFunc scheduled for the MCU).
* :func:`lower_kernels` lowers them to host C-ready TIR: one pointer parameter per buffer,
  inputs then outputs, no packed API, no TVM runtime; intermediates of more than 1 KiB
  become ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` calls, asserts are
  kept. :mod:`.c_kernels` reads the facts the entry point needs from this TIR and prints
  the C.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

__all__ = ["lower_kernels"]

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
