"""Microcontroller benchmark: TBN vs binary vs float builds through the Cortex-M backend.

Run ``python benchmarks/bench_mcu.py [--board mps2-an386] [--out PATH]``. For the MNIST MLP
(784-128-10) and a digits CNN (1x8x8 input), each compiled three ways:

* ``tbn``: p=4 on the large layers (MNIST: fc1 p=4, fc2 p=1 as in the paper's MCU model;
  CNN: layers with >= 10,000 weights p=4, the rest p=1, as in the demo),
* ``tbn-no-lut``: the same with the table-free tile kernels (the Cortex-M schedule without
  :func:`~tbn_compiler.backends.lut_kernels.lut_variant`: what ``tbn`` was before the
  lookup-table kernels), measured in the same run,
* ``binary``: p=1 everywhere (one alpha per layer),
* ``float``: nothing tiled,

it reports weight bytes (and the ideal: tile bits / 8 + 4 bytes per alpha + everything else
at its own size), library flash, static RAM (data + bss: the arena) and stack (the deepest
kernel frame plus ``tbn_model_run``'s), instructions per inference in QEMU (``-icount`` +
CMSDK timer) and per kernel call (``cm.profile``).

Then real small models with the default config on ``--real-board`` (mps2-an500, Cortex-M7):
a tiny Hugging Face GPT-2 (``GPT2LMHeadModel``, 2 layers, n_embd 32, 2 heads, vocab 500,
its default ``use_cache``: int64 token ids (1, 8) in, logits and the key/value cache out)
and torchvision's MobileNetV3-small (width 0.25, 10 classes, 1x3x32x32): library flash and
RAM, the whole firmware (harness included), instructions, and the largest error of any
output tensor against the rewritten graph (max abs difference / max abs value). A model
whose library is missing is listed with the install line. Prints the tables and writes JSON
(default ``benchmarks/results/mcu.json``). Needs arm-none-eabi-gcc, newlib and
qemu-system-arm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends import schedule_rules  # noqa: E402
from tbn_compiler.backends.schedule_rules import mcu  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import zoo  # noqa: E402  (torchvision from its own folder)
from demo import DigitsCNN  # noqa: E402  (the demo's model)
from models import MnistMLP, randomize_batchnorm  # noqa: E402  (the test zoo's copy of the paper's model)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor, dict[str, tbn.TBNConfig]]]:
    torch.manual_seed(0)
    mlp = MnistMLP().eval()
    cnn = randomize_batchnorm(DigitsCNN())
    float_cfg = tbn.TBNConfig(exclude=["*"])
    return {
        "mnist_mlp": (
            mlp,
            torch.randn(1, 784),
            {
                "tbn": tbn.TBNConfig(layers={"fc1": 4, "fc2": 1}),
                "tbn-no-lut": tbn.TBNConfig(layers={"fc1": 4, "fc2": 1}),
                "binary": tbn.TBNConfig(p=1),
                "float": float_cfg,
            },
        ),
        "digits_cnn": (
            cnn,
            torch.randn(1, 1, 8, 8),
            {
                "tbn": tbn.TBNConfig(p=4, min_numel=10_000),  # as in the demo
                "tbn-no-lut": tbn.TBNConfig(p=4, min_numel=10_000),
                "binary": tbn.TBNConfig(p=1),
                "float": float_cfg,
            },
        ),
    }


def ideal_weight_bytes(gm: torch.fx.GraphModule) -> int:
    """Tile bits / 8 + 4 bytes per alpha + every other constant of the graph at its size."""
    tile_bits = sum(r.numel // r.p for r in tbn.inspect(gm).layers if r.status == "tiled")
    other = sum(
        t.numel() * t.element_size()
        for k, t in gm.state_dict().items()
        if t.dtype != torch.uint32 and not k.endswith("num_batches_tracked")
    )
    return math.ceil(tile_bits / 8) + other


@contextlib.contextmanager
def table_free_kernels() -> Iterator[None]:
    """Cortex-M builds inside use the tile kernels without lookup tables (the pipeline's
    schedule stage calls ``schedule_rules.schedule_mcu``, replaced here)."""
    original = schedule_rules.schedule_mcu
    schedule_rules.schedule_mcu = lambda func: mcu.schedule_mcu(func, lut=False)
    try:
        yield
    finally:
        schedule_rules.schedule_mcu = original


MEMORY_KEYS = (
    "weights_bytes",
    "code_bytes",
    "flash_bytes",
    "ram_bytes",
    "arena_bytes",
    "stack_bytes",
)


def memory_fields(mem: dict[str, Any]) -> dict[str, Any]:
    """The library's sizes from ``cm.memory`` (bytes; see :data:`MEMORY_KEYS`)."""
    return {key: mem[key] for key in MEMORY_KEYS}


def run_case(
    model: nn.Module, x: torch.Tensor, cfg: tbn.TBNConfig, board: str, lut: bool = True
) -> dict[str, Any]:
    gm = tbn.rewrite(model, (x,), cfg)
    with torch.no_grad():
        ref = gm(x)
    with contextlib.nullcontext() if lut else table_free_kernels():
        cm = tbn.compile(model, (x,), target=board, config=cfg)
    try:
        steps = cm.profile(x)
        y = cm(x)
        mem = cm.memory
        err = float((y - ref).abs().max())
        return {
            **memory_fields(mem),
            "ideal_weights_bytes": ideal_weight_bytes(gm),
            "firmware_flash_bytes": mem.get("firmware_flash_bytes"),
            "instructions": cm.last_run["instructions"],
            "steps": [
                {k: row[k] for k in ("step", "func", "layer", "instructions")} for row in steps
            ],
            "qemu_wall_s": round(cm.last_run["wall_s"], 4),
            "max_abs_err_vs_graph": err,
            "parity_rtol_1e-4": bool(torch.allclose(y, ref, rtol=1e-4, atol=1e-5)),
        }
    finally:
        cm.close()


def tiny_gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT2LMHeadModel, 2 layers, n_embd 32, vocab 500 (default use_cache), ids (1, 8)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=500, n_positions=64)
    return GPT2LMHeadModel(config).eval(), (torch.randint(0, 500, (1, 8)),)


def mobilenet_v3_small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """torchvision MobileNetV3-small, width 0.25, 10 classes, a 1x3x32x32 input."""
    models = zoo.import_torchvision_models()
    torch.manual_seed(0)
    model = models.mobilenet_v3_small(width_mult=0.25, num_classes=10).eval()
    return model, (torch.randn(1, 3, 32, 32),)


REAL_MODELS = {"gpt2_tiny": tiny_gpt2, "mobilenet_v3_small_0.25": mobilenet_v3_small}


def scaled_error(got: Any, ref: Any) -> float:
    """Largest max |got - ref| / max |ref| over the output tensors (same structure)."""
    leaves = torch.utils._pytree.tree_leaves
    pairs = list(zip(leaves(got), leaves(ref), strict=True))
    return max(
        float((g - r).abs().max()) / max(float(r.abs().max()), 1e-12)
        for g, r in pairs
        if isinstance(r, torch.Tensor)
    )


def run_real_case(build: Any, board: str) -> dict[str, Any]:
    """One real model with the default config on ``board``: sizes, instructions, error."""
    try:
        model, inputs = build()
    except (ImportError, zoo.LibraryMissing) as exc:
        return {"skipped": str(exc)}
    gm = tbn.rewrite(model, inputs)
    with torch.no_grad():
        ref = gm(*inputs)
    cm = tbn.compile(model, inputs, target=board)
    try:
        out = cm(*inputs)
        mem = cm.memory
        return {
            "inputs": [f"{s.dtype}{list(s.shape)}" for s in cm.input_specs],
            "outputs": len(cm.output_specs),
            "tiled_layers": cm.report.totals["tiled"],
            "layers": cm.report.totals["layers"],
            **memory_fields(mem),
            "firmware_flash_bytes": mem.get("firmware_flash_bytes"),
            "firmware_ram_bytes": mem.get("firmware_ram_bytes"),
            "instructions": cm.last_run["instructions"],
            "scaled_error_vs_graph": scaled_error(out, ref),
        }
    finally:
        cm.close()


def _real_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    keys = (
        "weights_bytes",
        "flash_bytes",
        "ram_bytes",
        "stack_bytes",
        "firmware_flash_bytes",
        "firmware_ram_bytes",
        "instructions",
    )
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"], *[""] * (len(keys) + 1)])
            continue
        ok = "ok" if r["scaled_error_vs_graph"] <= 1e-4 else "FAIL"
        err = f"{r['scaled_error_vs_graph']:.1e} {ok}"
        rows.append([name, ", ".join(r["inputs"]), *[r[k] for k in keys], err])
    return rows


def _step_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row per kernel call of every build."""
    return [
        [model, build, f"{row['step']}: {row['func']}", row["layer"] or "", row["instructions"]]
        for model, builds in results.items()
        for build, r in builds.items()
        for row in r["steps"]
    ]


def _gcc_version() -> str:
    out = subprocess.run(["arm-none-eabi-gcc", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board", default="mps2-an386")
    ap.add_argument("--real-board", default="mps2-an500", help="board of the real models")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mcu.json"))
    args = ap.parse_args()
    rows, results = [], {}
    for model_name, (model, x, configs) in _models().items():
        results[model_name] = {}
        for variant, cfg in configs.items():
            r = run_case(model, x, cfg, args.board, lut=variant != "tbn-no-lut")
            results[model_name][variant] = r
            rows.append(
                [
                    model_name,
                    variant,
                    r["weights_bytes"],
                    r["ideal_weights_bytes"],
                    r["flash_bytes"],
                    r["ram_bytes"],
                    r["stack_bytes"],
                    r["instructions"],
                    "ok" if r["parity_rtol_1e-4"] else "FAIL",
                ]
            )
        base = results[model_name]["float"]["instructions"]
        for r in results[model_name].values():
            r["instructions_vs_float"] = round(r["instructions"] / base, 3)
    headers = [
        "model",
        "build",
        "weights B",
        "ideal B",
        "flash B",
        "RAM B",
        "stack B",
        "instructions",
        "parity",
    ]
    print(f"board {args.board} (library sizes; instructions per inference under QEMU -icount)")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print("\ninstructions per kernel call")
    print(
        tabulate(_step_rows(results), headers=["model", "build", "step", "layer", "instructions"])
    )
    real = {name: run_real_case(build, args.real_board) for name, build in REAL_MODELS.items()}
    print(f"\nreal models on {args.real_board}, default config (library flash/RAM; firmware:")
    print("with the QEMU harness; error: max over output tensors vs the rewritten graph)")
    real_headers = ["model", "inputs", "weights B", "flash B", "RAM B", "stack B"]
    real_headers += ["firmware flash B", "firmware RAM B", "instructions", "error"]
    print(tabulate(_real_rows(real), headers=real_headers, tablefmt="github"))
    results["real_models"] = real
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "board": args.board,
        "real_board": args.real_board,
        "compiler": _gcc_version(),
        "opt": "-O2",
        "host": platform.platform(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
