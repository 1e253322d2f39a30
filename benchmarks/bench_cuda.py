"""GPU benchmark: compiled tile layers and models on CUDA vs torch (cuBLAS/cuDNN).

Run on a machine with an NVIDIA GPU: ``python benchmarks/bench_cuda.py [--quick]``.
Rows: tiled linear 4096x4096 at p = 4 and 8, batch 1/16/64 (vs torch fp16 and fp32
nn.Linear); tiled conv2d 3x3 256->256 at 14x14, batch 1/16 (vs torch fp16 conv2d);
whole models from bench_models.py. Each row also checks the CUDA output against the
PyTorch reference graph (``rewrite``) on the CPU. Latencies are medians of CUDA-event
timed repeats. Writes JSON (default ``benchmarks/results/cuda.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_models import MODELS  # noqa: E402

import tbn_compiler as tbn  # noqa: E402


def time_cuda(fn: Callable[[], object], repeat: int = 20, inner: int = 20) -> float:
    """Median ms per call of ``fn`` (CUDA events around ``inner`` calls, ``repeat`` times)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def bench_layer(name: str, layer: nn.Module, x: torch.Tensor, p: int) -> dict:
    layer = layer.eval()
    cfg = tbn.TBNConfig(p=p, min_numel=0)
    ref = tbn.rewrite(layer, (x,), cfg)(x)
    t0 = time.perf_counter()
    cm = tbn.compile(layer, (x,), target="cuda", config=cfg)
    compile_s = time.perf_counter() - t0
    xg = x.cuda()
    out = cm(xg)
    err = (out.cpu() - ref).abs().max().item()
    ok = torch.allclose(out.cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    ours = time_cuda(lambda: cm(xg))
    fp16, fp32, xh = copy.deepcopy(layer).half().cuda(), copy.deepcopy(layer).cuda(), xg.half()
    with torch.no_grad():
        torch_fp16 = time_cuda(lambda: fp16(xh))
        torch_fp32 = time_cuda(lambda: fp32(xg))
    return {
        "case": name,
        "p": p,
        "compile_s": round(compile_s, 1),
        "ours_ms": round(ours, 4),
        "torch_fp16_ms": round(torch_fp16, 4),
        "torch_fp32_ms": round(torch_fp32, 4),
        "speedup_vs_fp16": round(torch_fp16 / ours, 2),
        "max_abs_err": err,
        "parity": ok,
    }


def layer_cases(quick: bool):
    batches = [1] if quick else [1, 16, 64]
    for p in (4, 8):
        for b in batches:
            yield f"linear {b}x4096->4096", nn.Linear(4096, 4096), torch.randn(b, 4096), p
    for b in [1] if quick else [1, 16]:
        yield (
            f"conv3x3 {b}x256x14x14->256",
            nn.Conv2d(256, 256, 3, padding=1),
            torch.randn(b, 256, 14, 14),
            8,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cuda.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    rows = [bench_layer(*case) for case in layer_cases(args.quick)]
    for name, (factory, make_input) in MODELS.items():
        torch.manual_seed(0)
        rows.append(bench_layer(f"model {name}", factory(), make_input(1), 8))
    print(
        tabulate(
            [
                [
                    r["case"],
                    r["p"],
                    r["ours_ms"],
                    r["torch_fp16_ms"],
                    r["torch_fp32_ms"],
                    f"{r['speedup_vs_fp16']:.2f}x",
                    r["parity"],
                    r["compile_s"],
                ]
                for r in rows
            ],
            headers=[
                "case",
                "p",
                "ours ms",
                "torch fp16 ms",
                "torch fp32 ms",
                "fp16/ours",
                "parity",
                "compile s",
            ],
        )
    )
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
