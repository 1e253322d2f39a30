"""CortexMModule: the compiled static C program for one board, callable under QEMU.

* ``cm.check_build()`` (run by ``tbn.compile`` and ``cm.retarget``) compiles the generated
  C: the library with ``arm-none-eabi-gcc`` when the toolchain is installed, else a
  syntax-only compile with the host C compiler (see :mod:`.check`); with neither it raises
  :class:`.toolchain.ToolchainError`. It is never skipped. A build error names each failing
  kernel and the model step it computes.
* ``cm.export(directory)`` writes the C project (see :mod:`.project`); a non-empty
  directory is refused unless ``overwrite=True``, which replaces a previous export whole.
* ``cm.memory``: sizes from the real build (``arm-none-eabi-size`` of the library objects)
  plus the plan: ``weights_bytes``, ``code_bytes``, ``arena_bytes``, ``flash_bytes``,
  ``ram_bytes``, ``stack_bytes`` (the deepest stack of ``tbn_model_run``: its frame plus
  the largest kernel frame, from gcc's ``-fstack-usage``; library calls such as
  ``memset`` not counted; None when a frame is unbounded), ``per_layer`` (weight bytes per
  kernel call and its model layer), board limits, and for emulated boards the whole
  firmware image (``firmware_*``, harness included).
* ``cm(*inputs)``: checks the inputs against the compiled signature (count, shape, dtype:
  :class:`..protocol.InputError` naming the input) and ids given as inputs against the
  embeddings they index (the ``IndexError`` torch raises, before any run), builds the
  firmware once, runs it in QEMU and returns what the model returns; ``cm.last_run`` holds ``instructions``, ``ticks``, ``wall_s`` and ``machine`` of the
  latest finished run. Thread-safe: one lock guards the private build directory, the
  lazy build and the memory report; QEMU runs proceed in parallel, each in its own
  working directory. ``cm.close()`` must not race with calls in flight.
* ``cm.profile(x)``: instructions per kernel call (see :meth:`CortexMModule.profile`),
  also left in ``cm.last_run["steps"]``.
* ``cm.retarget(board)``: the same generated C for another board (no recompilation).
* ``cm.save(path)`` writes ONE file (:func:`..archive.write_archive`: atomic, every
  member and the metadata checksummed); ``tbn.load(path)`` (or
  :meth:`CortexMModule.load`) gives back a module that runs, exports and measures like
  the original. Saved form, format :data:`..artifact.FORMAT_NAME` version
  :data:`..artifact.FORMAT_VERSION`:

  - ``metadata.json``: ``format``, ``format_version``, ``versions``, ``target`` (the
    :class:`TargetSpec` dict, kind ``"cortex-m"``, board included), ``inputs`` /
    ``outputs`` (name, shape, dtype), ``index_checks`` (see
    :func:`..relax_import.index_input_checks`; absent in older files), ``output_tree`` (:class:`~tbn_compiler.capture.OutputTree`
    JSON or null), ``report`` (text or null), ``weights_bytes``, ``arena_bytes``,
    ``per_layer``, ``steps`` and ``sources`` (the member names below);
  - ``sources/include/tbn_model.h``, ``sources/src/tbn_kernels.h``,
    ``sources/src/tbn_kernels.c``, ``sources/src/tbn_model.c``: the generated C (the
    build files and harness are regenerated for the board).

``cm(*inputs)`` returns what the model returns: its output tensors inside the model's
output structure (a dict, nested tuples, a named tuple, a Hugging Face output with its
key/value cache) when the module knows it, else the one tensor or a tuple of them.
Inputs travel to the board in their own dtype (token ids as ``int64_t``, see
:mod:`.emit`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...capture import OutputTree
from ...targets import TargetSpec, resolve_target
from ..archive import ArtifactError, package_versions, read_archive, write_archive
from ..protocol import FORMAT_NAME, FORMAT_VERSION, InputError
from ..specs import TensorSpec, check_index_inputs, shape_mismatch
from . import check, qemu, toolchain
from .project import project_files

__all__ = ["CortexMModule", "ModelTooLargeError", "NotEmulatedError", "check_fit"]


class ModelTooLargeError(ValueError):
    """The model does not fit the board's flash or RAM."""


class NotEmulatedError(RuntimeError):
    """``cm(x)`` on a board QEMU does not emulate (build only)."""


def check_fit(spec: TargetSpec, flash_bytes: int, ram_bytes: int, what: str) -> None:
    """Raise :class:`ModelTooLargeError` when the model exceeds the board's memories."""
    board = spec.board
    if board is None:
        return
    for mem, need, kib in (
        ("flash", flash_bytes, board.flash_kib),
        ("RAM", ram_bytes, board.ram_kib),
    ):
        if kib is not None and need > kib * 1024:
            raise ModelTooLargeError(
                f"model does not fit board {spec.name!r}: it needs {need} bytes of {mem} "
                f"({what}), the board has {kib * 1024} bytes ({kib} KiB) of {mem}"
            )


@dataclasses.dataclass
class ModelInfo:
    """What the generated program computes: I/O specs, per-layer and total weight bytes,
    ``steps``, one row per kernel call (see :func:`.driver.step_table`), the output
    structure and ``index_checks``, the id ranges of inputs that index embeddings
    (:func:`..relax_import.index_input_checks`)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights_bytes: int
    arena_bytes: int
    per_layer: list[dict[str, Any]]
    report: Any = None
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    output_tree: OutputTree | None = None
    index_checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        tree = self.output_tree
        if tree is not None and tree.num_leaves != len(self.outputs):
            raise ValueError(
                f"output tree has {tree.num_leaves} tensors, the program returns "
                f"{len(self.outputs)}"
            )


class CortexMModule:
    """A model compiled to a static C program for ``spec`` (a Cortex-M board or CPU)."""

    def __init__(self, spec: TargetSpec, sources: dict[str, str], info: ModelInfo) -> None:
        if spec.board is None:
            raise ValueError(f"target {spec.name!r} is not a Cortex-M board or CPU preset")
        self.spec = spec
        self.sources = dict(sources)
        self.info = info
        self.files = project_files(spec.board, self.sources, len(info.inputs), len(info.outputs))
        self.last_run: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._dir: Path | None = None
        self._built: set[str] = set()
        self._memory: dict[str, Any] | None = None
        check_fit(spec, info.weights_bytes, info.arena_bytes, "weights + arena, before the build")

    # ------------------------------------------------------------------ project

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.info.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.info.outputs

    @property
    def target(self) -> TargetSpec:
        """The Cortex-M preset (same as ``spec``; the name compiled modules share)."""
        return self.spec

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self.info.inputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self.info.outputs

    @property
    def output_tree(self) -> OutputTree | None:
        return self.info.output_tree

    @property
    def report(self) -> Any:
        return self.info.report

    def export(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the C project into ``directory``; returns its path. A directory that
        exists and is not empty is refused (:class:`FileExistsError`) unless
        ``overwrite``, which replaces it whole (no old sources or ``build/`` output
        stay); ``overwrite`` refuses a directory that is not a previous export."""
        root = Path(directory)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"cannot export the C project to {root}: not a directory")
        if root.is_dir() and any(root.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"cannot export the C project to {root}: the directory is not empty; "
                    "pass overwrite=True to replace a previous export, or pick a new directory"
                )
            if not (root / "include" / "tbn_model.h").is_file():
                raise FileExistsError(
                    f"cannot overwrite {root}: it is not a C project exported by "
                    "tbn_compiler (no include/tbn_model.h); refusing to delete its contents"
                )
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = root.parent / f".{root.name}.{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_files(staging, self.files)
            _replace_dir(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return root

    def retarget(self, target: Any) -> CortexMModule:
        """The same generated C sources packaged for another Cortex-M preset (compile
        checked for it, see :meth:`check_build`)."""
        cm = CortexMModule(resolve_target(target), self.sources, self.info)
        cm.check_build()
        return cm

    def workdir(self) -> Path:
        """Private build directory holding the exported project (created on first use)."""
        with self._lock:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix=f"tbn_cm_{self.spec.name}_"))
                self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
                _write_files(self._dir, self.files)
            return self._dir

    def build(self, firmware: bool = False, profile: bool = False) -> Path:
        """Build the library (and the firmware, or with ``profile`` the profiling firmware
        ``profile/firmware.elf``) with the project's Makefile; returns the build directory.
        A compile error is a :class:`.toolchain.BuildError` naming the failing kernels and
        the model steps they compute."""
        target = "profile" if profile else "firmware" if firmware else "lib"
        with self._lock:
            if target not in self._built:
                if target != "lib" and self.spec.board.qemu_machine is None:
                    raise NotEmulatedError(self._not_emulated())
                try:
                    toolchain.run_make(self.workdir(), (target,))
                except toolchain.BuildError as exc:
                    raise toolchain.BuildError(self._explain(str(exc))) from None
                self._built.add(target)
                self._memory = None
            return self.workdir() / "build"

    def check_build(self) -> str:
        """Compile the generated C now (see module doc); returns the compiler used."""
        if toolchain.has_toolchain():
            self.build()
            return "arm-none-eabi-gcc"
        try:
            return check.syntax_check(self.sources)
        except toolchain.BuildError as exc:
            raise toolchain.BuildError(self._explain(str(exc))) from None

    def _explain(self, log: str) -> str:
        return check.explain_build_log(log, self.info.steps, self.spec.name)

    def close(self) -> None:
        """Remove the private build directory."""
        with self._lock:
            if self._dir is not None:
                self._cleanup()
                self._dir, self._built, self._memory = None, set(), None

    # ------------------------------------------------------------------ memory

    @property
    def memory(self) -> dict[str, Any]:
        """Sizes in bytes from the real build (see module doc); raises
        :class:`.toolchain.ToolchainError` without the Arm toolchain."""
        with self._lock:
            if self._memory is None:
                self._memory = self._measure()
            return self._memory

    def _measure(self) -> dict[str, Any]:
        build = self.build(firmware=self.spec.board.qemu_machine is not None)
        lib = toolchain.section_sizes([build / "tbn_kernels.o", build / "tbn_model.o"])
        mem: dict[str, Any] = {
            "weights_bytes": self.info.weights_bytes,
            "code_bytes": lib["text"],
            "rodata_bytes": lib["rodata"],
            "arena_bytes": self.info.arena_bytes,
            "flash_bytes": lib["text"] + lib["rodata"] + lib["data"],
            "ram_bytes": lib["data"] + lib["bss"],
            "stack_bytes": self._stack_bytes(build),
            "per_layer": self.info.per_layer,
            "board_flash_bytes": _kib(self.spec.board.flash_kib),
            "board_ram_bytes": _kib(self.spec.board.ram_kib),
        }
        elf = build / "firmware.elf"
        if elf.exists():
            fw = toolchain.firmware_sizes(elf)
            mem["firmware_flash_bytes"] = fw["text"] + fw["data"]
            mem["firmware_ram_bytes"] = fw["data"] + fw["bss"]
        check_fit(self.spec, mem["flash_bytes"], mem["ram_bytes"], "code + weights; arena")
        return mem

    def _stack_bytes(self, build: Path) -> int | None:
        """Frame of ``tbn_model_run`` plus the largest frame of the kernels it calls."""
        su = [build / "tbn_kernels.su", build / "tbn_model.su"]
        if not all(p.is_file() for p in su):
            return None
        frames = toolchain.stack_frames(su)
        kernels = [frames.get(row["kernel"], 0) for row in self.info.steps]
        entry = frames.get("tbn_model_run")
        if entry is None or any(f is None for f in kernels):
            return None
        return entry + max(kernels, default=0)

    # ------------------------------------------------------------------ run

    def _not_emulated(self) -> str:
        return (
            f"target {self.spec.name!r} is build only (QEMU does not emulate it): use "
            "cm.export(directory) and flash the library, or retarget to 'mps2-an386', "
            "'mps2-an500' or 'mps2-an385' to run it"
        )

    def __call__(self, *args: torch.Tensor) -> Any:
        """Run one inference in QEMU on inputs of the example inputs' shapes and dtypes
        (see module doc). :class:`.qemu.KernelError` when a kernel met invalid data (e.g.
        an embedding id computed in the graph is out of range), naming the step and its
        layer."""
        xs, elf, _ = self._inputs_and_firmware(args, profile=False)
        res = self._run(elf, xs)
        with self._lock:
            self.last_run = res.to_dict()
        ys = [torch.from_numpy(y.copy()) for y in res.outputs]
        if self.output_tree is not None:
            return self.output_tree.unflatten(ys)
        return ys[0] if len(ys) == 1 else tuple(ys)

    def profile(self, *args: torch.Tensor) -> list[dict[str, Any]]:
        """Instructions of each kernel call for one inference on ``args`` (emulated boards
        with a timer). Runs the firmware as ``cm(*args)`` does (its exact total goes to
        ``last_run["instructions"]``), then the profiling firmware (``make profile``: a
        timer read after every step), whose outputs must be the same bits. Returns one row
        per step: ``step``, ``kernel``, ``func``, ``layer`` and ``instructions`` (the timer
        read taken off), also stored as ``last_run["steps"]``; the rows add up to the total
        but for the entry point's glue (a few instructions per step)."""
        xs, plain_elf, profile_elf = self._inputs_and_firmware(args, profile=True)
        plain, profiled = self._run(plain_elf, xs), self._run(profile_elf, xs)
        if profiled.step_instructions is None:
            raise qemu.RunError(f"board {self.spec.name!r} has no timer to profile the steps with")
        if not plain.same_bits(profiled):
            raise qemu.RunError("the profiling firmware computed other outputs than the model")
        keys = ("step", "kernel", "func", "layer")
        rows = [
            {**{k: row[k] for k in keys}, "instructions": n}
            for row, n in zip(self.info.steps, profiled.step_instructions, strict=True)
        ]
        with self._lock:
            self.last_run = {**plain.to_dict(), "steps": rows}
        return rows

    def _inputs_and_firmware(
        self, args: tuple[torch.Tensor, ...], profile: bool
    ) -> tuple[list[np.ndarray], Path, Path | None]:
        """``args`` checked, and the firmware built (checking that the model fits), with
        the profiling firmware too when ``profile``: ``(inputs, elf, profile_elf)``.
        :class:`NotEmulatedError` for a board QEMU does not emulate."""
        if self.spec.board.qemu_machine is None:
            raise NotEmulatedError(self._not_emulated())
        xs = self._check_inputs(args)
        with self._lock:
            self.memory  # noqa: B018  (builds the firmware and checks that the model fits)
            elf = self.build(firmware=True) / "firmware.elf"
            profile_elf = self.build(profile=True) / "profile" / "firmware.elf" if profile else None
        return xs, elf, profile_elf

    def _run(self, elf: Path, xs: list[np.ndarray]) -> qemu.RunResult:
        """One QEMU run of ``elf`` on ``xs`` (a kernel error described in model terms)."""
        board = self.spec.board
        outs = [(s.shape, _numpy_dtype(s)) for s in self.info.outputs]
        try:
            return qemu.run_firmware(elf, board.qemu_machine, board.cpu, xs, outs)
        except qemu.KernelError as exc:
            raise self._kernel_error(exc) from None

    def _kernel_error(self, exc: qemu.KernelError) -> qemu.KernelError:
        """``exc`` with the step described in model terms."""
        what = exc.reason
        index, bound = exc.detail
        if bound >= 0:
            what += f": index {index} is not in [0, {bound})"
        steps = self.info.steps
        where = (
            check.describe_step(steps, exc.step)
            if 0 <= exc.step < len(steps)
            else f"step {exc.step}"
        )
        return qemu.KernelError(
            f"the model stopped at {where}: {what}",
            exc.step,
            exc.reason,
            exc.detail,
        )

    def _check_inputs(self, args: tuple[Any, ...]) -> list[np.ndarray]:
        """The inputs as numpy arrays for the firmware; :class:`InputError` naming the
        first input whose count, type, shape or dtype differs from the compiled signature
        (Cortex-M builds are static: one arena for the example's shapes), the exception
        torch raises for an id out of its embedding's range."""
        specs = self.inputs
        if len(args) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InputError(f"expected {len(specs)} input(s) ({names}), got {len(args)}")
        for spec, x in zip(specs, args, strict=True):
            if not isinstance(x, torch.Tensor):
                raise InputError(
                    f"input {spec.name!r}: expected a torch.Tensor, got {type(x).__name__}"
                )
            problem = shape_mismatch(spec, x.shape, {})
            if problem is not None:
                raise InputError(f"{problem} (Cortex-M builds are static: compiled shapes only)")
            dtype = str(x.dtype).removeprefix("torch.")
            if dtype != spec.dtype:
                raise InputError(
                    f"input {spec.name!r}: expected dtype {spec.dtype}, got {dtype} "
                    f"(shape {spec.signature})"
                )
        if self.info.index_checks:
            named = {s.name: t.detach().cpu() for s, t in zip(specs, args, strict=True)}
            check_index_inputs(self.info.index_checks, named)
        return [x.detach().cpu().contiguous().numpy() for x in args]

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write the module to ONE file (see module doc), atomically; returns the path.
        :class:`..archive.ArtifactWriteError` names ``path`` when it cannot be written."""
        members = {_SOURCES + rel: text.encode() for rel, text in sorted(self.sources.items())}
        return write_archive(path, self._metadata(sorted(members)), members)

    def _metadata(self, source_members: list[str]) -> dict[str, Any]:
        info = self.info
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": package_versions(),
            "target": self.spec.to_dict(),
            "inputs": [s.to_dict() for s in info.inputs],
            "outputs": [s.to_dict() for s in info.outputs],
            "index_checks": info.index_checks,
            "output_tree": None if info.output_tree is None else info.output_tree.to_json(),
            "report": None if info.report is None else str(info.report),
            "weights_bytes": info.weights_bytes,
            "arena_bytes": info.arena_bytes,
            "per_layer": info.per_layer,
            "steps": info.steps,
            "sources": source_members,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> CortexMModule:
        """Read a module written by :meth:`save` (checked by :func:`..archive.read_archive`)."""
        meta, members = read_archive(path)
        for key, want in (("format", FORMAT_NAME), ("format_version", FORMAT_VERSION)):
            if meta.get(key) != want:
                raise ArtifactError(f"{path}: {key} is {meta.get(key)!r}, expected {want!r}")
        return cls.from_archive(Path(path), meta, members)

    @classmethod
    def from_archive(
        cls, path: Path, meta: dict[str, Any], members: dict[str, bytes]
    ) -> CortexMModule:
        """The module held by an archive already read and checked (format, version,
        checksums) by the caller: ``tbn.load`` dispatches here for targets of kind
        ``"cortex-m"``. :class:`..archive.ArtifactError` naming ``path`` when the
        metadata is malformed or a source member is missing."""
        try:
            spec = TargetSpec.from_dict(meta["target"])
            if spec.kind != "cortex-m" or spec.board is None:
                raise ValueError(f"target {spec.name!r} is not a Cortex-M board")
            tree = meta.get("output_tree")
            info = ModelInfo(
                inputs=[TensorSpec.from_dict(d) for d in meta["inputs"]],
                outputs=[TensorSpec.from_dict(d) for d in meta["outputs"]],
                weights_bytes=int(meta["weights_bytes"]),
                arena_bytes=int(meta["arena_bytes"]),
                per_layer=list(meta["per_layer"]),
                report=meta.get("report"),
                steps=list(meta["steps"]),
                output_tree=None if tree is None else OutputTree.from_json(tree),
                index_checks=list(meta.get("index_checks") or []),
            )
            names = list(meta["sources"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{path}: malformed metadata.json of a Cortex-M module "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        missing = [n for n in names if n not in members]
        if missing or not names:
            raise ArtifactError(f"{path}: not a complete Cortex-M module, missing {missing}")
        try:
            sources = {n.removeprefix(_SOURCES): members[n].decode() for n in names}
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{path}: a C source is not UTF-8 text ({exc})") from exc
        return cls(spec, sources, info)

    def __repr__(self) -> str:
        return (
            f"CortexMModule(target={self.spec.name!r}, weights={self.info.weights_bytes} B, "
            f"arena={self.info.arena_bytes} B)"
        )


_SOURCES = "sources/"


def _numpy_dtype(spec: TensorSpec) -> str:
    """The numpy dtype of a tensor spec (torch's dtype names: float32, int64, bool...)."""
    return str(torch.empty((), dtype=getattr(torch, spec.dtype)).numpy().dtype)


def _kib(kib: int | None) -> int | None:
    return None if kib is None else kib * 1024


def _write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _replace_dir(new: Path, root: Path) -> None:
    """Put directory ``new`` at ``root``; an old ``root`` is moved aside first, then
    removed, so ``root`` never holds old and new files mixed."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
        os.replace(root, old / root.name)
    os.replace(new, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
