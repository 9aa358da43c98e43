"""Checkpoints: one typed :class:`Checkpoint`, built, saved and loaded here and nowhere else.

``checkpoint.pt`` (the best epoch) is a ``torch.save`` of plain data, so that it loads with
``weights_only=True``: ``format`` (= CHECKPOINT_FORMAT), ``model`` (the :class:`ModelConfig`:
arch, num_classes, the classifier's and first layer's dotted names, head spec, dropout,
image_size), ``model_state`` (the full state_dict, new head included), ``manifest``
(``Manifest.to_dict()``), the training extras ``epoch`` and ``config`` (the run's TrainConfig), and
``temperature``: the calibration temperature export folds into the graph (absent or None when the
run was not calibrated; it always equals the manifest's ``calibration.temperature``).
Format 1 files (arch/head/dropout/image_size at the top level, no names) still load: their
names come from building the architecture. The run's ``last.pt`` (``save_resume``) carries what
``--resume`` needs: model, optimiser, schedule, EMA and loop state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tlserve.manifest import Manifest, ManifestError
from tlserve.trainer.models import ModelConfig, build_model
from tlserve.trainer.torchfile import CheckpointError, atomic_save, plain, safe_load

CHECKPOINT_FORMAT = "tlserve.checkpoint/2"
FORMAT_1 = "tlserve.checkpoint/1"
RESUME_KIND = "last"


@dataclass(frozen=True)
class Checkpoint:
    """A trained model: how to build it, its weights, its manifest, and what training adds."""

    model: ModelConfig
    manifest: Manifest
    model_state: Mapping[str, torch.Tensor]
    epoch: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # the run's TrainConfig; export finds its data there
    temperature: float | None = None  # calibration: served probabilities are softmax(logits / temperature)

    def __post_init__(self) -> None:
        calibrated = self.manifest.calibration.temperature if self.manifest.calibration else None
        if self.temperature != calibrated:
            raise ValueError(f"temperature {self.temperature} disagrees with the manifest's calibration {calibrated}")

    def replace(self, **changes: Any) -> Checkpoint:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """What ``torch.save`` writes: tensors and plain data only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": plain(self.model),
            "model_state": self.model_state,
            "manifest": plain(self.manifest.to_dict()),
            "epoch": self.epoch,
            "config": plain(self.config),
            "temperature": self.temperature,
        }


def build(
    model: nn.Module,
    config: ModelConfig,
    manifest: Manifest,
    *,
    epoch: int | None = None,
    train_config: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint of ``model``, which ``build_model`` made together with ``config``; its temperature is
    the manifest's calibration's (None when uncalibrated)."""
    if config.num_classes != manifest.num_classes:
        raise ValueError(f"the model has {config.num_classes} classes, its manifest {manifest.num_classes} labels")
    temperature = manifest.calibration.temperature if manifest.calibration else None
    return Checkpoint(config, manifest, model.state_dict(), epoch, dict(train_config or {}), temperature)


def save(checkpoint: Checkpoint, path: str | os.PathLike) -> None:
    atomic_save(checkpoint.to_dict(), path)


def _format_1_config(data: Mapping[str, Any], manifest: Manifest) -> ModelConfig:
    _, config = build_model(
        data["arch"],
        manifest.num_classes,
        None,
        data.get("head", "linear"),
        data.get("dropout", 0.0),
        data.get("image_size"),
    )
    return config


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint (weights_only: a file holding other objects is refused, never unpickled)."""
    data = safe_load(path)
    if not isinstance(data, dict) or data.get("format") not in (CHECKPOINT_FORMAT, FORMAT_1) or "kind" in data:
        raise CheckpointError(f"{path} is not a tlserve checkpoint (expected format {CHECKPOINT_FORMAT})")
    try:
        manifest = Manifest.from_dict(data["manifest"])
        config = (
            ModelConfig(**data["model"]) if data["format"] == CHECKPOINT_FORMAT else _format_1_config(data, manifest)
        )
        return Checkpoint(
            config, manifest, data["model_state"], data.get("epoch"), data.get("config") or {}, data.get("temperature")
        )
    except (KeyError, TypeError, ValueError, ManifestError) as exc:
        raise CheckpointError(f"{path} is not a valid tlserve checkpoint ({type(exc).__name__}: {exc})") from None


def load_model(path: str | os.PathLike) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model (eval mode, CPU) from a checkpoint; returns (model, checkpoint)."""
    checkpoint = load(path)
    config = checkpoint.model
    model, built = build_model(config.arch, config.num_classes, None, config.head, config.dropout, config.image_size)
    if built != config:
        raise CheckpointError(f"{path}: its model config {config} is not what {config.arch} builds ({built})")
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit {config.arch}: {exc}") from None
    return model.eval(), checkpoint


def save_resume(resume: Mapping[str, Any], auto: Mapping[str, Any] | None, path: str | os.PathLike) -> None:
    """``last.pt``: fit's resume state (``EpochEnd.resume``) and the auto strategy's evidence."""
    body = {**resume, "state": plain(resume["state"]), "auto": plain(auto)}
    atomic_save({"format": CHECKPOINT_FORMAT, "kind": RESUME_KIND, **body}, path)


def load_resume(path: str | os.PathLike) -> dict[str, Any]:
    data = safe_load(path)
    formats = (CHECKPOINT_FORMAT, FORMAT_1)
    if not isinstance(data, dict) or data.get("format") not in formats or data.get("kind") != RESUME_KIND:
        raise CheckpointError(f"{path} is not a tlserve resume file (last.pt)")
    return data
