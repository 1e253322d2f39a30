"""QAT layers: forward, straight-through gradients and state_dict, against plain torch math."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import MLP, ResidualCNN
from reference import np_reconstruct

import tbn_compiler as tbn
from tbn_compiler.nn import conv_geometry


def _reference_weight(layer):
    s, w = layer.scores.detach().double().numpy(), layer.weight.detach().double().numpy()
    return torch.from_numpy(np_reconstruct(s, w, layer.p, layer.alpha_mode)).float()


@pytest.mark.parametrize("alpha", ["per_tile", "single"])
def test_tiled_linear_forward_matches_reconstruction(alpha):
    torch.manual_seed(0)
    layer = tbn.TiledLinear.from_float(nn.Linear(12, 8), p=4, alpha_mode=alpha)
    with torch.no_grad():  # scores and weight diverge after training
        layer.scores.add_(torch.randn_like(layer.scores))
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), F.linear(x, _reference_weight(layer), layer.bias))


def test_tiled_conv_preserves_geometry_and_matches_reconstruction():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2)
    layer = tbn.TiledConv2d.from_float(conv, p=4)
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == (
        (2, 2),
        (2, 2),
        (2, 2),
        2,
    )
    x = torch.randn(2, 6, 11, 11)
    ref = F.conv2d(x, _reference_weight(layer), layer.bias, 2, 2, 2, 2)
    torch.testing.assert_close(layer(x), ref)
    conv1 = tbn.TiledConv1d.from_float(nn.Conv1d(4, 6, 3, padding=1), p=3)
    x1 = torch.randn(2, 4, 9)
    torch.testing.assert_close(
        conv1(x1), F.conv1d(x1, _reference_weight(conv1), conv1.bias, padding=1)
    )


def test_straight_through_gradients():
    """scores get dL/dW_hat[e] * alpha(e) (their own position, no sum over copies);
    weight gets the gradient through the alphas only."""
    torch.manual_seed(0)
    n, k, p = 8, 6, 4
    layer = tbn.TiledLinear.from_float(nn.Linear(k, n, bias=False), p=p)
    x, g = torch.randn(5, k), torch.randn(5, n)
    (layer(x) * g).sum().backward()
    grad_w_hat = (g.T @ x).double().numpy()  # dL/dW_hat
    w = layer.weight.detach().double().numpy().reshape(-1)
    s = layer.scores.detach().double().numpy().reshape(-1)
    length = w.size // p
    folded = s.reshape(p, length).sum(0)
    t = np.where(folded > 0, 1.0, -1.0)
    alphas = np.abs(w).reshape(p, length).mean(1)
    e = np.arange(w.size)
    expected_scores = grad_w_hat.reshape(-1) * alphas[e // length]
    np.testing.assert_allclose(
        layer.scores.grad.numpy().reshape(-1), expected_scores, rtol=1e-5, atol=1e-6
    )
    # dL/dalpha_i = sum over chunk i of dL/dW_hat * t ; dalpha_i/dw = sign(w)/L
    dalpha = (grad_w_hat.reshape(p, length) * t[None, :]).sum(1)
    expected_weight = dalpha[e // length] * np.sign(w) / length
    np.testing.assert_allclose(
        layer.weight.grad.numpy().reshape(-1), expected_weight, rtol=1e-5, atol=1e-6
    )


def test_prepare_replaces_layers_and_keeps_original():
    model = ResidualCNN()
    qat = tbn.prepare(model, tbn.TBNConfig(p=4, min_numel=1000, exclude=["fc"]))
    assert not any(isinstance(m, tbn.TiledConv2d) for m in model.modules())
    assert isinstance(qat.conv1, tbn.TiledConv2d) and qat.conv1.p == 4  # 2304 weights
    assert isinstance(qat.stem, tbn.TiledConv2d) and qat.stem.p == 1  # 432 < min_numel
    assert type(qat.fc) is nn.Linear
    assert qat.tbn_plan["fc"].p is None and "excluded" in qat.tbn_plan["fc"].reason


def test_prepare_skips_indivisible_or_raises_when_strict():
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 4))
    qat = tbn.prepare(model, tbn.TBNConfig(p=2, min_numel=0))
    assert type(qat[0]) is nn.Linear and "not divisible by p=2" in qat.tbn_plan["0"].reason
    assert isinstance(qat[2], tbn.TiledLinear)
    with pytest.raises(
        ValueError, match=r"layer '0' \(Linear, weight \(3, 5\)\): 15 weights not divisible by p=2"
    ):
        tbn.prepare(model, tbn.TBNConfig(p=2, min_numel=0, strict=True))


def test_prepare_keeps_tied_parameters_tied():
    from models import TiedNet

    qat = tbn.prepare(TiedNet(), tbn.TBNConfig(p=2, min_numel=0))
    assert qat.enc.scores is qat.dec.scores and qat.enc.weight is qat.dec.weight


def test_state_dict_round_trip_and_training_loop():
    torch.manual_seed(0)
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    qat = tbn.prepare(MLP(), cfg)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(qat(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    fresh = tbn.prepare(MLP(), cfg)
    fresh.load_state_dict(qat.state_dict())
    torch.testing.assert_close(fresh.eval()(x), qat.eval()(x))
    assert "layers.0.scores" in qat.state_dict()


def test_convert_matches_prepared_and_stores_only_packed():
    torch.manual_seed(0)
    qat = tbn.prepare(MLP(), tbn.TBNConfig(p=4, min_numel=0)).eval()
    frozen = tbn.convert(qat)
    x = torch.randn(3, 64)
    torch.testing.assert_close(frozen(x), qat(x), rtol=1e-5, atol=1e-6)
    keys = set(frozen.state_dict())
    assert (
        "layers.0.tile" in keys and "layers.0.weight" not in keys and "layers.0.scores" not in keys
    )
    torch.testing.assert_close(frozen.layers[0].weight, _reference_weight(qat.layers[0]))


def test_prepare_rejects_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tbn.prepare("model")
    with pytest.raises(TypeError, match="TBNConfig"):
        tbn.prepare(MLP(), {"p": 4})


@pytest.mark.parametrize(
    "kernel,dilation,padding", [((3, 5), (1, 2), "same"), ((3, 3), 1, "valid"), ((1, 3), 2, (0, 2))]
)
def test_conv_geometry_matches_torch_padding(kernel, dilation, padding):
    geometry, reason = conv_geometry(kernel, 1, padding, dilation, 1)
    assert reason is None
    x, w = torch.randn(1, 2, 9, 9), torch.randn(3, 2, *kernel)
    want = F.conv2d(x, w, padding=padding, dilation=dilation)
    got = F.conv2d(
        x, w, padding=geometry.padding, dilation=geometry.dilation, stride=geometry.stride
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "args,reason",
    [
        (((4, 4), 1, "same", 1, 1), "even kernel needs asymmetric padding"),
        (((3, 3), 2, "same", 1, 1), "stride > 1"),
        (((3, 3), 1, 1, 1, 1, "circular"), "padding_mode='circular'"),
    ],
)
def test_conv_geometry_refusals(args, reason):
    geometry, why = conv_geometry(*args)
    assert geometry is None and reason in why
