"""Checkpoint files: written atomically, read back into a model plus its manifest.

A checkpoint (``checkpoint.pt``, the best epoch) is a ``torch.save`` dict with at least:
``format`` (= CHECKPOINT_FORMAT), ``arch``, ``head``, ``dropout``, ``image_size`` (optional; ViT
builders need it), ``model_state`` (the full model's state_dict, new head included) and
``manifest`` (``Manifest.to_dict()``); training adds ``epoch`` and ``config``. The run's
``last.pt`` carries what ``--resume`` needs (model, optimiser, schedule, EMA, loop state).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlserve.manifest import Manifest
from tlserve.trainer.models import build_model

CHECKPOINT_FORMAT = "tlserve.checkpoint/1"


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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a tlserve checkpoint (expected format {CHECKPOINT_FORMAT})")
    return ckpt


def load_model(path: str | os.PathLike) -> tuple[nn.Module, Manifest, dict[str, Any]]:
    """Rebuild the model (eval mode, CPU) from a checkpoint; returns (model, manifest, checkpoint)."""
    ckpt = read_checkpoint(path)
    manifest = Manifest.from_dict(ckpt["manifest"])
    model = build_model(
        ckpt["arch"],
        manifest.num_classes,
        weights=None,
        head=ckpt.get("head", "linear"),
        dropout=ckpt.get("dropout", 0.0),
        image_size=ckpt.get("image_size"),
    )
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), manifest, ckpt
