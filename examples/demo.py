"""End-to-end demo on scikit-learn's bundled digits data set (no download).

1. Train a small CNN in float.
2. prepare() it for Tiled Bit Network QAT (p=4 on the large layers) and fine-tune.
3. rewrite() it into a graph of tile ops and check it computes what the QAT model does.
4. Compile it for the host CPU (and more targets when their backends are present)
   and compare accuracies.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tbn_compiler as tbn


class DigitsCNN(nn.Module):
    """8x8 grey images -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def load_data(seed: int = 0):
    """Digits as float tensors (N, 1, 8, 8) scaled to [0, 1]; 75/25 stratified split."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.25, random_state=seed, stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
        sched.step()
    return model.eval()


def logits(fn, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """``fn`` over all of ``x``; with ``batch``, in fixed-size batches (the last one
    zero-padded), for compiled models whose input shape is fixed."""
    with torch.no_grad():
        if batch is None:
            return fn(x)
        outs = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            padded = torch.cat([chunk, chunk.new_zeros(batch - len(chunk), *chunk.shape[1:])])
            outs.append(fn(padded)[: len(chunk)])
        return torch.cat(outs)


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (out.argmax(1) == y).float().mean().item()


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal pytree notices
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--p", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_data()

    t0 = time.perf_counter()
    float_model = train(DigitsCNN(), x_train, y_train, args.epochs, 3e-3)
    float_acc = accuracy(logits(float_model, x_test), y_test)
    print(f"float model: test accuracy {float_acc:.2f}%  ({time.perf_counter() - t0:.1f} s)")

    cfg = tbn.TBNConfig(
        p=args.p, min_numel=10_000
    )  # conv2 (18k) and fc1 (131k) at p; the rest binary
    qat = train(tbn.prepare(float_model, cfg), x_train, y_train, args.epochs, 1e-3)
    qat_out = logits(qat, x_test)
    tbn_acc = accuracy(qat_out, y_test)
    print(
        f"TBN (QAT, p={args.p}): test accuracy {tbn_acc:.2f}%  (float - TBN = {float_acc - tbn_acc:+.2f})"
    )

    gm = tbn.rewrite(qat, (x_test[:16],), cfg)
    gm_out = logits(gm, x_test)
    print(
        f"rewritten graph: test accuracy {accuracy(gm_out, y_test):.2f}%  "
        f"(max |graph - QAT| = {(gm_out - qat_out).abs().max():.2e})"
    )
    print()
    print(tbn.inspect(gm))
    print()
    results = {"float": float_acc, "tbn_qat": tbn_acc, "tbn_graph": accuracy(gm_out, y_test)}
    results.update(compiled_accuracies(qat, cfg, x_test, y_test, gm_out))
    print("accuracy summary:", ", ".join(f"{k} {v:.2f}%" for k, v in results.items()))


def compiled_accuracies(
    qat: nn.Module, cfg: tbn.TBNConfig, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor
) -> dict:
    """Accuracy of the model compiled for the host CPU (batches of 16)."""
    batch = 16
    t0 = time.perf_counter()
    cm = tbn.compile(qat, (x[:batch],), target="llvm", config=cfg)
    out = logits(cm, x, batch)
    print(
        f"compiled for llvm in {time.perf_counter() - t0:.1f} s; "
        f"max |llvm - graph| = {(out - reference).abs().max():.2e}"
    )
    results = {"llvm": accuracy(out, y)}
    results.update(cortex_m_accuracy(qat, cfg, x, y, reference))
    return results


def cortex_m_accuracy(
    qat: nn.Module,
    cfg: tbn.TBNConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    reference: torch.Tensor,
    board: str = "mps2-an386",
) -> dict:
    """Accuracy of the model built as a static C program and run in QEMU (batches of 4),
    when the Arm toolchain and QEMU are installed."""
    from tbn_compiler.backends.cortex_m import ToolchainError, require_toolchain

    try:
        require_toolchain(qemu=True)
    except ToolchainError as e:
        print(f"(Cortex-M run skipped: {e})")
        return {}
    batch = 4
    t0 = time.perf_counter()
    cm = tbn.compile(qat, (x[:batch],), target=board, config=cfg)
    out = logits(cm, x, batch)
    mem = cm.memory
    print(
        f"{board}: built and ran {len(x)} images in QEMU in {time.perf_counter() - t0:.1f} s; "
        f"max |mcu - graph| = {(out - reference).abs().max():.2e}; "
        f"{cm.last_run['instructions']:,} instructions per batch of {batch}; "
        f"weights {mem['weights_bytes']:,} B, flash {mem['flash_bytes']:,} B, "
        f"RAM {mem['ram_bytes']:,} B"
    )
    return {board: accuracy(out, y)}


if __name__ == "__main__":
    main()
