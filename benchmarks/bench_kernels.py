"""CPU benchmark: scheduled tbn TIR kernels vs torch fp32 (nn.Linear / F.conv2d).

Run ``python benchmarks/bench_kernels.py [--quick] [--out PATH]``. Prints a table
(ms, torch/ours) and writes JSON (default ``benchmarks/results/kernels.json``).
Both sides use every core of the machine; per case the runs alternate between torch
and ours so they see the same background load. Medians are the headline numbers;
the best repeat ("min") is reported too, since on a small shared machine other
processes can slow either side by several times (torch's OpenMP pool suffers most).
Cases are plain :class:`Case` entries in :func:`default_cases`; model rows can be
appended the same way (a case only needs a kernel builder, inputs and a torch
baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# TVM workers go to sleep right after a parallel region instead of spinning, so they do
# not take cores from the torch runs that alternate with ours.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
CORES = len(os.sched_getaffinity(0))
os.environ.setdefault("TVM_NUM_THREADS", str(CORES))
MIN_REPEAT_MS = 50

import tvm  # noqa: E402

from tbn_compiler import tiling  # noqa: E402
from tbn_compiler.backends import kernels, schedule_rules  # noqa: E402


@dataclass
class Case:
    """One benchmark row: a tbn kernel and the torch fp32 layer it replaces."""

    name: str
    build: Callable[[], tvm.tirx.PrimFunc]  # unscheduled kernel
    inputs: Callable[[], list[torch.Tensor]]  # kernel inputs: x, tile, alphas, [bias]
    out_shape: tuple[int, ...]
    torch_fn: Callable[[], Callable[[], torch.Tensor]]  # returns a zero-arg torch call
    info: dict = field(default_factory=dict)


def _tile(numel: int, p: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(numel // p, generator=g) > 0.5, 1.0, -1.0)
    return [tiling.pack_bits(signs), torch.rand(p, generator=g) + 0.5]


def linear_case(m: int, k: int, n: int, p: int, weight_in_out: bool = False) -> Case:
    x = torch.randn(m, k)

    def torch_fn():
        layer = torch.nn.Linear(k, n)
        return lambda: layer(x)

    return Case(
        name=f"linear {m}x{k}->{n} p={p}" + (" in_out" if weight_in_out else ""),
        build=lambda: kernels.tiled_linear_primfunc(m, k, n, p, weight_in_out, True),
        inputs=lambda: [x, *_tile(k * n, p), torch.randn(n)],
        out_shape=(m, n),
        torch_fn=torch_fn,
        info={"op": "linear", "m": m, "k": k, "n": n, "p": p, "weight_in_out": weight_in_out},
    )


def conv2d_case(batch: int, cin: int, cout: int, hw: int, k: int, pad: int, p: int) -> Case:
    x = torch.randn(batch, cin, hw, hw)
    ws = (cout, cin, k, k)
    out_hw = hw + 2 * pad - k + 1

    def torch_fn():
        w, b = torch.randn(ws), torch.randn(cout)
        return lambda: F.conv2d(x, w, b, padding=pad)

    return Case(
        name=f"conv2d {k}x{k} {cin}->{cout} {hw}x{hw} b={batch} p={p}",
        build=lambda: kernels.tiled_conv_primfunc(x.shape, ws, 1, pad, 1, 1, p, True),
        inputs=lambda: [x, *_tile(int(np.prod(ws)), p), torch.randn(cout)],
        out_shape=(batch, cout, out_hw, out_hw),
        torch_fn=torch_fn,
        info={"op": "conv2d", "batch": batch, "cin": cin, "cout": cout, "hw": hw, "k": k, "p": p},
    )


def default_cases(quick: bool) -> list[Case]:
    cases = []
    for p in (4, 8):
        for m in (1, 16, 64):
            cases.append(linear_case(m, 4096, 4096, p))
    for p in (8, 4):
        for batch in (1, 16):
            cases.append(conv2d_case(batch, 256, 256, 14, 3, 1, p))
    for batch in (1, 16):  # ResNet-18-CIFAR's binary (p=1) 64-channel convs
        cases.append(conv2d_case(batch, 64, 64, 32, 3, 1, 1))
    if quick:
        keep = {
            "linear 1x4096->4096 p=8",
            "linear 64x4096->4096 p=8",
            "conv2d 3x3 256->256 14x14 b=1 p=8",
            "conv2d 3x3 64->64 32x32 b=1 p=1",
        }
        cases = [c for c in cases if c.name in keep]
    return cases


# --------------------------------------------------------------------------- timing


def _to_tvm(t: torch.Tensor, dev) -> tvm.runtime.Tensor:
    arr = t.view(torch.int32).numpy().view(np.uint32) if t.dtype == torch.uint32 else t.numpy()
    return tvm.runtime.tensor(arr, dev)


def build_ours(case: Case, target) -> Callable[[int], list[float]]:
    """Build the scheduled kernel; return ``sample(n)``: ``n`` timings in seconds
    (TVM ``time_evaluator``, each repeat at least ``MIN_REPEAT_MS`` long)."""
    func = schedule_rules.schedule_for(case.build(), target)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    mod = ex.jit() if hasattr(ex, "jit") else ex
    dev = tvm.cpu()
    args = [_to_tvm(t, dev) for t in case.inputs()]
    out = tvm.runtime.tensor(np.zeros(case.out_shape, np.float32), dev)

    def sample(n: int) -> list[float]:
        evaluator = mod.time_evaluator("main", dev, number=1, repeat=n, min_repeat_ms=MIN_REPEAT_MS)
        return list(evaluator(*args, out).results)

    return sample


def torch_sampler(fn: Callable[[], torch.Tensor]) -> Callable[[int], list[float]]:
    """Warm ``fn`` up; return ``sample(n)``: ``n`` timings in seconds, each the mean of
    enough calls to last at least ``MIN_REPEAT_MS``."""
    with torch.no_grad():
        for _ in range(10):  # oneDNN primitive creation, thread pool start
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-6)
    number = max(1, int(MIN_REPEAT_MS / 1e3 / once))

    def sample(n: int) -> list[float]:
        samples = []
        with torch.no_grad():
            for _ in range(n):
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                samples.append((time.perf_counter() - start) / number)
        return samples

    return sample


def alternate(
    ours_fn: Callable[[int], list[float]],
    torch_fn: Callable[[int], list[float]],
    repeat: int,
    rounds: int = 3,
) -> tuple[list[float], list[float]]:
    """(ours, torch) samples in seconds, taken ``rounds`` times in turn (``repeat`` each
    in all) so both see the same background load."""
    ours, ref = [], []
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        ref += torch_fn(per_round)
        ours += ours_fn(per_round)
    return ours, ref


def run(cases: list[Case], repeat: int, rounds: int = 3) -> list[dict]:
    """Per case, alternate ``rounds`` times between torch and ours (``repeat`` samples
    each in all) so both see the same background load; report median and min."""
    target = schedule_rules.host_target()
    rows = []
    for case in cases:
        ours, ref = alternate(
            build_ours(case, target), torch_sampler(case.torch_fn()), repeat, rounds
        )
        o, r = statistics.median(ours) * 1e3, statistics.median(ref) * 1e3
        o_min, r_min = min(ours) * 1e3, min(ref) * 1e3
        rows.append(
            {
                "case": case.name,
                **case.info,
                "ours_ms": round(o, 4),
                "torch_ms": round(r, 4),
                "speedup": round(r / o, 2),
                "ours_min_ms": round(o_min, 4),
                "torch_min_ms": round(r_min, 4),
                "speedup_of_mins": round(r_min / o_min, 2),
            }
        )
        print(f"  {case.name}: ours {o:.3f} ms, torch {r:.3f} ms", flush=True)
    return rows


def meta_load(before: float) -> str:
    """Other processes skew both timings on a small machine: report the load."""
    return f"{before:.2f} / {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three rows, fewer repeats")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.json"
    )
    args = parser.parse_args(argv)
    cores = CORES
    torch.set_num_threads(cores)
    repeat = 6 if args.quick else 15
    load_before = os.getloadavg()[0]
    rows = run(default_cases(args.quick), repeat)
    table = [
        [
            r["case"],
            f"{r['ours_ms']:.3f}",
            f"{r['torch_ms']:.3f}",
            f"{r['speedup']:.2f}x",
            f"{r['ours_min_ms']:.3f}",
            f"{r['torch_min_ms']:.3f}",
            f"{r['speedup_of_mins']:.2f}x",
        ]
        for r in rows
    ]
    headers = ["case", "ours ms", "torch fp32 ms", "torch/ours", "ours min", "torch min", "min/min"]
    print(tabulate(table, headers=headers))
    print("median of repeats; 'min' columns are the best repeat (less sensitive to load)")
    print(f"load average (1 min) before/after: {meta_load(load_before)}")
    meta = {
        "cores": cores,
        "cpu": tvm.target.codegen.llvm_get_system_cpu(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "tvm": tvm.__version__,
        "target": str(schedule_rules.host_target()),
        "repeat": repeat,
        "min_repeat_ms": MIN_REPEAT_MS,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
