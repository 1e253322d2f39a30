"""Winograd form of aligned 3x3 stride-1 convs (``F(m x m, 3 x 3)``, ``m`` = 2 or 4).

:func:`winograd_primfunc` rebuilds a ``conv_aligned`` kernel of :mod:`.kernels` (from
its :data:`~.kernels.SPEC_ATTR`) with the same buffers, kind and results, up to
rounding: ``x (n, cin, h, w)``, ``tile``, ``alphas (p,)``, ``[bias (cout,)]`` ->
``out (n, cout, ho, wo)``. The weights stay the packed bit tile; every call:

``panel (cin, 3, 3, F)``
    the ``F = cout / p`` binary filters of the tile unpacked into ``+-1`` numbers;
``wtrans (a, a, cin, F)``
    the filter transform ``U = G g G^T`` of each (input channel, filter), ``a = m + 2``;
``xcl (n, h, w, cin)``
    the input, channels last; the tiles of a grid of ``th x tw`` output tiles of
    ``m x m`` (``th = ceil(ho / m)``: outputs past ``ho`` are computed and dropped)
    read it with zeros for the padding and past the edge;
``dtrans (a, a, n * th, tw, cin)``
    the input transform ``V = B^T d B`` of each tile (tile row of the batch, tile of the
    row) and channel;
``prod (a, a, n * th, tw, F)``
    the batched product over the ``a * a`` transform positions, ``M = sum_c V U``
    (the only reduction; the multiply-adds of the conv, ``(3 * 3 * m * m) / (a * a)``
    times fewer than a direct conv: 2.25 for ``m = 2``, 4 for ``m = 4``);
``ytrans (n * th, m, tw, m, F)``
    the inverse transform ``Y = A^T M A`` (channels last);
``out (n, cout, ho, wo)``
    ``alphas[co // F] * Y[..., co % F] + bias[co]``, channels first (the ``p`` scaled
    copies of the filters' outputs, as in the panel form).

Each transform is separable, two passes of 1-D transforms (blocks ``wcol``, ``dcol``,
``ycol`` are the first passes), multiplying by the constant matrices ``A, B, G`` of
TVM's ``topi.nn.winograd_util`` (Cook-Toom, interpolation points ``0, -1, 1, 1/2, -2``
for ``m = 4``) written out term by term: zero coefficients vanish, ``+-1`` add or
subtract. Rounding: ``F(2x2)`` is within about 5e-7, ``F(4x4)`` 5e-6 of the largest
output (float64 reference; a direct float32 conv about 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import te, tirx

from .kernels import (
    FORM_ATTR,
    Extent,
    _add_bias,
    _finish,
    _i64,
    _inputs,
    _own_extent,
    _shape,
    _sign_value,
    kernel_spec,
)

__all__ = [
    "WINOGRAD_TILES",
    "winograd_applies",
    "winograd_matrices",
    "winograd_primfunc",
    "winograd_tensors",
]

WINOGRAD_TILES = (2, 4)
"""Output tile sizes ``m`` of :func:`winograd_primfunc`."""


def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A (a, m), B (a, a), G (a, 3))`` float64 of ``F(m x m, 3 x 3)``, ``a = m + 2``:
    ``Y = A^T [(G g G^T) * (B^T d B)] A`` is the ``m x m`` valid correlation of a
    ``a x a`` input tile ``d`` with a 3x3 filter ``g``."""
    from tvm.topi.nn import winograd_util

    points = winograd_util._interpolation_points(m + 1)
    a, b, g = winograd_util._cook_toom_convolution(points, m, 3)
    return np.asarray(a), np.asarray(b), np.asarray(g)


def winograd_applies(spec: dict) -> bool:
    """True when a ``conv_aligned`` kernel's spec is a 2-D 3x3 stride-1 dilation-1
    ungrouped float32 conv (the convs :func:`winograd_primfunc` rebuilds)."""
    return (
        spec.get("op") == "conv"
        and len(spec["weight_shape"]) == 4
        and list(spec["weight_shape"][2:]) == [3, 3]
        and list(spec["stride"]) == [1, 1]
        and list(spec["dilation"]) == [1, 1]
        and int(spec["groups"]) == 1
        and spec["dtype"] == "float32"
    )


def winograd_primfunc(func: tirx.PrimFunc, m: int = 2) -> tirx.PrimFunc | None:
    """``func`` (a ``conv_aligned`` kernel of :mod:`.kernels`) in Winograd form
    ``F(m x m, 3 x 3)`` (see the module docstring), or None when it is another kernel,
    carries no :data:`~.kernels.SPEC_ATTR` or is not a conv :func:`winograd_applies` to.
    The batch extent is ``func``'s (a symbolic one becomes the new kernel's own var).
    Attribute :data:`~.kernels.FORM_ATTR` ``"winograd"``, kind and spec of ``func``."""
    if m not in WINOGRAD_TILES:
        raise ValueError(f"Winograd output tiles are {WINOGRAD_TILES}, not {m}")
    spec = kernel_spec(func, "conv_aligned")
    if spec is None or not winograd_applies(spec):
        return None
    x_shape = list(func.params[0].shape)
    batch = x_shape[0] if not isinstance(x_shape[0], tirx.IntImm) else int(x_shape[0])
    return _winograd(batch, [int(d) for d in x_shape[1:]], spec, m)


def _winograd(batch: Extent, chw: list[int], spec: dict, m: int) -> tirx.PrimFunc:
    t = winograd_tensors(batch, chw, spec, m)
    args = [t[k] for k in ("x", "tile", "alphas", "bias", "out") if k in t]
    return _finish(args, "conv_aligned", spec).with_attr(FORM_ATTR, "winograd")


def winograd_tensors(batch: Extent, chw: list[int], spec: dict, m: int) -> dict[str, te.Tensor]:
    """The tensors of the Winograd form by name (inputs, the stages of the module
    docstring, ``out``); ``bias`` only with a bias."""
    cout, cin = (int(d) for d in spec["weight_shape"][:2])
    pad_h, pad_w = (int(v) for v in spec["padding"])
    p, has_bias, dtype = int(spec["p"]), bool(spec["has_bias"]), "float32"
    n = _own_extent(batch, "n")
    _, h, w = chw
    ho, wo = h + 2 * pad_h - 2, w + 2 * pad_w - 2
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv output would be empty: {[ho, wo]}")
    th, tw = -(-ho // m), -(-wo // m)
    filters = cout // p
    a_mat, b_mat, g_mat = winograd_matrices(m)
    alpha = m + 2
    x, tile, alphas, bias = _inputs((n, cin, h, w), filters * cin * 9, p, cout, has_bias, dtype)

    panel = te.compute(
        _shape((cin, 3, 3, filters)),
        lambda c, kh, kw, f: _sign_value(tile, ((f * cin + c) * 3 + kh) * 3 + kw, dtype),
        name="panel",
    )
    g_t = g_mat.T  # (3, a): the filter transform as sums over taps
    wcol = te.compute(
        _shape((cin, alpha, 3, filters)),
        lambda c, e1, kw, f: _transform(g_t, e1, lambda kh: panel[c, kh, kw, f]),
        name="wcol",
    )
    wtrans = te.compute(
        _shape((alpha, alpha, cin, filters)),
        lambda e1, e2, c, f: _transform(g_t, e2, lambda kw: wcol[c, e1, kw, f]),
        name="wtrans",
    )
    xcl = te.compute(_shape((n, h, w, cin)), lambda b, y, xo, c: x[b, c, y, xo], name="xcl")

    def padded(r, tx, i, j, c) -> tirx.Expr:
        """Input ``(i, j)`` of tile ``tx`` of tile row ``r`` (zero in the padding)."""
        y = tirx.floormod(r, th) * m + i - pad_h
        xo = tx * m + j - pad_w
        inside = tirx.all(y >= 0, y < h, xo >= 0, xo < w)
        value = xcl[tirx.floordiv(r, th), y, xo, c]
        return tirx.if_then_else(inside, value, tirx.const(0.0, dtype))

    rows = n * th  # tile rows of the batch: dcol ... ytrans are per (tile row, tile)
    dcol = te.compute(
        _shape((rows, tw, alpha, alpha, cin)),
        lambda r, tx, e1, j, c: _transform(b_mat, e1, lambda i: padded(r, tx, i, j, c)),
        name="dcol",
    )
    dtrans = te.compute(
        _shape((alpha, alpha, rows, tw, cin)),
        lambda e1, e2, r, tx, c: _transform(b_mat, e2, lambda j: dcol[r, tx, e1, j, c]),
        name="dtrans",
    )
    rc = te.reduce_axis((_i64(0), _i64(cin)), name="rc")
    prod = te.compute(
        _shape((alpha, alpha, rows, tw, filters)),
        lambda e1, e2, r, tx, f: te.sum(dtrans[e1, e2, r, tx, rc] * wtrans[e1, e2, rc, f], axis=rc),
        name="prod",
    )
    ycol = te.compute(
        _shape((rows, tw, m, alpha, filters)),
        lambda r, tx, i, e2, f: _transform(a_mat, i, lambda e1: prod[e1, e2, r, tx, f]),
        name="ycol",
    )
    ytrans = te.compute(
        _shape((rows, m, tw, m, filters)),
        lambda r, i, tx, j, f: _transform(a_mat, j, lambda e2: ycol[r, tx, i, e2, f]),
        name="ytrans",
    )

    def value(b, co, y, xo):
        f = tirx.floormod(co, filters)
        r = b * th + tirx.floordiv(y, m)
        v = ytrans[r, tirx.floormod(y, m), tirx.floordiv(xo, m), tirx.floormod(xo, m), f]
        return _add_bias(alphas[tirx.floordiv(co, filters)] * v, bias, co)

    out = te.compute(_shape((n, cout, ho, wo)), value, name="out")
    stages = (
        x,
        tile,
        alphas,
        bias,
        panel,
        wcol,
        wtrans,
        xcl,
        dcol,
        dtrans,
        prod,
        ycol,
        ytrans,
        out,
    )
    return {t.op.name: t for t in stages if t is not None}


def _transform(mat: np.ndarray, r: tirx.Expr, load: Callable[[int], tirx.Expr]) -> tirx.Expr:
    """``sum_i mat[i, r] * load(i)`` for an index expression ``r`` (``mat`` constant,
    ``(k, e)``): a choice over the values of ``r`` of sums written term by term. Once the
    loop over ``r`` is unrolled the choice folds away (``if_then_else`` of a constant:
    unlike a ``Select``, vectorizing keeps its condition scalar), leaving the adds of
    one row of the transform."""
    result = None
    for v in reversed(range(mat.shape[1])):
        terms = [(float(mat[i, v]), i) for i in range(mat.shape[0]) if mat[i, v] != 0]
        value = _linear_combination(terms, load)
        result = value if result is None else tirx.if_then_else(r == v, value, result)
    return result


def _linear_combination(
    terms: list[tuple[float, int]], load: Callable[[int], tirx.Expr]
) -> tirx.Expr:
    """``sum c * load(i)`` over ``terms`` ``(c, i)``: unit coefficients add or subtract,
    other ones multiply."""
    acc = None
    for c, i in terms:
        v = load(i)
        if abs(c) != 1.0:
            v, c = tirx.const(c, "float32") * v, 1.0
        if acc is None:
            acc = v if c > 0 else -v
            continue
        acc = acc + v if c > 0 else acc - v
    return acc if acc is not None else tirx.const(0.0, "float32")
