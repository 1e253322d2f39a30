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

The schedule (:func:`schedule_winograd`): the filters transformed per input channel
(in parallel for large layers); the input transposed to channels last in blocks of
``lanes x lanes`` (scalar moves, unrolled); then one parallel task per tile row of the
batch: the input transform of its tiles, the product for every transform position,
register-blocked like the panel conv's (``mr`` tiles x ``nr`` filters, the vector,
accumulated over every input channel, one broadcast input value per tile and channel),
and the inverse transform, transforms one tile at a time with the positions unrolled
(their choice of terms folds to the adds of each position) and channels or filters as
the vector; last, the output back to channels first in ``lanes x lanes`` blocks.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.target import Target

from ..kernels import kernel_spec
from ..winograd import winograd_applies, winograd_primfunc
from .base import ScheduleRule, apply_first, dispatch, factor, known_extent, shape_vars

__all__ = [
    "WINOGRAD_MIN_CHANNELS",
    "WINOGRAD_PARALLEL_FILTERS",
    "WINOGRAD_MIN_ROWS",
    "WinogradProduct",
    "schedule_winograd",
    "winograd_tile",
]

WINOGRAD_MIN_ROWS = 128
"""Output positions (over the whole batch) from which an eligible conv runs in Winograd
form. Measured on Zen 4, one thread, against the panel form (CPU time): ResNet-18-CIFAR's
convs at 32x32 (64 channels, binary) 0.91 -> 0.33 ms at batch 1; at 8x8 (256 channels,
p=8) 0.104 -> 0.090 ms at batch 1 (64 positions; left to the panel form, whose tests
take 8x8 convs), 0.195 -> 0.149 at batch 2; at 4x4 (512 channels, p=8) 0.134 -> 0.179
ms at batch 1 (16 positions: slower), 0.39 -> 0.35 at batch 4, 0.75 -> 0.59 at batch
8."""

WINOGRAD_MIN_CHANNELS = 16
"""Input channels and binary filters (``cout / p``) from which it does (a vector of
filters)."""

WINOGRAD_PARALLEL_FILTERS = 1 << 18
"""Tile weights (input channels x 9 x binary filters) from which the filters transform
in parallel. Measured on two idle Zen 4 cores: 512 channels, p=8 (294,912 weights) 0.109
-> 0.080 ms; 256 channels, p=8 (73,728) 0.050 -> 0.074 ms (slower: serial)."""


def winograd_tile(ho: int, wo: int, batch: int) -> int:
    """Output tile size ``m`` of ``F(m x m, 3 x 3)`` for a batch of ``ho x wo`` outputs:
    4 (4x fewer multiply-adds than a direct conv) from 16x16 on, and from 8x8 on for two
    images or more; else 2 (2.25x; fewer transform positions and edge tiles: 256
    channels at 8x8, batch 1: 0.090 ms against 0.100 with 4; 64 channels at batch 2:
    0.063 against 0.058)."""
    least = min(ho, wo)
    return 4 if least >= 16 or (least >= 8 and batch >= 2) else 2


class WinogradProduct(ScheduleRule):
    """Aligned 3x3 stride-1 convs with many output positions and channels: rebuilt in
    Winograd form (:func:`..winograd.winograd_primfunc`, tile size
    :func:`winograd_tile`) and scheduled by :func:`schedule_winograd`; None (the next
    rules) for every other kernel. A symbolic batch gets one function: the next rules'
    schedule below :data:`WINOGRAD_MIN_ROWS` output positions, the tile size of each
    batch from there."""

    name = "winograd-product"

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        positions = _eligible_positions(func)
        if positions is None:
            return None
        from .cpu import _rules_after, _vector_lanes, _with_attrs_of

        lanes = _vector_lanes(target)
        n, _, ho, wo = func.params[-1].shape
        ho, wo = int(ho), int(wo)
        batch = shape_vars(func)
        if len(batch) != 1:
            if positions * int(n) < WINOGRAD_MIN_ROWS:
                return None
            form = winograd_primfunc(func, winograd_tile(ho, wo, int(n)))
            return _with_attrs_of(schedule_winograd(form, lanes), func)
        small = -(-WINOGRAD_MIN_ROWS // positions)  # the least batch in Winograd form
        cases = []
        if small > 1:
            cases.append((batch[0] < small, apply_first(func, target, _rules_after(self))))
        big = winograd_tile(ho, wo, max(small, 2))
        if winograd_tile(ho, wo, small) != big:  # batch 1 (small) with its own tiles
            form = winograd_primfunc(func, winograd_tile(ho, wo, small))
            cases.append((batch[0] < 2, schedule_winograd(form, lanes)))
        default = schedule_winograd(winograd_primfunc(func, big), lanes)
        if any(case is None for _, case in cases):
            return None
        return _with_attrs_of(dispatch(func, cases, default) if cases else default, func)


def _eligible_positions(func: tirx.PrimFunc) -> int | None:
    """Output positions per image of a ``conv_aligned`` kernel with a spec that
    :func:`..winograd.winograd_applies` to, enough channels and at least two tiles a
    row (:func:`schedule_winograd`); None for any other."""
    spec = kernel_spec(func, "conv_aligned")
    if spec is None or not winograd_applies(spec):
        return None
    cout, cin = (int(d) for d in spec["weight_shape"][:2])
    if min(cin, cout // int(spec["p"])) < WINOGRAD_MIN_CHANNELS:
        return None
    out = func.params[-1].shape
    ho, wo = int(out[2]), int(out[3])
    return ho * wo if wo > winograd_tile(ho, wo, 1) else None


def schedule_winograd(func: tirx.PrimFunc, lanes: int, parallel: bool = True) -> tirx.PrimFunc:
    """The scheduled ``func`` (a kernel in Winograd form) with ``lanes``-wide vectors:
    the filter transform serially; the input to channels last in parallel; one
    parallel loop over the tile rows of the batch, each task doing the input transform,
    product and inverse transform of its row; the output back to channels first in
    parallel. Three parallel loops, not one per stage: on two busy cores each parallel
    loop can wait a time slice for a descheduled thread (64-channel binary conv at
    32x32, batch 16, load 4: 8.0 ms with five, 6.6 with three; batch 1: 0.37 and 0.39
    ms). Computing the channels-last rows in each task as well (two loops) was slower:
    a task transposes the 2 rows it shares with the next again.

    Tile rows of one tile are refused (ValueError): the stages computed in a task would
    lose their loop over tiles."""
    sch = Schedule(func)
    if int(sch.get(sch.get_sblock("ytrans")).iter_vars[2].dom.extent) < 2:
        raise ValueError("the Winograd schedule needs at least two tiles a row")
    _filter_transform(sch, lanes, parallel)
    _channels_last(sch, lanes, parallel)
    task = _output_side(sch, lanes, parallel)
    _product(sch, task, lanes)
    _input_side(sch, task, lanes)
    _scaled_copies(sch, lanes, parallel)
    return sch.mod["main"]


def _parallel(sch: Schedule, loop, enabled: bool) -> None:
    n = known_extent(sch, loop)
    if enabled and (n is None or n > 1):
        sch.parallel(loop)


def _vector(sch: Schedule, loop, lanes: int):
    """Split ``loop`` into (outer, vector of up to ``lanes``); vectorize the vector."""
    v = factor(int(sch.get(loop).extent), (lanes, 8, 4, 2))
    outer, inner = sch.split(loop, [None, v])
    if v > 1:
        sch.vectorize(inner)
    return outer, inner


def _unroll_pass(sch: Schedule, block, loop) -> None:
    """The first pass ``block`` of a separable transform computed at ``loop`` of the
    second: its two position loops unrolled, the last one (channels) a vector."""
    sch.compute_at(block, loop)
    *_, r, s, v = sch.get_loops(block)
    sch.unroll(r)
    sch.unroll(s)
    if known_extent(sch, v) != 1:
        sch.vectorize(v)


def _transpose_block(sch: Schedule, outer, inner, lanes: int) -> None:
    """The two innermost loops ``outer, inner`` in blocks of up to ``lanes x lanes``,
    unrolled: a transpose by scalar moves (a vector of one would gather or scatter
    with the stride of a whole image plane)."""
    oo, oi = sch.split(outer, [None, factor(int(sch.get(outer).extent), (lanes, 8, 4, 2))])
    io, ii = sch.split(inner, [None, factor(int(sch.get(inner).extent), (lanes, 8, 4, 2))])
    sch.reorder(oo, io, oi, ii)
    sch.unroll(oi)
    sch.unroll(ii)


def _filter_transform(sch: Schedule, lanes: int, parallel: bool) -> None:
    """Per input channel: its filters unpacked (``panel``, filters as the vector), then
    ``wtrans`` per vector of filters, its first pass (``wcol``) computed there,
    transform positions unrolled. Parallel over channels from
    :data:`WINOGRAD_PARALLEL_FILTERS` tile weights on."""
    block = sch.get_sblock("wtrans")
    e1, e2, c, f = sch.get_loops(block)
    fo, fi = _vector(sch, f, lanes)
    sch.reorder(c, fo, e1, e2, fi)
    _unroll_pass(sch, sch.get_sblock("wcol"), fo)
    sch.unroll(e1)
    sch.unroll(e2)
    panel = sch.get_sblock("panel")
    weights = math.prod(int(iv.dom.extent) for iv in sch.get(panel).iter_vars)
    sch.compute_at(panel, c)
    _vector(sch, sch.get_loops(panel)[-1], lanes)
    _parallel(sch, c, parallel and weights >= WINOGRAD_PARALLEL_FILTERS)


def _product(sch: Schedule, task, lanes: int) -> None:
    """``prod (a, a, rows, tw, F)`` in each task (a tile row): ``mr`` tiles x ``nr``
    filters per register block (see :func:`.cpu._cpu_panel_conv`), accumulated over
    every input channel, for each transform position."""
    from .cpu import _widest_block

    block = sch.get_sblock("prod")
    sch.compute_at(block, task)
    e1, e2, tx, f, rc = sch.get_loops(block)[-5:]
    budget = 16 if lanes >= 16 else 8
    mr, nr = _widest_block(int(sch.get(tx).extent), int(sch.get(f).extent), lanes, budget)
    txo, txi = sch.split(tx, [None, mr])
    fo, fi = sch.split(f, [None, nr])
    sch.reorder(e1, e2, txo, fo, rc, txi, fi)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, fo)
    sch.unroll(txi)
    if nr > 1:
        sch.vectorize(fi)
    init = sch.decompose_reduction(block, rc)
    for b in (init, acc):
        inner = sch.get_loops(b)[-1]
        if known_extent(sch, inner) != 1:
            sch.vectorize(inner)


def _channels_last(sch: Schedule, lanes: int, parallel: bool) -> None:
    """``xcl``: the input, channels last, in ``lanes x lanes`` transposed blocks,
    parallel over (image, row). Unpadded: the blocks divide the width (a 32-wide row,
    not 34 padded columns in blocks of 2; 64-channel conv at 32x32: 0.37 -> 0.34 ms)."""
    xcl = sch.get_sblock("xcl")
    b, y, xo, c = sch.get_loops(xcl)
    _transpose_block(sch, xo, c, lanes)
    _parallel(sch, sch.fuse(b, y), parallel)


def _input_side(sch: Schedule, task, lanes: int) -> None:
    """In each task: the transform of its tiles, one tile and vector of channels at a
    time (``dcol`` there), positions unrolled."""
    dtrans = sch.get_sblock("dtrans")
    sch.compute_at(dtrans, task)
    e1, e2, tx, c = sch.get_loops(dtrans)[-4:]
    co, ci = _vector(sch, c, lanes)
    sch.reorder(tx, co, e1, e2, ci)
    _unroll_pass(sch, sch.get_sblock("dcol"), co)
    sch.unroll(e1)
    sch.unroll(e2)


def _output_side(sch: Schedule, lanes: int, parallel: bool):
    """The inverse transform, parallel over tile rows (the task loop, returned; the
    other stages of a row are computed in it), one tile and vector of filters at a time
    (``ycol`` there), positions unrolled."""
    ycol, ytrans = sch.get_sblock("ycol"), sch.get_sblock("ytrans")
    row, i, tx, j, f = sch.get_loops(ytrans)
    fo, fi = _vector(sch, f, lanes)
    sch.reorder(row, tx, fo, i, j, fi)
    _parallel(sch, row, parallel)
    _unroll_pass(sch, ycol, fo)
    sch.unroll(i)
    sch.unroll(j)
    return row


def _scaled_copies(sch: Schedule, lanes: int, parallel: bool) -> None:
    """``out``: channels last to first in ``lanes x lanes`` blocks, parallel over
    (image, output row)."""
    block = sch.get_sblock("out")
    b, co, y, x = sch.get_loops(block)
    sch.reorder(b, y, co, x)
    _transpose_block(sch, co, x, lanes)
    _parallel(sch, sch.fuse(b, y), parallel)
