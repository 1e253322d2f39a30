"""Where the time of a compiled model goes: per kernel and per kind of op (host CPU).

Run ``python benchmarks/profile_ops.py [--cases NAME,...] [--threads 2] [--runs 20]``
with the case names of ``bench_peers.py``. Each model is compiled for ``llvm`` with
``TBNConfig(p)`` and run in a Relax VM whose instrument times every call instruction
(kernels and VM builtins); per-call times are medians over ``--runs`` runs. The VM
calls each function once per instruction, so a kernel's row sums its calls in one run.

Categories (from the function names the Relax pipeline gives): ``tile`` (our ``tbn_*``
kernels), ``attention``, ``conv`` / ``matmul`` (TVM's dense ops), ``pool``, ``softmax``,
``batch_norm`` (with what FuseOps fused to it), ``norm`` (layer norm), ``layout`` (transpose, reshape, pad, concat, ...), ``elementwise``
(add, multiply, relu, ...), ``vm`` (VM builtins: allocation, views, shape checks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_peers import _cases, quietly  # noqa: E402

# first match wins; names are TVM's fused-function names (fused_conv2d_add_relu, ...)
CATEGORIES = (
    ("tile", ("tbn_",)),
    ("vm", ("vm.builtin", "vm.")),
    ("attention", ("attention",)),
    ("conv", ("conv",)),
    ("matmul", ("matmul", "dense", "batch_matmul")),
    ("pool", ("pool",)),
    ("softmax", ("softmax",)),
    ("batch_norm", ("batch_norm",)),
    ("norm", ("layer_norm", "norm")),
    ("layout", ("transpose", "reshape", "pad", "concat", "split", "strided_slice", "take")),
    ("elementwise", ("add", "multiply", "subtract", "divide", "relu", "gelu", "tanh", "exp")),
)


def category(symbol: str) -> str:
    for name, keys in CATEGORIES:
        if any(symbol.startswith(k) if k.endswith(("_", ".")) else k in symbol for k in keys):
            return name
    return "other"


def profile(cm, x: torch.Tensor, runs: int) -> tuple[dict[str, list[float]], dict, float]:
    """(per symbol: median seconds per run, calls per run), category of each, and the
    median wall time of an uninstrumented run."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(cm.library, tvm.cpu())
    main = vm["main"]
    arg = tvm.runtime.from_dlpack(x.contiguous())
    for _ in range(3):
        main(arg)
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        main(arg)
        walls.append(time.perf_counter() - start)

    per_run: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *args):  # noqa: ARG001 (VM signature)
        now = time.perf_counter()
        if before:
            started[symbol] = now
        else:
            per_run[symbol] += now - started.pop(symbol)
            calls[symbol] += 1
        return 0

    vm.set_instrument(instrument)
    samples: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = {}
    for _ in range(runs):
        per_run.clear()
        calls.clear()
        main(arg)
        for symbol, t in per_run.items():
            samples[symbol].append(t)
        counts = dict(calls)
    medians = {s: statistics.median(v) for s, v in samples.items()}
    return medians, counts, statistics.median(walls)


def report(name: str, medians: dict[str, float], counts: dict[str, int], wall: float) -> None:
    total = sum(medians.values())
    rows = sorted(medians.items(), key=lambda kv: -kv[1])
    print(f"\n== {name}: uninstrumented run {wall * 1e3:.2f} ms, sum of calls {total * 1e3:.2f} ms")
    by_cat: dict[str, float] = defaultdict(float)
    for symbol, t in rows:
        by_cat[category(symbol)] += t
    print(
        tabulate(
            [[c, f"{t * 1e3:.3f}", f"{100 * t / total:.1f}%"] for c, t in _sorted(by_cat)],
            headers=["category", "ms", "share"],
        )
    )
    top = [
        [s[:60], category(s), counts.get(s, 0), f"{t * 1e3:.3f}", f"{100 * t / total:.1f}%"]
        for s, t in rows[:25]
    ]
    print(tabulate(top, headers=["function", "category", "calls", "ms", "share"]))


def _sorted(d: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet18-cifar-b1,resnet18-cifar-b16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tbn_compiler as tbn

    cases = _cases()
    print(f"load {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores")
    cfg = tbn.TBNConfig(p=args.p)
    for name in args.cases.split(","):
        model, x = cases[name].build()
        cm = quietly(lambda m=model, x=x: tbn.compile(m, (x,), target="llvm", config=cfg))
        medians, counts, wall = profile(cm, x, args.runs)
        report(name, medians, counts, wall)
    print(f"\nload {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
