"""A calibrated export served through gRPC: the scores callers threshold are the calibrated ones."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from serving_helpers import MODEL, PHOTOS, photo_bytes, photo_path

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

pytestmark = pytest.mark.torch


def test_served_top1_score_is_the_calibrated_one_not_the_raw_one(
    calibrated_repository, calibrated_checkpoint, make_server, tmp_path
):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from tlserve.trainer.checkpoint import load_model
    from tlserve.trainer.transforms import EvalTransform, normalize

    shutil.copytree(calibrated_repository / MODEL, tmp_path / MODEL)
    server = make_server(tmp_path)  # the trainer's pixels (no --fast-decode), so the scores compare to 1e-4
    model, ckpt = load_model(calibrated_checkpoint)
    pre, temperature = ckpt.manifest.preprocessing, ckpt.temperature
    batch = np.stack([EvalTransform(pre)(Image.open(photo_path(name))).numpy() for name in PHOTOS])
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(batch), pre))
    calibrated, raw = torch.softmax(logits / temperature, 1).numpy(), torch.softmax(logits, 1).numpy()

    request = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes(name)) for name in PHOTOS], top_k=1)
    response = server.stub.Classify(request, timeout=60)
    for result, want, unscaled in zip(response.results, calibrated, raw):
        (top,) = result.predictions
        assert top.index == int(want.argmax()) == int(unscaled.argmax())
        assert top.score == pytest.approx(float(want.max()), abs=1e-4)
        assert abs(top.score - float(unscaled.max())) > 0.01
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name=MODEL)), timeout=10)
    assert '"calibration"' in info.manifest_json and info.ready
