"""Dynamic batch on llvm: one compile (from a batch-1 or a batch-4 example) runs every
batch size with the rewritten graph's results; signatures name the batch, survive
save/load, and calls that do not fit raise InputError naming the dims."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("tvm")

from models import Conv1D  # noqa: E402

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends.artifact import InputError  # noqa: E402
from tbn_compiler.backends.kernels import kernel_kind  # noqa: E402
from tbn_compiler.backends.relax_import import import_graph  # noqa: E402

pytestmark = pytest.mark.tvm

CFG = tbn.TBNConfig(p=4, min_numel=0)
BATCHES = (1, 3, 7, 17, 64)


class PoolCNN(nn.Module):
    """conv + BN + ReLU, max pooling, conv, average pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class EmbeddingBag(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(dim=1))


class SequenceMLP(nn.Module):
    """Linear layers over the last dim of (batch, seq, feat) inputs, and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class AllKernelKinds(nn.Module):
    """Every tile kernel kind: conv1d (aligned), grouped conv1d (general), a GPT-2
    ``Conv1D`` (in/out weight, aligned) and an unaligned linear (general)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.proj = Conv1D(12, 8)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.grouped(F.relu(self.conv(x))))
        return self.head(F.relu(self.proj(x.transpose(1, 2).contiguous())))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 50, (batch, 6))


MODELS = {
    "mlp": (_mlp, lambda b: torch.randn(b, 64)),
    "cnn": (PoolCNN, lambda b: torch.randn(b, 3, 8, 8)),
    "encoder": (_encoder_layer, lambda b: torch.randn(b, 5, 32)),
    "embedding": (EmbeddingBag, _ids),
    "sequence": (SequenceMLP, lambda b: torch.randn(b, 7, 24)),
    "kinds": (AllKernelKinds, lambda b: torch.randn(b, 4, 6)),
}


def _model(name: str) -> tuple[nn.Module, object]:
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model, make_input


_BUILT: dict[tuple[str, int], tuple] = {}


def _built(name: str, example_batch: int = 1):
    """(compiled module, rewritten graph, input maker) of a model, compiled once."""
    key = (name, example_batch)
    if key not in _BUILT:
        model, make_input = _model(name)
        x = make_input(example_batch)
        gm = tbn.rewrite(model, (x,), CFG)
        _BUILT[key] = (tbn.compile(model, (x,), config=CFG), gm, make_input)
    return _BUILT[key]


def _assert_matches_graph(cm, gm, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = gm(x)
    got = cm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, example_batch",
    [(name, 1) for name in MODELS] + [("mlp", 4), ("embedding", 4)],
)
def test_one_compile_runs_every_batch_size(name: str, example_batch: int) -> None:
    cm, gm, make_input = _built(name, example_batch)
    assert cm.dynamic_batch and cm.static_batch is None
    spec = cm.input_specs[0]
    assert spec.dims[0] == "batch" and spec.dims[1:] == spec.shape[1:]
    assert spec.shape[0] == example_batch  # the example's shape stays the spec's shape
    assert cm.output_specs[0].dims[0] == "batch"
    torch.manual_seed(1)
    for batch in BATCHES:
        _assert_matches_graph(cm, gm, make_input(batch))


def test_every_tile_kernel_kind_takes_a_symbolic_batch() -> None:
    cm, gm, make_input = _built("kinds")
    mod = import_graph(gm, (make_input(1),), dynamic_batch=True).mod
    kinds = {kernel_kind(f) for f in mod.functions.values() if kernel_kind(f)}
    assert kinds == {"conv_aligned", "conv_general", "linear_in_out_aligned", "linear_general"}
    assert cm.dynamic_batch


def test_index_checks_hold_at_every_batch_size() -> None:
    cm, _, _ = _built("embedding")
    assert [c["input"] for c in cm.index_checks] == ["ids"]
    for batch in (1, 5):
        ids = _ids(batch)
        ids[-1, 2] = 50
        with pytest.raises(IndexError, match="embedding .* has 50 rows"):
            cm(ids)


def test_save_and_load_keep_the_dynamic_signature(tmp_path) -> None:
    cm, gm, make_input = _built("sequence")
    loaded = tbn.load(cm.save(tmp_path / "seq.tbn"))
    assert loaded.input_specs == cm.input_specs and loaded.output_specs == cm.output_specs
    assert loaded.input_specs[0].dims == ("batch", 7, 24) and loaded.dynamic_batch
    for batch in (2, 9):
        _assert_matches_graph(loaded, gm, make_input(batch))


def test_a_wrong_static_dim_raises_input_error_naming_the_dims() -> None:
    cm, _, _ = _built("sequence")
    with pytest.raises(
        InputError, match=r"input 'x': expected shape \(batch, 7, 24\), got \(3, 7, 25\)"
    ):
        cm(torch.randn(3, 7, 25))
    with pytest.raises(InputError, match=r"expected shape \(batch, 7, 24\), got \(3, 24\)"):
        cm(torch.randn(3, 24))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * y


def test_batched_inputs_share_one_batch_size() -> None:
    torch.manual_seed(0)
    model, x, y = TwoInputs().eval(), torch.randn(2, 16), torch.randn(2, 16)
    cm = tbn.compile(model, (x, y), config=CFG)
    assert [s.dims for s in cm.input_specs] == [("batch", 16), ("batch", 16)]
    x5, y5 = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(cm(x5, y5), tbn.rewrite(model, (x, y), CFG)(x5, y5))
    with pytest.raises(InputError, match=r"input 'y'.*got \(4, 16\): dim 0 \(batch\) is 5"):
        cm(x5, torch.randn(4, 16))


def test_a_static_build_refuses_another_batch() -> None:
    model, make_input = _model("mlp")
    x = make_input(4)
    cm = tbn.compile(model, (x,), config=CFG, dynamic_batch=False)
    assert not cm.dynamic_batch and cm.input_specs[0].dims == (4, 64)
    torch.testing.assert_close(cm(x), tbn.rewrite(model, (x,), CFG)(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(
        InputError, match=r"expected shape \(4, 64\), got \(3, 64\).*dynamic_batch=False"
    ):
        cm(make_input(3))


class FixedBatch(nn.Module):
    """Reshapes to a batch of 1: the model fixes its batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, 64))


def test_a_model_that_fixes_its_batch_compiles_static_and_says_why() -> None:
    torch.manual_seed(0)
    model, x = FixedBatch().eval(), torch.randn(1, 64)
    cm = tbn.compile(model, (x,), config=CFG)
    assert not cm.dynamic_batch and "fixes its batch size" in cm.static_batch
    torch.testing.assert_close(cm(x), tbn.rewrite(model, (x,), CFG)(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"got \(2, 64\) \(the batch is static: the model fixes"):
        cm(torch.randn(2, 64))
    with pytest.warns(RuntimeWarning, match="batch stays static: the model fixes its batch"):
        tbn.compile(model, (x,), config=CFG, dynamic_batch=True)


def test_cortex_m_refuses_a_dynamic_batch_before_building() -> None:
    model, make_input = _model("mlp")
    with pytest.raises(ValueError, match=r"Cortex-M.*static batch.*dynamic_batch=False"):
        tbn.compile(model, (make_input(1),), target="mps2-an386", config=CFG, dynamic_batch=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_build_with_a_symbolic_batch_schedules_every_kernel_and_compiles() -> None:
    import tvm
    from tvm.support import nvcc

    model, make_input = _model("cnn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = tbn.compile(model, (make_input(1),), target="cuda:sm_80", config=CFG)
    assert not [w for w in caught if "schedule failed" in str(w.message)]
    assert cm.dynamic_batch and cm.input_specs[0].dims == ("batch", 3, 8, 8)
    if cm.cuda_kernels == "source":  # else nvcc compiled the kernels at build time
        with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):
            nvcc.compile_cuda(cm.cuda_source(), target_format="cubin", arch="sm_80")
