"""Small models shared by the tests: each exercises one kind of layer use."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, sizes=(64, 128, 32, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ResidualCNN(nn.Module):
    """conv + BN + ReLU, a residual block, pooling, linear."""

    def __init__(self, channels=16, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        x = F.relu(self.down(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class GroupedConvNet(nn.Module):
    """Depthwise, pointwise and grouped convs (with dilation)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4)
        self.head = nn.Conv2d(16, 4, 3, stride=2)

    def forward(self, x):
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        x = F.relu(self.grouped(x))
        return self.head(x)


class TimeSeriesNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv1d(16, 8, 3, padding="same")
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean(dim=-1))


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


class FunctionalNet(nn.Module):
    """Weights used through torch.nn.functional, not modules."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 24) * 0.2)
        self.b1 = nn.Parameter(torch.randn(32) * 0.1)
        self.kernel = nn.Parameter(torch.randn(8, 2, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(6, 32) * 0.2)

    def forward(self, x):
        seq = F.relu(F.conv1d(x, self.kernel, padding=1))  # (n, 8, 3)
        h = F.relu(F.linear(seq.flatten(1), self.w1, self.b1))
        return F.linear(h, self.w2)


class TiedNet(nn.Module):
    """One Linear called twice, and two Linear modules sharing one Parameter."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.enc = nn.Linear(16, 8)
        self.dec = nn.Linear(16, 8)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.enc(x) + self.dec(-x)


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), applied with addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.c_out = Conv1D(d, 4 * d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.c_out(F.gelu(self.c_fc(self.ln2(x))))


class MnistMLP(nn.Module):
    """The paper's microcontroller model: 784-128-10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def zoo() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """name -> (model in eval mode, example inputs), deterministic."""
    torch.manual_seed(0)
    models = {
        "mlp": (MLP(), (torch.randn(4, 64),)),
        "cnn": (ResidualCNN(), (torch.randn(2, 3, 8, 8),)),
        "grouped": (GroupedConvNet(), (torch.randn(2, 8, 9, 9),)),
        "conv1d": (TimeSeriesNet(), (torch.randn(3, 4, 20),)),
        "transformer": (transformer_encoder(), (torch.randn(2, 5, 32),)),
        "functional": (FunctionalNet(), (torch.randn(3, 2, 3),)),
        "tied": (TiedNet(), (torch.randn(5, 16),)),
        "gpt2": (GPT2Block(), (torch.randn(2, 6, 32),)),
    }
    for model, _ in models.values():
        randomize_batchnorm(model)
    return models


def randomize_batchnorm(model: nn.Module, affine: bool = False) -> nn.Module:
    """Non-trivial BatchNorm statistics (and scale/shift with ``affine``); eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model.eval()
