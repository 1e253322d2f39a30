"""One-file archives of compiled modules: written atomically, checked completely on read.

Container (a zip file):

* ``metadata.json``: a JSON object; what it holds is up to the module kind that wrote it
  (see :mod:`.artifact` and :mod:`.cortex_m.module`), but always ``format`` and
  ``format_version``.
* any number of named members (bytes): libraries, sources, ...
* ``checksums.json``: ``{member name: sha256 hex}`` for ``metadata.json`` and every other
  member. An archive whose metadata or any member was edited, truncated or removed is
  refused by :func:`read_archive`, before anything in it is used.

:func:`write_archive` writes a temporary file next to the destination and renames it
into place: the destination is either the old file or the complete new one, and nothing
is left behind on failure. Errors name the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import zipfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ArtifactError",
    "ArtifactWriteError",
    "package_versions",
    "read_archive",
    "write_archive",
]

METADATA = "metadata.json"
CHECKSUMS = "checksums.json"


class ArtifactError(ValueError):
    """A saved compiled module cannot be loaded (corrupt, foreign or not runnable here)."""


class ArtifactWriteError(OSError):
    """A compiled module cannot be written to the given path."""


def package_versions(**more: str) -> dict[str, str]:
    """Versions for an archive's metadata: tbn_compiler, torch, python, plus ``more``."""
    try:
        tbn = metadata.version("tbn_compiler")
    except metadata.PackageNotFoundError:
        tbn = "unknown"
    return {
        "tbn_compiler": tbn,
        **more,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_destination(path: Path) -> None:
    if path.is_dir():
        raise ArtifactWriteError(f"cannot save to {path}: it is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactWriteError(
            f"cannot save to {path}: cannot create directory {path.parent} ({exc.strerror or exc})"
        ) from exc


def write_archive(
    path: str | os.PathLike, meta: Mapping[str, Any], members: Mapping[str, bytes]
) -> Path:
    """Write ``meta`` and ``members`` to ONE zip file at ``path``, atomically.

    Raises :class:`ArtifactWriteError` naming ``path`` when it is a directory or cannot be
    written; no temporary file survives a failure. Returns the path."""
    path = Path(path)
    reserved = {METADATA, CHECKSUMS} & set(members)
    if reserved:
        raise ValueError(f"member names {sorted(reserved)} are reserved")
    _check_destination(path)
    contents = {METADATA: json.dumps(meta, indent=2).encode(), **members}
    checksums = {name: _sha256(data) for name, data in contents.items()}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArtifactWriteError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in contents.items():
                zf.writestr(name, data)
            zf.writestr(CHECKSUMS, json.dumps(checksums, indent=2))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ArtifactWriteError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_archive(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read an archive written by :func:`write_archive`: ``(metadata, members)``.

    Raises ``FileNotFoundError`` when there is no file, and :class:`ArtifactError` naming
    the path when it is not such an archive, is truncated, lacks a member, or any member
    (metadata included) fails its checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no compiled module at {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            contents = {name: zf.read(name) for name in zf.namelist()}
    except zipfile.BadZipFile as exc:
        raise ArtifactError(
            f"{path}: not a tbn_compiler compiled module, or the file is truncated/corrupt ({exc})"
        ) from exc
    except (EOFError, OSError, ValueError, zipfile.LargeZipFile) as exc:
        raise ArtifactError(f"{path}: corrupt archive ({type(exc).__name__}: {exc})") from exc
    for member in (METADATA, CHECKSUMS):
        if member not in contents:
            raise ArtifactError(f"{path}: not a complete compiled module, missing {member!r}")
    checksums = _json_object(path, CHECKSUMS, contents.pop(CHECKSUMS))
    for name, expected in checksums.items():
        if name not in contents:
            raise ArtifactError(f"{path}: not a complete compiled module, missing {name!r}")
        if _sha256(contents[name]) != expected:
            raise ArtifactError(
                f"{path}: checksum mismatch for {name!r}; the file is corrupt or was edited"
            )
    unlisted = sorted(set(contents) - set(checksums))
    if unlisted:
        raise ArtifactError(f"{path}: members without a checksum: {unlisted}")
    meta = _json_object(path, METADATA, contents.pop(METADATA))
    return meta, contents


def _json_object(path: Path, name: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: {name} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: {name} must hold a JSON object")
    return value
