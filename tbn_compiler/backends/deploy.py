"""Deploy bundle: what a host needs beside torch and numpy to load and run compiled
modules (``tbn.load(path)(x)``) with TVM's runtime only, CUDA included.

:func:`write_bundle` (``tbnc deploy-bundle DIR``) writes into ``DIR``:

* ``python/tvm/``: TVM's Python package without its compiler (``libtvm_compiler.so``,
  ``relax/``) and without sources, headers and ``3rdparty/``, with
  ``lib/libtvm_runtime_cuda.so`` (built by :mod:`.cuda_runtime`; never the stand-in
  driver: a GPU host has the real one);
* ``python/tvm_ffi/``: apache-tvm-ffi, whose extension is built for this Python
  (``manifest.json`` names it), with its ``dist-info`` so that TVM finds the bundle's
  ``libtvm_ffi.so`` even where another apache-tvm-ffi is installed;
* ``python/tbn_compiler/``: the project's runtime part (:data:`RUNTIME_FILES`) under an
  ``__init__`` that exports ``load``, ``CompiledModule`` and the errors;
* ``env.sh`` (``PYTHONPATH`` and ``TVM_USE_RUNTIME_LIB=1``), ``manifest.json``
  (versions, Python, file count, bytes) and ``README.txt``.

With ``archive=True`` it also writes ``DIR.tar.xz``. Runtime-only use needs no CUDA
toolkit: CUDA artifacts hold fatbins (see :mod:`.build`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import cuda_runtime

__all__ = ["RUNTIME_FILES", "Bundle", "BundleError", "write_bundle"]

RUNTIME_FILES = (
    "capture.py",
    "targets/__init__.py",
    "targets/registry.py",
    "targets/boards.py",
    "backends/__init__.py",
    "backends/archive.py",
    "backends/artifact.py",
    "backends/cuda_runtime.py",
    "backends/protocol.py",
    "backends/specs.py",
)
"""The modules of this package that loading and calling a compiled module imports."""

# Parts of the installed packages a runtime-only host never uses (relative paths).
_TVM_LEFT_OUT = (
    "lib/libtvm_compiler.so",
    f"lib/{cuda_runtime.STATE_DIR}",
    "relax",
    "3rdparty",
    "src",
    "include",
    "web",
    "lib64",
)
_FFI_LEFT_OUT = ("include", "src", "3rdparty")
_DISTRIBUTIONS = {"tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi"}

_INIT = '''"""tbn_compiler, runtime part (deploy bundle written by `tbnc deploy-bundle`): load and
run compiled modules with TVM's runtime only. Compile them with the full package."""

import os
import sys

if sys.version_info[:2] != {python}:
    raise ImportError(
        "this deploy bundle's tvm_ffi is built for Python {dotted}, this is Python "
        f"{{sys.version_info[0]}}.{{sys.version_info[1]}}: write the bundle with that Python"
    )
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

from .backends.artifact import (  # noqa: E402
    ArtifactError,
    ArtifactWriteError,
    CompiledModule,
    InputError,
    load,
)

__version__ = {version!r}
__all__ = ["ArtifactError", "ArtifactWriteError", "CompiledModule", "InputError", "load"]
'''

_ENV = """# Source this file to use the bundle: its packages first on PYTHONPATH, TVM's runtime only.
here="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export PYTHONPATH="$here/python${PYTHONPATH:+:$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB=1
"""

_README = """tbn_compiler deploy bundle: load and run compiled modules with TVM's runtime only.

Needs on the host: Python {python} ({implementation}), torch, numpy; for CUDA modules an
NVIDIA driver (no CUDA toolkit: the artifacts hold compiled kernels).

    . ./env.sh
    python -c "import tbn_compiler as tbn; m = tbn.load('model.tbn'); print(m)"

python/tvm: TVM {tvm} without its compiler, with libtvm_runtime_cuda.so
python/tvm_ffi: apache-tvm-ffi {tvm_ffi}
python/tbn_compiler: tbn_compiler {tbn_compiler} (load, CompiledModule, ArtifactError, InputError)
"""


class BundleError(RuntimeError):
    """The bundle cannot be written (a part is missing, or the directory is in use)."""


@dataclass(frozen=True)
class Bundle:
    """A written bundle: its directory, file count, bytes and the archive, if any."""

    path: Path
    files: int
    size: int
    archive: Path | None = None
    archive_size: int | None = None

    def summary(self) -> str:
        """One line: where, how many files, how large (and the archive)."""
        line = f"deploy bundle {self.path}: {self.files} files, {self.size / 1e6:.1f} MB"
        if self.archive is not None and self.archive_size is not None:
            line += f"; {self.archive} {self.archive_size / 1e6:.1f} MB"
        return line


def write_bundle(path: str | os.PathLike, *, archive: bool = False) -> Bundle:
    """Write the bundle into ``path`` (created; must be empty if it exists). Raises
    :class:`BundleError` when TVM's CUDA runtime is not built or ``path`` is not empty."""
    dest = Path(path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} exists and is not an empty directory")
    tvm_dir, ffi_dir = _installed("tvm"), _installed("tvm_ffi")
    cuda_lib = tvm_dir / "lib" / cuda_runtime.LIBRARY
    if not cuda_lib.is_file():
        raise BundleError(
            f"TVM's CUDA runtime ({cuda_lib}) is not built: run `make setup` or "
            "`python -m tbn_compiler.backends.cuda_runtime` (needs nvcc)"
        )
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    _copy_tree(tvm_dir, python / "tvm", _TVM_LEFT_OUT)
    _copy_tree(ffi_dir, python / "tvm_ffi", _FFI_LEFT_OUT)
    for package in _DISTRIBUTIONS:
        _copy_dist_info(package, python)
    _write_runtime_part(python / "tbn_compiler")
    versions = _versions()
    (dest / "env.sh").write_text(_ENV)
    (dest / "README.txt").write_text(_README.format(**versions))
    files, size = _count(dest)
    manifest = {**versions, "files": files, "bytes": size, "machine": platform.machine()}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    files, size = _count(dest)
    if not archive:
        return Bundle(dest, files, size)
    tar = _write_archive(dest)
    return Bundle(dest, files, size, tar, tar.stat().st_size)


def _installed(package: str) -> Path:
    spec_dir = cuda_runtime._package_dir(package)
    if spec_dir is None:
        raise BundleError(f"{package} is not installed")
    return spec_dir


def _copy_tree(src: Path, dest: Path, left_out: Iterable[str]) -> None:
    skip = {src / rel for rel in left_out}

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        return {n for n in names if here / n in skip or n == "__pycache__"}

    shutil.copytree(src, dest, ignore=ignore, symlinks=False)


def _copy_dist_info(package: str, python: Path) -> None:
    """The distribution's metadata, its RECORD reduced to the files in the bundle (TVM
    finds ``libtvm_ffi.so`` through it)."""
    dist = metadata.distribution(_DISTRIBUTIONS[package])
    info = next((f for f in dist.files or [] if f.parts[0].endswith(".dist-info")), None)
    if info is None:
        raise BundleError(f"{_DISTRIBUTIONS[package]} has no dist-info directory")
    info_dir = python / info.parts[0]
    info_dir.mkdir(parents=True, exist_ok=True)
    for name in ("METADATA", "WHEEL"):
        text = dist.read_text(name)
        if text is not None:
            (info_dir / name).write_text(text)
    present = sorted(
        str(p.relative_to(python)) for p in (python / package).rglob("*") if p.is_file()
    )
    record = "".join(f"{rel},,\n" for rel in present)
    (info_dir / "RECORD").write_text(record + f"{info_dir.name}/RECORD,,\n")


def _write_runtime_part(dest: Path) -> None:
    src = Path(__file__).resolve().parents[1]
    for rel in RUNTIME_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)
    python = tuple(sys.version_info[:2])
    init = _INIT.format(
        python=python, dotted=".".join(map(str, python)), version=_dist_version("tbn_compiler")
    )
    (dest / "__init__.py").write_text(init)


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _versions() -> dict[str, str]:
    return {
        "tvm": _dist_version("apache-tvm"),
        "tvm_ffi": _dist_version("apache-tvm-ffi"),
        "tbn_compiler": _dist_version("tbn_compiler"),
        "python": platform.python_version().rsplit(".", 1)[0],
        "implementation": sys.implementation.name,
    }


def _count(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _write_archive(dest: Path) -> Path:
    tar_path = dest.with_name(dest.name + ".tar.xz")
    tmp = tar_path.with_name(f".{tar_path.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w:xz", preset=6) as tar:
        tar.add(dest, arcname=dest.name)
    os.replace(tmp, tar_path)
    return tar_path
