"""Single-model mode (``--model-dir``): find one model in what KServe's storage-initializer left in a folder.

Four layouts are recognised, each named by what ``storageUri`` pointed at:

- ``DIR/model.onnx``: one exported file, or a version folder of ``tlserve export`` (``model.onnx`` with its
  variants and ``manifest.json``): one version, numbered by the manifest embedded in ``model.onnx``;
- ``DIR/<version>/model.onnx``: a model folder of versions;
- ``DIR/<name>/<version>/model.onnx``: a repository holding one model.

The model is served as ``--model-name`` when given, else by its folder name in a repository, else by the name
in its embedded manifest. Anything else (nothing found, two layouts at once, several models) is a
:class:`ModelDirError` naming the path and what was expected. Blocking: run :func:`scan_model_dir` in an executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tlserve.contract import MODEL_FILE
from tlserve.manifest import Manifest, ManifestError
from tlserve.server.errors import FailedPrecondition
from tlserve.server.onnx_metadata import MetadataError, read_metadata
from tlserve.server.scan import Scan, VersionDir, file_signature, is_version_name, scan

DEFAULT_VERSION = "1"  # a lone model.onnx whose manifest version is not a plain integer
IGNORED = {"lost+found"}  # a fresh ext4 volume (pvc://) has one
SHOWN = 10  # entries of DIR an error lists

EXPECTED = (
    f"expected {MODEL_FILE} (an exported file or version folder), <version>/{MODEL_FILE} "
    f"or <name>/<version>/{MODEL_FILE} (a repository holding one model)"
)


class ModelDirError(FailedPrecondition, ValueError):
    """``--model-dir`` does not hold exactly one model in a known layout (the message names the path). At start-up
    it stops the server (exit 2); on a rescan (ReloadRepository) it is FAILED_PRECONDITION and the loaded model
    keeps serving."""


@dataclass(frozen=True)
class SingleModel:
    """Where the one model is, and the name it is served under ("" = from the files)."""

    root: Path
    name: str = ""


def embedded_identity(model_file: Path) -> tuple[str, str]:
    """(name, version) from the manifest inside ``model_file``, read without loading the model."""
    manifest = Manifest.from_metadata(read_metadata(model_file))
    return manifest.name, manifest.version


def _listing(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(names[:SHOWN]) + (f", ... ({len(names)} entries)" if len(names) > SHOWN else "")
    return shown or "nothing (empty)"


def _flat(single: SingleModel) -> Scan:
    """``DIR/model.onnx``: one version, numbered (and, without --model-name, named) by its manifest."""
    model_file = single.root / MODEL_FILE
    if not model_file.is_file():
        raise ModelDirError(f"{model_file} is not a regular file: {EXPECTED}")
    try:
        name, version = embedded_identity(model_file)
    except (MetadataError, ManifestError, OSError) as exc:  # half written, not ONNX, or not from `tlserve export`
        raise ModelDirError(f"{model_file} is not a complete model exported by `tlserve export`: {exc}") from None
    if not is_version_name(version):
        version = DEFAULT_VERSION
    versions = {version: VersionDir(single.root, file_signature(single.root))}
    return Scan(exists=True, models={single.name or name: versions})


def _versions(single: SingleModel, version_dirs: list[Path]) -> Scan:
    """``DIR/<version>/model.onnx``: a model folder; without --model-name, the newest version's manifest names it."""
    versions = {}
    for version_dir in version_dirs:
        try:
            versions[version_dir.name] = VersionDir(version_dir, file_signature(version_dir))
        except OSError:  # removed while we looked
            continue
    name = single.name
    if not name:
        newest = max(version_dirs, key=lambda p: int(p.name)) / MODEL_FILE
        try:
            name = embedded_identity(newest)[0]
        except (MetadataError, ManifestError, OSError) as exc:
            raise ModelDirError(
                f"{newest}: cannot read the model name from its embedded manifest ({exc}); pass --model-name"
            ) from None
    return Scan(exists=True, models={name: versions})


def scan_model_dir(single: SingleModel) -> Scan:
    """The one model in ``single.root`` as a repository scan (raises ModelDirError on any other layout)."""
    root = single.root
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ModelDirError(f"--model-dir {root} {what}: {EXPECTED}")
    version_dirs = sorted(
        p.parent for p in root.glob(f"*/{MODEL_FILE}") if is_version_name(p.parent.name) and p.parent.is_dir()
    )
    repository = scan(root)
    for name in IGNORED:
        repository.models.pop(name, None)
    found = []
    if (root / MODEL_FILE).exists():
        found.append(MODEL_FILE)
    if version_dirs:
        found.append(f"<version>/{MODEL_FILE} ({', '.join(p.name for p in version_dirs)})")
    if repository.models:
        found.append(f"<name>/<version>/{MODEL_FILE} ({', '.join(sorted(repository.models))})")
    if len(found) > 1:
        raise ModelDirError(f"--model-dir {root} holds several layouts at once: {' and '.join(found)}; {EXPECTED}")
    if (root / MODEL_FILE).exists():
        return _flat(single)
    if version_dirs:
        return _versions(single, version_dirs)
    if len(repository.models) > 1:
        raise ModelDirError(
            f"--model-dir {root} holds several models ({', '.join(sorted(repository.models))}): single-model mode "
            "serves one; point --model-dir at one of them, or serve them all with --repository"
        )
    if repository.models:
        ((name, versions),) = repository.models.items()
        return Scan(exists=True, models={single.name or name: versions}, skipped=repository.skipped)
    others = sorted(p.name for p in root.glob("*.onnx")) + sorted(p.name for p in root.glob("*/*.onnx"))
    hint = f" ({', '.join(others[:SHOWN])}: the model file must be named {MODEL_FILE})" if others else ""
    raise ModelDirError(f"--model-dir {root} holds no model{hint}: {EXPECTED}; found {_listing(root)}")
