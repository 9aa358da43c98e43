"""What a repository folder holds on disk: ``ROOT/<name>/<version>/model.onnx`` and the files' identities.

Blocking (file-system walks): run :func:`scan` in an executor. Version folders are plain integers
("0", "12"; not "01", "1a" or "²"); hidden folders (a version being written aside) are skipped quietly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tlserve.contract import FP16_FILE, MODEL_FILE

# (file name, inode, size, mtime_ns) of model.onnx and, when present, the fp16 variant
Signature = tuple[tuple[str, int, int, int], ...]
VERSION_NAME = re.compile(r"0|[1-9][0-9]*")  # plain ASCII integers, no leading zeros ("01" would equal "1")


@dataclass(frozen=True)
class VersionDir:
    path: Path
    signature: Signature


@dataclass
class Scan:
    """What a scan of the repository folder found."""

    exists: bool = False
    models: dict[str, dict[str, VersionDir]] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)  # version folders whose names are not plain integers


def is_version_name(name: str) -> bool:
    return VERSION_NAME.fullmatch(name) is not None


def file_signature(version_dir: Path) -> Signature:
    """Identity of the files a version loads from; it changes when one is replaced or rewritten."""
    files = [(f, version_dir / f) for f in (MODEL_FILE, FP16_FILE)]
    return tuple((f, s.st_ino, s.st_size, s.st_mtime_ns) for f, s in ((f, p.stat()) for f, p in files if p.is_file()))


def scan(root: Path) -> Scan:
    """Every ``root/<name>/<version>/model.onnx`` with its signature; hidden folders are skipped quietly
    (a version being written aside), other non-integer version folders are reported in ``skipped``."""
    found = Scan(exists=root.is_dir())
    if not found.exists:
        return found
    for model_file in sorted(root.glob(f"*/*/{MODEL_FILE}")):
        version_dir = model_file.parent
        if version_dir.name.startswith(".") or version_dir.parent.name.startswith("."):
            continue
        if not is_version_name(version_dir.name):
            found.skipped.append(version_dir)
            continue
        try:
            signature = file_signature(version_dir)
        except OSError:  # removed while we looked: the next scan sees what is left
            continue
        found.models.setdefault(version_dir.parent.name, {})[version_dir.name] = VersionDir(version_dir, signature)
    return found
