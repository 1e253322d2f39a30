"""The CPU attention kernel alone: the generic row-by-row schedule against the kernel of
``schedule_rules/attention_cpu.py``, on the attention PrimFunc the CPU pipeline
legalizes from ``R.nn.attention`` (no mask), interleaved in one process.

Run ``python benchmarks/bench_attention_cpu.py [--threads 2] [--repeat 15]``. Shapes are
(batch, seq, heads, dim): DeiT-tiny (1 and 16 x 197 x 3 x 64) and the bench_models
transformer encoder (1 and 16 x 64 x 4 x 64). GFLOP/s counts ``4 * seq^2 * dim`` per
batch and head (the two products), at the median time. Each row also gives the fastest
sample (less sensitive to other jobs on the cores) and the largest difference between
the two outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "deit-tiny-b1": (1, 197, 3, 64),
    "deit-tiny-b16": (16, 197, 3, 64),
    "transformer-b1": (1, 64, 4, 64),
    "transformer-b16": (16, 64, 4, 64),
}


def legalized_attention(shape: tuple[int, int, int, int]):
    """The attention PrimFunc the CPU pipeline legalizes for (batch, seq, heads, dim)."""
    from tvm import relax

    from tbn_compiler.backends import pipelines
    from tbn_compiler.backends.schedule_rules import host_target

    bb = relax.BlockBuilder()
    ty = relax.TensorType(shape, "float32")
    q, k, v = (relax.Var(name, ty) for name in "qkv")
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.attention(q, k, v))
        bb.emit_func_output(out)
    with host_target():
        mod = relax.transform.LegalizeOps(pipelines.CPU_LEGALIZATIONS)(bb.get())
    return mod["attention"]


def builds(func) -> dict[str, object]:
    """The generic schedule and the kernel of ``func``, each built for the host."""
    import tvm

    from tbn_compiler.backends.schedule_rules import host_target, parallelize_generic
    from tbn_compiler.backends.schedule_rules.attention_cpu import ATTENTION_ATTR

    target = host_target()
    with target:
        funcs = {
            "generic": parallelize_generic(func.without_attr(ATTENTION_ATTR)),
            "kernel": parallelize_generic(func),
        }
        return {
            name: tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}), target)
            for name, f in funcs.items()
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    os.environ["TBN_THREADS"] = str(args.threads)
    import tvm

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    print(f"{args.threads} threads, load {os.getloadavg()[0]:.2f}")
    for case, shape in SHAPES.items():
        built = builds(legalized_attention(shape))
        arrays = [rng.standard_normal(shape).astype("float32") for _ in range(3)]
        tensors = [tvm.runtime.tensor(a, dev) for a in [*arrays, np.zeros(shape, "float32")]]
        outputs, times = {}, {name: [] for name in built}
        for _ in range(args.repeat):  # interleaved: both see the same load
            for name, ex in built.items():
                timer = ex.mod.time_evaluator("f", dev, number=10, repeat=1)
                times[name].append(timer(*tensors).results[0])
                outputs[name] = tensors[3].numpy()
        diff = float(np.abs(outputs["kernel"] - outputs["generic"]).max())
        batch, seq, heads, dim = shape
        flops = 4 * batch * heads * seq * seq * dim
        cells = []
        for name, samples in times.items():
            ms, best = statistics.median(samples) * 1e3, min(samples) * 1e3
            cells.append(f"{name} {ms:.3f} ms (min {best:.3f}; {flops / ms / 1e6:.0f} GFLOP/s)")
        print(f"{case:16s} " + "  ".join(cells) + f"  max |diff| {diff:.1e}")
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
