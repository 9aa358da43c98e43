"""Shared fixtures: a real model, fine-tuned and exported by our own export, for every part's tests.

- ``fashion_checkpoint`` (session): Path of a run directory's ``checkpoint.pt`` in the trainer's
  format: ImageNet-pretrained MobileNetV2 with a new 10-class head (the demo data's Fashion-MNIST
  labels, folder-name spelling: "T-shirt_top", "Trouser", ...), 64 px input, the head fitted for a
  few seconds on the demo train split (backbone frozen). Demo test accuracy is about 0.75.
- ``model_repository`` (session): Path of a model repository holding ``fashion/1/model.onnx`` and
  ``fashion/1/manifest.json``, exported from that checkpoint by ``export_checkpoint``. Treat it as
  read-only: copy a version folder elsewhere before changing anything.
- ``export_version`` (session): ``export_version(repository, name="fashion", version="auto",
  **options) -> Path`` exports the same checkpoint again into ``repository`` and returns the new
  ``model.onnx`` (``options`` are ExportOptions fields, e.g. ``logits=True``). Each call takes
  tens of seconds on 2 cores: prefer copying ``fashion/1`` when a plain copy will do.

- ``calibrated_checkpoint`` (session): the same run with a calibration temperature of
  :data:`CALIBRATION_TEMPERATURE` in its checkpoint and manifest (as ``tlserve train`` writes it).
- ``calibrated_repository`` (session): a repository holding ``fashion/1`` exported from it with
  ``logits=True``: ``probabilities`` are ``softmax(logits / T)``, ``logits`` the raw ones.

- ``head_fitter`` (session): ``fit_head(model, head, preprocessing, uint8_images, targets)``, fits a
  ``build_model`` model's new head (``head`` = its ``ModelConfig.classifier``) in place on
  frozen-backbone embeddings (a few seconds).

All of them skip cleanly when torch is not installed (a serve-only install).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

MODEL_NAME = "fashion"
INPUT_SIZE = 64
CALIBRATION_TEMPERATURE = 2.5  # far from 1, so calibrated and raw scores differ plainly


def fit_head(model, head_name, pre, images, targets, steps: int = 150) -> None:
    """Fit ``model``'s new head (``head_name``) on frozen-backbone embeddings of uint8 NCHW ``images``
    (full batch, Adam)."""
    import torch

    from tlserve.export.graph import split_head
    from tlserve.trainer.transforms import normalize

    torch.manual_seed(0)
    body, _ = split_head(model, head_name)
    with torch.no_grad():
        x = torch.from_numpy(images)
        embeddings = torch.cat([torch.flatten(body(normalize(x[i : i + 250], pre)), 1) for i in range(0, len(x), 250)])
    head = model.get_submodule(head_name)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-4)
    y = torch.from_numpy(targets)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(head(embeddings), y).backward()
        optimiser.step()


@pytest.fixture(scope="session")
def head_fitter() -> Callable[..., None]:
    """``fit_head(model, head, preprocessing, uint8_images, targets)``: fit the new head in place."""
    pytest.importorskip("torch")
    return fit_head


@pytest.fixture(scope="session")
def fashion_checkpoint(tmp_path_factory) -> Path:
    """A run directory's checkpoint.pt: pretrained MobileNetV2, new 10-class head fitted on the demo data."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from tlserve.export.samples import demo_split
    from tlserve.manifest import Manifest
    from tlserve.trainer import checkpoint
    from tlserve.trainer.demo_data import folder_name, load_arrays
    from tlserve.trainer.models import build_model
    from tlserve.trainer.preprocessing import preprocessing_for

    labels = [folder_name(str(label)) for label in load_arrays()["labels"]]
    pre = preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", INPUT_SIZE)
    manifest = Manifest(
        MODEL_NAME,
        "0",
        "mobilenet_v2",
        labels,
        pre,
        provenance={
            "strategy": "linear_probe",
            "weights": "IMAGENET1K_V1",
            "dataset": {"path": "embedded demo data", "train": 2000},
        },
    )
    model, config = build_model("mobilenet_v2", len(labels), weights="IMAGENET1K_V1")
    train = demo_split("train", manifest, None)
    fit_head(model.eval(), config.classifier, pre, train.images, train.targets)
    path = tmp_path_factory.mktemp("fashion-run") / "checkpoint.pt"
    checkpoint.save(checkpoint.build(model, config, manifest), path)
    return path


@pytest.fixture(scope="session")
def export_version(fashion_checkpoint) -> Callable[..., Path]:
    """``export_version(repository, name="fashion", version="auto", **options) -> Path`` of the new model.onnx."""
    from tlserve.export.api import export_checkpoint

    def export(repository, name: str = MODEL_NAME, version: str = "auto", **options) -> Path:
        return export_checkpoint(fashion_checkpoint, repository, name=name, version=version, **options)

    return export


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, export_version) -> Path:
    """A model repository holding ``fashion/1/model.onnx`` (+ manifest.json); read-only for tests."""
    root = tmp_path_factory.mktemp("models")
    export_version(root, version="1")
    return root


@pytest.fixture(scope="session")
def calibrated_checkpoint(fashion_checkpoint, tmp_path_factory) -> Path:
    """``fashion_checkpoint`` calibrated with T = CALIBRATION_TEMPERATURE (checkpoint and manifest)."""
    from tlserve.manifest import Calibration
    from tlserve.trainer import checkpoint

    ckpt = checkpoint.load(fashion_checkpoint)
    calibration = Calibration(temperature=CALIBRATION_TEMPERATURE, ece_before=0.1, ece_after=0.02)
    path = tmp_path_factory.mktemp("calibrated-run") / "checkpoint.pt"
    checkpoint.save(
        ckpt.replace(manifest=ckpt.manifest.replace(calibration=calibration), temperature=CALIBRATION_TEMPERATURE),
        path,
    )
    return path


@pytest.fixture(scope="session")
def calibrated_repository(calibrated_checkpoint, tmp_path_factory) -> Path:
    """A repository holding ``fashion/1`` exported (with a logits output) from the calibrated checkpoint."""
    from tlserve.export.api import export_checkpoint

    root = tmp_path_factory.mktemp("calibrated-models")
    export_checkpoint(calibrated_checkpoint, root, name=MODEL_NAME, version="1", logits=True)
    return root
