"""End-to-end demo on scikit-learn's bundled digits data set (no download).

1. Train a small CNN in float.
2. prepare() it for Tiled Bit Network QAT (p=4 on the large layers) and fine-tune it
   with the recipe of tbn_compiler.qat (distillation from the float model, cosine
   learning rate, BatchNorm recalibration).
3. rewrite() it into a graph of tile ops and check it computes what the QAT model does.
4. Compile it for the host CPU and the emulated Cortex-M board (when the Arm toolchain
   and QEMU are installed), check each against the graph, and compare accuracies.
5. Write the HTML report of the rewritten model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import tbn_compiler as tbn

BOARD = "mps2-an386"
PARITY_RTOL = 1e-4  # fp32 rounding between the QAT model, the graph and compiled code


class DigitsCNN(nn.Module):
    """8x8 grey images -> 10 classes. Every conv/linear layer but the classifier is
    followed by BatchNorm (``fc_norm=False`` drops the one after ``fc1``, for comparison):
    the copies of a tile differ only by their scale, and a per-channel affine after them
    is what lets them act as different units (see tbn_compiler/qat.py)."""

    def __init__(self, fc_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.bn3 = nn.BatchNorm1d(128) if fc_norm else nn.Identity()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
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


def batches(x: torch.Tensor, y: torch.Tensor, seed: int, batch_size: int = 64) -> DataLoader:
    """Shuffled training batches, the order fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block: how many threads a matmul is split
    over changes its float rounding, and a few flipped tile bits change the accuracy, so
    training runs single-threaded to give the same numbers on machines with more cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_float(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, **model_kw) -> nn.Module:
    """The float baseline: Adam at 3e-3, cosine schedule, cross entropy."""
    torch.manual_seed(seed)
    model = DigitsCNN(**model_kw)
    with one_thread():
        tbn.qat.fit(model, batches(x, y, seed), epochs=epochs, lr=3e-3, progress=False)
    return model


def train_tbn(
    float_model: nn.Module,
    cfg: tbn.TBNConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    distill: bool = True,
    **fit_kw,
) -> nn.Module:
    """The QAT recipe: prepare from the float model, then fine-tune with
    ``tbn_compiler.qat.fit`` (Adam at 3e-3 unless ``fit_kw`` says otherwise), distilling
    the float model into the tiled one unless ``distill`` is False."""
    torch.manual_seed(seed)
    qat = tbn.prepare(float_model, cfg)
    teacher = float_model if distill else None
    fit_kw = {"lr": 3e-3, "progress": False, **fit_kw}
    with one_thread():
        tbn.qat.fit(qat, batches(x, y, seed + 1), teacher=teacher, epochs=epochs, **fit_kw)
    return qat


def demo_config(p: int) -> tbn.TBNConfig:
    """conv2 (18k weights) and fc1 (131k) at ``p``; conv1 and fc2 binary (p = 1)."""
    return tbn.TBNConfig(p=p, min_numel=10_000)


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


def check_parity(what: str, out: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |out - reference|; raises when it exceeds fp32 rounding: PARITY_RTOL times the
    largest |reference| (at least 1)."""
    diff = (out - reference).abs().max().item()
    bound = PARITY_RTOL * max(1.0, reference.abs().max().item())
    if diff > bound:
        raise SystemExit(f"parity check failed: max |{what}| = {diff:.2e} > {bound:.1e}")
    return diff


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal pytree notices
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--p", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", default="build/demo-report.html", help="report path")
    parser.add_argument("--json", help="also write the accuracies to this JSON file")
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load_data()

    t0 = time.perf_counter()
    float_model = train_float(x_train, y_train, args.epochs, args.seed)
    float_acc = accuracy(logits(float_model, x_test), y_test)
    print(f"float model: test accuracy {float_acc:.2f}%  ({time.perf_counter() - t0:.1f} s)")

    cfg = demo_config(args.p)
    t0 = time.perf_counter()
    qat = train_tbn(float_model, cfg, x_train, y_train, args.epochs, args.seed, progress=True)
    qat_out = logits(qat, x_test)
    tbn_acc = accuracy(qat_out, y_test)
    print(
        f"TBN (QAT, p={args.p}): test accuracy {tbn_acc:.2f}%  "
        f"(float - TBN = {float_acc - tbn_acc:+.2f}; {time.perf_counter() - t0:.1f} s)"
    )

    gm = tbn.rewrite(qat, (x_test[:16],), cfg)
    gm_out = logits(gm, x_test)
    diff = check_parity("graph - QAT", gm_out, qat_out)
    print(
        f"rewritten graph: test accuracy {accuracy(gm_out, y_test):.2f}%  (max |graph - QAT| = {diff:.2e})"
    )
    report = tbn.inspect(gm)
    print()
    print(report)
    print()
    results = {"float": float_acc, "tbn_qat": tbn_acc, "tbn_graph": accuracy(gm_out, y_test)}
    compiled, memory = compiled_accuracies(qat, cfg, x_test, y_test, gm_out)
    results.update(compiled)
    print("accuracy summary:", ", ".join(f"{k} {v:.2f}%" for k, v in results.items()))
    report.to_html(args.html, memory=memory, title=f"digits CNN, TBN p={args.p}")
    print(f"report written to {args.html}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"p": args.p, "seed": args.seed, **results}, indent=1)
        )


def compiled_accuracies(
    qat: nn.Module, cfg: tbn.TBNConfig, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor
) -> tuple[dict, dict | None]:
    """Accuracy of the model compiled for the host CPU (batches of 16) and for the
    Cortex-M board when its toolchain is present; the board's memory sizes or None."""
    batch = 16
    t0 = time.perf_counter()
    cm = tbn.compile(qat, (x[:batch],), target="llvm", config=cfg)
    out = logits(cm, x, batch)
    diff = check_parity("llvm - graph", out, reference)
    print(f"compiled for llvm in {time.perf_counter() - t0:.1f} s; max |llvm - graph| = {diff:.2e}")
    results = {"llvm": accuracy(out, y)}
    board = cortex_m_accuracy(qat, cfg, x, y, reference)
    if board is None:
        return results, None
    results[BOARD], memory = board
    return results, memory


def cortex_m_accuracy(
    qat: nn.Module, cfg: tbn.TBNConfig, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor
) -> tuple[float, dict] | None:
    """Accuracy and memory sizes of the model built as a static C program and run in QEMU
    (batches of 4), or None when the Arm toolchain or QEMU is missing."""
    from tbn_compiler.backends.cortex_m import ToolchainError, require_toolchain

    try:
        require_toolchain(qemu=True)
    except ToolchainError as e:
        print(f"(Cortex-M run skipped: {e})")
        return None
    batch = 4
    t0 = time.perf_counter()
    cm = tbn.compile(qat, (x[:batch],), target=BOARD, config=cfg)
    out = logits(cm, x, batch)
    diff = check_parity("mcu - graph", out, reference)
    mem = cm.memory
    print(
        f"{BOARD}: built and ran {len(x)} images in QEMU in {time.perf_counter() - t0:.1f} s; "
        f"max |mcu - graph| = {diff:.2e}; "
        f"{cm.last_run['instructions']:,} instructions per batch of {batch}; "
        f"weights {mem['weights_bytes']:,} B, flash {mem['flash_bytes']:,} B, "
        f"RAM {mem['ram_bytes']:,} B"
    )
    return accuracy(out, y), mem


if __name__ == "__main__":
    main()
