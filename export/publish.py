"""The model repository: ``ROOT/<name>/<version>/model.onnx``, published atomically, never overwritten.

A version is staged in a hidden folder beside the versions (``ROOT/<name>/.staging-*``), every
file fsynced, then the folder is renamed into place in one step: a reader (the server's
repository scan) sees either no version or the complete one. Existing versions are never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The version cannot be published (it exists already, or the name/version is invalid)."""


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(repository: Path, name: str, version: str | int = "auto") -> str:
    """``auto`` -> one more than the highest integer version (1 for a new model); else ``version`` itself,
    refused when it exists already."""
    model_dir = Path(repository) / name
    if str(version) == "auto":
        return str(max(existing_versions(model_dir), default=0) + 1)
    version = str(version)
    if not version or version.startswith(".") or "/" in version or version in ("auto", ".."):
        raise PublishError(f"invalid version {version!r}")
    if (model_dir / version).exists():
        raise PublishError(f"{model_dir / version} exists already: versions are never overwritten")
    return version


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(repository: Path, name: str, version: str, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (file name -> content) as ``repository/name/version/`` in one atomic step.

    Returns the version folder. Raises PublishError when the version exists; on any failure the
    staging folder is removed and nothing becomes visible.
    """
    if not name or name.startswith(".") or "/" in name:
        raise PublishError(f"invalid model name {name!r}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / version
    staging = model_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for file_name, data in files.items():
            write_synced(staging / file_name, data)
        fsync_dir(staging)
        if target.exists():
            raise PublishError(f"{target} appeared while publishing: versions are never overwritten")
        os.rename(staging, target)
        fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("published %s (%s)", target, ", ".join(files))
    return target
