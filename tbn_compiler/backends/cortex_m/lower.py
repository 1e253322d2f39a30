"""Scheduled TIR PrimFuncs -> TIR ready for C, with a plain pointer convention.

Contract:

* The input is the kernels called by a module from :func:`..pipelines.cortex_m` (whose
  ``main`` is a flat sequence of ``call_tir`` bindings on tensors and constants, every
  PrimFunc scheduled for the MCU).
* :func:`lower_kernels` lowers them to host C-ready TIR: one pointer parameter per buffer,
  inputs then outputs, no packed API, no TVM runtime; intermediates of more than 1 KiB
  become ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` calls (TVM's rule), and
  so do the lookup tables of :mod:`..lut_kernels` kernels whatever their size (buffer
  ``table``): they live in the static arena the entry point plans (reported, and sharing
  the room other steps' buffers leave free) rather than on the stack. Other small
  intermediates stay local arrays: the C compiler knows they alias nothing and keeps
  accumulators in registers. Asserts are kept. :mod:`.c_kernels` reads the facts the
  entry point needs from this TIR and prints the C.
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from ..lut_kernels import lut_chunking

__all__ = ["ARENA_BUFFERS", "lower_kernels"]

ARENA_BUFFERS = {"table"}
"""Intermediates of LUT kernels taken from the arena whatever their size (read-only after
they are built, so a pointer that may alias costs the lookups nothing)."""

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


def _nbytes(buf: tirx.Buffer) -> int | None:
    if not all(isinstance(d, tirx.IntImm) for d in buf.shape):
        return None
    return math.prod(int(d) for d in buf.shape) * tvm.DataType(buf.dtype).bits // 8


def _throw_if(cond: tirx.Expr) -> tirx.Stmt:
    throw = tirx.Evaluate(tirx.call_intrin("int32", "tirx.tvm_throw_last_error"))
    return tirx.IfThenElse(cond, throw, None)


def _from_workspace(buf: tirx.Buffer, nbytes: int) -> list[tirx.Stmt]:
    """``buf`` declared on a workspace block (the form ``LowerTVMBuiltin`` gives)."""
    dtype = tvm.DataType(buf.dtype)
    ptr = tirx.call_intrin(
        "handle",
        "tirx.TVMBackendAllocWorkspace",
        1,
        0,
        tirx.const(nbytes, "uint64"),
        int(dtype.type_code),
        int(dtype.bits),
    )
    return [
        tirx.DeclBuffer(buf, data=ptr),
        _throw_if(tirx.call_intrin("bool", "tirx.isnullptr", buf.data)),
    ]


def _free(buf: tirx.Buffer) -> tirx.Stmt:
    call = tirx.call_intrin("int32", "tirx.TVMBackendFreeWorkspace", 1, 0, buf.data)
    return _throw_if(tirx.NE(call, tirx.IntImm("int32", 0)))


def _is_free(stmt: tirx.Stmt) -> bool:
    return isinstance(stmt, tirx.IfThenElse) and "TVMBackendFreeWorkspace" in str(stmt.condition)


def _scratch_to_arena(seq: tirx.SeqStmt) -> tirx.SeqStmt:
    """``seq`` with its local :data:`ARENA_BUFFERS` taken from the workspace (an
    allocation's scope is the rest of its sequence; frees go before the sequence's
    trailing frees, last allocated first)."""
    out: list[tirx.Stmt] = []
    frees: list[tirx.Stmt] = []
    for stmt in seq.seq:
        moved = isinstance(stmt, tirx.AllocBuffer) and stmt.buffer.name in ARENA_BUFFERS
        nbytes = _nbytes(stmt.buffer) if moved else None
        if nbytes is not None:
            out += _from_workspace(stmt.buffer, nbytes)
            frees.insert(0, _free(stmt.buffer))
        else:
            out.append(stmt)
    if not frees:
        return seq
    end = len(out)
    while end and _is_free(out[end - 1]):
        end -= 1
    return tirx.SeqStmt(out[:end] + frees + out[end:])


def _arena_scratch(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the tables of its LUT kernels in the arena."""
    funcs = {}
    for gv, f in mod.functions.items():
        if lut_chunking(f) is not None:
            f = f.with_body(tvm_ffi.structural_map(f.body, [(tirx.SeqStmt, _scratch_to_arena)]))
        funcs[gv] = f
    return tvm.IRModule(funcs)


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
        mod = _arena_scratch(mod)
        mod = tirx.transform.LowerIntrin()(mod)
    return mod
