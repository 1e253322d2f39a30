"""Vision transformers at 224 px against torch eager and ONNX Runtime fp32 (host CPU).

Run ``python benchmarks/bench_transformers.py [--cases NAME,...] [--threads 2]``.
Models (random init, batch 1, one 3 x 224 x 224 image, :data:`MODELS`):

* ``deit-tiny``: timm ``deit_tiny_patch16_224``;
* ``hf-vit``: Hugging Face ``ViTModel(ViTConfig())`` (ViT-B/16), last hidden state;
* ``hf-clip``: Hugging Face ``CLIPVisionModel(CLIPVisionConfig())`` (ViT-B/32), last
  hidden state;
* ``tv-vit-b16``: torchvision ``vit_b_16`` (from ``.venv/zoo-site``, see ``zoo.py``).

Contenders, timed round-robin in one run with ``bench_peers.py``'s harness (same
threads, new random order each round, medians): ``torch`` (eager, ``no_grad``),
``ort-fp32`` (``torch.onnx.export(dynamo=True)``, ``intra_op_num_threads``), ``ours``
(``tbn.compile(target="llvm", config=TBNConfig(p))``, default p=8), and builds saved
earlier (``--save DIR`` then ``--compare LABEL=DIR``: ``ours-LABEL``, e.g. a build of an
older version). Prints the table with the ratios ours/peer (below 1: ours is faster) and
the machine load, writes JSON (default ``benchmarks/results/transformers.json``) and a
PNG bar chart next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_peers import (  # noqa: E402
    Case,
    Contender,
    add_harness_args,
    first_tensor,
    have_onnxruntime,
    ours_contender,
    quietly,
    ratio,
    table,
    timed_row,
    torch_contender,
    write_results,
)
from zoo import import_torchvision_models  # noqa: E402

SIZE = 224


class FirstOutput(nn.Module):
    """A Hugging Face model returning its first output (the last hidden state) as a
    tensor, the form ONNX export and the timing harness take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def _deit() -> nn.Module:
    import_torchvision_models()  # timm's norm layers import torchvision
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


def _hf_vit() -> nn.Module:
    import transformers

    return FirstOutput(transformers.ViTModel(transformers.ViTConfig()))


def _hf_clip() -> nn.Module:
    import transformers

    return FirstOutput(transformers.CLIPVisionModel(transformers.CLIPVisionConfig()))


def _tv_vit() -> nn.Module:
    return import_torchvision_models().vit_b_16(weights=None)


def _image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


MODELS: dict[str, Case] = {
    c.name: c
    for c in (
        Case("deit-tiny", _deit, _image),
        Case("hf-vit", _hf_vit, _image),
        Case("hf-clip", _hf_clip, _image),
        Case("tv-vit-b16", _tv_vit, _image),
    )
}


def ort_fp32(case: Case, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path):
    """ONNX Runtime fp32 on the model exported as ``bench_peers.py`` exports it."""
    import onnxruntime as ort

    path = workdir / f"{case.name}.onnx"
    quietly(lambda: torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return Contender("ort-fp32", lambda: session.run(None, feed), {})


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One row: every contender timed round-robin, medians, errors vs torch, load."""
    model, x = case.build()
    with torch.no_grad():
        reference = first_tensor(model(x)).float()
    contenders = [torch_contender(model, x)]
    if args.ort:
        contenders.append(ort_fp32(case, model, x, args.threads, workdir))
    start = time.perf_counter()
    ours = ours_contender(case, model, x, args.p, None)
    print(f"{case.name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    return timed_row(case, x, reference, contenders, ours, args)


def verdict(row: dict[str, Any]) -> str:
    """Whether ours meets the targets: faster than torch, at most 0.5x ORT fp32."""
    vs_torch, vs_ort = ratio(row, "torch"), ratio(row, "ort-fp32")
    parts = []
    if vs_torch is not None:
        parts.append(f"{'faster' if vs_torch < 1 else 'SLOWER'} than torch ({vs_torch:.2f}x)")
    if vs_ort is not None:
        parts.append(f"{'<=' if vs_ort <= 0.5 else '>'} 0.5x ORT fp32 ({vs_ort:.2f}x)")
    return f"{row['case']}: " + ", ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(MODELS)} (default all)")
    add_harness_args(parser, rounds=5, per_round=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "transformers.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    torch.set_num_threads(args.threads)
    args.ort = have_onnxruntime() and not args.no_ort
    names = args.cases.split(",") if args.cases else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(MODELS)}")
    print(f"{len(os.sched_getaffinity(0))} cores, {args.threads} threads, load {_load()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_transformers_") as tmp:
        for name in names:
            rows.append(run_case(MODELS[name], args, Path(tmp)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    for row in rows:
        print(verdict(row))
    print(f"medians of {args.rounds * args.per_round} samples; load at end {_load()}")
    write_results(rows, args)


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
