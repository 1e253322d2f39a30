"""Test accuracy of the digits demo's TBN QAT against its float model, per p and seed.

Trains the demo's float CNN for every seed, fine-tunes a TBN copy for every p and
training variant, prints one row per (variant, p) with the float and TBN accuracies and
their gap (mean, min and max over the seeds) and writes every run to a JSON file::

    .venv/bin/python examples/qat_sweep.py                       # p = 2, 4, 8; seeds 0-4
    .venv/bin/python examples/qat_sweep.py --variants recipe before --seeds 0 1

Variants: ``recipe`` is what ``examples/demo.py`` does (BatchNorm after fc1, distillation
from the float model, Adam at 3e-3 with a cosine decay, BatchNorm recalibration);
``before`` is the demo before the recipe (no BatchNorm after fc1, cross entropy only, Adam
at 1e-3, no recalibration); the others drop one part of the recipe. The accuracies are
those of the QAT model in torch; the compiled targets equal it (the demo checks parity).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from demo import accuracy, demo_config, load_data, logits, train_float, train_tbn
from tabulate import tabulate


@dataclass(frozen=True)
class Variant:
    """A training variant: the float model's architecture and ``train_tbn``'s options."""

    fc_norm: bool = True
    distill: bool = True
    fit_kw: dict = field(default_factory=dict)


VARIANTS = {
    "recipe": Variant(),
    "no-distill": Variant(distill=False),
    "no-fc-norm": Variant(fc_norm=False),
    "no-recalibration": Variant(fit_kw={"recalibrate": False}),
    "before": Variant(fc_norm=False, distill=False, fit_kw={"lr": 1e-3, "recalibrate": False}),
}


def run_seed(seed: int, ps: list[int], variants: list[str], epochs: int, data) -> list[dict]:
    """Float and TBN test accuracies of one seed, one record per (variant, p)."""
    x_train, y_train, x_test, y_test = data
    floats = {}
    records = []
    for name in variants:
        variant = VARIANTS[name]
        if variant.fc_norm not in floats:
            model = train_float(x_train, y_train, epochs, seed, fc_norm=variant.fc_norm)
            floats[variant.fc_norm] = (model, accuracy(logits(model, x_test), y_test))
        float_model, float_acc = floats[variant.fc_norm]
        for p in ps:
            t0 = time.perf_counter()
            qat = train_tbn(
                float_model, demo_config(p), x_train, y_train, epochs, seed,
                distill=variant.distill, **variant.fit_kw,
            )  # fmt: skip
            tbn_acc = accuracy(logits(qat, x_test), y_test)
            records.append(
                {
                    "variant": name, "p": p, "seed": seed, "float": float_acc, "tbn": tbn_acc,
                    "gap": float_acc - tbn_acc, "qat_seconds": time.perf_counter() - t0,
                }
            )  # fmt: skip
            print(
                f"  seed {seed} {name:16s} p={p}: float {float_acc:.2f}%  TBN {tbn_acc:.2f}%",
                flush=True,
            )
    return records


def summary_rows(records: list[dict], variants: list[str], ps: list[int]) -> list[list]:
    """One row per (variant, p): mean float, mean/min/max TBN and mean/max gap."""
    rows = []
    for name in variants:
        for p in ps:
            runs = [r for r in records if r["variant"] == name and r["p"] == p]
            tbn_accs = [r["tbn"] for r in runs]
            gaps = [r["gap"] for r in runs]
            rows.append(
                [
                    name, p, len(runs), mean(r["float"] for r in runs), mean(tbn_accs),
                    min(tbn_accs), max(tbn_accs), mean(gaps), max(gaps),
                    sum(g <= 0.5 for g in gaps),
                ]
            )  # fmt: skip
    return rows


DEFAULT_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "qat_sweep.json"
HEADERS = [
    "variant", "p", "seeds", "float %", "TBN %", "TBN min", "TBN max", "gap", "gap max",
    "gap <= 0.5",
]  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="output path")
    args = parser.parse_args()
    data = load_data()
    t0 = time.perf_counter()
    records = []
    for seed in args.seeds:
        records += run_seed(seed, args.ps, args.variants, args.epochs, data)
    rows = summary_rows(records, args.variants, args.ps)
    print()
    print(tabulate(rows, headers=HEADERS, floatfmt=".2f"))
    print(f"({time.perf_counter() - t0:.0f} s; gap = float - TBN, in points)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = [dict(zip(HEADERS, row, strict=True)) for row in rows]
    out.write_text(
        json.dumps({"epochs": args.epochs, "summary": summary, "runs": records}, indent=1)
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
