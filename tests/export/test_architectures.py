"""Other graphs: inception_v3 at 299 px (no pretrained weights offline) and the stock ImageNet MobileNetV2."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from tlserve.manifest import Manifest  # noqa: E402


def load(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)


def test_inception_v3_at_299_exports_and_verifies(tmp_path):
    import torch

    from tlserve.export.api import export_checkpoint
    from tlserve.trainer import checkpoint
    from tlserve.trainer.models import build_model
    from tlserve.trainer.preprocessing import preprocessing_for

    torch.manual_seed(0)
    model, config = build_model("inception_v3", 3, weights=None)
    pre = preprocessing_for("inception_v3", None)
    assert pre.input_size == 299
    manifest = Manifest("flowers", "0", "inception_v3", ["daisy", "rose", "tulip"], pre)
    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.save(checkpoint.build(model, config, manifest), ckpt)
    path = export_checkpoint(ckpt, tmp_path / "models", verify_images=16)
    assert path == tmp_path / "models" / "flowers" / "1" / "model.onnx"
    session, got = load(path)
    assert [i.shape[1:] for i in session.get_inputs()] == [[3, 299, 299]]
    assert {o.name: o.shape[1] for o in session.get_outputs()} == {"probabilities": 3, "embedding": 2048}
    parity = got.provenance["export"]["verification"]["model.onnx"]
    assert parity["max_abs_prob"] <= 1e-4 and parity["top1_agreement"] == 1.0
    print(f"inception_v3 parity: {parity}")


@pytest.fixture(scope="module")
def stock_mobilenet(tmp_path_factory) -> Path:
    from tlserve.cli import main

    repo = tmp_path_factory.mktemp("stock")
    assert main(["export", "--pretrained", "mobilenet_v2", "--repository", str(repo)]) == 0
    return repo / "mobilenet_v2" / "1" / "model.onnx"


@pytest.mark.parametrize("photo, expected", [("chelsea.png", "cat"), ("coffee.png", "espresso")])
def test_stock_imagenet_export_classifies_photos(stock_mobilenet, photo, expected):
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    from tlserve.export.samples import preprocess

    session, manifest = load(stock_mobilenet)
    assert manifest.num_classes == 1000 and manifest.preprocessing.input_size == 224
    assert manifest.preprocessing.resize_size == 256 and manifest.provenance["strategy"] == "pretrained"
    with Image.open(Path(skimage.__file__).parent / "data" / photo) as img:
        x = preprocess([img.convert("RGB")], manifest.preprocessing)
    prob = session.run(["probabilities"], {"images": x})[0][0]
    top = manifest.labels[int(prob.argmax())]
    assert expected in top.lower(), (top, float(prob.max()))
    print(f"{photo}: {top} ({prob.max():.2f})")


def test_inspect_prints_manifest_and_signature(stock_mobilenet, capsys):
    from tlserve.cli import main

    assert main(["inspect", str(stock_mobilenet)]) == 0
    out = capsys.readouterr().out
    assert "model mobilenet_v2 version 1: mobilenet_v2, fp32, 1000 labels (tench" in out
    assert "input  images: uint8 ['batch', 3, 224, 224]" in out
    assert "output probabilities: float32 ['batch', 1000]" in out and "opsets ai.onnx 18" in out
    assert '"source_sha256": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"' in out
