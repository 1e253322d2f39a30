"""TVM's CUDA runtime (``libtvm_runtime_cuda.so``): build it into the environment, load it.

The ``apache-tvm`` wheel's runtime cannot run CUDA modules by itself: TVM keeps CUDA in
a separate library, ``tvm/lib/libtvm_runtime_cuda.so``, which registers the CUDA device
API (``device_api.cuda``) and the CUDA module loader (``ffi.Module.load_from_bytes.cuda``).

**Build** (``python -m tbn_compiler.backends.cuda_runtime``, run by ``make setup``):
TVM's CUDA runtime sources (three ``.cc`` files; ``TVM_SOURCE_DIR``, a TVM checkout at the
wheel's version, or ``../shared/third_party/tvm-cuda-runtime`` beside this repository)
are compiled where they are, against the installed wheels' headers (``tvm/include``,
``tvm/src/runtime``, ``tvm_ffi/include``) and the CUDA toolkit of the ``nvcc`` found
(``CUDA_HOME``, else ``nvcc`` on ``PATH``), with the CUDA runtime linked statically, and
linked against the NVIDIA driver (``libcuda.so.1``): the real one where it is installed,
else a stand-in built from ``cuda_stand_in.c`` (every call: no device). The result
replaces ``tvm/lib/libtvm_runtime_cuda.so`` (the file the wheel may ship needs a shared
``libcudart.so.13`` that a GPU host rarely has on its library path). A record of the
inputs (``tvm/lib/tbn_cuda/build.json``) makes a second run a no-op. Without ``nvcc`` or
sources it prints one line and builds nothing.

**Load** (:func:`load`): the library is loaded into the process with ``RTLD_GLOBAL``
(TVM's own loader skips it in runtime-only mode, ``TVM_USE_RUNTIME_LIB=1``, and
silently when the driver is missing); where no driver exists, the stand-in is loaded
first so that the library loads and reports no GPU instead of failing.

This module imports only the standard library at import time (``make setup`` runs it as
a script); TVM is imported inside :func:`load`.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LIBRARY",
    "BuildError",
    "BuildResult",
    "CudaRuntimeError",
    "build",
    "compile_arch",
    "current_compile_arch",
    "find_driver",
    "find_nvcc",
    "find_sources",
    "installed_library",
    "is_loaded",
    "load",
    "stand_in_library",
]

LIBRARY = "libtvm_runtime_cuda.so"
DRIVER = "libcuda.so.1"
STATE_DIR = "tbn_cuda"  # under tvm/lib: the stand-in driver and the build record
_RECORD = "build.json"
_STAND_IN_SOURCE = Path(__file__).with_name("cuda_stand_in.c")

# TVM's CUDA runtime sources, relative to a TVM checkout or the third-party copy.
SOURCES = (
    "src/backend/cuda/runtime/cuda_device_api.cc",
    "src/backend/cuda/runtime/cuda_module.cc",
    "src/runtime/vm/cuda/cuda_graph_builtin.cc",
)
_HEADERS = (
    "src/support/bytes_io.h",
    "src/support/utils.h",
    "include/tvm/support/io.h",
    "include/tvm/support/serializer.h",
)
_CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-DTVM_RUNTIME_EXPORTS")
_SYSTEM_LIBS = ("-lrt", "-ldl", "-lpthread")


class CudaRuntimeError(RuntimeError):
    """TVM's CUDA runtime is not installed or cannot be loaded in this process."""


class BuildError(RuntimeError):
    """Building TVM's CUDA runtime failed (the message holds the compiler's output)."""


# --------------------------------------------------------------------------- locations


def _package_dir(name: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def installed_library() -> Path | None:
    """Where TVM loads its CUDA runtime from (``tvm/lib/libtvm_runtime_cuda.so``; the
    file may not exist), or None without TVM."""
    tvm_dir = _package_dir("tvm")
    return None if tvm_dir is None else tvm_dir / "lib" / LIBRARY


def stand_in_library() -> Path | None:
    """Where the build puts the stand-in driver (only on machines without a driver)."""
    lib = installed_library()
    return None if lib is None else lib.parent / STATE_DIR / DRIVER


def find_nvcc() -> Path | None:
    """``$CUDA_HOME/bin/nvcc`` when ``CUDA_HOME`` is set, else ``nvcc`` on ``PATH``."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def cuda_home(nvcc: Path) -> Path:
    """The CUDA toolkit root of ``nvcc``: ``CUDA_HOME``, else what nvcc reports as its
    own directory (``nvcc`` on ``PATH`` may be a wrapper script elsewhere)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return Path(home)
    try:
        out = subprocess.run(
            [str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        match = None
    bin_dir = Path(match.group(1).strip()) if match else nvcc.resolve().parent
    return bin_dir.parent


def find_sources() -> Path | None:
    """TVM's CUDA runtime sources: ``TVM_SOURCE_DIR``, else the third-party copy beside
    this repository (``../shared/third_party/tvm-cuda-runtime``); None if neither holds
    them."""
    candidates = []
    if os.environ.get("TVM_SOURCE_DIR"):
        candidates.append(Path(os.environ["TVM_SOURCE_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "third_party" / "tvm-cuda-runtime")
    for root in candidates:
        if all((root / rel).is_file() for rel in SOURCES + _HEADERS):
            return root.resolve()
    return None


def find_driver() -> Path | None:
    """The installed NVIDIA driver library (``libcuda.so.1``), or None."""
    for path in _ldconfig_paths(DRIVER) + _usual_driver_paths():
        if path.is_file() and path != stand_in_library():
            return path
    return None


def _ldconfig_paths(soname: str) -> list[Path]:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    paths = []
    for line in out.splitlines():  # "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/.../libcuda.so.1"
        head, sep, target = line.strip().partition(" => ")
        name, _, kind = head.partition(" ")
        if sep and name == soname and "64" in kind:  # not a 32-bit copy
            paths.append(Path(target.strip()))
    return paths


def _usual_driver_paths() -> list[Path]:
    dirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
    return [Path(d) / DRIVER for d in (*dirs, "/usr/lib/wsl/lib")]


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build` did: ``status`` is "built", "up to date" or "skipped"."""

    status: str
    message: str
    library: Path | None = None


@dataclass(frozen=True)
class _Plan:
    sources: Path
    tvm_dir: Path
    ffi_dir: Path
    cuda_home: Path
    driver: Path | None  # None: link against the stand-in

    @property
    def library(self) -> Path:
        return self.tvm_dir / "lib" / LIBRARY

    @property
    def state_dir(self) -> Path:
        return self.tvm_dir / "lib" / STATE_DIR


def _plan() -> _Plan | str:
    """The build inputs, or why there is nothing to build."""
    tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
    if tvm_dir is None or ffi_dir is None:
        return "apache-tvm is not installed; TVM's CUDA runtime not built"
    nvcc = find_nvcc()
    if nvcc is None:
        return (
            "nvcc not found (set CUDA_HOME or put nvcc on PATH); TVM's CUDA runtime not "
            "built: CUDA targets keep their kernels as source"
        )
    if _cxx() is None:
        return "no C++ compiler (g++) found; TVM's CUDA runtime not built"
    sources = find_sources()
    if sources is None:
        return (
            "TVM's CUDA runtime sources not found (set TVM_SOURCE_DIR to a TVM checkout "
            "at the installed version); TVM's CUDA runtime not built: CUDA targets keep "
            "their kernels as source"
        )
    return _Plan(sources, tvm_dir, ffi_dir, cuda_home(nvcc), find_driver())


def _fingerprint(plan: _Plan) -> str:
    """Hash of everything the library is built from (sources, headers, flags, versions,
    toolkit and driver)."""
    digest = hashlib.sha256()
    for rel in SOURCES + _HEADERS:
        digest.update(rel.encode() + (plan.sources / rel).read_bytes())
    digest.update(_STAND_IN_SOURCE.read_bytes())
    for part in (
        *_CXXFLAGS,
        *_SYSTEM_LIBS,
        str(plan.tvm_dir),
        _dist_version("apache-tvm"),
        _dist_version("apache-tvm-ffi"),
        str(plan.cuda_home.resolve()),
        str(plan.driver),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _up_to_date(plan: _Plan, fingerprint: str) -> bool:
    record = plan.state_dir / _RECORD
    if not (record.is_file() and plan.library.is_file()):
        return False
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    stand_in_ok = plan.driver is not None or (plan.state_dir / DRIVER).is_file()
    return (
        stand_in_ok
        and data.get("fingerprint") == fingerprint
        and data.get("library_sha256") == _sha256(plan.library)
    )


def build(force: bool = False) -> BuildResult:
    """Build and install ``libtvm_runtime_cuda.so`` unless it is up to date (or there is
    no nvcc or no sources: status "skipped"). Raises :class:`BuildError` when a compiler
    or the linker fails."""
    plan = _plan()
    if isinstance(plan, str):
        return BuildResult("skipped", plan)
    fingerprint = _fingerprint(plan)
    if not force and _up_to_date(plan, fingerprint):
        return BuildResult("up to date", f"{plan.library} is up to date", plan.library)
    start = time.monotonic()
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    if plan.driver is not None:  # never keep a stand-in beside a real driver
        (plan.state_dir / DRIVER).unlink(missing_ok=True)
    driver = plan.driver or _build_stand_in(plan.state_dir / DRIVER)
    with tempfile.TemporaryDirectory(prefix="tbn_cuda_build_") as tmp:
        objects = _compile_objects(plan, Path(tmp))
        built = _link(plan, objects, driver, Path(tmp) / LIBRARY)
        _install(built, plan.library)
    record = {
        "fingerprint": fingerprint,
        "library_sha256": _sha256(plan.library),
        "sources": str(plan.sources),
        "cuda_home": str(plan.cuda_home),
        "driver": str(plan.driver) if plan.driver else "stand-in",
    }
    (plan.state_dir / _RECORD).write_text(json.dumps(record, indent=1) + "\n")
    size = plan.library.stat().st_size / 1e6
    against = f"driver {plan.driver}" if plan.driver else f"the stand-in driver {driver}"
    return BuildResult(
        "built",
        f"built {plan.library} ({size:.1f} MB, {time.monotonic() - start:.0f} s), "
        f"linked against {against}",
        plan.library,
    )


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build_stand_in(out: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or "cc"
    cmd = [cc, "-shared", "-fPIC", "-O2", f"-Wl,-soname,{DRIVER}", "-o", str(out)]
    _run([*cmd, str(_STAND_IN_SOURCE)], "the stand-in driver")
    return out


def _include_flags(plan: _Plan, tree: Path) -> list[str]:
    """Include paths in the order the sources need. The sources include
    ``"../../../runtime/<file>.h"`` relative to ``src/backend/cuda/runtime``: in a TVM
    checkout that is its ``src/runtime``; for the third-party copy, ``tree`` mirrors
    that layout with ``src/runtime`` pointing at the wheel's ``tvm/src/runtime``."""
    return [
        f"-I{plan.tvm_dir / 'include'}",
        f"-I{plan.sources / 'include'}",
        f"-I{plan.ffi_dir / 'include'}",
        f"-I{plan.cuda_home / 'include'}",
        "-iquote",
        str(tree / "src" / "backend" / "cuda" / "runtime"),
    ]


def _source_tree(plan: _Plan, tmp: Path) -> Path:
    tree = tmp / "tree"
    (tree / "src" / "backend" / "cuda" / "runtime").mkdir(parents=True)
    (tree / "src" / "runtime").symlink_to(plan.tvm_dir / "src" / "runtime")
    (tree / "src" / "support").symlink_to(plan.sources / "src" / "support")
    return tree


def _compile_objects(plan: _Plan, tmp: Path) -> list[Path]:
    """Compile the sources in parallel; objects go to ``tmp``."""
    cxx = _cxx() or "c++"
    flags = [*_CXXFLAGS, *_include_flags(plan, _source_tree(plan, tmp))]
    jobs = []
    for rel in SOURCES:
        obj = tmp / (Path(rel).stem + ".o")
        cmd = [cxx, *flags, "-c", str(plan.sources / rel), "-o", str(obj)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        jobs.append((rel, obj, proc))
    failures = []
    for rel, _obj, proc in jobs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{rel}:\n{out[-4000:]}")
    if failures:
        raise BuildError("compiling TVM's CUDA runtime failed:\n" + "\n".join(failures))
    return [obj for _rel, obj, _proc in jobs]


def _link(plan: _Plan, objects: list[Path], driver: Path, out: Path) -> Path:
    """Link with ``--no-undefined`` (every symbol must resolve against libtvm_runtime,
    libtvm_ffi, the static CUDA runtime and the driver) and keep the driver as a
    dependency even though nothing at link time seems to need it."""
    cxx = _cxx() or "c++"
    cmd = [
        cxx,
        "-shared",
        "-o",
        str(out),
        *map(str, objects),
        f"-Wl,-soname,{LIBRARY}",
        "-Wl,--no-undefined",
        f"-L{plan.tvm_dir / 'lib'}",
        "-ltvm_runtime",
        f"-L{plan.ffi_dir / 'lib'}",
        "-ltvm_ffi",
        f"-L{plan.cuda_home / 'lib64'}",
        f"-L{plan.cuda_home / 'lib'}",
        "-l:libcudart_static.a",
        "-Wl,--no-as-needed",
        str(driver),
        "-Wl,--as-needed",
        *_SYSTEM_LIBS,
    ]
    _run(cmd, LIBRARY)
    return out


def _install(built: Path, dest: Path) -> None:
    """Replace ``dest`` atomically (a process that has the old file open keeps it)."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.copyfile(built, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        raise BuildError(f"building {what} failed:\n$ {' '.join(cmd)}\n{output}")


# --------------------------------------------------------------------------- load

_LOAD_LOCK = threading.Lock()
_ARCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("tbn_cuda_arch", default=None)


def is_loaded() -> bool:
    """True when TVM's CUDA device API and module loader are registered in this process."""
    import tvm_ffi

    return all(
        tvm_ffi.get_global_func(name, allow_missing=True) is not None
        for name in ("device_api.cuda", "ffi.Module.load_from_bytes.cuda")
    )


def load() -> None:
    """Make TVM's CUDA runtime available in this process (idempotent, thread-safe).

    Raises :class:`CudaRuntimeError` saying why not: the library was never built, or it
    cannot be loaded (no driver and no stand-in, a missing symbol, ...)."""
    import tvm  # noqa: F401  (libtvm_runtime first: the CUDA runtime links against it)

    with _LOAD_LOCK:
        if is_loaded():
            return
        lib = installed_library()
        if lib is None or not lib.is_file():
            raise CudaRuntimeError(
                f"TVM's CUDA runtime ({LIBRARY}) is not installed in {lib and lib.parent}: "
                "build it with `make setup` or `python -m tbn_compiler.backends.cuda_runtime` "
                "(needs nvcc)"
            )
        _load_driver()
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise CudaRuntimeError(
                f"TVM's CUDA runtime {lib} cannot be loaded ({exc}); rebuild it with "
                "`python -m tbn_compiler.backends.cuda_runtime --force`"
            ) from exc
        if not is_loaded():
            raise CudaRuntimeError(f"{lib} loaded but registered no CUDA device API")


def _load_driver() -> None:
    """Load the NVIDIA driver, or the stand-in where there is none."""
    try:
        ctypes.CDLL(DRIVER, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    stand_in = stand_in_library()
    if stand_in is None or not stand_in.is_file():
        raise CudaRuntimeError(
            f"no NVIDIA driver ({DRIVER}) on this machine, and no stand-in for it "
            "(built by `python -m tbn_compiler.backends.cuda_runtime` where no driver exists)"
        )
    ctypes.CDLL(str(stand_in), mode=ctypes.RTLD_GLOBAL)


@contextlib.contextmanager
def compile_arch(arch: str | None) -> Iterator[None]:
    """Within the block, CUDA source that TVM compiles in this thread is compiled for
    ``arch`` (``"sm_90"``); see :func:`current_compile_arch`."""
    token = _ARCH.set(arch)
    try:
        yield
    finally:
        _ARCH.reset(token)


def current_compile_arch() -> str | None:
    """The architecture set by the innermost :func:`compile_arch` of this thread."""
    return _ARCH.get()


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m tbn_compiler.backends.cuda_runtime [--force]``: build if needed; one
    line of output; exit status 1 only when a build fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        result = build(force=args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prefix = "note: " if result.status == "skipped" else "CUDA runtime: "
    print(prefix + result.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
