"""CPU rule for the Winograd form of aligned 3x3 stride-1 convs
(:func:`..winograd.winograd_primfunc`).

:class:`WinogradProduct` (in :data:`.cpu.CPU_RULES` before :class:`.cpu.PanelProduct`)
rebuilds a ``conv_aligned`` kernel in Winograd form where that pays: a 2-D 3x3 conv of
stride 1, dilation 1, no groups, with at least :data:`WINOGRAD_MIN_ROWS` output
positions over the batch and at least :data:`WINOGRAD_MIN_CHANNELS` input channels and
binary filters; any other conv is left to the next rules (the panel form). A symbolic
batch takes the Winograd form from the batch that has that many positions on (every
batch for images of 128 positions or more) and the next rules' schedule below it, in
one function.

The schedule (:func:`schedule_winograd`): the padded input is transposed to channels
last in blocks of ``lanes x lanes`` (scalar moves, unrolled); the filter, input and
inverse transforms run one tile at a time with the transform positions unrolled (their
choice of terms folds to the adds of each position) and channels (filters) as the
vector; the product is register-blocked like the panel conv's, ``mr`` tiles of an image
x ``nr`` filters (the vector) accumulated over every input channel, one broadcast input
value per tile and channel, parallel over (position, image, ``mr`` tiles); the output
goes back to channels first in blocks of ``lanes x lanes``.
"""

from __future__ import annotations

import json

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.target import Target

from ..kernels import SPEC_ATTR, kernel_kind
from ..winograd import winograd_applies, winograd_primfunc
from .base import ScheduleRule, apply_first, dispatch, factor, known_extent, shape_vars

__all__ = [
    "WINOGRAD_MIN_CHANNELS",
    "WINOGRAD_MIN_ROWS",
    "WinogradProduct",
    "schedule_winograd",
    "winograd_tile",
]

WINOGRAD_MIN_ROWS = 128
"""Output positions (over the whole batch) from which an eligible conv runs in Winograd
form. Measured on Zen 4 (2 cores) against the panel form: ResNet-18-CIFAR's convs at
32x32 (64 channels, binary) 2.4x faster at batch 1, at 16x16 (128 channels, p=8) 1.2x,
at 8x8 (256 channels, p=8) 0.95x at batch 1 (64 positions), 1.2x at batch 2 and 2x at
batch 16, at 4x4 (512 channels, p=8) 1.2x at batch 4 and 1.6x at batch 16."""

WINOGRAD_MIN_CHANNELS = 16
"""Input channels and binary filters (``cout / p``) from which it does (a vector of
filters)."""


def winograd_tile(ho: int, wo: int) -> int:
    """Output tile size ``m`` of ``F(m x m, 3 x 3)`` for an ``ho x wo`` output: 4 (4x
    fewer multiply-adds than a direct conv) from 8x8 on, else 2 (2.25x; fewer tiles
    padded at the edges and fewer transform positions per small image)."""
    return 4 if min(ho, wo) >= 8 else 2


class WinogradProduct(ScheduleRule):
    """Aligned 3x3 stride-1 convs with many output positions and channels: rebuilt in
    Winograd form (:func:`..winograd.winograd_primfunc`, tile size
    :func:`winograd_tile`) and scheduled by :func:`schedule_winograd`; None (the next
    rules) for every other kernel. With a symbolic batch, batches of fewer than
    :data:`WINOGRAD_MIN_ROWS` output positions run as the next rules schedule them, in
    the same function."""

    name = "winograd-product"

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        positions = _eligible_positions(func)
        if positions is None:
            return None
        from .cpu import _rules_after, _vector_lanes, _with_attrs_of

        out = func.params[-1].shape
        form = winograd_primfunc(func, winograd_tile(int(out[2]), int(out[3])))
        if form is None:
            return None
        scheduled = schedule_winograd(form, _vector_lanes(target))
        batch = shape_vars(func)
        if len(batch) != 1:
            if positions * int(out[0]) < WINOGRAD_MIN_ROWS:
                return None
            return _with_attrs_of(scheduled, func)
        small = -(-WINOGRAD_MIN_ROWS // positions)
        if small <= 1:
            return _with_attrs_of(scheduled, func)
        others = apply_first(func, target, _rules_after(self))
        if others is None:
            return None
        return _with_attrs_of(
            dispatch(form, [(shape_vars(form)[0] < small, others)], scheduled), func
        )


def _eligible_positions(func: tirx.PrimFunc) -> int | None:
    """Output positions per image of a ``conv_aligned`` kernel with a spec that
    :func:`..winograd.winograd_applies` to and enough channels; None for any other."""
    attrs = func.attrs
    if kernel_kind(func) != "conv_aligned" or attrs is None or SPEC_ATTR not in attrs:
        return None
    spec = json.loads(str(attrs[SPEC_ATTR]))
    if not winograd_applies(spec):
        return None
    cout, cin = (int(d) for d in spec["weight_shape"][:2])
    if min(cin, cout // int(spec["p"])) < WINOGRAD_MIN_CHANNELS:
        return None
    out = func.params[-1].shape
    return int(out[2]) * int(out[3])


def schedule_winograd(func: tirx.PrimFunc, lanes: int, parallel: bool = True) -> tirx.PrimFunc:
    """The scheduled ``func`` (a kernel in Winograd form) with ``lanes``-wide vectors."""
    sch = Schedule(func)
    _filter_transform(sch, lanes)
    _channels_last_pad(sch, lanes, parallel)
    _input_transform(sch, lanes, parallel)
    _product(sch, lanes, parallel)
    _inverse_transform(sch, lanes, parallel)
    _scaled_copies(sch, lanes, parallel)
    return sch.mod["main"]


def _vector(sch: Schedule, loop, lanes: int):
    """Split ``loop`` into (outer, vector of up to ``lanes``); vectorize the vector."""
    v = factor(int(sch.get(loop).extent), (lanes, 8, 4, 2))
    outer, inner = sch.split(loop, [None, v])
    if v > 1:
        sch.vectorize(inner)
    return outer, inner


def _parallel(sch: Schedule, loop, enabled: bool) -> None:
    n = known_extent(sch, loop)
    if enabled and (n is None or n > 1):
        sch.parallel(loop)


def _filter_transform(sch: Schedule, lanes: int) -> None:
    """``panel`` unpacked serially (filters as the vector); ``wtrans`` per input channel
    and vector of filters, its first pass (``wcol``) computed there; transform
    positions unrolled."""
    panel = sch.get_sblock("panel")
    _vector(sch, sch.get_loops(panel)[-1], lanes)
    block = sch.get_sblock("wtrans")
    e1, e2, c, f = sch.get_loops(block)
    fo, fi = _vector(sch, f, lanes)
    sch.reorder(c, fo, e1, e2, fi)
    _unroll_pass(sch, sch.get_sblock("wcol"), fo, lanes)
    sch.unroll(e1)
    sch.unroll(e2)


def _unroll_pass(sch: Schedule, block, loop, lanes: int) -> None:
    """The first pass ``block`` of a separable transform computed at ``loop`` of the
    second: its two position loops unrolled, the last one (channels) a vector."""
    sch.compute_at(block, loop)
    *_, r, s, v = sch.get_loops(block)
    sch.unroll(r)
    sch.unroll(s)
    if known_extent(sch, v) != 1:
        sch.vectorize(v)


def _channels_last_pad(sch: Schedule, lanes: int, parallel: bool) -> None:
    """A transpose: blocks of ``lanes`` columns x ``lanes`` channels, unrolled (scalar
    moves; a vector of channels would gather with a stride of a whole image plane)."""
    block = sch.get_sblock("xpad")
    b, yp, xp, c = sch.get_loops(block)
    t = factor(int(sch.get(c).extent), (lanes, 8, 4, 2))
    co, ci = sch.split(c, [None, t])
    xo, xi = sch.split(xp, [None, factor(int(sch.get(xp).extent), (lanes, 8, 4, 2))])
    sch.reorder(b, yp, co, xo, ci, xi)
    sch.unroll(ci)
    sch.unroll(xi)
    _parallel(sch, sch.fuse(b, yp), parallel)


def _input_transform(sch: Schedule, lanes: int, parallel: bool) -> None:
    block = sch.get_sblock("dtrans")
    e1, e2, b, t, c = sch.get_loops(block)
    co, ci = _vector(sch, c, lanes)
    sch.reorder(b, t, co, e1, e2, ci)
    _parallel(sch, sch.fuse(b, t), parallel)
    _unroll_pass(sch, sch.get_sblock("dcol"), co, lanes)
    sch.unroll(e1)
    sch.unroll(e2)


def _product(sch: Schedule, lanes: int, parallel: bool) -> None:
    """``prod (a, a, n, th * tw, F)``: ``mr`` tiles of an image x ``nr`` filters per
    register block (see :func:`.cpu._cpu_panel_conv`), accumulated over every input
    channel; parallel over (position, image, ``mr`` tiles)."""
    from .cpu import _widest_block

    block = sch.get_sblock("prod")
    e1, e2, b, tiles, f, rc = sch.get_loops(block)
    budget = 16 if lanes >= 16 else 8
    mr, nr = _widest_block(int(sch.get(tiles).extent), int(sch.get(f).extent), lanes, budget)
    to, ti = sch.split(tiles, [None, mr])
    fo, fi = sch.split(f, [None, nr])
    sch.reorder(e1, e2, b, to, fo, rc, ti, fi)
    task = sch.fuse(e1, e2, b, to)
    _parallel(sch, task, parallel)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, fo)
    sch.unroll(ti)
    if nr > 1:
        sch.vectorize(fi)
    init = sch.decompose_reduction(block, rc)
    for b in (init, acc):
        inner = sch.get_loops(b)[-1]
        if known_extent(sch, inner) != 1:
            sch.vectorize(inner)


def _inverse_transform(sch: Schedule, lanes: int, parallel: bool) -> None:
    block = sch.get_sblock("ytrans")
    b, ty, i, tx, j, f = sch.get_loops(block)
    fo, fi = _vector(sch, f, lanes)
    sch.reorder(b, ty, tx, fo, i, j, fi)
    _parallel(sch, sch.fuse(b, ty), parallel)
    _unroll_pass(sch, sch.get_sblock("ycol"), fo, lanes)
    sch.unroll(i)
    sch.unroll(j)


def _scaled_copies(sch: Schedule, lanes: int, parallel: bool) -> None:
    """A transpose (channels last to first): blocks of ``lanes`` channels x ``lanes``
    columns, unrolled."""
    block = sch.get_sblock("out")
    b, co, y, x = sch.get_loops(block)
    t = factor(int(sch.get(co).extent), (lanes, 8, 4, 2))
    coo, coi = sch.split(co, [None, t])
    xo, xi = sch.split(x, [None, factor(int(sch.get(x).extent), (lanes, 8, 4, 2))])
    sch.reorder(b, y, coo, xo, coi, xi)
    sch.unroll(coi)
    sch.unroll(xi)
    _parallel(sch, sch.fuse(b, y), parallel)
