"""Seeded random small nets for the differential fuzzer, and an independent reference.

:func:`make_case` builds everything from ``random.Random(seed)`` alone: a small valid
``nn.Module`` (stacks and branches of Linear, Conv1d, Conv2d, ``F.linear``, ``F.conv*``,
``x @ W`` and ``addmm``; BatchNorm, ReLU/GELU/SiLU, residual adds, concat, pooling,
reshapes, a module called twice, tied weights), an example input and a random
:class:`~tbn_compiler.TBNConfig`. While it builds the net it records every linear/conv
call in forward order (:class:`Use`), so the expected tiling decisions can be derived
from the config without reading the compiler (:func:`expected_decisions`).

The reference does not run the compiler's tile math: it takes from the report which
weights were tiled with which ``p`` and rebuilds them with the numpy formulas of
``reference.py`` (tile = sign of the sum of the p flat chunks, 0 -> -1; alpha_i = mean
|chunk i|, or one alpha), substituted into a copy of the float model run in plain torch.

Weights are rounded to a power-of-two grid so that folding p chunks is exact in float32
and float64 alike: a tie (a folded sum of exactly 0, which binarizes to -1) is then the
same tie in the compiler and in the reference, instead of a float rounding coin flip.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_model

import tbn_compiler as tbn

__all__ = [
    "FuzzCase",
    "Use",
    "assert_close",
    "check_rewrite",
    "expected_decisions",
    "make_case",
    "reference_output",
    "replay_hint",
    "strict_failures",
    "tiled_params",
]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "none": lambda x: x}


def replay_hint(seed: int) -> str:
    """The one-line command that replays one fuzz net."""
    return f"fuzz seed {seed}: replay with `make fuzz N=1 SEED={seed}`"


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """Per-sample shape of the running activation: ``vec`` (F,), ``seq`` (C, L),
    ``img`` (C, H, W)."""

    dims: tuple[int, ...]

    @property
    def kind(self) -> str:
        return {1: "vec", 2: "seq", 3: "img"}[len(self.dims)]

    @property
    def channels(self) -> int:
        return self.dims[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.dims[1:]


# ----------------------------------------------------------------------------- blocks


class Act(nn.Module):
    """A functional activation (so activations appear both as modules and as calls)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.kind](x)


class Residual(nn.Module):
    """``x + inner(x)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class Concat(nn.Module):
    """``cat([a(x), b(x)], dim=1)``; ``b`` None means ``x`` itself."""

    def __init__(self, a: nn.Module, b: nn.Module | None) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), x if self.b is None else self.b(x)], dim=1)


class Twice(nn.Module):
    """One module called twice: ``layer(act(layer(x)))``."""

    def __init__(self, layer: nn.Module, act: str) -> None:
        super().__init__()
        self.layer = layer
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(ACTIVATIONS[self.act](self.layer(x)))


class FunctionalLinear(nn.Module):
    """``F.linear(x, W, b)`` with ``W`` stored (out, in) under attribute ``attr``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, attr: str) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.Parameter(weight))
        self.b = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(self, self.attr), self.b)


class Matmul(nn.Module):
    """``x @ W`` (or ``addmm(b, x, W)`` on 2-D input) with ``W`` stored (in, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, addmm: bool) -> None:
        super().__init__()
        self.W = nn.Parameter(weight)
        self.b = None if bias is None else nn.Parameter(bias)
        self.addmm = addmm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b is None:
            return x @ self.W
        if self.addmm and x.dim() == 2:
            return torch.addmm(self.b, x, self.W)
        return x @ self.W + self.b


class FunctionalConv(nn.Module):
    """``F.conv1d`` / ``F.conv2d`` with a parameter weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, geometry: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.geometry = dict(geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.weight.dim() == 3 else F.conv2d
        return conv(x, self.weight, self.bias, **self.geometry)


class Reshape(nn.Module):
    """``x.reshape(batch, *dims)``."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.dims)


class Pool(nn.Module):
    """max / avg pooling (kernel k, stride k) or adaptive average pooling to ``k``."""

    def __init__(self, kind: str, spatial: int, k: int) -> None:
        super().__init__()
        self.kind, self.spatial, self.k = kind, spatial, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "adaptive":
            pool = F.adaptive_avg_pool1d if self.spatial == 1 else F.adaptive_avg_pool2d
            return pool(x, self.k)
        if self.kind == "max":
            pool = F.max_pool1d if self.spatial == 1 else F.max_pool2d
        else:
            pool = F.avg_pool1d if self.spatial == 1 else F.avg_pool2d
        return pool(x, self.k)


class FuzzNet(nn.Module):
    """The blocks applied in order."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# ----------------------------------------------------------------------------- records


@dataclass
class Use:
    """One linear/conv call, in forward order: the weight is ``getattr(owner, leaf)``.

    ``module_type`` is the layer module's type for module calls, None for functional
    calls. ``may_stay_dense``: the call has a form the tile ops may decline (a padding
    mode other than zeros, ``padding='same'`` with an even kernel), so keeping it dense
    is allowed as well as tiling it."""

    owner: nn.Module
    leaf: str
    module_type: type | None
    may_stay_dense: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.leaf)


@dataclass
class FuzzCase:
    """One generated net with its input and config."""

    seed: int
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    config_kwargs: dict
    uses: list[Use]
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> tbn.TBNConfig:
        return tbn.TBNConfig(**self.config_kwargs)

    @property
    def excludes(self) -> tuple:
        """The exclude entries meant (a bare string is one name)."""
        ex = self.config_kwargs.get("exclude", ())
        return (ex,) if isinstance(ex, str) else tuple(ex)

    def param_paths(self) -> dict[int, str]:
        """id(weight) -> its first parameter path (the key for ``reference_model``)."""
        out: dict[int, str] = {}
        for path, t in self.model.named_parameters(remove_duplicate=False):
            out.setdefault(id(t), path)
        return out

    def aliases(self) -> dict[int, list[str]]:
        """id(weight) -> every layer name it can be reported under (one per parameter
        path: the path minus ``.weight``, else the full path)."""
        out: dict[int, list[str]] = {}
        for path, t in self.model.named_parameters(remove_duplicate=False):
            out.setdefault(id(t), []).append(layer_name(path))
        return out

    def describe(self) -> str:
        """The net, config and generator notes, for failure messages."""
        return (
            f"{replay_hint(self.seed)}\nconfig: TBNConfig(**{self.config_kwargs})\ninput: "
            f"{tuple(self.inputs[0].shape)}\nnotes: {'; '.join(self.notes)}\n{self.model}"
        )


def layer_name(param_path: str) -> str:
    owner, _, leaf = param_path.rpartition(".")
    return owner if leaf == "weight" and owner else param_path


# ----------------------------------------------------------------------------- generator


class _Builder:
    """Draws blocks for a running activation shape; records linear/conv calls."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.uses: list[Use] = []
        self.notes: list[str] = []
        self.n_layers = 0

    # -- random sizes

    def width(self) -> int:
        return self.rng.choice([4, 6, 8, 12, 16, 24, 32, 48, 64])

    def channels(self) -> int:
        return self.rng.choice([2, 3, 4, 6, 8, 12, 16])

    def act(self) -> str:
        return self.rng.choice(["relu", "gelu", "silu", "none"])

    def act_module(self) -> nn.Module:
        kind = self.rng.choice(["relu", "gelu", "silu"])
        if self.rng.random() < 0.5:
            return Act(kind)
        return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[kind]()

    # -- layers (each records its call; callers append in forward order)

    def linear(self, shape: Shape, out_f: int | None = None) -> tuple[nn.Module, Shape]:
        """A linear map of the last dim, as nn.Linear, F.linear, x @ W or addmm."""
        in_f = shape.dims[-1]
        out_f = out_f or self.width()
        bias = self.rng.random() < 0.6
        form = self.rng.choices(["module", "functional", "matmul"], weights=[6, 2, 2])[0]
        self.n_layers += 1
        if form == "module":
            layer = nn.Linear(in_f, out_f, bias=bias)
            self.uses.append(Use(layer, "weight", nn.Linear))
        elif form == "functional":
            w, b = nn.Linear(in_f, out_f, bias=bias).weight.data, None
            if bias:
                b = torch.randn(out_f) * 0.1
            layer = FunctionalLinear(w, b, self.rng.choice(["weight", "w", "kernel"]))
            self.uses.append(Use(layer, layer.attr, None))
        else:
            w = nn.Linear(in_f, out_f).weight.data.t().contiguous()
            b = torch.randn(out_f) * 0.1 if bias else None
            layer = Matmul(w, b, addmm=self.rng.random() < 0.5)
            self.uses.append(Use(layer, "W", None))
        return layer, Shape((*shape.dims[:-1], out_f))

    def conv(
        self, shape: Shape, same_size: bool = False, out_c: int | None = None
    ) -> tuple[nn.Module, Shape]:
        """A Conv1d/Conv2d (module or functional) on a seq/img activation.

        ``same_size``: stride 1 and 'same'-style padding, so spatial sizes are kept."""
        spatial = len(shape.spatial)
        c_in = shape.channels
        groups, out_c = self._groups(c_in, out_c)
        kernel, stride, dilation, padding = self._conv_geometry(shape.spatial, same_size)
        bias = self.rng.random() < 0.5
        cls = nn.Conv1d if spatial == 1 else nn.Conv2d
        module_form = self.rng.random() < 0.8
        padding_mode = "zeros"
        if (
            module_form
            and isinstance(padding, int)
            and 0 < padding < min(shape.spatial)
            and self.rng.random() < 0.15
        ):
            padding_mode = self.rng.choice(["reflect", "replicate", "circular"])
        layer = cls(
            c_in,
            out_c,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        self.n_layers += 1
        awkward = padding_mode != "zeros" or (padding == "same" and dilation * (kernel - 1) % 2)
        out_shape = Shape(
            (out_c, *self._conv_out(shape.spatial, kernel, stride, dilation, padding))
        )
        if module_form:
            self.uses.append(Use(layer, "weight", cls, may_stay_dense=awkward))
            return layer, out_shape
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        b = layer.bias.data if bias else None
        func = FunctionalConv(layer.weight.data, b, geometry)
        self.uses.append(Use(func, "weight", None, may_stay_dense=awkward))
        return func, out_shape

    def _groups(self, c_in: int, out_c: int | None) -> tuple[int, int]:
        """(groups, out channels): depthwise, grouped or dense."""
        r = self.rng.random()
        if r < 0.15 and (out_c is None or out_c % c_in == 0):
            return c_in, out_c or c_in * self.rng.choice([1, 2])
        out_c = out_c or self.channels()
        divisors = [g for g in range(2, c_in + 1) if c_in % g == 0 and out_c % g == 0]
        if divisors and r < 0.35:
            return self.rng.choice(divisors), out_c
        return 1, out_c

    def _conv_geometry(self, spatial: tuple[int, ...], same_size: bool):
        smallest = min(spatial)
        for _ in range(50):
            kernel = self.rng.choice([1, 1, 2, 3, 3, 5])
            dilation = self.rng.choice([1, 1, 1, 2])
            reach = dilation * (kernel - 1)
            if same_size:
                if reach % 2 == 0 and self.rng.random() < 0.5:
                    return kernel, 1, dilation, reach // 2
                if reach % 2 == 0 or self.rng.random() < 0.3:
                    return kernel, 1, dilation, "same"
                continue
            stride = self.rng.choice([1, 1, 2, 3])
            padding = self.rng.choice([0, 0, 1, 2, "valid"])
            pad = 0 if padding == "valid" else padding
            if smallest + 2 * pad - reach - 1 >= 0 and (padding == "valid" or pad < smallest):
                return kernel, stride, dilation, padding
        return 1, 1, 1, 0

    @staticmethod
    def _conv_out(spatial, kernel, stride, dilation, padding) -> tuple[int, ...]:
        if padding == "same":
            return tuple(spatial)
        pad = 0 if padding == "valid" else padding
        return tuple((s + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for s in spatial)

    def map_layer(self, shape: Shape, same_size: bool = False) -> tuple[nn.Module, Shape]:
        """A linear for vectors, a conv for seq/img (or, sometimes, a linear of the last
        dim). ``same_size``: the output has the input's shape."""
        if shape.kind == "vec" or self.rng.random() < 0.1:
            return self.linear(shape, shape.dims[-1] if same_size else None)
        return self.conv(shape, same_size, shape.channels if same_size else None)

    # -- blocks

    def block(self, shape: Shape) -> tuple[list[nn.Module], Shape]:
        """One random block for ``shape``; returns its modules (in order) and the new shape."""
        options: list[tuple[float, Callable]] = [
            (5, self._plain_layer),
            (2, self._residual),
            (1.5, self._concat),
            (1.5, self._twice),
            (1, self._batchnorm),
            (1, self._activation),
            (1, self._reshape),
        ]
        if shape.kind != "vec":
            options.append((1, self._pool))
        weights, makers = zip(*options, strict=True)
        return self.rng.choices(makers, weights=weights)[0](shape)

    def _plain_layer(self, shape: Shape):
        layer, shape = self.map_layer(shape)
        mods = [layer]
        if self.rng.random() < 0.3 and shape.kind != "vec":
            mods.append(_batchnorm_for(shape))
        if self.rng.random() < 0.6:
            mods.append(self.act_module())
        return mods, shape

    def _residual(self, shape: Shape):
        """x + f(x) with f one or two shape-keeping layers (a tiled layer feeding one)."""
        inner: list[nn.Module] = []
        for i in range(self.rng.choice([1, 2])):
            if i and self.rng.random() < 0.5:
                inner.append(self.act_module())
            inner.append(self.map_layer(shape, same_size=True)[0])
        self.notes.append(f"residual of {len([m for m in inner if not _is_act(m)])}")
        return [Residual(nn.Sequential(*inner))], shape

    def _concat(self, shape: Shape):
        if shape.kind == "vec":
            a, sa = self.linear(shape)
        else:
            a, sa = self.conv(shape, same_size=True)
        b, sb = None, shape
        if self.rng.random() < 0.6:
            if shape.kind == "vec":
                b, sb = self.linear(shape)
            else:
                b, sb = self.conv(shape, same_size=True)
        self.notes.append("concat")
        return [Concat(a, b)], Shape((sa.dims[0] + sb.dims[0], *sa.dims[1:]))

    def _twice(self, shape: Shape):
        layer, _ = self.map_layer(shape, same_size=True)
        # map_layer recorded the first call; the second call uses the same weight
        self.uses.append(dataclasses.replace(self.uses[-1]))
        self.notes.append("module called twice")
        return [Twice(layer, self.act())], shape

    def _batchnorm(self, shape: Shape):
        return [_batchnorm_for(shape)], shape

    def _activation(self, shape: Shape):
        return [self.act_module()], shape

    def _reshape(self, shape: Shape):
        numel = math.prod(shape.dims)
        if shape.kind != "vec":
            self.notes.append("flatten")
            return [nn.Flatten(1) if self.rng.random() < 0.5 else Reshape((numel,))], Shape(
                (numel,)
            )
        splits = [c for c in range(2, 9) if numel % c == 0 and 2 <= numel // c <= 16]
        if not splits:
            return [], shape
        c = self.rng.choice(splits)
        length = numel // c
        squares = [h for h in range(2, length) if length % h == 0 and length // h >= 2]
        if squares and self.rng.random() < 0.5:
            h = self.rng.choice(squares)
            dims = (c, h, length // h)
        else:
            dims = (c, length)
        self.notes.append(f"reshape to {dims}")
        return [Reshape(dims)], Shape(dims)

    def _pool(self, shape: Shape):
        spatial = len(shape.spatial)
        smallest = min(shape.spatial)
        if smallest >= 2 and self.rng.random() < 0.6:
            kind = self.rng.choice(["max", "avg"])
            return [Pool(kind, spatial, 2)], Shape(
                (shape.channels, *(s // 2 for s in shape.spatial))
            )
        k = self.rng.choice([1, 2]) if smallest >= 2 else 1
        return [Pool("adaptive", spatial, k)], Shape((shape.channels, *([k] * spatial)))


def _is_act(module: nn.Module) -> bool:
    return isinstance(module, (Act, nn.ReLU, nn.GELU, nn.SiLU))


def _batchnorm_for(shape: Shape) -> nn.Module:
    """A BatchNorm over the channel dim with random running statistics and affine."""
    cls = nn.BatchNorm2d if shape.kind == "img" else nn.BatchNorm1d
    bn = cls(shape.channels)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return bn


def _input_shape(rng: random.Random) -> Shape:
    kind = rng.choice(["vec", "seq", "img", "img"])
    if kind == "vec":
        return Shape((rng.choice([4, 8, 12, 16, 32, 48, 64]),))
    c = rng.choice([1, 2, 3, 4, 8])
    if kind == "seq":
        return Shape((c, rng.randint(4, 12)))
    return Shape((c, rng.randint(4, 12), rng.randint(4, 12)))


def _tie_weights(uses: list[Use], rng: random.Random, notes: list[str]) -> None:
    """Make some later weights the very Parameter of an earlier weight of the same shape."""
    seen: dict[tuple[int, ...], Use] = {}
    for use in uses:
        w = use.weight
        earlier = seen.setdefault(tuple(w.shape), use)
        if earlier.weight is not w and rng.random() < 0.35:
            setattr(use.owner, use.leaf, earlier.weight)
            notes.append(f"tied weight {tuple(w.shape)}")


def _round_weights(model: nn.Module, rng: random.Random) -> None:
    """Round every layer parameter to a grid of 2**-k (exact folds; see module doc)."""
    step = 2.0 ** -rng.choice([10, 10, 10, 5])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p / step) * step)


# ----------------------------------------------------------------------------- configs


def _random_config(rng: random.Random, case: FuzzCase) -> dict:
    """Keyword arguments of a random TBNConfig for the case's layers."""
    aliases = case.aliases()
    used = {id(u.weight) for u in case.uses}
    names = sorted({n for key in used for n in aliases[key]})
    numels = [u.weight.numel() for u in case.uses]
    kwargs: dict = dict(
        p=rng.randint(1, 8),
        alpha=rng.choice(["per_tile", "single"]),
        min_numel=0 if rng.random() < 0.6 else rng.choice(numels) + rng.choice([0, 1]),
        keep_first=rng.random() < 0.25,
        keep_last=rng.random() < 0.25,
        strict=rng.random() < 0.25,
    )
    if names and rng.random() < 0.35:
        kwargs["exclude"] = _random_excludes(rng, case, names)
    if names and rng.random() < 0.35:
        rules: dict = {}
        for _ in range(rng.choice([1, 1, 2])):
            key = rng.choice(names) if rng.random() < 0.7 else _glob_for(rng, rng.choice(names))
            rules[key] = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, None])
        kwargs["layers"] = rules
    return kwargs


def _random_excludes(rng: random.Random, case: FuzzCase, names: list[str]):
    """One or two names, globs or module types; sometimes a bare name string."""
    types = sorted(
        {u.module_type for u in case.uses if u.module_type is not None}, key=lambda t: t.__name__
    )
    excludes: list = []
    for _ in range(rng.choice([1, 1, 2])):
        r = rng.random()
        if r < 0.5:
            excludes.append(rng.choice(names))
        elif r < 0.75 or not types:
            excludes.append(_glob_for(rng, rng.choice(names)))
        else:
            excludes.append(rng.choice(types))
    if len(excludes) == 1 and isinstance(excludes[0], str) and rng.random() < 0.3:
        return excludes[0]
    return excludes


def _glob_for(rng: random.Random, name: str) -> str:
    """A glob that matches ``name`` (and perhaps others)."""
    parts = name.split(".")
    r = rng.random()
    if r < 0.4 and len(parts) > 1:
        return ".".join(parts[:-1]) + ".*"
    if r < 0.7:
        return "*" + parts[-1]
    return name[:-1] + "?"


# ----------------------------------------------------------------------------- case


def make_case(seed: int) -> FuzzCase:
    """The net, input and config of one seed (deterministic in ``seed``)."""
    rng = random.Random(seed)
    torch.manual_seed(rng.getrandbits(32))
    builder = _Builder(rng)
    shape = _input_shape(rng)
    in_shape = shape
    blocks: list[nn.Module] = []
    target_layers = rng.randint(2, 6)
    for _ in range(20):
        if builder.n_layers >= target_layers:
            break
        mods, shape = builder.block(shape)
        blocks += mods
    if rng.random() < 0.5:  # a classifier head on the flattened features
        numel = math.prod(shape.dims)
        if shape.kind != "vec":
            blocks.append(nn.Flatten(1))
            shape = Shape((numel,))
        head, shape = builder.linear(shape, rng.randint(2, 12))
        blocks.append(head)
    model = FuzzNet(blocks)
    _tie_weights(builder.uses, rng, builder.notes)
    _round_weights(model, rng)
    model.eval()
    batch = rng.choice([1, 1, 2, 3])
    x = torch.randn(batch, *in_shape.dims)
    case = FuzzCase(seed, model, (x,), {}, builder.uses, builder.notes)
    case.config_kwargs = _random_config(rng, case)
    return case


# ----------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expected:
    """Allowed outcomes for one weight: ``allowed`` p values (None = kept dense), more
    than one where the config leaves the choice open; ``raw`` the p the plan asks for
    before the divisibility check (what strict mode checks)."""

    allowed: frozenset
    raw: frozenset


def _rule_values(layers: dict, names: list[str]) -> set:
    """What the ``layers`` rules say for a weight with these names: {("rule", p)} for an
    exact match of any name (several if names disagree), else for the first glob that
    matches any name, else {("none",)}."""
    exact = {("rule", layers[n]) for n in names if n in layers}
    if exact:
        return exact
    for pattern, value in layers.items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return {("rule", value)}
    return {("none",)}


def _excluded(excludes: tuple, names: list[str], types: list[type | None]) -> bool:
    """Excluded under any alias (name or glob) or any call's module type."""
    for item in excludes:
        if isinstance(item, str) and any(fnmatch.fnmatchcase(n, item) for n in names):
            return True
        if isinstance(item, type) and any(t is not None and issubclass(t, item) for t in types):
            return True
    return False


def _weights_in_call_order(case: FuzzCase) -> dict[int, list[Use]]:
    out: dict[int, list[Use]] = {}
    for use in case.uses:
        out.setdefault(id(use.weight), []).append(use)
    return out


def expected_decisions(case: FuzzCase) -> dict[int, Expected]:
    """id(weight) -> :class:`Expected`, from the config and the recorded calls only.

    Per weight (all its calls share one decision): excluded under any of its names or by
    any call's module type -> dense; else its ``layers`` rule (an exact name before a
    glob); else keep_first/keep_last when one of its calls is the first/last layer call;
    else p=1 below ``min_numel``; else ``p``. A p that does not divide numel keeps it
    dense (strict mode raises instead). Left open: exact rules that differ between
    aliases, and calls the tile ops may decline (``Use.may_stay_dense``)."""
    aliases = case.aliases()
    uses_of = _weights_in_call_order(case)
    first = id(case.uses[0].weight) if case.uses else None
    last = id(case.uses[-1].weight) if case.uses else None
    out: dict[int, Expected] = {}
    for key, uses in uses_of.items():
        numel = uses[0].weight.numel()
        raw = _raw_plans(case, aliases[key], uses, numel, key == first, key == last)
        allowed = {p if p is None or numel % p == 0 else None for p in raw}
        if any(u.may_stay_dense for u in uses):
            allowed.add(None)
        out[key] = Expected(frozenset(allowed), frozenset(raw))
    return out


def _raw_plans(
    case: FuzzCase, names: list[str], uses: list[Use], numel: int, is_first: bool, is_last: bool
) -> set:
    cfg = case.config_kwargs
    if _excluded(case.excludes, names, [u.module_type for u in uses]):
        return {None}
    plans = set()
    for rule in _rule_values(dict(cfg.get("layers", {})), names):
        if rule[0] == "rule":
            plans.add(rule[1])
            continue
        if (is_first and cfg["keep_first"]) or (is_last and cfg["keep_last"]):
            plans.add(None)
            continue
        plans.add(1 if numel < cfg["min_numel"] else cfg["p"])
    return plans


def strict_failures(case: FuzzCase) -> tuple[set[int], set[int]]:
    """(weights that must make strict mode raise, weights that may): those whose planned
    p does not divide numel, under every / some allowed plan."""
    must, may = set(), set()
    uses_of = _weights_in_call_order(case)
    for key, exp in expected_decisions(case).items():
        numel = uses_of[key][0].weight.numel()
        bad = [p is not None and numel % p != 0 for p in exp.raw]
        if any(bad):
            may.add(key)
        if all(bad) and not any(u.may_stay_dense for u in uses_of[key]):
            must.add(key)
    return must, may


# ----------------------------------------------------------------------------- reference


def tiled_params(case: FuzzCase, report: tbn.Report) -> dict[int, int]:
    """id(weight) -> p for every row the report marks tiled; a tiled row that names no
    weight of the model is an error."""
    by_name = {n: key for key, names in case.aliases().items() for n in names}
    out: dict[int, int] = {}
    for row in report.layers:
        if row.status != "tiled":
            continue
        if row.name not in by_name:
            raise AssertionError(
                f"report row {row.name!r} names no weight of the model; names: {sorted(by_name)}"
            )
        key = by_name[row.name]
        if out.get(key, row.p) != row.p:
            raise AssertionError(f"weight of {row.name!r} tiled twice, p={out[key]} and {row.p}")
        out[key] = row.p
    return out


def reference_output(case: FuzzCase, tiled: dict[int, int]) -> torch.Tensor:
    """The float model with each tiled weight rebuilt by the numpy formulas, run in torch."""
    paths = case.param_paths()
    alpha = case.config_kwargs["alpha"]
    ref = reference_model(case.model, {paths[k]: p for k, p in tiled.items()}, alpha)
    with torch.no_grad():
        return ref(*case.inputs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """rtol 1e-4 and an atol of 1e-5 of the output's scale (long sums cancel)."""
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach(),
        expected.detach(),
        rtol=1e-4,
        atol=1e-5 * scale,
        msg=lambda m: f"{what}: {m}",
    )


# ----------------------------------------------------------------------------- checks


def _names(case: FuzzCase, keys: set[int]) -> list[str]:
    aliases = case.aliases()
    return sorted(n for k in keys for n in aliases[k])


def check_strict(case: FuzzCase) -> fx.GraphModule | None:
    """Rewrite with the strict config: it must raise a ValueError naming a layer whose
    planned p does not divide its size when one must, and must not when none may.
    Returns the graph, or None when it raised."""
    must, may = strict_failures(case)
    try:
        gm = tbn.rewrite(case.model, case.inputs, case.config)
    except ValueError as exc:
        if not may:
            raise AssertionError(f"strict rewrite raised though every p divides: {exc}") from exc
        named = [n for n in _names(case, may) if repr(n) in str(exc)]
        assert named, f"strict error names none of {_names(case, may)}: {exc}"
        return None
    assert not must, f"strict rewrite accepted p not dividing the size of {_names(case, must)}"
    return gm


def check_rewrite(case: FuzzCase) -> fx.GraphModule:
    """Rewrite the case, check the report's decisions against :func:`expected_decisions`
    and the graph's output against :func:`reference_output`; return the graph."""
    gm = check_strict(case) if case.config_kwargs["strict"] else None
    if gm is None:
        config = tbn.TBNConfig(**{**case.config_kwargs, "strict": False})
        gm = tbn.rewrite(case.model, case.inputs, config)
    report = tbn.inspect(gm)
    tiled = tiled_params(case, report)
    check_decisions(case, report, tiled)
    with torch.no_grad():
        assert_close(gm(*case.inputs), reference_output(case, tiled), "rewrite vs reference")
    return gm


def check_decisions(case: FuzzCase, report: tbn.Report, tiled: dict[int, int]) -> None:
    """Each weight tiled with an allowed p or kept dense where allowed; every weight a
    linear/conv call uses has a report row (tiled or skipped with a reason)."""
    aliases = case.aliases()
    reported = {r.name for r in report.layers}
    for key, exp in expected_decisions(case).items():
        got = tiled.get(key)
        assert got in exp.allowed, (
            f"layer {aliases[key]}: expected p in {set(exp.allowed)} (None = dense), got {got}\n"
            f"{report}"
        )
        assert reported & set(aliases[key]), f"layer {aliases[key]} missing from the report"
    unused = set(tiled) - set(expected_decisions(case))
    assert not unused, f"tiled weights no linear/conv call uses: {_names(case, unused)}"
