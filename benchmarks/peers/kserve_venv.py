"""KServe's own virtual environment for the serving benchmark, at ``.bench/kserve-venv``: the pinned
``kserve`` plus exactly the ONNX Runtime and numpy distributions of the interpreter running the
benchmark, so that both servers run the same ORT. It is reused while its key (the pins and the
Python version) is unchanged, and rebuilt otherwise."""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

KSERVE_PIN = "kserve==0.21.*"
KEY_FILE = "tlserve-bench-key.txt"


def distribution_of(module: str) -> str:
    """The installed distribution that provides ``module`` (``onnxruntime`` comes as
    ``onnxruntime`` or ``onnxruntime-gpu``)."""
    names = importlib.metadata.packages_distributions().get(module, [])
    if not names:
        raise SystemExit(f"no installed distribution provides {module!r}")
    return names[0]


def pins() -> list[str]:
    """``kserve`` and this interpreter's ONNX Runtime and numpy, pinned exactly."""
    found = [distribution_of("onnxruntime"), distribution_of("numpy")]
    return [KSERVE_PIN, *(f"{name}=={importlib.metadata.version(name)}" for name in found)]


def venv_key(requirements: list[str], python: tuple[int, int]) -> str:
    """What the venv was built from: the Python version and the sorted requirements, one a line."""
    return "\n".join([f"python {python[0]}.{python[1]}", *sorted(requirements)]) + "\n"


def ensure_venv(root: Path) -> Path:
    """The venv's interpreter, building (or rebuilding) the venv at ``root`` when its key differs."""
    requirements = pins()
    key = venv_key(requirements, sys.version_info[:2])
    python = root / "bin" / "python"
    stamp = root / KEY_FILE
    if python.is_file() and stamp.is_file() and stamp.read_text() == key:
        return python
    log.info("building %s with %s (pip, a few minutes)", root, " ".join(requirements))
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    stamp.write_text(key)  # written last: an interrupted build is rebuilt next time
    return python
