"""Export folds the calibration temperature into the graph: probabilities = softmax(logits / T)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def session(calibrated_repository):
    path = calibrated_repository / "fashion" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(calibrated_checkpoint):
    """(uint8 demo test images, raw PyTorch logits, T) computed without the export's code."""
    from tlserve.export.samples import demo_split
    from tlserve.trainer.checkpoint import load_model
    from tlserve.trainer.transforms import normalize

    model, ckpt = load_model(calibrated_checkpoint)
    images = demo_split("test", ckpt.manifest, 64).images
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(images), ckpt.manifest.preprocessing)).numpy()
    return images, logits, ckpt.temperature


def test_onnx_probabilities_are_pytorch_softmax_of_logits_over_t(session, reference):
    images, logits, temperature = reference
    assert temperature == 2.5  # tests/conftest.py's CALIBRATION_TEMPERATURE
    probabilities, raw = session.run(["probabilities", "logits"], {"images": images})
    calibrated = torch.softmax(torch.from_numpy(logits) / temperature, 1).numpy()
    np.testing.assert_allclose(probabilities, calibrated, atol=1e-4)
    uncalibrated = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert np.abs(probabilities - uncalibrated).max() > 0.05  # the fold is really there
    assert (probabilities.argmax(1) == uncalibrated.argmax(1)).all()  # and top-1 never moves
    np.testing.assert_allclose(raw, logits, atol=1e-3)  # the logits output stays raw


def test_manifest_carries_the_calibration_and_parity_is_against_the_calibrated_output(
    session, calibrated_repository, calibrated_checkpoint, reference
):
    from tlserve.manifest import Manifest
    from tlserve.trainer import checkpoint

    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert manifest.calibration == checkpoint.load(calibrated_checkpoint).manifest.calibration
    assert manifest.calibration.temperature == reference[2]
    sidecar = json.loads((calibrated_repository / "fashion" / "1" / "manifest.json").read_text())
    assert sidecar["calibration"]["temperature"] == reference[2]
    parity = manifest.provenance["export"]["verification"]["model.onnx"]
    assert parity["max_abs_prob"] <= 1e-4 and parity["top1_agreement"] == 1.0


def test_an_uncalibrated_export_has_no_calibration_and_one_division_less(model_repository, calibrated_repository):
    import onnx

    from tlserve.manifest import Manifest

    path = model_repository / "fashion" / "1"
    assert "calibration" not in json.loads((path / "manifest.json").read_text())
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert Manifest.from_metadata(session.get_modelmeta().custom_metadata_map).calibration is None

    def divisions(root):
        return sum(n.op_type == "Div" for n in onnx.load(str(root / "fashion" / "1" / "model.onnx")).graph.node)

    assert divisions(calibrated_repository) == divisions(model_repository) + 1


def test_inspect_says_how_the_probabilities_are_calibrated(calibrated_repository, model_repository):
    from tlserve.export.inspect_model import describe, render

    text = render(describe(calibrated_repository / "fashion" / "1" / "model.onnx"))
    assert "calibration: temperature, probabilities = softmax(logits / 2.5000), ECE 0.1000 -> 0.0200 on val" in text
    assert "calibration: none" in render(describe(model_repository / "fashion" / "1" / "model.onnx"))
