"""Torch files on disk: written atomically, read back with ``weights_only`` so that no pickle runs code.

``torch.load(weights_only=True)`` rebuilds only tensors and plain data (dicts, lists, tuples,
strings, numbers); a file holding any other object is refused before that object is created.
What we save is therefore plain: :func:`plain` turns dataclasses, paths and numpy values into
those types first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A file that is not a tlserve checkpoint (or state_dict), or not one that loads safely."""


def plain(value: Any) -> Any:
    """``value`` as types ``weights_only`` loading accepts: dataclasses become dicts, paths strings,
    numpy values Python numbers and lists, subclasses of str/int/float (``torch.__version__``) their
    base type; tensors and plain data pass unchanged."""
    if value is None or isinstance(value, (bool, torch.Tensor)):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple):  # named tuples too
        return tuple(plain(item) for item in value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file it refuses raises CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not a tlserve checkpoint: refused as an unsafe pickle (it holds objects other than "
            "tensors and plain data, and loading those could run code); nothing in it was loaded"
        ) from None
    except Exception as exc:  # torch.load raises KeyError, RuntimeError, struct.error... on a non-torch file
        raise CheckpointError(f"{path} is not a tlserve checkpoint: unreadable as a torch file ({exc!r})") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
