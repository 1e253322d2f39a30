"""Whole-program CPU benchmark against the peers users would pick instead.

Run ``python benchmarks/bench_peers.py [--quick] [--cases NAME,...] [--threads 2]``.
Contenders, all with the same number of threads (``--threads``, default 2):

* ``torch``: the float model in torch eager (``torch.no_grad``);
* ``ort-fp32``: ONNX Runtime on the float model (``torch.onnx.export(dynamo=True)``; a
  Linear as ONNX ``MatMul(X, W^T) + Add``, the form both quantizers accept);
* ``ort-int8``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights);
* ``ort-4bit``: ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric,
  ``accuracy_level=4``), Linear cases only;
* ``ours``: ``tbn.compile(model, target="llvm", config=TBNConfig(p))`` (default p=8);
* ``ours-int8``: the same with ``precision="int8"`` (int8 activations), Linear cases only.

Cases (:data:`CASES`): Linear 4096x4096 at batch 1 and 64, ResNet-18-CIFAR and the
transformer encoder of ``bench_models.py`` at batch 1 and 16, and the call overhead of
a 2-layer 64-wide MLP at batch 1. The contenders of a case are timed round-robin
(``--rounds`` rounds, each in a new random order, each contender re-warmed when its turn
comes),
so all see the same background load; a sample is the mean of enough calls to last
``--sample-ms``. Headline numbers are medians; the machine load (``os.getloadavg``) is
recorded before and after each case. Prints a table with the ratios ours/peer, writes
JSON (default ``benchmarks/results/peers.json``) and a PNG bar chart next to it.

Without ``onnxruntime`` (``pip install -e .[bench]``) the ORT contenders are skipped
with one line saying so. ``--cache DIR`` keeps compiled modules between runs (keyed by
case, p and a hash of the tbn_compiler sources, so any source change recompiles).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tbn_compiler.backends.artifact import POOL_SPIN_COUNT  # noqa: E402

# Our modules run with the library's own thread-pool settings, what a user's process
# gets. bench_kernels (imported with the cases) would otherwise set TVM's spin count to
# 0: its workers then sleep after every parallel region and each call pays a wake-up of
# several microseconds. The pause before each turn (SETTLE_S) already keeps one
# contender's spinning threads from slowing the next.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(POOL_SPIN_COUNT))

ORT_CONTENDERS = ("ort-fp32", "ort-int8", "ort-4bit")
CONTENDERS = ("torch", *ORT_CONTENDERS, "ours", "ours-int8")


# --------------------------------------------------------------------------- cases


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


@dataclass(frozen=True)
class Case:
    """One row: a float model, its example input, and which peers apply."""

    name: str
    model: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    linear_only: bool = False  # MatMulNBits quantizes MatMul nodes: Linear cases only

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return self.model().eval(), self.example()


def _cases() -> dict[str, Case]:
    from bench_models import MODELS  # the models of the model benchmark

    resnet, resnet_in = MODELS["resnet18-cifar"]
    encoder, encoder_in = MODELS["transformer-encoder"]
    cases = [
        Case("linear4096-b1", lambda: nn.Linear(4096, 4096), lambda: torch.randn(1, 4096), True),
        Case("linear4096-b64", lambda: nn.Linear(4096, 4096), lambda: torch.randn(64, 4096), True),
        Case("resnet18-cifar-b1", resnet, lambda: resnet_in(1)),
        Case("resnet18-cifar-b16", resnet, lambda: resnet_in(16)),
        Case("transformer-b1", encoder, lambda: encoder_in(1)),
        Case("transformer-b16", encoder, lambda: encoder_in(16)),
        Case("mlp64-call", _mlp, lambda: torch.randn(1, 64)),
    ]
    return {c.name: c for c in cases}


QUICK = ("linear4096-b1", "resnet18-cifar-b1", "transformer-b1", "mlp64-call")


# --------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """A ready-to-time call and what we know about it (bytes, error vs the reference)."""

    name: str
    call: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)


def first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        return first_tensor(value[0])
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def rel_err(value: Any, reference: torch.Tensor) -> float:
    got = first_tensor(value).float()
    return float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def torch_contender(model: nn.Module, x: torch.Tensor) -> Contender:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Contender("torch", call, {"weight_bytes": n_bytes})


def ours_contender(
    case: Case,
    model: nn.Module,
    x: torch.Tensor,
    p: int,
    cache: Path | None,
    precision: str = "float32",
) -> Contender:
    """``tbn.compile`` (or the cached module); error measured against ``tbn.rewrite``
    (the numerical contract) and against the float model. Named ``ours``, or
    ``ours-PRECISION`` for another ``precision`` than float32."""
    import tbn_compiler as tbn

    cfg = tbn.TBNConfig(p=p)
    suffix = "" if precision == "float32" else f"-{precision}"
    name = f"{case.name}-p{p}{suffix}-{_source_hash()}.tbn"
    path = None if cache is None else cache / name
    start = time.perf_counter()
    if path is not None and path.exists():
        cm = tbn.load(path)
    else:
        cm = quietly(
            lambda: tbn.compile(model, (x,), target="llvm", config=cfg, precision=precision)
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            cm.save(path)
    build_s = time.perf_counter() - start
    with torch.no_grad():
        graph_out = quietly(lambda: tbn.rewrite(model, (x,), cfg))(x)
    totals = getattr(cm.report, "totals", None) or {}
    info = {
        "build_s": round(build_s, 1),
        "rel_err_vs_rewrite": rel_err(cm(x), first_tensor(graph_out).float()),
        "weight_bytes_tiled": totals.get("tbn_bytes"),
    }
    return Contender(f"ours{suffix}", lambda: cm(x), {**info, "module": cm})


def saved_contenders(case: Case, x: torch.Tensor, compare: list[str]) -> list[Contender]:
    """``ours-LABEL`` for each ``LABEL=DIR`` of ``--compare`` holding ``<case>.tbn``
    (a build saved by ``--save``, e.g. from another version of tbn_compiler)."""
    import tbn_compiler as tbn

    out = []
    for item in compare:
        label, _, folder = item.partition("=")
        path = Path(folder) / f"{case.name}.tbn"
        if path.exists():
            cm = tbn.load(path)
            out.append(Contender(f"ours-{label}", lambda cm=cm: cm(x), {"path": str(path)}))
    return out


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "tbn_compiler").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with Python warnings, log records and stdout chatter suppressed."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return fn()
    finally:
        logging.disable(logging.NOTSET)


def have_onnxruntime() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def ort_contenders(
    case: Case, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path
) -> list[Contender]:
    """ORT fp32, dynamic int8 and (Linear cases) 4-bit MatMulNBits sessions."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = workdir / f"{case.name}.onnx"
    if isinstance(model, nn.Linear):
        _save_linear_onnx(model, x, fp32)
    else:
        quietly(lambda: torch.onnx.export(model, (x,), str(fp32), dynamo=True, verbose=False))
    int8 = workdir / f"{case.name}.int8.onnx"
    quietly(lambda: quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8))
    models = [("ort-fp32", fp32), ("ort-int8", int8)]
    if case.linear_only:
        models.append(("ort-4bit", _matmul_nbits(fp32, workdir / f"{case.name}.q4.onnx")))
    return [_ort_session(name, path, x, threads) for name, path in models]


def _save_linear_onnx(layer: nn.Linear, x: torch.Tensor, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w_t = layer.weight.detach().numpy().T.copy()
    bias = layer.bias.detach().numpy()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_t"], ["xw"]),
            helper.make_node("Add", ["xw", "bias"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], w_t.shape[1]])],
        [numpy_helper.from_array(w_t, "w_t"), numpy_helper.from_array(bias, "bias")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _matmul_nbits(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4
    )
    quietly(quant.process)
    quant.model.save_model_to_file(str(dst), False)
    return dst


def _ort_session(name: str, path: Path, x: torch.Tensor, threads: int) -> Contender:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return Contender(
        name, lambda: session.run(None, feed), {"model_file_bytes": path.stat().st_size}
    )


# --------------------------------------------------------------------------- timing


def calibrate(call: Callable[[], Any], sample_ms: float, warmup: int = 5) -> int:
    """Warm ``call`` up; the number of calls that last about ``sample_ms``."""
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(sample_ms / 1e3 / once))


def sample(call: Callable[[], Any], number: int, n: int) -> list[float]:
    """``n`` timings (seconds per call, each the mean of ``number`` calls), after a
    quarter of a sample of untimed calls (another contender ran just before)."""
    for _ in range(max(1, number // 4)):
        call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        for _ in range(number):
            call()
        out.append((time.perf_counter() - start) / number)
    return out


def round_robin(
    contenders: list[Contender], rounds: int, per_round: int, sample_ms: float
) -> dict[str, list[float]]:
    """Timings per contender, taken in ``rounds`` turns in a new random order each
    round (seeded): a contender that leaves busy threads behind (ONNX Runtime and TVM
    spin after a run) must not always slow down the same successor. Each turn starts
    after a pause of :data:`SETTLE_S` and one untimed call, so the previous contender's
    spinning threads have gone to sleep and this one's pool is awake, as in a process
    that runs only it."""
    order = random.Random(0)
    with torch.no_grad():
        numbers = {c.name: calibrate(c.call, sample_ms) for c in contenders}
        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        for _ in range(rounds):
            for c in order.sample(contenders, len(contenders)):
                time.sleep(SETTLE_S)
                c.call()
                times[c.name] += sample(c.call, numbers[c.name], per_round)
    return times


SETTLE_S = 0.1
"""Pause before each contender's turn (longer than the spin-wait of ORT's, torch's and
TVM's thread pools)."""


# --------------------------------------------------------------------------- run


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model, x = case.build()
    with torch.no_grad():
        reference = first_tensor(model(x)).float()
    contenders = [torch_contender(model, x)]
    if args.ort:
        contenders += ort_contenders(case, model, x, args.threads, workdir)
    if case.linear_only:
        contenders.append(ours_contender(case, model, x, args.p, args.cache, "int8"))
    ours = ours_contender(case, model, x, args.p, args.cache)
    return timed_row(case, x, reference, contenders, ours, args)


def timed_row(
    case: Case,
    x: torch.Tensor,
    reference: torch.Tensor,
    contenders: list[Contender],
    ours: Contender,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The row of ``case``: ``ours`` (saved with ``--save``) after the peers in
    ``contenders``, plus the ``--compare`` builds, timed round-robin; medians, errors
    against ``reference`` and the load before and after."""
    contenders = [*contenders, ours]
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        ours.info["saved"] = str(ours.info["module"].save(args.save / f"{case.name}.tbn"))
    contenders += saved_contenders(case, x, args.compare)
    load_before = os.getloadavg()
    times = round_robin(contenders, args.rounds, args.per_round, args.sample_ms)
    load_after = os.getloadavg()
    row: dict[str, Any] = {"case": case.name, "batch": int(x.shape[0]), "contenders": {}}
    for c in contenders:
        samples = times[c.name]
        row["contenders"][c.name] = {
            "median_ms": statistics.median(samples) * 1e3,
            "min_ms": min(samples) * 1e3,
            "samples": len(samples),
            "rel_err_vs_torch": rel_err(c.call(), reference),
            **{k: v for k, v in c.info.items() if k != "module"},
        }
    row["load_before"] = [round(v, 2) for v in load_before]
    row["load_after"] = [round(v, 2) for v in load_after]
    return row


def ratio(row: dict[str, Any], peer: str) -> float | None:
    cs = row["contenders"]
    if peer not in cs or "ours" not in cs:
        return None
    return cs["ours"]["median_ms"] / cs[peer]["median_ms"]


def contender_names(rows: list[dict[str, Any]]) -> list[str]:
    """Contenders present in ``rows``: the standard ones in order, then saved builds."""
    seen = [c for c in CONTENDERS if any(c in r["contenders"] for r in rows)]
    for r in rows:
        seen += [c for c in r["contenders"] if c not in seen]
    return seen


def table(rows: list[dict[str, Any]]) -> str:
    present = contender_names(rows)
    peers = [c for c in present if c != "ours"]
    body = []
    for r in rows:
        cs = r["contenders"]
        ms = [_fmt_ms(cs[c]["median_ms"]) if c in cs else "-" for c in present]
        ratios = [_fmt_ratio(ratio(r, peer)) for peer in peers]
        load = f"{r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}"
        body.append([r["case"], *ms, *ratios, load])
    headers = ["case", *(f"{c} ms" for c in present), *(f"ours/{c}" for c in peers), "load"]
    return tabulate(body, headers=headers)


def _fmt_ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Bar chart of each contender's median relative to ORT fp32 (else torch), log scale.
    False when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = contender_names(rows)
    base = "ort-fp32" if "ort-fp32" in names else "torch"
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, r in enumerate(rows):
            cs = r["contenders"]
            if name in cs and base in cs:
                xs.append(j + i * width)
                ys.append(cs[name]["median_ms"] / cs[base]["median_ms"])
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["case"] for r in rows], rotation=20, ha="right")
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel(f"median time / {base} (lower is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_harness_args(parser: argparse.ArgumentParser, rounds: int, per_round: int) -> None:
    """The options every round-robin benchmark takes: threads, p, rounds and samples,
    ORT on/off, and saving/comparing builds."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--per-round", type=int, default=per_round, help="samples per turn")
    parser.add_argument("--sample-ms", type=float, default=30.0)
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime peers")
    parser.add_argument("--save", type=Path, help="write each case's build to DIR/<case>.tbn")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also time the builds DIR/<case>.tbn (from --save) as contender ours-LABEL",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"cases {', '.join(QUICK)}")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    add_harness_args(parser, rounds=7, per_round=3)
    parser.add_argument("--cache", type=Path, help="directory of compiled modules to reuse")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    return parser.parse_args(argv)


def select_cases(args: argparse.Namespace) -> list[Case]:
    cases = _cases()
    names = args.cases.split(",") if args.cases else list(QUICK if args.quick else cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(cases)}")
    return [cases[n] for n in names]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    torch.set_num_threads(args.threads)
    args.ort = have_onnxruntime() and not args.no_ort
    if not have_onnxruntime():
        print("onnxruntime/onnx not installed: skipping ORT contenders (pip install -e .[bench])")
    cases = select_cases(args)
    print(
        f"{len(os.sched_getaffinity(0))} cores, {args.threads} threads per contender, "
        f"load {_load()}, torch {torch.__version__}, {_ort_version()}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        for case in cases:
            rows.append(run_case(case, args, Path(tmp)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    print(
        f"medians of {args.rounds * args.per_round} samples (each >= {args.sample_ms:.0f} ms "
        f"of calls), {args.rounds} rounds in random orders; load at end {_load()}"
    )
    write_results(rows, args)


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    meta = {
        "cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "p": args.p,
        "torch": torch.__version__,
        "onnxruntime": _ort_version(),
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "per_round": args.per_round,
        "sample_ms": args.sample_ms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    png = args.out.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {png}")


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _ort_version() -> str:
    if not have_onnxruntime():
        return "no onnxruntime"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    main()
