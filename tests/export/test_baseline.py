"""The drift baseline export writes into the manifest: what ONNX Runtime predicts on the validation split."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def session(model_repository):
    path = model_repository / "fashion" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_baseline_is_the_served_graphs_confidence_on_the_validation_split(session):
    from tlserve.export.samples import demo_split
    from tlserve.manifest import BASELINE_QUANTILES, Manifest

    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    baseline = manifest.baseline
    assert baseline is not None and baseline.split == "demo data (val)"
    val = demo_split("val", manifest, None)  # the demo data's whole val split: 500 images
    assert baseline.images == len(val) == 500
    prob = session.run(["probabilities"], {"images": val.images})[0]
    top1 = prob.max(1)
    assert list(baseline.quantiles) == list(BASELINE_QUANTILES)
    for quantile, value in baseline.quantiles.items():
        assert value == pytest.approx(np.quantile(top1, float(quantile)), abs=1e-5), quantile
    shares = np.bincount(prob.argmax(1), minlength=manifest.num_classes) / len(val)
    assert baseline.class_share == pytest.approx(dict(zip(manifest.labels, shares)), abs=1e-6)
    # a fine-tuned classifier on its own validation images: confident for most, less so for a tail
    assert baseline.quantiles["0.1"] < baseline.quantiles["0.5"] < baseline.quantiles["0.9"] <= 1.0


def test_summary_of_known_probabilities():
    from tlserve.export.baseline import summarize

    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.5, 0.5]], np.float32)
    baseline = summarize(prob, ("a", "b"), "toy (val)")
    assert baseline.images == 5
    assert baseline.quantiles["0.5"] == pytest.approx(0.7)  # top-1 values 0.5 0.6 0.7 0.8 0.9
    assert baseline.quantiles["0.05"] == pytest.approx(0.52)
    assert baseline.class_share == {"a": 0.6, "b": 0.4}  # the tie 0.5/0.5 goes to the lower index


def test_unlabelled_images_give_no_baseline(model_repository):
    from tlserve.export.baseline import confidence_baseline
    from tlserve.export.samples import Samples

    photos = Samples(np.zeros((3, 3, 64, 64), np.uint8), None, "photos")
    path = model_repository / "fashion" / "1" / "model.onnx"
    assert confidence_baseline(path, None, photos, ("a", "b")) is None
