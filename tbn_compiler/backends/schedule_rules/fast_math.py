"""Vectorizable float32 ``erf`` and ``sigmoid`` for CPU functions.

LLVM has no vector form of these: a vectorized loop calls the C library once per element
(GELU of DeiT-tiny's MLP, 151k elements: 2.5 ms per call on 2 cores). TVM's TOPI has
polynomial versions that vectorize (``topi.fast_exp``, ``topi.fast_erf``; the softmax
of our CPU legalization already uses ``fast_exp``).
:func:`with_fast_math` puts them in place of the calls in a PrimFunc: each is TOPI's own
expression, taken from the function TOPI builds for a one-element placeholder, with the
call's argument in place of the placeholder. ``sigmoid(x)`` becomes
``1 / (1 + fast_exp(-x))``.

Accuracy (float32, against float64 torch in ``tests/test_fast_math.py``; measured: 2.8e-7
and 3.2e-7): ``fast_exp`` relative error below 1e-6 over [-80, 80]; ``fast_erf`` and the
sigmoid absolute error below 1e-6.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tvm
import tvm_ffi
from tvm import te, tirx, topi

__all__ = ["FAST_CALLS", "fast_expr", "with_fast_math"]

_TOPI = {"exp": topi.fast_exp, "erf": topi.fast_erf}

FAST_CALLS = frozenset(("tirx.erf", "tirx.sigmoid"))
"""The calls :func:`with_fast_math` replaces (on float32 arguments): GELU's ``erf`` and
the sigmoid of SiLU / QuickGELU. A plain ``exp`` stays: the CPU legalization of softmax
and attention already uses ``fast_exp``, and what else calls ``exp`` is rare."""


@functools.cache
def _template(name: str) -> tuple[tirx.PrimExpr, object]:
    """(TOPI's fast ``name`` of ``x[i]``, the buffer ``x``)."""
    x = te.placeholder((1,), "float32", name="x")
    func = te.create_prim_func([x, _TOPI[name](x)])
    stores: list = []
    tvm_ffi.structural_walk(func, [(tirx.BufferStore, stores.append)])
    (store,) = stores
    return store.value, func.params[0]


def fast_expr(name: str, arg: tirx.PrimExpr) -> tirx.PrimExpr:
    """TOPI's vectorizable float32 ``name`` (``exp``, ``erf``, ``sigmoid``) of
    ``arg``."""
    if name == "sigmoid":
        one = tirx.const(1.0, "float32")
        return one / (one + fast_expr("exp", tirx.const(0.0, "float32") - arg))
    template, x = _template(name)

    def load(e: tvm.ir.TensorLoad) -> tirx.PrimExpr:
        return arg if e.source.same_as(x) else e

    return tvm_ffi.structural_map(template, [(tvm.ir.TensorLoad, load)])


def with_fast_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float32 call of :data:`FAST_CALLS` replaced by
    :func:`fast_expr` (``func`` itself when it has none)."""
    replace: Callable[[tvm.ir.Call], tirx.PrimExpr]

    def replace(call: tvm.ir.Call) -> tirx.PrimExpr:
        name = getattr(call.op, "name", "")
        if name not in FAST_CALLS or len(call.args) != 1 or str(call.ty) != "float32":
            return call
        return fast_expr(name.removeprefix("tirx."), call.args[0])

    return tvm_ffi.structural_map(func, [(tvm.ir.Call, replace)])
