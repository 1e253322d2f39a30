"""TVM's CUDA runtime built with the project, compiled kernels (fatbins) in CUDA artifacts,
loading and calling with TVM's runtime only (``TVM_USE_RUNTIME_LIB=1``), and the deploy
bundle. Everything here runs without a GPU; where one is visible, the CUDA artifacts of
its architecture are also run and compared with the rewritten graph. References: the
rewritten graph run in PyTorch, the fatbin layout (magic ``0xBA55ED50``, one entry per
architecture and kind) read independently of TVM."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import artifact, cuda_runtime  # noqa: E402
from tbn_compiler.backends.specs import check_index_inputs  # noqa: E402

pytestmark = pytest.mark.tvm

HAS_NVCC = shutil.which("nvcc") is not None
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found on PATH")
ARCHS = ("sm_80", "sm_90")
CFG = tbn.TBNConfig(p=2, min_numel=0)
FATBIN_MAGIC = 0xBA55ED50
ELF_KIND = 2


# --------------------------------------------------------------------------- model


class AllKinds(nn.Module):
    """One aligned and one modulo-indexed layer of each tile op (p=2): linear, conv1d,
    conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.lin_a = nn.Linear(8, 6)  # 48 weights, chunk 24 = 3 rows of 8: aligned
        self.lin_m = nn.Linear(6, 5)  # chunk 15, rows of 6: modulo
        self.c1_a = nn.Conv1d(4, 6, 3)  # chunk 36 = 3 rows of 12: aligned
        self.c1_m = nn.Conv1d(6, 5, 3)  # chunk 45, rows of 18: modulo
        self.c2_a = nn.Conv2d(2, 4, 3)  # chunk 36 = 2 rows of 18: aligned
        self.c2_m = nn.Conv2d(4, 3, 3, padding=1)  # chunk 54, rows of 36: modulo

    def forward(self, vec, seq, img):
        v = self.lin_m(torch.relu(self.lin_a(vec)))
        s = self.c1_m(torch.relu(self.c1_a(seq)))
        i = self.c2_m(torch.relu(self.c2_a(img)))
        return v, s, i


class TwoBatches(nn.Module):
    """:class:`AllKinds` applied to a batch of 1 and a batch of 3: every tile-op kind at
    both batch sizes in one program (one kernel build per architecture)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = AllKinds()

    def forward(self, v1, s1, i1, v3, s3, i3):
        return {"batch1": self.net(v1, s1, i1), "batch3": self.net(v3, s3, i3)}


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    shapes = [(8,), (4, 10), (2, 7, 7)]
    return tuple(torch.randn(b, *s, generator=g) for b in (1, 3) for s in shapes)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net, inputs = TwoBatches().eval(), _inputs()
    gm = tbn.rewrite(net, inputs, CFG)
    with torch.no_grad():
        ref = gm(*inputs)
    return net, gm, inputs, ref


@pytest.fixture(scope="module")
def llvm_artifact(model, tmp_path_factory) -> Path:
    net, _gm, inputs, _ref = model
    cm = tbn.compile(net, inputs, target="llvm", config=CFG)
    return cm.save(tmp_path_factory.mktemp("llvm") / "all_kinds.tbn")


@pytest.fixture(scope="module")
def cuda_artifacts(model, tmp_path_factory) -> dict[str, Path]:
    if not HAS_NVCC:
        pytest.skip("nvcc not found on PATH")
    net, _gm, inputs, _ref = model
    out = tmp_path_factory.mktemp("cuda")
    return {
        arch: tbn.compile(net, inputs, target=f"cuda:{arch}", config=CFG).save(
            out / f"all_kinds_{arch}.tbn"
        )
        for arch in ARCHS
    }


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flat(value[k])]
    return [t for v in value for t in _flat(v)]


def _assert_close(got, ref) -> None:
    assert type(got) is type(ref)
    got, ref = _flat(got), _flat(ref)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the library


@pytest.fixture(scope="module")
def runtime_library() -> Path:
    """The installed library; built here if `make setup` did not (a no-op otherwise)."""
    if not HAS_NVCC:
        pytest.skip("nvcc not found on PATH")
    result = cuda_runtime.build()
    if result.status == "skipped":
        pytest.skip(result.message)
    assert result.library is not None
    return result.library


def test_runtime_library_is_built_and_up_to_date(runtime_library: Path) -> None:
    assert runtime_library == cuda_runtime.installed_library()
    assert runtime_library.is_file()
    assert cuda_runtime.build().status == "up to date"  # a second run does nothing
    if cuda_runtime.find_driver() is None:
        assert cuda_runtime.stand_in_library().is_file()


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not found")
def test_runtime_library_links_the_driver_and_static_cudart(runtime_library: Path) -> None:
    dynamic = subprocess.run(
        ["readelf", "-d", str(runtime_library)], capture_output=True, text=True, check=True
    ).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic))
    assert {"libtvm_runtime.so", "libtvm_ffi.so", "libcuda.so.1"} <= needed
    assert not any(n.startswith("libcudart") for n in needed)  # linked statically


def test_setup_without_nvcc_prints_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = str(tmp_path)  # no nvcc there
    script = Path(cuda_runtime.__file__)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: nvcc not found"), proc.stdout


# --------------------------------------------------------------------------- fatbins


def _fatbin_entries(blob: bytes) -> list[tuple[int, int, bytes]]:
    """(kind, sm number, payload) of every entry of the first fatbin in ``blob``."""
    start = blob.find(struct.pack("<I", FATBIN_MAGIC))
    assert start >= 0, "no fatbin in the library"
    _magic, _version, header, size = struct.unpack_from("<IHHQ", blob, start)
    entries, offset, end = [], start + header, start + header + size
    while offset < end:
        kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", blob, offset)
        (arch,) = struct.unpack_from("<I", blob, offset + 28)
        body = blob[offset + entry_header : offset + entry_header + payload]
        entries.append((kind, arch, body))
        offset += entry_header + payload
    return entries


def test_every_tile_op_kind_is_tiled_at_both_batch_sizes(model) -> None:
    _net, gm, _inputs, _ref = model
    layers = [r for r in tbn.inspect(gm).to_dict()["layers"] if r["status"] == "tiled"]
    kinds = {(r["op"], r["aligned"]) for r in layers}
    assert len(layers) == 6 and len(kinds) == 6 and {a for _o, a in kinds} == {True, False}
    assert all(r["uses"] == 2 for r in layers)  # each layer runs at batch 1 and batch 3


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_artifact_holds_a_fatbin_for_its_arch(cuda_artifacts, arch: str) -> None:
    with zipfile.ZipFile(cuda_artifacts[arch]) as z:
        meta = json.loads(z.read("metadata.json"))
        library, source = z.read("library.so"), z.read("kernels.cu").decode()
    assert meta["cuda_kernels"] == "fatbin" and meta["target"]["tvm_target"]["arch"] == arch
    assert b"__global__" not in library  # compiled code, not source
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)", source))
    tile_kernels = {k for k in kernels if k.startswith("tbn_")}
    assert len({re.sub(r"_kernel(_\d+)?$", "", k) for k in tile_kernels}) == 12  # 6 x 2
    elves = [body for kind, sm, body in _fatbin_entries(library) if kind == ELF_KIND]
    archs = [sm for kind, sm, _body in _fatbin_entries(library) if kind == ELF_KIND]
    assert archs == [int(arch.removeprefix("sm_"))]
    assert elves[0].startswith(b"\x7fELF")
    symbols = set(re.findall(rb"[A-Za-z_][A-Za-z0-9_]*", elves[0]))
    assert {k.encode() for k in kernels} <= symbols  # every kernel compiled for arch


@needs_nvcc
def test_cuda_artifact_refuses_another_gpu_naming_both(cuda_artifacts, monkeypatch) -> None:
    for module in (artifact, sys.modules["tbn_compiler.targets.registry"]):
        monkeypatch.setattr(module, "local_cuda_arch", lambda: "sm_86")
    with pytest.raises(tbn.ArtifactError, match=r"compiled for sm_90, this GPU is sm_86"):
        tbn.load(cuda_artifacts["sm_90"])


def test_llvm_artifact_checks_cpu_features_without_llvm(llvm_artifact, monkeypatch) -> None:
    here = artifact.host_cpu_features()
    if not here:
        pytest.skip("this system does not list CPU features")
    with zipfile.ZipFile(llvm_artifact) as z:
        recorded = json.loads(z.read("metadata.json"))["cpu_features"]
    assert recorded == here
    monkeypatch.setattr(artifact, "_llvm_host_cpu", lambda: None)  # TVM's runtime only
    assert tbn.load(llvm_artifact).cpu_features == here
    monkeypatch.setattr(artifact, "host_cpu_features", lambda: here[1:])
    with pytest.raises(tbn.ArtifactError, match=f"lacks its features {re.escape(here[0])}"):
        tbn.load(llvm_artifact)


# --------------------------------------------------------------------------- runtime only

_RUNTIME_ONLY_SCRIPT = """
import json, sys
import torch
import tbn_compiler as tbn
import tvm
from tbn_compiler.backends import artifact, cuda_runtime
from tbn_compiler.targets import local_cuda_arch, registry

llvm, inputs_path, out_path, cuda_paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
inputs = torch.load(inputs_path)
report = {"outputs": {}}
report["outputs"]["llvm"] = out_path + ".llvm"
torch.save(tbn.load(llvm)(*inputs), report["outputs"]["llvm"])
gpu = local_cuda_arch()
report["gpu"] = gpu
for path in cuda_paths:
    arch = tbn.load(path, check_target=False).target.arch
    entry = report.setdefault("cuda", {}).setdefault(arch, {})
    try:
        module = tbn.load(path)
    except tbn.ArtifactError as exc:
        entry["load_error"] = str(exc)
        lazy = tbn.load(path, check_target=False)
        try:
            lazy(*inputs)
        except RuntimeError as exc:
            entry["call_error"] = str(exc)
        continue
    entry["output"] = out_path + "." + arch
    torch.save(module(*[t.cuda() for t in inputs]), entry["output"])
if cuda_paths:
    cuda_runtime.load()
    report["cuda_runtime_loaded"] = cuda_runtime.is_loaded()
    report["device_exists"] = bool(tvm.cuda(0).exist)
    if gpu is None:  # pretend a GPU: TVM's CUDA runtime deserializes the fatbin module
        artifact.local_cuda_arch = registry.local_cuda_arch = lambda: "sm_90"
        module = tbn.load([p for p in cuda_paths if p.endswith("sm_90.tbn")][0])
        report["cuda_module_kinds"] = [m.kind for m in artifact._walk_imports(module.library)]
report["relax_imported"] = sorted(m for m in sys.modules if m.startswith("tvm.relax"))
report["tvm_libraries"] = sorted(tvm.base._LOADED_LIBS)
report["mapped"] = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libtvm" in l})
report["modules"] = {m: sys.modules[m].__file__ for m in ("tvm", "tvm_ffi", "tbn_compiler")}
print(json.dumps(report))
"""

_BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("networkx", "tabulate") or name.startswith("tvm.relax"):
            raise ImportError(f"{name} is not part of the deploy bundle")
sys.meta_path.insert(0, _Block())
"""


def _run_runtime_only(tmp: Path, artifacts: list[Path], inputs, env_extra=None, prelude=""):
    inputs_path = tmp / "inputs.pt"
    torch.save(inputs, inputs_path)
    script = tmp / "run.py"
    script.write_text(prelude + textwrap.dedent(_RUNTIME_ONLY_SCRIPT))
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, str(script), str(artifacts[0]), str(inputs_path), str(tmp / "out")]
        + [str(a) for a in artifacts[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runtime_only(request, model, llvm_artifact, tmp_path_factory):
    """One runtime-only process: the llvm artifact, then the CUDA ones (where nvcc is)."""
    cuda = list(request.getfixturevalue("cuda_artifacts").values()) if HAS_NVCC else []
    return _run_runtime_only(tmp_path_factory.mktemp("rt"), [llvm_artifact, *cuda], model[2])


def test_runtime_only_load_and_call_match_the_rewritten_graph(model, runtime_only) -> None:
    *_rest, ref = model
    _assert_close(torch.load(runtime_only["outputs"]["llvm"]), ref)
    assert runtime_only["relax_imported"] == []
    assert "tvm_compiler" not in runtime_only["tvm_libraries"]
    assert not any("libtvm_compiler" in lib for lib in runtime_only["mapped"])


def test_runtime_only_cuda_without_a_gpu_fails_clearly(model, runtime_only) -> None:
    if "cuda" not in runtime_only:
        pytest.skip("no CUDA artifacts (nvcc or TVM's CUDA runtime missing)")
    gpu = runtime_only["gpu"]
    assert runtime_only["cuda_runtime_loaded"]
    assert runtime_only["device_exists"] == (gpu is not None)
    for arch, entry in runtime_only["cuda"].items():
        if gpu is None:
            assert "no CUDA GPU is visible" in entry["load_error"]
            assert "needs a CUDA GPU" in entry["call_error"]
        elif gpu != arch:
            assert f"compiled for {arch}, this GPU is {gpu}" in entry["load_error"]
        else:
            _assert_close(torch.load(entry["output"]), model[3])
    if gpu is None:
        assert "cuda" in runtime_only["cuda_module_kinds"]


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    torch.manual_seed(0)
    model, ids = Embedded().eval(), torch.randint(0, 50, (2, 5))
    target = "cuda" if torch.cuda.is_available() else "llvm"
    cm = tbn.compile(model, (ids,), target=target, config=CFG)
    return model, cm, tbn.load(cm.save(tmp_path_factory.mktemp("emb") / "emb.tbn")), ids


@pytest.mark.parametrize("bad", [50, -1])
def test_index_checks_travel_with_the_artifact(embedded, bad: int) -> None:
    model, cm, loaded, ids = embedded
    assert loaded.index_checks == cm.index_checks and len(cm.index_checks) == 1
    ids_bad = ids.clone()
    ids_bad[1, 3] = bad
    with pytest.raises(IndexError, match="index out of range in self"):
        model(ids_bad)  # torch's behaviour, the reference
    check_index_inputs(loaded.index_checks, {loaded.input_specs[0].name: ids})
    with pytest.raises(IndexError, match=r"index out of range.*'emb'.*50 rows"):
        check_index_inputs(loaded.index_checks, {loaded.input_specs[0].name: ids_bad})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_module_refuses_bad_ids_like_the_host_kernel(embedded) -> None:
    model, _cm, loaded, ids = embedded
    with torch.no_grad():
        ref = tbn.rewrite(model, (ids,), CFG)(ids)
    _assert_close(loaded(ids.cuda()), ref)
    ids_bad = ids.clone()
    ids_bad[0, 0] = 50
    with pytest.raises(IndexError, match=r"index out of range.*'emb'.*50 rows"):
        loaded(ids_bad.cuda())


# --------------------------------------------------------------------------- deploy bundle


@needs_nvcc
def test_deploy_bundle_runs_an_artifact_with_only_its_packages(
    model, llvm_artifact, runtime_library, tmp_path, capsys
) -> None:
    from tbn_compiler import cli

    assert cli.main(["deploy-bundle", str(tmp_path / "bundle")]) == 0
    printed = capsys.readouterr().out.strip()
    python = tmp_path / "bundle" / "python"
    assert (python / "tvm" / "lib" / cuda_runtime.LIBRARY).is_file()
    assert not (python / "tvm" / "lib" / "libtvm_compiler.so").exists()
    assert not list(python.rglob("libcuda.so*"))  # never the stand-in driver
    files = [p for p in (tmp_path / "bundle").rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert (
        printed == f"deploy bundle {tmp_path / 'bundle'}: {len(files)} files, {size / 1e6:.1f} MB"
    )
    assert size < 40e6
    assert cli.main(["deploy-bundle", str(tmp_path / "bundle")]) == 2  # not empty
    assert "is not an empty directory" in capsys.readouterr().err
    env = {"PYTHONPATH": str(python)}
    report = _run_runtime_only(tmp_path, [llvm_artifact], model[2], env, textwrap.dedent(_BLOCKER))
    _assert_close(torch.load(report["outputs"]["llvm"]), model[3])
    for name, file in report["modules"].items():
        assert Path(file).is_relative_to(python), f"{name} came from {file}"
    assert all(Path(lib).is_relative_to(python) for lib in report["mapped"]), report["mapped"]
