"""Dynamic batch vs static builds: latency of one dynamic-batch llvm build of each model
against a static build per batch size.

Run ``python benchmarks/bench_dynamic.py [--quick] [--p P] [--out PATH]``. For each model
(an MLP, ResNet-18-CIFAR and the transformer encoder of ``bench_models.py``): one
``tbn.compile`` with the default ``dynamic_batch=True`` from a batch-1 example, and one
``dynamic_batch=False`` build at each batch size (1, 7, 64; ``--quick``: 1 and 7). Per
batch size the two modules are timed in pairs of samples taken back to back (each
sample the mean of calls over at least 50 ms, the order swapped every pair), so both
see the same background load; ``dynamic / static`` is the median of the pairs' ratios
(the goal: at most 1.10), next to the medians of each. Outputs of the two builds are
compared too.
Writes JSON (default ``benchmarks/results/dynamic.json``) and prints a table with the
machine load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import meta_load, torch_sampler  # noqa: E402
from bench_models import ResNet18Cifar, small_transformer  # noqa: E402

import tbn_compiler as tbn  # noqa: E402


class MLP(nn.Module):
    """784-1024-1024-10 with ReLU: linear layers only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


MODELS = {
    "mlp": (MLP, lambda b: torch.randn(b, 784)),
    "resnet18-cifar": (ResNet18Cifar, lambda b: torch.randn(b, 3, 32, 32)),
    "transformer-encoder": (small_transformer, lambda b: torch.randn(b, 64, 256)),
}


def _compile(model: nn.Module, x: torch.Tensor, p: int, dynamic: bool):
    start = time.perf_counter()
    cm = tbn.compile(model, (x,), config=tbn.TBNConfig(p=p), dynamic_batch=dynamic)
    return cm, time.perf_counter() - start


def paired(
    ours: Callable[[int], list[float]], ref: Callable[[int], list[float]], pairs: int
) -> tuple[list[float], list[float]]:
    """``pairs`` samples of each, taken back to back (the order swapped every pair)."""
    a, b = [], []
    for i in range(pairs):
        if i % 2:
            b += ref(1)
            a += ours(1)
        else:
            a += ours(1)
            b += ref(1)
    return a, b


def bench_model(name: str, batches: list[int], p: int, pairs: int) -> list[dict]:
    """Rows of one model: per batch size, the dynamic build against a static one."""
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    dynamic, dynamic_s = _compile(model, make_input(1), p, True)
    if not dynamic.dynamic_batch:
        raise RuntimeError(f"{name}: the dynamic build is static ({dynamic.static_batch})")
    rows = []
    for batch in batches:
        x = make_input(batch)
        static, static_s = _compile(model, x, p, False)
        ours, ref = paired(
            torch_sampler(lambda x=x: dynamic(x)),
            torch_sampler(lambda x=x, static=static: static(x)),
            pairs,
        )
        dyn_ms, static_ms = statistics.median(ours) * 1e3, statistics.median(ref) * 1e3
        ratio = statistics.median(a / b for a, b in zip(ours, ref, strict=True))
        with torch.no_grad():
            want = static(x)
            err = ((dynamic(x) - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        rows.append(
            {
                "model": name,
                "batch": batch,
                "p": p,
                "dynamic_ms": round(dyn_ms, 3),
                "static_ms": round(static_ms, 3),
                "ratio": round(ratio, 3),
                "dynamic_compile_s": round(dynamic_s, 1),
                "static_compile_s": round(static_s, 1),
                "rel_err_vs_static": err,
            }
        )
        print(f"  {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 7, fewer repeats")
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "dynamic.json"
    )
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    pairs = 10 if args.quick else 30
    batches = [1, 7] if args.quick else [1, 7, 64]
    load_before = os.getloadavg()[0]
    rows = [row for name in args.models for row in bench_model(name, batches, args.p, pairs)]
    print(
        tabulate(
            [
                [r["model"], r["batch"], r["dynamic_ms"], r["static_ms"], f"{r['ratio']:.3f}"]
                for r in rows
            ],
            headers=["model", "batch", "dynamic ms", "static ms", "dynamic / static (pairs)"],
        )
    )
    load = meta_load(load_before)
    print(f"medians of {pairs} back-to-back sample pairs; load before/after: {load}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cores": cores, "torch": torch.__version__, "load": load, "p": args.p}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
