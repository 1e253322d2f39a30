"""TVM lowering: parity with the rewritten graph, save/load, errors, CUDA source."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from models import zoo  # noqa: E402

from tbn_compiler.backends.artifact import ArtifactError, InputError, load  # noqa: E402
from tbn_compiler.backends.build import compile as tbn_compile  # noqa: E402
from tbn_compiler.backends.relax_import import UnsupportedOpError  # noqa: E402
from tbn_compiler.config import TBNConfig  # noqa: E402
from tbn_compiler.inspect import inspect  # noqa: E402
from tbn_compiler.passes import rewrite  # noqa: E402

pytestmark = pytest.mark.tvm

REPO = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()


# --------------------------------------------------------------------------- models

# The foundation test models (tests/models.py), each with a config that leaves at
# least one layer unaligned where the model allows it.
CASES = {
    "mlp": TBNConfig(p=4, min_numel=0),  # layers.2 (10x32) unaligned
    "res_cnn": TBNConfig(p=2, min_numel=0, layers={"fc": 4}),  # fc unaligned
    "grouped_cnn": TBNConfig(p=2, min_numel=0),
    "conv1d": TBNConfig(p=2, min_numel=0),  # fc (3x8) unaligned
    "transformer": TBNConfig(p=4, min_numel=0),
    "functional": TBNConfig(p=4, min_numel=0),
    "tied": TBNConfig(p=4, min_numel=0),
    "gpt2_mlp": TBNConfig(p=2, min_numel=0, layers={"c_attn": 3}),  # c_attn unaligned
}
_ZOO_NAMES = {"res_cnn": "cnn", "grouped_cnn": "grouped", "gpt2_mlp": "gpt2"}


def _build(name: str):
    model, inputs = zoo()[_ZOO_NAMES.get(name, name)]
    return model, inputs, CASES[name]


def _alignment(gm: torch.fx.GraphModule) -> list[bool]:
    """Aligned-ness of each tiled layer in ``gm`` (grouped convs count as unaligned:
    they have no shared product)."""
    return [r["aligned"] for r in inspect(gm).to_dict()["layers"] if r["status"] == "tiled"]


def _assert_close(got, ref) -> None:
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, ref.detach(), rtol=1e-4, atol=1e-5)
    else:
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            _assert_close(g, r)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CASES))
def test_llvm_parity(name: str) -> None:
    model, inputs, cfg = _build(name)
    gm = rewrite(model, inputs, cfg)
    assert _alignment(gm), f"{name}: no layer was tiled"
    cm = tbn_compile(model, inputs, target="llvm", config=cfg)
    with torch.no_grad():
        ref = gm(*inputs)
    _assert_close(cm(*inputs), ref)
    assert cm.target.kind == "llvm"
    assert [s.shape for s in cm.input_specs] == [tuple(t.shape) for t in inputs]


@pytest.mark.parametrize("name", ["mlp", "res_cnn", "conv1d", "gpt2_mlp"])
def test_cases_mix_aligned_and_unaligned(name: str) -> None:
    model, inputs, cfg = _build(name)
    kinds = set(_alignment(rewrite(model, inputs, cfg)))
    assert kinds == {True, False}


def test_multiple_outputs_and_batched_leading_dims() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 12)

        def forward(self, x, y):
            h = self.fc(x)
            return h, h.sum(-1) + y

    torch.manual_seed(0)
    model, x, y = Two().eval(), torch.randn(2, 3, 8), torch.randn(2, 3)
    cfg = TBNConfig(p=2, min_numel=0)
    cm = tbn_compile(model, (x, y), config=cfg)
    out = cm(x, y)
    assert isinstance(out, tuple) and len(out) == 2
    with torch.no_grad():
        _assert_close(out, rewrite(model, (x, y), cfg)(x, y))
    assert [s.name for s in cm.input_specs] == ["x", "y"]


def test_input_errors() -> None:
    model, inputs, cfg = _build("mlp")
    cm = tbn_compile(model, inputs, config=cfg, dynamic_batch=False)  # batch 5 is refused
    (x,) = inputs
    with pytest.raises(InputError, match=r"expected 1 inputs"):
        cm(x, x)
    with pytest.raises(InputError, match=r"input 'x'.*shape \(4, 64\).*\(5, 64\)"):
        cm(torch.randn(5, 64))
    with pytest.raises(InputError, match=r"input 'x'.*dtype float32.*float64"):
        cm(x.double())
    with pytest.raises(InputError, match=r"expected a torch.Tensor"):
        cm(x.numpy())
    # non-contiguous and requires-grad inputs are accepted
    xt = torch.randn(64, 4).t().requires_grad_()
    with torch.no_grad():
        ref = rewrite(model, inputs, cfg)(xt)
    _assert_close(cm(xt), ref)


def test_unsupported_op_names_node() -> None:
    class Bessel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.special.bessel_j0(self.fc(x))

    with pytest.raises(UnsupportedOpError, match=r"special_bessel_j0") as info:
        tbn_compile(Bessel().eval(), torch.randn(2, 8), config=TBNConfig(p=2, min_numel=0))
    assert "node " in str(info.value)


# --------------------------------------------------------------------------- save / load


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compiled CNN saved to disk, with its input and expected output."""
    model, inputs, cfg = _build("res_cnn")
    cm = tbn_compile(model, inputs, config=cfg)
    root = tmp_path_factory.mktemp("artifact")
    path = cm.save(root / "model.tbn")
    torch.save({"x": inputs[0], "y": cm(*inputs)}, root / "io.pt")
    return path, root / "io.pt", cm


def test_save_load_fresh_process(saved) -> None:
    path, io_path, _ = saved
    script = textwrap.dedent(
        f"""
        import sys, torch
        from tbn_compiler.backends.artifact import load
        cm = load({str(path)!r})
        io = torch.load({str(io_path)!r})
        y = cm(io["x"])
        assert torch.equal(y, io["y"]), (y - io["y"]).abs().max()
        assert "tvm" in sys.modules
        print("OK", cm.target.name, cm.input_specs[0].shape)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK llvm (2, 3, 8, 8)" in proc.stdout


def test_load_same_process_and_resave(saved, tmp_path) -> None:
    path, io_path, cm = saved
    cm2 = load(path)
    io = torch.load(io_path)
    assert torch.equal(cm2(io["x"]), io["y"])
    assert cm2.report == (None if cm.report is None else str(cm.report))
    again = cm2.save(tmp_path / "again.tbn")
    assert torch.equal(load(again)(io["x"]), io["y"])


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members = edit(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _edit_meta(fn, update_checksum=True):
    """Edit metadata.json; with ``update_checksum`` also its entry in checksums.json (to
    reach the checks behind the checksum)."""

    def edit(members):
        meta = json.loads(members["metadata.json"])
        fn(meta)
        members["metadata.json"] = json.dumps(meta).encode()
        if update_checksum:
            sums = json.loads(members["checksums.json"])
            sums["metadata.json"] = hashlib.sha256(members["metadata.json"]).hexdigest()
            members["checksums.json"] = json.dumps(sums)
        return members

    return edit


def test_corrupt_artifacts_refused(saved, tmp_path) -> None:
    path, _, _ = saved
    data = path.read_bytes()

    truncated = tmp_path / "truncated.tbn"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated|corrupt"):
        load(truncated)

    junk = tmp_path / "junk.tbn"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ArtifactError, match="not a tbn_compiler compiled module"):
        load(junk)

    def flip(members):
        lib = bytearray(members["library.so"])
        lib[len(lib) // 2] ^= 0xFF
        members["library.so"] = bytes(lib)
        return members

    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load(_rewrite_zip(path, tmp_path / "flipped.tbn", flip))

    def drop(members):
        del members["library.so"]
        return members

    with pytest.raises(ArtifactError, match="missing 'library.so'"):
        load(_rewrite_zip(path, tmp_path / "missing.tbn", drop))

    def version(meta):
        meta["format_version"] = 999

    with pytest.raises(ArtifactError, match="format version 999"):
        load(_rewrite_zip(path, tmp_path / "version.tbn", _edit_meta(version)))

    def reshape(meta):
        meta["inputs"][0]["shape"] = [3, *meta["inputs"][0]["shape"][1:]]

    with pytest.raises(ArtifactError, match="checksum mismatch for 'metadata.json'"):
        load(_rewrite_zip(path, tmp_path / "edited.tbn", _edit_meta(reshape, False)))

    def foreign(meta):
        meta["target"]["tvm_target"]["mtriple"] = "powerpc64le-linux-gnu"

    with pytest.raises(ArtifactError, match="cannot run here"):
        load(_rewrite_zip(path, tmp_path / "foreign.tbn", _edit_meta(foreign)))

    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.tbn")


# --------------------------------------------------------------------------- CUDA


@pytest.fixture(scope="module")
def cuda_module():
    model, inputs, cfg = _build("res_cnn")
    return tbn_compile(model, inputs, target="cuda", config=cfg), model, inputs, cfg


def test_cuda_compile_yields_source(cuda_module) -> None:
    cm, *_ = cuda_module
    assert cm.target.kind == "cuda"
    src = cm.cuda_source()
    assert "__global__" in src
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            cm(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_with_nvcc(cuda_module, arch: str, tmp_path) -> None:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    import tvm
    from tvm.support import nvcc

    cm, model, inputs, cfg = cuda_module
    if cm.target.arch != arch:
        cm = tbn_compile(model, inputs, target=f"cuda:{arch}", config=cfg)
    with tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm"):
        cubin = nvcc.compile_cuda(
            cm.cuda_source(), target_format="cubin", arch=arch, compiler="nvcc"
        )
    assert len(cubin) > 0


def test_cuda_save_load_keeps_source(cuda_module, tmp_path) -> None:
    cm, *_ = cuda_module
    path = cm.save(tmp_path / "cuda.tbn")
    if not HAS_GPU:
        with pytest.raises(ArtifactError, match="cannot run here"):
            load(path)
    loaded = load(path, check_target=False)
    assert "__global__" in loaded.cuda_source()
    assert loaded.target.arch == cm.target.arch


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_parity(name: str) -> None:
    model, inputs, cfg = _build(name)
    with torch.no_grad():
        ref = rewrite(model, inputs, cfg)(*inputs)
    cm = tbn_compile(model, inputs, target="cuda", config=cfg)
    gpu_inputs = [t.cuda() for t in inputs]
    out = cm(*gpu_inputs)
    if isinstance(out, torch.Tensor):
        assert out.is_cuda
        out = out.cpu()
    else:
        out = tuple(o.cpu() for o in out)
    _assert_close(out, ref)
    with pytest.raises(InputError, match="expected a tensor on cuda"):
        cm(*inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_save_load_run(cuda_module, tmp_path) -> None:
    cm, _, inputs, _ = cuda_module
    x = inputs[0].cuda()
    y = cm(x)
    loaded = load(cm.save(tmp_path / "gpu.tbn"))
    torch.testing.assert_close(loaded(x), y)


# --------------------------------------------------------------------------- tuning


def test_tuning_options_validated() -> None:
    from tbn_compiler.backends.tuning import Tuning

    with pytest.raises(ValueError, match="trials"):
        Tuning(trials=-1)
    with pytest.raises(ValueError, match="cost_model"):
        Tuning(cost_model="magic")


def test_tuning_with_empty_database_applies_hand_schedules(tmp_path) -> None:
    from tbn_compiler.backends.tuning import Tuning

    model, inputs, cfg = _build("mlp")
    db = tmp_path / "db"
    cm = tbn_compile(model, inputs, config=cfg, tune=Tuning(trials=0, database=db))
    assert db.is_dir()
    with torch.no_grad():
        _assert_close(cm(*inputs), rewrite(model, inputs, cfg)(*inputs))


def _parallel_kernels(model, inputs, cfg, tune=None) -> set[str]:
    """Names of the host kernels of the model's llvm build (as ``compile`` builds it) that
    launch parallel tasks, from the LLVM IR of the executable before it is exported (a
    compiled module holds the exported library, whose IR is gone)."""
    from tbn_compiler.backends.build import build_executable, make_tvm_target, native_spec
    from tbn_compiler.backends.relax_import import import_graph
    from tbn_compiler.targets import resolve_target

    def modules(m):
        yield m
        for sub in m.imports:
            yield from modules(sub)

    target = make_tvm_target(native_spec(resolve_target("llvm")))
    executable = build_executable(
        import_graph(rewrite(model, inputs, cfg), inputs).mod, target, tune
    )
    found = set()
    for m in modules(executable.mod):
        if m.kind == "llvm":
            ir = m.inspect_source("ll")
            for body in re.finditer(r"^define [^@]*@(\w+)_compute_\(.*?^}", ir, re.S | re.M):
                if "TVMBackendParallelLaunch" in body.group(0):
                    found.add(body.group(1))
    return found


def test_tuned_build_parallelizes_kernels_the_database_misses(tmp_path) -> None:
    """An empty database covers no kernel: the dense layer's matmul (a TVM kernel) must
    still run in parallel, as in the default build, and the result must match."""
    from tbn_compiler.backends.tuning import Tuning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(8, 64)
    cfg = TBNConfig(p=4, min_numel=0, keep_first=True)  # the first layer stays dense
    tuned = tbn_compile(model, (x,), config=cfg, tune=Tuning(trials=0, database=tmp_path))
    parallel = _parallel_kernels(model, (x,), cfg, Tuning(trials=0, database=tmp_path))
    assert any("matmul" in name for name in parallel), parallel
    assert parallel == _parallel_kernels(model, (x,), cfg)
    with torch.no_grad():
        _assert_close(tuned(x), rewrite(model, (x,), cfg)(x))


@pytest.mark.slow
def test_tuning_parity_and_database_reuse(tmp_path) -> None:
    from tbn_compiler.backends.tuning import Tuning

    model, inputs, cfg = _build("mlp")
    db = tmp_path / "db"
    tune = Tuning(trials=4, database=db, num_trials_per_iter=2, max_workers=1, progress=False)
    cm = tbn_compile(model, inputs, config=cfg, tune=tune)
    with torch.no_grad():
        ref = rewrite(model, inputs, cfg)(*inputs)
    _assert_close(cm(*inputs), ref)
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert records, "tuning wrote no records"
    again = tbn_compile(model, inputs, config=cfg, tune=Tuning(trials=0, database=db))
    _assert_close(again(*inputs), ref)


def test_generic_cpu_schedule_runs_a_matmul_and_its_epilogue_row_by_row() -> None:
    """A TVM-legalized matmul and the ReLU after it run in one parallel loop over rows,
    vectorized inside a row (tests/test_cpu_schedules.py has the other cases)."""
    import numpy as np
    import tvm
    from tvm import te

    from tbn_compiler.backends.schedule_rules import parallelize_generic

    a = te.placeholder((64, 32), name="a")
    b = te.placeholder((32, 48), name="b")
    k = te.reduce_axis((0, 32), name="k")
    mm = te.compute((64, 48), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="mm")
    relu = te.compute((64, 48), lambda i, j: tvm.tirx.max(mm[i, j], 0.0), name="relu")
    func = parallelize_generic(te.create_prim_func([a, b, relu]), min_work=1)
    script = func.script()
    # one parallel row loop; the matmul's init and update and the ReLU as vectors
    assert script.count("T.parallel") == 1 and script.count("T.vectorized") == 3
    lib = tvm.compile(tvm.IRModule({"main": func}), "llvm")
    x, y = np.random.rand(64, 32).astype("float32"), np.random.rand(32, 48).astype("float32")
    out = tvm.runtime.tensor(np.zeros((64, 48), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    np.testing.assert_allclose(out.numpy(), np.maximum(x @ y, 0), rtol=1e-5)


def test_huggingface_gpt2_compiles_with_parity() -> None:
    """A real model: boolean attention masks and bool cumsum/eq need import fixes."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    cfg = TBNConfig(p=2, min_numel=0)
    cm = tbn_compile(model, (ids,), config=cfg)
    with torch.no_grad():
        ref = rewrite(model, (ids,), cfg)(ids)
    out = cm(ids)  # the model's own output class, as the graph returns it
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    _assert_close(out["last_hidden_state"], ref["last_hidden_state"])
    assert cm.report.totals["tiled"] == 8
