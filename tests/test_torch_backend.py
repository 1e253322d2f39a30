"""torch.compile(model, backend="tbn"): every compiled graph computes what ``rewrite``'s
graph computes (the PyTorch reference of tiling), graphs that cannot be compiled run in
torch with one warning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler import TBNFallbackWarning  # noqa: E402  (the public name)
from tbn_compiler.backends.torch_backend import source_tokens  # noqa: E402

CFG = tbn.TBNConfig(p=4, min_numel=0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model: nn.Module, cfg: tbn.TBNConfig = CFG, **options):
    return torch.compile(model, backend="tbn", options={"config": cfg, **options})


def _run_quietly(fn, *args):
    """``fn(*args)`` under no_grad; fails on any fallback warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TBNFallbackWarning)
        with torch.no_grad():
            return fn(*args)


def _assert_tiled_like_rewrite(y, model, x, cfg=CFG) -> None:
    """``y`` equals the rewritten graph's output and not the float model's (so the
    layers were really tiled, not run in torch)."""
    ref = tbn.rewrite(model, (x,), cfg)(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-2


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_cnn_matches_rewrite() -> None:
    """Tiled as ``rewrite`` tiles it, ``layers`` names and ``exclude`` types included."""
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    cfg = tbn.TBNConfig(p=4, min_numel=0, layers={"4": 2}, exclude=[nn.Linear])
    y = _run_quietly(_compiled(model, cfg), x)
    _assert_tiled_like_rewrite(y, model, x, cfg)
    plain = tbn.rewrite(model, (x,), CFG)(x)  # the config changed the result
    assert (y - plain).abs().max() > 1e-3


def test_transformer_block_matches_rewrite() -> None:
    """In eval mode without autograd the layer takes PyTorch's fused fast path; its
    projections are tiled as ``rewrite`` tiles them."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    y = _run_quietly(_compiled(model), x)
    _assert_tiled_like_rewrite(y, model, x)


class _PrintBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        print("hidden", tuple(h.shape), file=sys.stderr)  # a graph break
        return self.fc2(h)


def test_graph_break_model_matches_rewrite() -> None:
    from torch._dynamo.utils import counters

    model = _PrintBreak().eval()
    x = torch.randn(3, 16)
    counters.clear()
    y = _run_quietly(_compiled(model), x)
    assert counters["stats"]["unique_graphs"] == 2
    _assert_tiled_like_rewrite(y, model, x)


class _ValueBranch(nn.Module):
    """A branch on a tensor's value: graph break at ``.item()``, one graph per branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.mean().item() > 0.2:
            return self.head(h)
        return self.head(-h)


def test_value_dependent_branch_matches_rewritten_parts() -> None:
    model = _ValueBranch().eval()
    compiled = _compiled(model)
    body = tbn.rewrite(model.body, (torch.randn(4, 16),), CFG)
    head = tbn.rewrite(model.head, (torch.randn(4, 32),), CFG)
    taken = set()
    for scale in (0.1, 10.0):  # both branches
        x = torch.randn(4, 16) * scale + scale
        y = _run_quietly(compiled, x)
        h = body(x)
        taken.add(bool(h.mean() > 0.2))
        torch.testing.assert_close(y, head(h if h.mean() > 0.2 else -h), rtol=1e-4, atol=1e-5)
    assert taken == {True, False}


def test_new_batch_shape_recompiles_and_stays_right() -> None:
    model = _MLP().eval()
    compiled = _compiled(model)
    for batch in (2, 5, 2):
        x = torch.randn(batch, 16)
        _assert_tiled_like_rewrite(_run_quietly(compiled, x), model, x)


def test_unsupported_op_falls_back_with_one_warning() -> None:
    class Cummax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cummax(self.fc(x), dim=1).values

    model = Cummax().eval()
    compiled = _compiled(model)
    x = torch.randn(3, 8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outputs = [compiled(x) for _ in range(3)]
    fallbacks = [w for w in caught if issubclass(w.category, TBNFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    assert "cummax" in str(fallbacks[0].message)
    with torch.no_grad():
        for y in outputs:
            torch.testing.assert_close(y, model(x))
    with pytest.raises(Exception, match="cummax"):
        torch._dynamo.reset()
        with torch.no_grad():
            _compiled(model, fallback=False)(x)


def test_autograd_and_training_mode_calls_run_in_torch() -> None:
    """Training stays in PyTorch (gradients flow), with a warning naming the reason."""
    model = _MLP()
    compiled = _compiled(model)
    x = torch.randn(4, 16)
    with pytest.warns(TBNFallbackWarning, match="requires grad"):
        y = compiled(x)
    y.sum().backward()
    assert model.fc1.weight.grad is not None

    torch._dynamo.reset()
    model.train()
    with pytest.warns(TBNFallbackWarning, match="dropout.*training mode"), torch.no_grad():
        compiled(x)


class _InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.fc(x)


class _MaskedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.layer(x, src_key_padding_mask=pad)


@pytest.mark.parametrize(
    ("model", "inputs", "reason"),
    [
        (_InPlaceInput, lambda: (torch.randn(3, 8),), r"Tensor.mul_ .*in place .*L\['x'\]"),
        (
            _MaskedEncoder,
            lambda: (torch.randn(2, 3, 8), torch.tensor([[False, False, True], [False] * 3])),
            "_transformer_encoder_layer_fwd .*given a mask",
        ),
    ],
)
def test_graphs_that_cannot_be_compiled_as_is_run_in_torch(model, inputs, reason) -> None:
    """Without a compile attempt: the result is torch's, input writes included."""
    module = model().eval()
    args = inputs()
    expected_args = [a.clone() for a in args]
    with torch.no_grad():
        expected = module(*expected_args)
        with pytest.warns(TBNFallbackWarning, match=reason):
            y = _compiled(module)(*args)
    torch.testing.assert_close(y, expected)
    for a, b in zip(args, expected_args, strict=True):
        torch.testing.assert_close(a, b)


def test_output_dtypes_stay_torch_s() -> None:
    """A Python float argument reaches the graph as a 0-d float64 tensor: the result
    stays float32, as in torch, whether the graph is compiled or runs in torch."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
            return self.fc(x) * scale

    model = Scaled().eval()
    compiled = torch.compile(model, backend="tbn", dynamic=True)
    x = torch.randn(3, 8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", TBNFallbackWarning)
        y = compiled(x, 1.5)
        expected = model(x, 1.5)
    assert y.dtype == expected.dtype == torch.float32
    tiled = tbn.rewrite(model, (x, 1.5), tbn.TBNConfig())(x, 1.5)
    assert torch.allclose(y, expected) or torch.allclose(y, tiled, rtol=1e-4, atol=1e-5)


def test_weights_changed_in_place_are_compiled_again() -> None:
    model = _MLP().eval()
    compiled = _compiled(model)
    x = torch.randn(4, 16)
    _run_quietly(compiled, x)
    with torch.no_grad():
        model.fc2.weight.mul_(-2.0)
    with pytest.warns(TBNFallbackWarning, match="'fc2.weight' changed"), torch.no_grad():
        y = compiled(x)
    _assert_tiled_like_rewrite(y, model, x)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(Exception, match="unknown tbn backend options.*'p'"), torch.no_grad():
        torch.compile(_MLP().eval(), backend="tbn", options={"p": 4})(torch.randn(2, 16))


def test_source_paths() -> None:
    assert source_tokens("L['self']._modules['enc']._modules['0']._parameters['weight']") == (
        "L",
        "self",
        "enc",
        "0",
        "weight",
    )
    assert source_tokens("G['model'].encoder._buffers['mean']") == ("G", "model", "encoder", "mean")
    assert source_tokens("L['x'].size()[0]") is None


def test_backend_found_without_importing_the_package() -> None:
    """The entry point registers "tbn": torch.compile finds it in a fresh interpreter."""
    script = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        x = torch.randn(3, 16)
        assert "tbn_compiler" not in sys.modules
        with torch.no_grad():
            y = torch.compile(model, backend="tbn")(x)
        assert "tbn_compiler" in sys.modules  # loaded by torch through the entry point
        import tbn_compiler as tbn
        ref = tbn.rewrite(model, (x,), tbn.TBNConfig())(x)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
