"""CPU benchmark of whole models: compile time and latency of the llvm build vs torch fp32.

Run ``python benchmarks/bench_models.py [--quick] [--out PATH]``. For each model and
batch size: ``tbn.compile`` wall time (no tuning), then the median latency of the
compiled module and of the float model in torch eager (same process, same threads).
Writes JSON (default ``benchmarks/results/models.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import alternate, meta_load, torch_sampler  # noqa: E402

import tbn_compiler as tbn  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


MODELS = {
    "resnet18-cifar": (ResNet18Cifar, lambda b: torch.randn(b, 3, 32, 32)),
    "transformer-encoder": (small_transformer, lambda b: torch.randn(b, 64, 256)),
}


def bench(name: str, batch: int, p: int, repeat: int, rounds: int = 3) -> dict:
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = make_input(batch)
    cfg = tbn.TBNConfig(p=p)
    start = time.perf_counter()
    cm = tbn.compile(model, (x,), target="llvm", config=cfg)
    compile_s = time.perf_counter() - start
    ours, ref = alternate(
        torch_sampler(lambda: cm(x)), torch_sampler(lambda: model(x)), repeat, rounds
    )
    ours_ms, torch_ms = statistics.median(ours) * 1e3, statistics.median(ref) * 1e3
    with torch.no_grad():
        err = (cm(x) - tbn.rewrite(model, (x,), cfg)(x)).abs().max().item()
    totals = cm.report.totals
    return {
        "model": name,
        "batch": batch,
        "p": p,
        "compile_s": round(compile_s, 1),
        "ours_ms": round(ours_ms, 3),
        "torch_ms": round(torch_ms, 3),
        "speedup": round(torch_ms / ours_ms, 2),
        "max_abs_err_vs_graph": err,
        "tiled_layers": totals["tiled"],
        "compression": round(totals["compression"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "models.json")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    repeat = 3 if args.quick else 9
    batches = [1] if args.quick else [1, 16]
    load_before = os.getloadavg()[0]
    rows = []
    for name in MODELS:
        for batch in batches:
            rows.append(bench(name, batch, args.p, repeat))
            print(f"  {rows[-1]}", flush=True)
    print(
        tabulate(
            [
                [
                    r["model"],
                    r["batch"],
                    r["p"],
                    r["compile_s"],
                    r["ours_ms"],
                    r["torch_ms"],
                    f"{r['speedup']:.2f}x",
                    f"{r['compression']}x",
                ]
                for r in rows
            ],
            headers=[
                "model",
                "batch",
                "p",
                "compile s",
                "ours ms",
                "torch fp32 ms",
                "torch/ours",
                "smaller",
            ],
        )
    )
    print(f"medians of {repeat} repeats; load average before/after: {meta_load(load_before)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": {"cores": cores, "torch": torch.__version__}, "rows": rows}, indent=2)
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
