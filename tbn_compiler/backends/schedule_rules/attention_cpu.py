"""The CPU kernel of attention without mask (``R.nn.attention`` legalized by
:func:`..pipelines._attention_te`).

The legalized function states the math: ``softmax(Q K^T * scale) V`` per batch and
head, with TOPI's polynomial ``exp`` (``topi.fast_exp``), on ``(batch, seq, heads,
dim)`` tensors. It carries the attribute :data:`ATTENTION_ATTR`; :func:`schedule_attention`
gives such a function the loop nest below, written directly in TIR (the same
arithmetic but for the order of the sums, and the division by the row sum done once
per output element instead of once per probability):

one parallel loop over tasks (batch x head x block of ``lanes`` query rows); a task

1. copies its query rows transposed, ``(dim, lanes)``, into a task buffer (rows past
   the end repeat the last row; their results are not stored);
2. computes its scores block ``(keys, lanes)`` = ``K Q_block^T * scale``: a vector of
   ``lanes`` query rows per key, blocks of 4 keys x 4 partial sums in registers, one
   broadcast key element and one query vector per step over ``dim``;
3. takes the softmax over keys one vector of rows at a time (max, ``fast_exp`` of the
   difference kept in the scores buffer, sum): no horizontal reductions;
4. computes ``P V`` for groups of rows with the output row in registers (``dim_v`` as
   vectors, one broadcast probability per row and key), divided by the sum at the end,
   written straight into the ``(batch, seq, heads, dim_v)`` output.

The heads-first layout of TOPI's version costs no pass: it is index arithmetic in the
loads and stores. ``benchmarks/bench_attention_cpu.py`` times it against the generic
schedule: DeiT-tiny's attention (3 heads x 197 tokens x 64, batch 1) 1.0 -> 0.35 ms
on one Zen 4 core (29 -> 86 GFLOP/s; the scores and ``P V`` loops are FMA-bound).
"""

from __future__ import annotations

from tvm import tirx
from tvm.ir.expr import Expr
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .fast_math import fast_expr

__all__ = ["ATTENTION_ATTR", "attention_attrs", "is_attention", "schedule_attention"]

ATTENTION_ATTR = "tbn_attention"
"""PrimFunc attribute of the legalized attention: a dict with ``scale`` (float32) when
the scores are multiplied by an explicit scale; without it they are divided by
``sqrt(dim)``, as TOPI does."""

CHAINS = 4
"""Partial sums of each score (over ``dim``) and of each row's exponentials (over keys),
added at the end: as accurate as the generic schedule's 8-lane sums (one chain had 1.5x
its mean error on scores of up to 57), at the same speed (the FMAs are the same)."""

MAX_SCORES_BYTES = 1 << 20
"""Largest per-task scores buffer (a workspace of the task); longer key sequences keep
the generic schedule."""

Buffer = tirx.Buffer
Index = Expr
Scale = tirx.FloatImm | None
"""An explicit float32 scale, or None for ``1 / sqrt(dim)``."""

MIN_PARALLEL_WORK = 1 << 16
"""Multiply-adds below which the kernel runs serially (a fork costs microseconds)."""


def attention_attrs(scale: object) -> dict:
    """The PrimFunc attributes that mark a legalized attention for :func:`schedule_attention`
    (``scale``: the operator's explicit scale, or None)."""
    info = {} if scale is None else {"scale": tirx.FloatImm("float32", float(scale))}
    return {ATTENTION_ATTR: info}


def is_attention(func: object) -> bool:
    """Whether ``func`` is a legalized attention (it carries :data:`ATTENTION_ATTR`)."""
    return (
        isinstance(func, tirx.PrimFunc) and func.attrs is not None and ATTENTION_ATTR in func.attrs
    )


def schedule_attention(func: tirx.PrimFunc, lanes: int = 16) -> tirx.PrimFunc | None:
    """The fast CPU form of a legalized attention, or None when ``func`` is not one or
    does not fit (not float32, a symbolic size other than the batch, shapes that are not
    those of attention, a scores buffer over :data:`MAX_SCORES_BYTES`). Parameters, buffers and attributes are those of ``func``;
    the result is marked ``tirx.is_scheduled``. ``lanes``: float32 vector lanes (16 with
    AVX-512, 8 with AVX2), also the query rows of a task."""
    if not is_attention(func) or len(func.params) != 4:
        return None
    q, k, v, out = func.params
    if any(b.dtype != "float32" or len(b.shape) != 4 for b in (q, k, v, out)):
        return None
    if not _attention_shapes(q, k, v, out):
        return None
    if int(k.shape[1]) * lanes * 4 > MAX_SCORES_BYTES:
        return None
    info = func.attrs[ATTENTION_ATTR]
    scale = info.get("scale", None)
    body = _kernel(q, k, v, out, scale, lanes)
    return tirx.PrimFunc(func.params, body, func.ret_type, func.attrs).with_attr(
        "tirx.is_scheduled", True
    )


def _attention_shapes(q, k, v, out) -> bool:
    """Whether ``q`` (B, L, H, D), ``k`` (B, N, H, D), ``v`` (B, N, H, Dv) and ``out``
    (B, L, H, Dv) have those shapes, all static and non-zero but for the batch."""
    dims = [[_static(d) for d in b.shape[1:]] for b in (q, k, v, out)]
    if any(d is None or d == 0 for shape in dims for d in shape):
        return False
    (seq, heads, dim), (keys, *kd), (vkeys, *vd), od = dims
    return (
        kd == [heads, dim]
        and vkeys == keys
        and vd[0] == heads
        and od == [seq, heads, vd[1]]
        and all(_same_dim(b.shape[0], q.shape[0]) for b in (k, v, out))
    )


def _same_dim(a: object, b: object) -> bool:
    """Whether two dims are the same variable or the same number."""
    return a.same_as(b) or (_static(a) is not None and _static(a) == _static(b))


def _static(dim: object) -> int | None:
    return int(dim) if isinstance(dim, tirx.IntImm | int) else None


def _kernel(q: Buffer, k: Buffer, v: Buffer, out: Buffer, scale: Scale, lanes: int) -> tirx.Stmt:
    """The loop nest of the module docstring for buffers ``q`` (B, L, H, D), ``k`` (B, N,
    H, D), ``v`` (B, N, H, Dv) and ``out`` (B, L, H, Dv): parallel from the batch at which
    it does :data:`MIN_PARALLEL_WORK` multiply-adds (a symbolic batch branches once)."""
    batch = q.shape[0]
    seq, heads, dim = (int(d) for d in q.shape[1:])
    keys, dim_v = int(k.shape[1]), int(v.shape[3])
    small = -(-MIN_PARALLEL_WORK // (heads * seq * keys * (dim + dim_v)))
    static = _static(batch)
    with IRBuilder() as ib:
        if static is not None or small <= 1:
            _tasks(q, k, v, out, scale, lanes, parallel=static is None or static >= small)
        else:
            with T.If(batch < small):
                with T.Then():
                    _tasks(q, k, v, out, scale, lanes, parallel=False)
                with T.Else():
                    _tasks(q, k, v, out, scale, lanes, parallel=True)
    return ib.get()


def _tasks(
    q: Buffer, k: Buffer, v: Buffer, out: Buffer, scale: Scale, lanes: int, parallel: bool
) -> None:
    """One loop over the tasks (batch x head x block of query rows)."""
    batch = q.shape[0]
    seq, heads, dim = (int(d) for d in q.shape[1:])
    keys = int(k.shape[1])
    registers = 16 if lanes >= 16 else 8  # P V accumulators: half the vector registers
    lanes = lanes if seq > lanes // 2 else lanes // 2  # short sequences: fewer padded rows
    tiles = -(-seq // lanes)
    loop = T.parallel if parallel else T.serial
    with loop(0, batch * (heads * tiles)) as task:
        b = task // (heads * tiles)
        h = task // tiles % heads
        i0 = task % tiles * lanes
        qt = T.alloc_buffer((dim, lanes), "float32", scope="local")
        scores = T.alloc_buffer((keys, lanes), "float32", scope="local")
        total = T.alloc_buffer((lanes,), "float32", scope="local")
        _load_queries(q, qt, b, h, i0, seq, lanes)
        _scores(k, qt, scores, b, h, dim, lanes, scale, registers)
        _softmax(scores, total, keys, lanes)
        _weighted_values(v, out, scores, total, b, h, i0, seq, lanes, registers)


def _load_queries(
    q: Buffer, qt: Buffer, b: Index, h: Index, i0: Index, seq: int, lanes: int
) -> None:
    """``qt[d, r] = q[b, min(i0 + r, seq - 1), h, d]``."""
    dim = int(q.shape[3])
    with T.serial(0, lanes) as r:
        row = tirx.min(i0 + r, seq - 1) if seq % lanes else i0 + r
        with T.serial(0, dim) as d:
            T.buffer_store(qt, q[b, row, h, d], [d, r])


def _scores(
    k: Buffer,
    qt: Buffer,
    scores: Buffer,
    b: Index,
    h: Index,
    dim: int,
    lanes: int,
    scale: Scale,
    registers: int,
) -> None:
    """``scores[j, r] = (sum_d k[b, j, h, d] * qt[d, r]) * scale`` (or ``/ sqrt(dim)``):
    blocks of keys whose :data:`CHAINS` partial sums each fit ``registers`` accumulator
    vectors, then the remaining keys."""
    keys = int(scores.shape[0])
    block = max(1, registers // CHAINS)
    full = keys // block
    if full:
        with T.serial(0, full) as jb:
            _key_block(k, qt, scores, b, h, jb * block, block, dim, lanes, scale)
    if keys % block:
        _key_block(k, qt, scores, b, h, full * block, keys % block, dim, lanes, scale)


def _key_block(
    k: Buffer,
    qt: Buffer,
    scores: Buffer,
    b: Index,
    h: Index,
    j0: Index,
    n: int,
    dim: int,
    lanes: int,
    scale: Scale,
) -> None:
    """Scores of keys ``j0 .. j0 + n``: ``n x CHAINS`` accumulator vectors, chain ``c``
    summing the ``d`` equal to ``c`` modulo :data:`CHAINS`, the chains added at the end."""
    chains = min(CHAINS, dim)
    acc = T.alloc_buffer((chains, n, lanes), "float32", scope="local")
    zero = tirx.const(0.0, "float32")
    with T.unroll(0, chains) as c, T.unroll(0, n) as jj, T.vectorized(0, lanes) as r:
        T.buffer_store(acc, zero, [c, jj, r])

    def step(d: Index, c: Index) -> None:
        with T.unroll(0, n) as jj, T.vectorized(0, lanes) as r:
            T.buffer_store(acc, acc[c, jj, r] + k[b, j0 + jj, h, d] * qt[d, r], [c, jj, r])

    with T.serial(0, dim // chains) as d0, T.unroll(0, chains) as c:
        step(d0 * chains + c, c)
    for c in range(dim % chains):
        step(dim // chains * chains + c, c)
    with T.unroll(0, n) as jj, T.vectorized(0, lanes) as r:
        total = acc[0, jj, r]
        for c in range(1, chains):
            total = total + acc[c, jj, r]
        T.buffer_store(scores, _scaled(total, scale, dim), [j0 + jj, r])


def _scaled(x: Expr, scale: Scale, dim: int) -> Expr:
    """``x * scale``, or ``x / sqrt(dim)`` in float32 as TOPI's legalization has it."""
    if scale is not None:
        return x * scale
    return x / tirx.sqrt(tirx.const(float(dim), "float32"))


def _softmax(scores: Buffer, total: Buffer, keys: int, lanes: int) -> None:
    """Per query row (vector lane): ``scores[j] = fast_exp(scores[j] - max_j scores)``
    and ``total = sum_j scores[j]`` (:data:`CHAINS` partial sums, keys ``j`` equal to
    ``c`` modulo :data:`CHAINS` in chain ``c``)."""
    top = T.alloc_buffer((lanes,), "float32", scope="local")
    with T.vectorized(0, lanes) as r:
        T.buffer_store(top, scores[0, r], [r])
    with T.serial(1, keys) as j, T.vectorized(0, lanes) as r:
        T.buffer_store(top, tirx.max(top[r], scores[j, r]), [r])
    chains = min(CHAINS, keys)
    sums = T.alloc_buffer((chains, lanes), "float32", scope="local")
    with T.unroll(0, chains) as c, T.vectorized(0, lanes) as r:
        T.buffer_store(sums, tirx.const(0.0, "float32"), [c, r])

    def step(j: Index, c: Index) -> None:
        with T.vectorized(0, lanes) as r:
            x = tirx.Var("x", "float32")
            e = tirx.Let(x, scores[j, r] - top[r], fast_expr("exp", x))
            T.buffer_store(scores, e, [j, r])
            T.buffer_store(sums, sums[c, r] + scores[j, r], [c, r])

    with T.serial(0, keys // chains) as j0, T.unroll(0, chains) as c:
        step(j0 * chains + c, c)
    for c in range(keys % chains):
        step(keys // chains * chains + c, c)
    with T.vectorized(0, lanes) as r:
        value = sums[0, r]
        for c in range(1, chains):
            value = value + sums[c, r]
        T.buffer_store(total, value, [r])


def _weighted_values(
    v: Buffer,
    out: Buffer,
    probs: Buffer,
    total: Buffer,
    b: Index,
    h: Index,
    i0: Index,
    seq: int,
    lanes: int,
    registers: int,
) -> None:
    """``out[b, i0 + r, h, :] = (sum_j probs[j, r] * v[b, j, h, :]) / total[r]`` for the
    rows ``i0 + r < seq``: groups of rows times column chunks of 4 vectors in registers."""
    keys, dim_v = int(v.shape[1]), int(v.shape[3])
    width = min(dim_v, 4 * lanes)
    group = _row_group(lanes, -(-width // lanes), registers)
    for c0 in range(0, dim_v, width):
        w = min(width, dim_v - c0)
        with T.serial(0, lanes // group) as g:
            acc = T.alloc_buffer((group, w), "float32", scope="local")
            with T.unroll(0, group) as rr, T.vectorized(0, w) as e:
                T.buffer_store(acc, tirx.const(0.0, "float32"), [rr, e])
            with T.serial(0, keys) as j, T.unroll(0, group) as rr, T.vectorized(0, w) as e:
                p = probs[j, g * group + rr]
                T.buffer_store(acc, acc[rr, e] + p * v[b, j, h, c0 + e], [rr, e])
            with T.unroll(0, group) as rr:
                r = g * group + rr
                _store_row(out, acc, total, b, h, i0, r, rr, c0, w, seq, lanes)


def _store_row(
    out: Buffer,
    acc: Buffer,
    total: Buffer,
    b: Index,
    h: Index,
    i0: Index,
    r: Index,
    rr: Index,
    c0: int,
    w: int,
    seq: int,
    lanes: int,
) -> None:
    """``out[b, i0 + r, h, c0 : c0 + w] = acc[rr] / total[r]`` when row ``i0 + r`` exists."""

    def store() -> None:
        with T.vectorized(0, w) as e:
            T.buffer_store(out, acc[rr, e] / total[r], [b, i0 + r, h, c0 + e])

    if seq % lanes == 0:
        store()
        return
    with T.If(i0 + r < seq), T.Then():
        store()


def _row_group(lanes: int, vectors: int, budget: int) -> int:
    """Rows per ``P V`` register block: the most (a divisor of ``lanes``) whose
    ``rows x vectors`` accumulators fit ``budget``."""
    best = 1
    for g in range(1, lanes + 1):
        if lanes % g == 0 and g * vectors <= budget:
            best = g
    return best
