"""``tbnc``: command-line access to inspect and compile.

A model is named as ``package.module:factory`` (a callable returning an
``nn.Module``, or an ``nn.Module`` instance); example inputs are random float
tensors of the given shapes::

    tbnc inspect mypkg.models:resnet18 --shape 1,3,32,32 --p 4 --json report.json
    tbnc compile mypkg.models:resnet18 --shape 1,3,32,32 --target llvm -o model.tbn
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

import torch

from .config import TBNConfig
from .inspect import inspect
from .passes import rewrite


def load_model(spec: str) -> torch.nn.Module:
    """Resolve ``package.module:attr`` to a module (calling ``attr`` if it is a factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"model must be given as package.module:factory, got {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"{spec} did not give a torch.nn.Module but {type(model).__name__}")
    return model.eval()


def parse_shapes(shapes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    try:
        return tuple(torch.randn(*[int(d) for d in s.split(",")]) for s in shapes)
    except ValueError as e:
        raise SystemExit(
            f"bad --shape {shapes}: use comma-separated ints like 1,3,32,32 ({e})"
        ) from e


def _config(args: argparse.Namespace) -> TBNConfig:
    return TBNConfig(p=args.p, min_numel=args.min_numel, exclude=args.exclude, strict=args.strict)


def cmd_inspect(args: argparse.Namespace) -> int:
    gm = rewrite(load_model(args.model), parse_shapes(args.shape), _config(args))
    report = inspect(gm)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(report.to_dot())
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from . import compile as compile_model  # the TVM backend is imported only here

    cm = compile_model(
        load_model(args.model), parse_shapes(args.shape), target=args.target, config=_config(args)
    )
    print(cm.report)
    cm.save(args.output)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbnc", description="Tiled Bit Network compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, doc in [
        ("inspect", cmd_inspect, "rewrite a model and print its per-layer report"),
        ("compile", cmd_compile, "compile a model and save the artifact"),
    ]:
        p = sub.add_parser(name, help=doc)
        p.add_argument("model", help="package.module:factory")
        p.add_argument(
            "--shape", action="append", required=True, help="input shape, e.g. 1,3,32,32"
        )
        p.add_argument("--p", type=int, default=4)
        p.add_argument("--min-numel", type=int, default=64_000)
        p.add_argument("--exclude", action="append", default=[], help="layer name or glob")
        p.add_argument("--strict", action="store_true")
        p.set_defaults(fn=fn)
    sub.choices["inspect"].add_argument("--json", help="write the report as JSON")
    sub.choices["inspect"].add_argument("--dot", help="write the graph as Graphviz DOT")
    sub.choices["compile"].add_argument("--target", default="llvm")
    sub.choices["compile"].add_argument("-o", "--output", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
