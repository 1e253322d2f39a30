"""The opt-in int8 precision of CPU builds (backends.int8_kernels,
schedule_rules.int8_cpu, compile(..., precision="int8")).

The int8 kernel is checked against a numpy reference of the same quantization (per-row
symmetric absmax scale, round half to even, exact integer sums: compared tightly), and
against plain float math within the bound of its input rounding, in both forms (panel;
bits, for few rows with VNNI); the CPU rule picks them by batch (without VNNI the exact
float32 kernel below INT8_MIN_ROWS rows); compile records the precision, saves
it, validates against the rewritten graph within INT8_TOLERANCE and refuses bad values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

tvm = pytest.importorskip("tvm")

from int8_reference import assert_tight as _tight  # noqa: E402
from int8_reference import edge_rows  # noqa: E402
from int8_reference import int8_reference as _int8_reference  # noqa: E402
from int8_reference import random_layer as _layer  # noqa: E402
from kernel_run import build_kernel  # noqa: E402
from tvm import tirx  # noqa: E402

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import int8_kernels, kernels, schedule_rules  # noqa: E402
from tbn_compiler.backends.schedule_rules import int8_cpu  # noqa: E402
from tbn_compiler.backends.validate import INT8_TOLERANCE, scaled_error  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = schedule_rules.host_target()


def _float_reference(x: torch.Tensor, signs, alphas, bias) -> np.ndarray:
    """Plain float math: the weight is the p scaled copies of the tile, stacked."""
    weight = torch.cat([a * signs for a in alphas])
    out = x.double() @ weight.double().T
    return (out if bias is None else out + bias.double()).float().numpy()


def _words(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).numpy().view(np.uint32)


def _call(lib, x: torch.Tensor, words, alphas, bias, n: int) -> np.ndarray:
    arrays = [x.numpy(), _words(words), alphas.numpy()] + (
        [bias.numpy()] if bias is not None else []
    )
    out = tvm.runtime.tensor(np.zeros((x.shape[0], n), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


def _int8_form(m, k: int, n: int, p: int, bias: bool, target=HOST) -> tirx.PrimFunc:
    """The int8 form of a linear_aligned kernel, scheduled for ``target`` (every batch)."""
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, bias)
    form = int8_kernels.int8_linear_primfunc(func)
    assert form is not None
    sch = tvm.s_tir.Schedule(form)
    int8_cpu.schedule_int8_linear(sch, int8_cpu._dot_intrinsic(target))
    return sch.mod["main"]


KERNEL_CASES = [
    # m, in, out, p, bias
    (1, 256, 128, 4, True),
    (7, 256, 96, 3, False),
    (64, 512, 512, 8, True),
    (64, 128, 80, 1, False),  # 80 tile rows: padded to 96
]


@pytest.mark.parametrize("m,k,n,p,bias", KERNEL_CASES)
def test_int8_kernel_matches_quantized_reference(m, k, n, p, bias):
    words, signs, alphas, b = _layer(k, n, p, bias)
    x = torch.randn(m, k) * 3
    got = _call(build_kernel(_int8_form(m, k, n, p, bias)), x, words, alphas, b, n)
    _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


def test_int8_kernel_symbolic_batch():
    k, n, p = 256, 256, 4
    words, signs, alphas, b = _layer(k, n, p, True, seed=1)
    lib = build_kernel(_int8_form(tirx.Var("batch", "int64"), k, n, p, True))
    for m in (1, 7, 64):
        x = torch.randn(m, k)
        got = _call(lib, x, words, alphas, b, n)
        _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


def test_int8_kernel_edge_rows():
    """A zero row gives the bias; a row with one large value keeps it (amax scale)."""
    k, n, p = 128, 64, 2
    words, signs, alphas, b = _layer(k, n, p, True, seed=2)
    x = edge_rows(4, k)
    got = _call(build_kernel(_int8_form(4, k, n, p, True)), x, words, alphas, b, n)
    np.testing.assert_array_equal(got[1], b.numpy())
    _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


@pytest.mark.parametrize(
    "target",
    [
        {"kind": "llvm", "mcpu": "skylake-avx512"},  # AVX-512 BW, no VNNI
        {"kind": "llvm"},  # no AVX-512: plain vectors
    ],
    ids=["avx512bw", "generic"],
)
def test_int8_kernel_without_vnni(target):
    target = tvm.target.Target(target)
    m, k, n, p = 16, 256, 128, 4
    words, signs, alphas, b = _layer(k, n, p, True, seed=3)
    x = torch.randn(m, k)
    got = _call(build_kernel(_int8_form(m, k, n, p, True, target), target), x, words, alphas, b, n)
    _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


def test_int8_error_bound_against_float_math():
    """Each input moves by at most amax_i / 254 (half a step of the int8 grid), so an
    output moves by at most |alpha| * in * amax_i / 254; typically about 1e-2 of the
    output range for Gaussian inputs."""
    m, k, n, p = 64, 512, 512, 8
    words, signs, alphas, b = _layer(k, n, p, True, seed=4)
    x = torch.randn(m, k)
    got = _call(build_kernel(_int8_form(m, k, n, p, True)), x, words, alphas, b, n)
    ref = _float_reference(x, signs, alphas, b)
    amax = x.abs().amax(dim=1, keepdim=True).numpy()
    alpha_col = np.repeat(alphas.numpy(), n // p)[None, :]
    bound = alpha_col * k * amax / 254 * (1 + 1e-4) + 1e-4
    assert (np.abs(got - ref) <= bound).all()
    relative = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-4 < relative < 3e-2


def _bits_form(m, k: int, n: int, p: int, bias: bool, rows: int) -> tirx.PrimFunc:
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, bias)
    form = int8_kernels.int8_linear_primfunc(func, bits=True, row_block=rows)
    sch = tvm.s_tir.Schedule(form)
    int8_cpu.schedule_int8_bits(sch, rows)
    return sch.mod["main"]


VNNI = int8_cpu._dot_intrinsic(HOST) == int8_cpu.VNNI_DOT
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI")


@needs_vnni
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("m,k,n,p,bias", KERNEL_CASES)
def test_int8_bits_form_matches_quantized_reference(m, k, n, p, bias, rows):
    """Bits form, input rows one at a time or in blocks of 4 (7 rows: padded to 8)."""
    words, signs, alphas, b = _layer(k, n, p, bias, seed=6)
    x = torch.randn(m, k) * 3
    got = _call(build_kernel(_bits_form(m, k, n, p, bias, rows)), x, words, alphas, b, n)
    _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


def _marked(m, k: int, n: int, p: int) -> tirx.PrimFunc:
    func = kernels.tiled_linear_primfunc(m, k, n, p, False, True)
    return func.with_attr(int8_kernels.PRECISION_ATTR, "int8")


@needs_vnni
def test_rule_runs_int8_at_every_batch_with_vnni():
    """With VNNI: the bits form below BITS_MAX_ROWS rows (one row at a time below
    BITS_BLOCK_ROWS), the panel form from there on (static and symbolic batch), all the
    same int8 computation."""
    k, n, p = 256, 128, 4
    words, signs, alphas, b = _layer(k, n, p, True, seed=5)
    dynamic = build_kernel(
        schedule_rules.schedule_for(_marked(tirx.Var("batch", "int64"), k, n, p), HOST)
    )
    block, most = int8_cpu.BITS_BLOCK_ROWS, int8_cpu.BITS_MAX_ROWS
    for m in (1, block - 1, block, most - 1, most, 64):
        x = torch.randn(m, k)
        static = build_kernel(schedule_rules.schedule_for(_marked(m, k, n, p), HOST))
        for lib in (static, dynamic):
            got = _call(lib, x, words, alphas, b, n)
            _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


def test_rule_without_vnni_runs_float32_below_min_rows():
    """Without VNNI (AVX-512 BW only): the int8 panel form from INT8_MIN_ROWS rows; fewer
    run the exact float32 kernel (static and symbolic batch)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    k, n, p = 256, 128, 4
    words, signs, alphas, b = _layer(k, n, p, True, seed=5)

    def build(m):
        return build_kernel(schedule_rules.schedule_for(_marked(m, k, n, p), target), target)

    dynamic = build(tirx.Var("batch", "int64"))
    for m in (int8_cpu.INT8_MIN_ROWS - 1, int8_cpu.INT8_MIN_ROWS):
        x = torch.randn(m, k)
        for lib in (build(m), dynamic):
            got = _call(lib, x, words, alphas, b, n)
            if m < int8_cpu.INT8_MIN_ROWS:
                ref = _float_reference(x, signs, alphas, b)
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            else:
                _tight(got, _int8_reference(x.numpy(), signs, alphas, b, p))


def test_int8_form_declines_unaligned_rows():
    """Tile rows that are not whole words (in % 32 != 0): no int8 form (float32 runs)."""
    func = kernels.tiled_linear_primfunc(16, 40, 32, 2, False, True)
    assert int8_kernels.int8_linear_primfunc(func) is None


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(128, 256)
        self.b = nn.Linear(256, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_compile_int8_mlp(tmp_path):
    torch.manual_seed(0)
    model = _MLP().eval()
    x = torch.randn(32, 128)
    cfg = tbn.TBNConfig(p=4)
    cm = tbn.compile(model, (x,), config=cfg, precision="int8")
    assert cm.precision == "int8"
    assert cm.validation.status == "passed" and cm.validation.max_error <= INT8_TOLERANCE
    gm = tbn.rewrite(model, (x,), cfg)
    for batch in (1, 64):
        xb = torch.randn(batch, 128)
        with torch.no_grad():
            err = scaled_error(gm(xb), cm(xb))
        if batch < int8_cpu.INT8_MIN_ROWS and not VNNI:
            assert err < 1e-5  # float32 kernels
        else:
            assert 1e-5 < err < INT8_TOLERANCE  # int8 activations, not float32
    loaded = tbn.load(cm.save(tmp_path / "m.tbn"))
    assert loaded.precision == "int8"
    assert tbn.compile(model, (x,), config=cfg).precision == "float32"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"precision": "int4"}, "precision='int4' is not one of 'float32', 'int8'"),
        ({"precision": 8}, "precision=8 is not one of"),
        ({"precision": "int8", "target": "cuda"}, "precision='int8' is available for host CPU"),
    ],
)
def test_bad_precision_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tbn.compile(_MLP().eval(), (torch.randn(2, 128),), **kwargs)


def test_int8_with_tuning_raises(tmp_path):
    tune = tbn.Tuning(trials=0, database=tmp_path / "db")
    with pytest.raises(ValueError, match="precision='int8' cannot be combined with tune"):
        tbn.compile(_MLP().eval(), (torch.randn(2, 128),), tune=tune, precision="int8")


def cli_mlp() -> nn.Module:
    """The model ``tbnc compile`` loads below (``test_int8_mode:cli_mlp``)."""
    torch.manual_seed(0)
    return _MLP().eval()


def test_tbnc_compile_precision(tmp_path, capsys):
    from tbn_compiler import cli

    out = tmp_path / "m.tbn"
    argv = ["compile", "test_int8_mode:cli_mlp", "--shape", "2,128", "-o", str(out)]
    assert cli.main([*argv, "--p", "4", "--precision", "int8"]) == 0
    assert tbn.load(out).precision == "int8"
    capsys.readouterr()
    code = cli.main([*argv, "--precision", "int8", "--target", "mps2-an386"])
    err = capsys.readouterr().err
    assert code != 0 and "precision='int8' is available for host CPU" in err


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))


def test_int8_divergence_is_located_at_int8_tolerance(monkeypatch):
    """A wrong op after int8 linears is still the node named: the bisection's probes use
    INT8_TOLERANCE too (at 1e-3 the first int8 linear would be blamed)."""
    from tbn_compiler.backends.relax_import import SEMANTIC_CONVERTERS, relax

    torch.manual_seed(0)
    x = torch.randn(32, 64)
    gm = tbn.rewrite(_TwoLayers().eval(), x, tbn.TBNConfig(p=4, min_numel=0))
    relus = [n for n in gm.graph.nodes if n.op == "call_function" and "relu" in str(n.target)]
    convert = SEMANTIC_CONVERTERS["relu.default"]

    def wrong(node, importer):
        out = convert(node, importer)
        if node.name != relus[1].name:
            return out
        scaled = relax.op.multiply(out, relax.const(1.5, "float32"))
        return importer.block_builder.emit(scaled)

    monkeypatch.setitem(SEMANTIC_CONVERTERS, "relu.default", wrong)
    with pytest.raises(tbn.ValidationError) as info:
        tbn.compile_graph(gm, x, precision="int8")
    assert info.value.divergence is not None
    assert info.value.divergence.node == relus[1].name
    assert "tolerance 0.05" in str(info.value)
