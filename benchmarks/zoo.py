"""A public model zoo: torchvision, timm and Hugging Face models, random init, through
``rewrite`` and an llvm build.

For each model: whether ``rewrite`` succeeds, the share of linear/conv weights tiled
(and, from ``tbn.inspect``, why the others are kept dense), the llvm compile time, the
parity of the compiled module with the rewritten graph (rel err = max |diff| / max
|reference|, over every output tensor), and the latency of one call at batch 1 against
the torch model (median of several calls). One failing model is a row with its exact
error, never a crash. Prints a table and writes ``benchmarks/results/zoo.json``.

    .venv/bin/python benchmarks/zoo.py                 # every model
    .venv/bin/python benchmarks/zoo.py --fast          # no heavy models, fewer timing calls
    .venv/bin/python benchmarks/zoo.py --only resnet18 --only tv-vit-small

Optional libraries, both installed by ``make setup``: timm (pure Python), installed with
``pip install --no-deps timm`` because its ``torchvision`` requirement would bring the wheel below
into the venv.
torchvision's wheels on PyPI are CUDA builds: with the CPU torch wheel its C extension does
not load and ``import torchvision`` fails with "operator torchvision::nms does not exist"
(``torchvision/_meta_registrations.py`` registers fake kernels for detection ops that were
never defined). Install the matching version without its dependencies, so that pip keeps
the CPU torch, in a folder of its own (``$TBN_ZOO_SITE``, default ``.venv/zoo-site``)::

    .venv/bin/pip install --no-deps --target .venv/zoo-site torchvision==0.28.0  # torch 2.13's

Not into the venv itself: transformers imports any torchvision it finds, and then fails
("Could not import module 'BertModel'"). :func:`import_torchvision_models` puts that folder
on ``sys.path`` and skips only those detection-op registrations. Its classification models are plain torch code and need no
C op. Missing libraries make their models a "skipped" row. No pretrained weights are used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "zoo.json"
ZOO_SITE = Path(os.environ.get("TBN_ZOO_SITE", ROOT / ".venv" / "zoo-site"))

Builder = Callable[[], tuple[torch.nn.Module, tuple]]


class LibraryMissing(RuntimeError):
    """An optional model library is not installed (the model's row says "skipped")."""


def import_torchvision_models() -> types.ModuleType:
    """``torchvision.models``, also with a CUDA torchvision wheel next to the CPU torch.

    When torchvision's C extension cannot load, its ``_meta_registrations`` module (fake
    kernels of nms/roi_align/...) is replaced by an empty module before the import; the
    classification models never call those ops. Raises :class:`LibraryMissing` when
    torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None and ZOO_SITE.is_dir():
        sys.path.append(str(ZOO_SITE))
    if importlib.util.find_spec("torchvision") is None:
        raise LibraryMissing(
            f"torchvision is not installed: pip install --no-deps --target {ZOO_SITE} "
            "torchvision==0.28.0"
        )
    if "torchvision" not in sys.modules and not _torchvision_ops_load():
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))
    return importlib.import_module("torchvision.models")


def _torchvision_ops_load() -> bool:
    """Whether torchvision's C extension loads against this torch (CPU builds only)."""
    spec = importlib.util.find_spec("torchvision")
    libs = list(Path(spec.origin).parent.glob("_C*.so")) if spec and spec.origin else []
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def _timm() -> types.ModuleType:
    """timm, imported after torchvision (timm's layers import ``torchvision.ops``)."""
    if importlib.util.find_spec("timm") is None:
        raise LibraryMissing("timm is not installed: pip install --no-deps timm")
    import_torchvision_models()
    return importlib.import_module("timm")


def _image(size: int) -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def torchvision_model(name: str, size: int, **kwargs: Any) -> Builder:
    """A torchvision classification model by name, random init, one ``size`` px image."""

    def build() -> tuple[torch.nn.Module, tuple]:
        models = import_torchvision_models()
        return _no_zero_layers(getattr(models, name)(weights=None, **kwargs)), _image(size)

    return build


def _no_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every all-zero Linear/Conv weight drawn at random (std 0.02):
    torchvision's ViT initializes its head to zeros, which makes every output 0 and the
    parity check trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.02)
    return model


def small_vision_transformer(size: int = 32) -> Builder:
    """torchvision's VisionTransformer with 2 layers, width 64, 8 px patches."""

    def build() -> tuple[torch.nn.Module, tuple]:
        vit = import_torchvision_models().vision_transformer.VisionTransformer
        model = vit(
            image_size=size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128
        )
        return _no_zero_layers(model), _image(size)

    return build


def timm_model(name: str, size: int, **kwargs: Any) -> Builder:
    """A timm model by name, random init (``pretrained=False``), one ``size`` px image."""

    def build() -> tuple[torch.nn.Module, tuple]:
        return _timm().create_model(name, pretrained=False, **kwargs), _image(size)

    return build


def hugging_face_model(family: str) -> Builder:
    """A builder of tests/test_hf_models.py (small configs, default flags)."""

    def build() -> tuple[torch.nn.Module, tuple]:
        if importlib.util.find_spec("transformers") is None:
            raise LibraryMissing("transformers is not installed")
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        factory, _ = importlib.import_module("test_hf_models").FAMILIES[family]
        return factory()

    return build


@dataclass(frozen=True)
class ZooModel:
    name: str
    library: str
    build: Builder
    heavy: bool = False  # left out by --fast


HF_FAMILIES = [
    "gpt2",
    "gpt2-lm-head",
    "llama",
    "qwen2",
    "mistral",
    "phi3",
    "bert",
    "distilbert",
    "t5-encoder",
    "whisper-encoder",
    "vit",
    "clip-vision",
    "wav2vec2",
]

ZOO: list[ZooModel] = [
    ZooModel("resnet18", "torchvision", torchvision_model("resnet18", 32)),
    ZooModel("resnet50", "torchvision", torchvision_model("resnet50", 64), heavy=True),
    ZooModel("mobilenet_v2", "torchvision", torchvision_model("mobilenet_v2", 32)),
    ZooModel("mobilenet_v3_small", "torchvision", torchvision_model("mobilenet_v3_small", 32)),
    ZooModel("mobilenet_v3_large", "torchvision", torchvision_model("mobilenet_v3_large", 32)),
    ZooModel("efficientnet_b0", "torchvision", torchvision_model("efficientnet_b0", 32)),
    ZooModel("shufflenet_v2_x0_5", "torchvision", torchvision_model("shufflenet_v2_x0_5", 32)),
    ZooModel("squeezenet1_1", "torchvision", torchvision_model("squeezenet1_1", 64)),
    ZooModel("densenet121", "torchvision", torchvision_model("densenet121", 32), heavy=True),
    ZooModel("regnet_y_400mf", "torchvision", torchvision_model("regnet_y_400mf", 32)),
    ZooModel("convnext_tiny", "torchvision", torchvision_model("convnext_tiny", 32), heavy=True),
    ZooModel("tv-vit-small", "torchvision", small_vision_transformer(32)),
    ZooModel("vit_b_16", "torchvision", torchvision_model("vit_b_16", 224), heavy=True),
    ZooModel("swin_t", "torchvision", torchvision_model("swin_t", 64), heavy=True),
    ZooModel("deit_tiny", "timm", timm_model("deit_tiny_patch16_224", 32, img_size=32)),
    ZooModel("mobilevit_xxs", "timm", timm_model("mobilevit_xxs", 64)),
    ZooModel("convnext_atto", "timm", timm_model("convnext_atto", 32)),
    ZooModel("efficientvit_b0", "timm", timm_model("efficientvit_b0", 64)),
    ZooModel("ghostnet_100", "timm", timm_model("ghostnet_100", 32)),
    *(ZooModel(f"hf-{f}", "transformers", hugging_face_model(f)) for f in HF_FAMILIES),
]


@dataclass
class Row:
    """One model's results; ``status`` is "ok", "mismatch", "failed" or "skipped"."""

    name: str
    library: str
    status: str = "failed"
    stage: str = ""  # where it failed: build, rewrite, compile, run
    rewrite_ok: bool = False
    tiled_pct: float | None = None  # % of linear/conv weight elements in tile ops
    layers: str = ""  # "tiled/all"
    dense_reasons: dict[str, int] = field(default_factory=dict)
    compile_s: float | None = None
    rel_err: float | None = None
    torch_ms: float | None = None
    tbn_ms: float | None = None
    error: str = ""


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output, in pytree order."""
    leaves = torch.utils._pytree.tree_leaves(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def relative_error(got: Any, reference: Any) -> float:
    """max |got - reference| / max |reference| over all output tensors (inf on a
    structure or shape mismatch)."""
    got_leaves, ref_leaves = tensor_leaves(got), tensor_leaves(reference)
    if len(got_leaves) != len(ref_leaves):
        return float("inf")
    diff, scale = 0.0, 0.0
    for g, r in zip(got_leaves, ref_leaves, strict=True):
        if g.shape != r.shape:
            return float("inf")
        if r.numel():
            diff = max(diff, float((g.double() - r.double()).abs().max()))
            scale = max(scale, float(r.double().abs().max()))
    return diff / scale if scale else diff


def tiling_summary(gm: torch.nn.Module) -> tuple[float, str, dict[str, int]]:
    """(% of weight elements tiled, "tiled/all" layers, reason -> count of dense layers)."""
    import tbn_compiler as tbn

    layers = tbn.inspect(gm).layers
    total = sum(r.numel for r in layers)
    tiled = [r for r in layers if r.status == "tiled"]
    pct = 100.0 * sum(r.numel for r in tiled) / total if total else 0.0
    reasons = Counter(_reason_kind(r.reason) for r in layers if r.status != "tiled")
    return pct, f"{len(tiled)}/{len(layers)}", dict(reasons)


def _reason_kind(reason: str) -> str:
    """A reason without its layer-specific numbers, so equal causes count together."""
    return "".join("#" if ch.isdigit() else ch for ch in reason).replace("##", "#")


def median_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median wall time of ``fn()`` in ms over ``calls`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_model(entry: ZooModel, calls: int) -> Row:
    """Build, rewrite, compile, check and time one model; never raises."""
    import tbn_compiler as tbn

    row = Row(entry.name, entry.library)
    try:
        row.stage = "build"
        torch.manual_seed(0)
        model, inputs = entry.build()
        model = model.eval()
        with torch.no_grad():  # before any TVM call: its spinning worker threads would slow torch
            row.torch_ms = median_ms(lambda: model(*inputs), calls)
        row.stage = "rewrite"
        gm = tbn.rewrite(model, inputs)
        row.rewrite_ok = True
        row.tiled_pct, row.layers, row.dense_reasons = tiling_summary(gm)
        row.stage = "compile"
        start = time.perf_counter()
        cm = tbn.compile_graph(gm, inputs, "llvm", validate=False)
        row.compile_s = time.perf_counter() - start
        row.stage = "run"
        with torch.no_grad():
            row.rel_err = relative_error(cm(*inputs), gm(*inputs))
            row.tbn_ms = median_ms(lambda: cm(*inputs), calls)
        row.stage = ""
        row.status = "ok" if row.rel_err <= 1e-4 else "mismatch"
    except LibraryMissing as exc:
        row.status, row.error = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 - one model's failure is its row
        row.error = _error_text(exc)
    return row


def _error_text(exc: BaseException) -> str:
    """The exception's type and first lines, plus where in our code it was raised."""
    lines = [ln for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "tbn_compiler" in f.filename]
    where = f" [at {Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return " | ".join(lines[:4])[:600] + where


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    """The results as a text table (one row per model)."""
    headers = ["model", "lib", "status", "rewrite", "tiled %", "layers", "compile s"]
    headers += ["rel err", "torch ms", "tbn ms", "dense layers: why / error"]
    body = []
    for r in rows:
        why = r.error or "; ".join(f"{n}x {k}" for k, n in r.dense_reasons.items())
        body.append(
            [
                r.name,
                r.library,
                r.status + (f" ({r.stage})" if r.stage and r.status == "failed" else ""),
                "yes" if r.rewrite_ok else "no",
                _fmt(r.tiled_pct, ".1f"),
                r.layers or "-",
                _fmt(r.compile_s, ".1f"),
                _fmt(r.rel_err, ".1e"),
                _fmt(r.torch_ms, ".2f"),
                _fmt(r.tbn_ms, ".2f"),
                why[:160],
            ]
        )
    return tabulate(body, headers=headers)


def select(only: list[str] | None, fast: bool) -> list[ZooModel]:
    """The models to run: ``only`` names (ValueError for an unknown one), else all
    (without the heavy ones when ``fast``)."""
    if only:
        known = {m.name: m for m in ZOO}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown zoo model(s) {unknown}; known: {sorted(known)}")
        return [known[n] for n in only]
    return [m for m in ZOO if not (fast and m.heavy)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only this model (repeatable)")
    parser.add_argument("--fast", action="store_true", help="skip heavy models, 5 timed calls")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    calls = 5 if args.fast else 20
    rows = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = select(args.only, args.fast)
    except ValueError as exc:
        parser.error(str(exc))
    if any(e.library == "torchvision" for e in entries):
        with contextlib.suppress(LibraryMissing):  # before transformers looks for torchvision
            import_torchvision_models()
    for entry in entries:
        print(f"[zoo] {entry.name} ...", file=sys.stderr, flush=True)
        rows.append(run_model(entry, calls))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        # after each model: an interrupted run keeps what it measured
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.json}")
    return 0 if all(r.status in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
