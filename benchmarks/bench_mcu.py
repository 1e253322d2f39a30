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
CMSDK timer) and per kernel call (``cm.profile``). Prints the tables and writes JSON
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
            "weights_bytes": mem["weights_bytes"],
            "ideal_weights_bytes": ideal_weight_bytes(gm),
            "code_bytes": mem["code_bytes"],
            "flash_bytes": mem["flash_bytes"],
            "ram_bytes": mem["ram_bytes"],
            "arena_bytes": mem["arena_bytes"],
            "stack_bytes": mem["stack_bytes"],
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "board": args.board,
        "compiler": _gcc_version(),
        "opt": "-O2",
        "host": platform.platform(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
