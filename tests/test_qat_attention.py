"""QAT of attention: ``prepare`` tiles ``nn.MultiheadAttention``'s projections.

References are torch's own ``nn.MultiheadAttention`` given the prepared layer's
reconstructed (tiled) weights, and the prepared model itself for convert/compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn
from tbn_compiler.nn import TiledMultiheadAttention

E, HEADS, P = 16, 4, 2
CFG = tbn.TBNConfig(p=P, min_numel=0)


def _prepared_attention(batch_first: bool) -> TiledMultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    prepared = tbn.prepare(nn.Sequential(mha), CFG)[0]
    assert isinstance(prepared, TiledMultiheadAttention)
    return prepared


def _torch_reference(prepared: TiledMultiheadAttention) -> nn.MultiheadAttention:
    """torch's layer with the prepared layer's tiled weights (a leaf in_proj_weight)."""
    ref = nn.MultiheadAttention(E, HEADS, batch_first=prepared.batch_first)
    with torch.no_grad():
        ref.in_proj_weight.copy_(prepared.in_proj.tiled_weight())
        ref.in_proj_bias.copy_(prepared.in_proj.bias)
        ref.out_proj.weight.copy_(prepared.out_proj.tiled_weight())
        ref.out_proj.bias.copy_(prepared.out_proj.bias)
    return ref


def _inputs(batch_first: bool, self_attention: bool):
    n, tgt, src = 3, 5, 5 if self_attention else 7
    shape = (lambda s: (n, s, E)) if batch_first else (lambda s: (s, n, E))
    q = torch.randn(shape(tgt))
    k, v = (q, q) if self_attention else (torch.randn(shape(src)), torch.randn(shape(src)))
    padding = torch.zeros(n, src, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(tgt, src, dtype=torch.bool), 1)
    return q, k, v, padding, causal


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("self_attention", [True, False])
def test_prepared_attention_equals_torch_with_tiled_weights(batch_first, training, self_attention):
    prepared = _prepared_attention(batch_first).train(training)
    ref = _torch_reference(prepared).train(training)
    q, k, v, padding, causal = _inputs(batch_first, self_attention)
    float_mask = torch.randn(
        3 * HEADS, q.shape[1 if batch_first else 0], k.shape[1 if batch_first else 0]
    )
    cases = [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal, "key_padding_mask": padding},
        {"attn_mask": float_mask, "average_attn_weights": False},
        {"attn_mask": causal, "need_weights": False},
    ]
    with torch.no_grad():
        for kwargs in cases:
            out, weights = prepared(q, k, v, **kwargs)
            ref_out, ref_weights = ref(q, k, v, **kwargs)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=str(kwargs))
            if ref_weights is None:
                assert weights is None
            else:
                torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_unbatched_input_equals_torch():
    prepared = _prepared_attention(batch_first=True).eval()
    ref = _torch_reference(prepared).eval()
    x = torch.randn(5, E)
    with torch.no_grad():
        out, weights = prepared(x, x, x, key_padding_mask=torch.tensor([0, 0, 0, 1, 0]).bool())
        ref_out, ref_weights = ref(x, x, x, key_padding_mask=torch.tensor([0, 0, 0, 1, 0]).bool())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_score_gradients_are_the_tiled_weight_gradients():
    """Straight-through: each score gets the gradient of its own position of the
    (3E, E) in-projection weight, as torch's layer computes it."""
    prepared = _prepared_attention(batch_first=True).train()
    ref = _torch_reference(prepared).train()
    q, k, v, padding, causal = _inputs(True, self_attention=False)
    kwargs = {"key_padding_mask": padding, "need_weights": False}
    prepared(q, k, v, **kwargs)[0].square().sum().backward()
    ref(q, k, v, **kwargs)[0].square().sum().backward()
    assert prepared.in_proj.scores.grad.abs().sum() > 0
    for tiled, weight in [
        (prepared.in_proj, ref.in_proj_weight),
        (prepared.out_proj, ref.out_proj.weight),
    ]:
        # W_hat = alpha * sign-tile: the score of a position gets alpha * dL/dW_hat there
        scale = tiled.alphas().detach().repeat_interleave(weight.numel() // P).reshape(weight.shape)
        torch.testing.assert_close(tiled.scores.grad, scale * weight.grad)
    assert prepared.in_proj.weight.grad is not None  # through the alphas


def test_unsupported_attention_is_kept_float_with_its_reason():
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=8, vdim=8))
    prepared = tbn.prepare(model, CFG)
    assert type(prepared[0]) is nn.MultiheadAttention
    assert "kdim/vdim" in prepared.tbn_plan["0.out_proj"].reason


class _Block(nn.Module):
    """A torchvision-style ViT encoder block (pre-norm, need_weights=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(E)
        self.self_attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, E, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, E))
        self.pos_embedding = nn.Parameter(torch.randn(1, 5, E))
        self.blocks = nn.Sequential(_Block(), _Block())
        self.ln = nn.LayerNorm(E)
        self.head = nn.Linear(E, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.blocks(x + self.pos_embedding))
        return self.head(x[:, 0])


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2)


@pytest.mark.parametrize(
    "make, example",
    [
        (_encoder, lambda: (torch.randn(2, 6, E),)),
        (_TinyViT, lambda: (torch.randn(2, 3, 8, 8),)),
    ],
    ids=["transformer_encoder", "vit"],
)
def test_attention_models_fully_tiled_and_compiled(make, example):
    torch.manual_seed(0)
    model = make().eval()
    x = example()
    prepared = tbn.prepare(model, CFG).eval()
    projections = [n for n in prepared.tbn_plan if n.endswith(("in_proj", "out_proj"))]
    assert len(projections) == 4
    assert all(prepared.tbn_plan[n].p == P for n in projections)

    report = tbn.inspect(tbn.rewrite(prepared, x))
    rows = {row.name: row for row in report.layers}
    assert all(rows[n].status == "tiled" for n in projections), str(report)
    assert not [r for r in report.layers if r.status != "tiled"], str(report)

    with torch.no_grad():
        expected = prepared(*x)
        # eval under no_grad is where torch's encoder fast path would run: it must not
        no_grad_train_math = prepared.train()(*x)
    prepared.eval()
    torch.testing.assert_close(no_grad_train_math, expected, rtol=1e-5, atol=1e-5)

    converted = tbn.convert(prepared).eval()
    graph = tbn.capture(converted, x)
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "tbn.tiled_linear.default" in ops
    compiled = tbn.compile(converted, x, target="llvm")
    torch.testing.assert_close(torch.as_tensor(compiled(*x)), expected, rtol=1e-4, atol=1e-5)


def test_weight_tied_to_another_layer_stays_tied():
    torch.manual_seed(0)
    mha, fc = nn.MultiheadAttention(E, HEADS, batch_first=True), nn.Linear(E, E)
    fc.weight = mha.out_proj.weight
    prepared = tbn.prepare(nn.ModuleDict({"attn": mha, "fc": fc}), CFG)
    assert prepared["attn"].out_proj.scores is prepared["fc"].scores
    assert prepared["attn"].out_proj.weight is prepared["fc"].weight
    assert mha.out_proj.weight is fc.weight  # the user's model is untouched
    assert isinstance(mha.in_proj_weight, nn.Parameter)


def test_encoder_with_padding_mask_takes_no_fast_path():
    """In eval under no_grad torch's encoder would turn a padded batch into nested
    tensors and fused kernels reading ``in_proj_weight``; the prepared encoder computes
    what it computes with autograd on (where those paths are off)."""
    torch.manual_seed(0)
    prepared = tbn.prepare(_encoder(), CFG).eval()
    x = torch.randn(2, 6, E)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    expected = prepared(x, src_key_padding_mask=padding).detach()
    with torch.no_grad():
        out = prepared(x, src_key_padding_mask=padding)
    assert not out.is_nested
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
