"""Mixed pipelines: our compiled module with torch ops between its calls (host CPU).

Run ``python benchmarks/bench_mixed.py [--model NAME] [--configs NAME,...]``.

A real pipeline runs torch pre/post-processing between calls of our module in the same
process. Both libraries keep a thread pool: TVM's (``TVM_NUM_THREADS`` threads, the
caller is one of them) and torch's OpenMP pool (libgomp). After a parallel region each
pool's workers keep spinning for a while, and on a machine with as many cores as
threads a spinning worker of one pool takes a core the other pool's next parallel
region is waiting for.

For each configuration (:data:`CONFIGS`: environment variables set before torch and
TVM start, so each runs in a fresh process) the child process compiles (or loads) the
module, then alternates, ``--rounds`` times, a block of ``alone`` iterations (``cm(x)``
back to back) and a block of ``mixed`` iterations (torch pre-processing, ``cm(x)``,
torch post-processing: :func:`pre_process`, :func:`post_process`), each iteration timed
per part. Configurations run in rotation (``--repeat`` processes each), so all see the same
background load. Reported per configuration: medians of our call alone and in the mixed loop,
of the torch ops in the mixed loop and on their own (a third block, ``torch-only``), the
mixed pipeline's total per iteration, the extra time of our call in the mixed loop, and
the load. Prints a table, writes JSON (default ``benchmarks/results/mixed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, dict[str, str]] = {
    # what a user gets with no settings: tbn_compiler's defaults
    "defaults": {},
    # TVM's own defaults (tbn_compiler leaves them): 1 thread where TVM halves the
    # logical CPUs, 300,000 yields of spinning
    "tvm-defaults": {"TBN_THREADS": "off"},
    # our thread count with other spin counts (300,000: TVM's default)
    "spin-300k": {"TVM_THREAD_POOL_SPIN_COUNT": "300000"},
    "spin-1k": {"TVM_THREAD_POOL_SPIN_COUNT": "1000"},
    "spin-0": {"TVM_THREAD_POOL_SPIN_COUNT": "0"},
    # torch's OpenMP workers sleep at once after a parallel region
    "defaults+omp-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
"""Environment of each configuration (``TBN_THREADS=off``: tbn_compiler leaves TVM's
thread pool settings alone)."""


def pre_process(frame: Any) -> Any:
    """Resize a camera frame to 224 x 224 and normalize it (torch ops, parallel)."""
    import torch.nn.functional as F

    x = F.interpolate(frame, size=(224, 224), mode="bilinear", align_corners=False)
    return (x - 0.45) / 0.225


def post_process(y: Any) -> Any:
    """Softmax and top-5 of the flattened output (torch ops)."""
    import torch

    flat = y.reshape(y.shape[0], -1)
    return torch.topk(torch.softmax(flat, dim=-1), 5)


def _model(name: str) -> tuple[Any, Any]:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    if name == "deit-tiny":
        from bench_transformers import MODELS as VIT

        return VIT["deit-tiny"].build()
    from bench_models import MODELS

    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    return factory().eval(), make_input(1)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the configuration's process: compile or load, time, return the stats."""
    import torch

    sys.path.insert(0, str(ROOT))
    import tbn_compiler as tbn

    torch.set_num_threads(args.threads)
    model, x = _model(args.model)
    cache = Path(args.cache) / f"{args.model}-p{args.p}.tbn"
    if cache.exists():
        cm = tbn.load(cache)
    else:
        cm = tbn.compile(model, (x,), target="llvm", config=tbn.TBNConfig(p=args.p))
        cm.save(cache)
    frame = torch.rand(1, 3, 480, 640)
    times: dict[str, list[float]] = {
        k: [] for k in ("alone", "mixed", "torch-mixed", "torch-only", "total")
    }
    with torch.no_grad():
        for _ in range(5):  # warm both pools up
            post_process(cm(x))
            pre_process(frame)
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                cm(x)
                times["alone"].append(time.perf_counter() - t0)
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                pre_process(frame)
                t1 = time.perf_counter()
                y = cm(x)
                t2 = time.perf_counter()
                post_process(y)
                t3 = time.perf_counter()
                times["mixed"].append(t2 - t1)
                times["torch-mixed"].append((t1 - t0) + (t3 - t2))
                times["total"].append(t3 - t0)
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                pre_process(frame)
                post_process(cm_output_stand_in(y))
                times["torch-only"].append(time.perf_counter() - t0)
        load_after = os.getloadavg()
    return {
        "times_s": times,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
    }


def cm_output_stand_in(y: Any) -> Any:
    """A tensor shaped like our module's output (post-processing input without a call)."""
    return y.clone()


def run_config(name: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`child` in a fresh process with ``env`` added; its timings (seconds per
    part and iteration) and the load before and after."""
    child_env = {**os.environ, **env}
    for key in ("TBN_THREADS", "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "OMP_WAIT_POLICY"):
        if key not in env:
            child_env.pop(key, None)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", out.name, *sys.argv[1:]]
        subprocess.run(cmd, env=child_env, check=True)
        return json.loads(Path(out.name).read_text())


def merge(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a configuration from its runs: medians over all their samples, the
    load before the first and after the last run."""
    parts = runs[0]["times_s"].keys()
    samples = {k: [t for r in runs for t in r["times_s"][k]] for k in parts}
    return {
        "config": name,
        "env": CONFIGS[name],
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in samples.items()},
        "samples": len(samples["alone"]),
        "runs": len(runs),
        "load_before": runs[0]["load_before"],
        "load_after": runs[-1]["load_after"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    body = []
    for r in rows:
        m = r["median_ms"]
        body.append(
            [
                r["config"],
                f"{m['alone']:.2f}",
                f"{m['mixed']:.2f}",
                f"{m['mixed'] - m['alone']:+.2f}",
                f"{m['torch-only']:.2f}",
                f"{m['torch-mixed']:.2f}",
                f"{m['total']:.2f}",
                f"{r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}",
            ]
        )
    headers = [
        "config",
        "ours alone ms",
        "ours mixed ms",
        "extra ms",
        "torch ops alone ms",
        "torch ops mixed ms",
        "mixed total ms",
        "load",
    ]
    return tabulate(body, headers=headers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="transformer-encoder",
        help="transformer-encoder, resnet18-cifar, deit-tiny",
    )
    parser.add_argument("--configs", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="block triples per process")
    parser.add_argument(
        "--repeat", type=int, default=3, help="processes per configuration, in rotation"
    )
    parser.add_argument("--iterations", type=int, default=20, help="iterations per block")
    parser.add_argument("--cache", default=tempfile.gettempdir(), help="folder of builds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mixed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        Path(args.child).write_text(json.dumps(child(args)))
        return
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    print(
        f"{len(os.sched_getaffinity(0))} cores, model {args.model}, load {os.getloadavg()[0]:.2f}"
    )
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(args.repeat):  # configurations in rotation: all see the same load
        for name in names:
            runs[name].append(run_config(name, CONFIGS[name], args))
            print(f"run {i + 1}/{args.repeat} {name} done", flush=True)
    rows = [merge(name, runs[name]) for name in names]
    print(table(rows))
    print(
        f"medians of {rows[0]['samples']} iterations per block kind ({args.repeat} processes "
        f"per configuration in rotation, {args.rounds} interleaved block triples each)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "p": args.p, "torch_threads": args.threads}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
