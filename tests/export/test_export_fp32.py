"""fp32 export: parity with PyTorch and the manifest round trip, on the session's exported model."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def published(model_repository):
    return model_repository / "fashion" / "1"


@pytest.fixture(scope="module")
def session(published):
    return ort.InferenceSession(str(published / "model.onnx"), providers=["CPUExecutionProvider"])


def test_graph_signature(session):
    import onnx

    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [3, 64, 64])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert {o.name: o.shape[1] for o in session.get_outputs()} == {"probabilities": 10, "embedding": 1280}
    opset = {o.domain: o.version for o in onnx.load(session._model_path).opset_import}[""]
    assert opset >= 17


def test_manifest_round_trip(session, published, fashion_checkpoint):
    from tlserve.manifest import Manifest
    from tlserve.trainer import checkpoint
    from tlserve.trainer.torchfile import file_sha256

    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    trained = checkpoint.load(fashion_checkpoint).manifest
    assert (manifest.name, manifest.version, manifest.precision) == ("fashion", "1", "fp32")
    assert manifest.labels == trained.labels and manifest.preprocessing == trained.preprocessing
    assert manifest.provenance["strategy"] == trained.provenance["strategy"]
    export = manifest.provenance["export"]
    assert export["source_sha256"] == file_sha256(fashion_checkpoint)
    assert export["source_checkpoint"] == f"{fashion_checkpoint.parent.name}/checkpoint.pt"  # no local path
    assert export["created"].startswith("20")
    assert Manifest.from_json((published / "manifest.json").read_text()) == manifest
    assert json.loads((published / "manifest.json").read_text())["version"] == "1"


def test_recorded_parity_meets_fp32_limits(session):
    from tlserve.manifest import Manifest

    parity = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map).provenance["export"]["verification"][
        "model.onnx"
    ]
    assert parity["max_abs_prob"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert len(parity["batch_sizes"]) >= 3 and parity["images"] >= 32


def test_parity_with_pytorch_on_real_photos(session, fashion_checkpoint):
    """Independent of export's own check: photos the verification never saw, odd batch sizes."""
    import torch

    from tlserve.export.graph import ServingGraph
    from tlserve.export.samples import photos
    from tlserve.trainer.checkpoint import load_model

    model, ckpt = load_model(fashion_checkpoint)
    images = photos(ckpt.manifest.preprocessing).images
    assert len(images) >= 5
    graph = ServingGraph(model, ckpt.model.classifier, ckpt.manifest.preprocessing).eval()
    with torch.no_grad():
        ref_prob, ref_emb = (t.numpy() for t in graph(torch.from_numpy(images)))
    for batch in (1, 3, len(images)):
        out = [session.run(None, {"images": images[i : i + batch]}) for i in range(0, len(images), batch)]
        prob = np.concatenate([o[0] for o in out])
        emb = np.concatenate([o[1] for o in out])
        assert np.abs(prob - ref_prob).max() <= 1e-4
        assert np.abs(emb - ref_emb).max() <= 1e-3 * max(1.0, np.abs(ref_emb).max())
        assert (prob.argmax(1) == ref_prob.argmax(1)).all()


def test_predicts_demo_test_images(session):
    from tlserve.export.samples import demo_split
    from tlserve.manifest import Manifest

    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    test = demo_split("test", manifest, 300)
    prob = session.run(["probabilities"], {"images": test.images})[0]
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    assert (prob.argmax(1) == test.targets).mean() >= 0.6
