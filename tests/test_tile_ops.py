"""The tile-op records: each declares its op once, and the steps that use it agree."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn
from tbn_compiler import ops
from tbn_compiler.passes import convert
from tbn_compiler.tile_ops import (
    LINEAR,
    PackedTileLayer,
    TileOpRecord,
    register_tile_op,
    tile_op,
    tile_op_for_layer,
    tile_op_for_module,
    tile_op_records,
)

HAS_TVM = importlib.util.find_spec("tvm") is not None


def test_builtin_records_cover_every_defined_op() -> None:
    names = [r.name for r in tile_op_records()]
    assert names == ["tiled_linear", "tiled_conv1d", "tiled_conv2d"]
    assert sorted(ops.TILE_OPS.values()) == sorted(names)
    for record in tile_op_records():
        assert ops.tile_op_name(record.op.default) == record.name
        assert any(issubclass(record.qat_type, t) for t in record.float_types)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(6, 4), nn.Conv1d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 3, stride=2)],
    ids=["linear", "conv1d", "conv2d"],
)
def test_packed_layer_computes_what_the_qat_layer_does(layer: nn.Module) -> None:
    """float -> QAT (record.qat_type) -> packed (record.packed_type, record.op_args):
    in eval mode the op of the record computes what the QAT layer does."""
    torch.manual_seed(0)
    record = tile_op_for_module(layer)
    qat = record.qat_type.from_float(layer, 2)
    assert tile_op_for_module(qat) is None and tile_op_for_layer(qat) is record
    packed = convert(qat)
    assert isinstance(packed, record.packed_type)
    x = torch.randn(3, 6) if record is LINEAR else torch.randn(2, 2, *[9] * (qat.weight.dim() - 2))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), qat(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed.weight, qat.tiled_weight())


def _record(**changes) -> TileOpRecord:
    fields = {f: getattr(LINEAR, f) for f in TileOpRecord.__dataclass_fields__}
    return TileOpRecord(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "already registered"),
        ({"name": "tiled_nothing"}, r"torch.ops.tbn.tiled_nothing is not defined.*define_tile_op"),
        (
            {"name": "tiled_conv1d", "float_types": (nn.Conv1d,), "qat_type": tbn.TiledConv1d},
            "already registered",
        ),
        (
            {"name": "tiled_conv1d", "float_types": (nn.Conv1d,)},
            "QAT type TiledLinear must subclass one of its float types",
        ),
        ({"packed_type": nn.Module}, "packed type must subclass PackedTileLayer"),
        ({"kernel_builder": "kernels.tiled_linear"}, "kernel_builder must be a 'module:function'"),
    ],
)
def test_register_refuses_incomplete_or_clashing_records(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        register_tile_op(_record(**changes))
    assert len(tile_op_records()) == 3


def test_registering_a_record_again_is_a_no_op() -> None:
    assert register_tile_op(LINEAR) is LINEAR and len(tile_op_records()) == 3


def test_unknown_op_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="tiled_conv3d.*tiled_conv1d"):
        tile_op("tiled_conv3d")


def test_packed_layers_share_one_base() -> None:
    assert all(issubclass(r.packed_type, PackedTileLayer) for r in tile_op_records())


@pytest.mark.skipif(not HAS_TVM, reason="the backends need apache-tvm")
def test_backend_paths_resolve() -> None:
    from tbn_compiler.backends import tile_ops as backend_tile_ops

    converters = backend_tile_ops.relax_converters()
    assert sorted(converters) == sorted(f"{r.name}.default" for r in tile_op_records())
    for record in tile_op_records():
        assert callable(backend_tile_ops.kernel_builder(record.op.default))
    with pytest.raises(ImportError, match="cannot resolve 'tbn_compiler.backends.kernels:nope'"):
        backend_tile_ops.resolve("tbn_compiler.backends.kernels:nope")


@pytest.mark.skipif(not HAS_TVM, reason="the backends need apache-tvm")
@pytest.mark.parametrize(
    ("x_shape", "weight_shape", "stride", "groups", "p", "kind"),
    [
        ((2, 4, 5, 6, 7), (8, 4, 3, 3, 3), 1, 1, 4, "conv_aligned"),  # direct conv
        ((1, 4, 5, 6, 6), (4, 4, 1, 2, 2), 2, 1, 2, "conv_aligned"),  # im2col rows of 16
        ((1, 4, 5, 6, 7), (4, 2, 3, 3, 3), 1, 2, 2, "conv_general"),  # grouped
    ],
)
def test_conv_kernel_builder_takes_three_spatial_dims(
    x_shape, weight_shape, stride, groups, p, kind
) -> None:
    """The conv kernel builder of the conv records is rank-generic: a 3-D conv kernel,
    scheduled and built for the host, computes ``F.conv3d`` with the tiled weight."""
    import numpy as np
    import tvm

    from tbn_compiler import tiling
    from tbn_compiler.backends import kernels, schedule_rules

    g = torch.Generator().manual_seed(0)
    numel = int(np.prod(weight_shape))
    signs = torch.where(torch.rand(numel // p, generator=g) > 0.5, 1.0, -1.0)
    words, alphas = tiling.pack_bits(signs), torch.rand(p, generator=g) + 0.5
    x, bias = torch.randn(*x_shape, generator=g), torch.randn(weight_shape[0], generator=g)
    weight = tiling.reconstruct(signs, alphas, list(weight_shape))
    want = torch.nn.functional.conv3d(x, weight, bias, stride, 1, 1, groups)
    func = kernels.tiled_conv_primfunc(x_shape, weight_shape, stride, 1, 1, groups, p, True)
    assert kernels.kernel_kind(func) == kind
    host = schedule_rules.host_target()
    func = schedule_rules.schedule_for(func, host).with_attr("global_symbol", "main")
    built = tvm.compile(tvm.IRModule({"main": func}), target=host)
    dev = tvm.cpu()
    args = [
        tvm.runtime.tensor(x.numpy(), dev),
        tvm.runtime.tensor(words.view(torch.int32).numpy().view(np.uint32), dev),
        tvm.runtime.tensor(alphas.numpy(), dev),
        tvm.runtime.tensor(bias.numpy(), dev),
    ]
    out = tvm.runtime.tensor(np.zeros(tuple(want.shape), np.float32), dev)
    built["main"](*args, out)
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
