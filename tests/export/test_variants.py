"""Precision variants and options: int8 (gate passing, refusing, forced), fp16 + float input, logits, ORT copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.torch
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from tlserve.cli import main  # noqa: E402
from tlserve.manifest import Manifest  # noqa: E402


def load(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)


def demo_accuracy(session, manifest, count=300):
    from tlserve.export.samples import demo_split

    test = demo_split("test", manifest, count)
    inputs = test.images
    if manifest.preprocessing.input_dtype == "float32":
        mean = np.array(manifest.preprocessing.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.array(manifest.preprocessing.std, np.float32).reshape(1, 3, 1, 1)
        inputs = ((inputs / np.float32(255) - mean) / std).astype(np.float32)
    prob = session.run(["probabilities"], {"images": inputs})[0]
    return float((prob.argmax(1) == test.targets).mean())


EASY = ("Trouser", "Sneaker", "Bag")  # well-separated demo classes: int8 keeps their accuracy


def demo_folder(root, labels, per_class, train_image=None):
    """An ImageFolder run folder (train/ and val/) of demo images; ``train_image`` replaces every train image."""
    from tlserve.trainer.demo_data import folder_name, load_arrays

    arrays = load_arrays()
    names = [folder_name(str(label)) for label in arrays["labels"]]
    for label in labels:
        for split in ("train", "val"):
            (root / split / label).mkdir(parents=True)
            for n in np.flatnonzero(arrays[f"{split}_y"] == names.index(label))[: per_class[split]]:
                image = train_image if split == "train" and train_image is not None else arrays[f"{split}_x"][n]
                Image.fromarray(image).save(root / split / label / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def easy_run(tmp_path_factory, head_fitter):
    """A 3-class run (pretrained MobileNetV2, head fitted) whose checkpoint config points at its data folder."""
    from tlserve.export.samples import folder_splits
    from tlserve.manifest import Manifest
    from tlserve.trainer import checkpoint
    from tlserve.trainer.models import build_model
    from tlserve.trainer.preprocessing import preprocessing_for

    root = tmp_path_factory.mktemp("easy")
    data = demo_folder(root / "data", EASY, {"train": 100, "val": 50})
    pre = preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", 64)
    manifest = Manifest("easy", "0", "mobilenet_v2", sorted(EASY), pre)
    train, _ = folder_splits(data, manifest, {}, None, None)
    model, config = build_model("mobilenet_v2", len(EASY), weights="IMAGENET1K_V1")
    head_fitter(model.eval(), config.classifier, pre, train.images, train.targets)
    run = checkpoint.build(model, config, manifest, train_config={"data": str(data)})
    checkpoint.save(run, root / "checkpoint.pt")
    return root


@pytest.fixture(scope="module")
def int8_version(easy_run, tmp_path_factory):
    from tlserve.export.api import export_checkpoint

    return export_checkpoint(
        easy_run, tmp_path_factory.mktemp("int8"), precision="int8", optimized=True, logits=True
    ).parent


def test_int8_passes_the_gate_and_is_published(int8_version):
    session, manifest = load(int8_version / "model.onnx")
    assert manifest.precision == "int8" and manifest.outputs.logits == "logits"
    report = manifest.provenance["export"]["verification"]
    gate = report["model.onnx"]["gate"]
    assert report["images"].endswith("(val)")  # the run's own val split
    assert gate["drop_points"] <= 1.0 and not gate["forced"] and gate["images"] == 150
    assert gate["fp32_top1"] >= 0.9 and gate["speed_ratio"] > 0
    ops = {node.op_type for node in __import__("onnx").load(str(int8_version / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    print(f"int8 gate: {gate}")


def strings(value):
    """Every string inside a provenance value (keys and values, nested)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def test_provenance_holds_no_local_paths(int8_version, easy_run):
    """The checkpoint's config points at an absolute data folder; the published manifest names only basenames."""
    from tlserve.trainer import checkpoint

    assert Path(checkpoint.load(easy_run / "checkpoint.pt").config["data"]).is_absolute()
    for file_name in ("model.onnx", "model.ort.onnx"):
        _, manifest = load(int8_version / file_name)
        found = list(strings(manifest.provenance))
        assert not [s for s in found if s.startswith("/") or str(easy_run.parent) in s], found
        export = manifest.provenance["export"]
        assert export["source_checkpoint"] == f"{easy_run.name}/checkpoint.pt"
        assert export["verification"]["images"] == "data (val)"


def test_logits_output_and_ort_optimised_copy(int8_version):
    session, manifest = load(int8_version / "model.onnx")
    x = np.zeros((2, 3, 64, 64), np.uint8)
    prob, logits = session.run(["probabilities", "logits"], {"images": x})
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(prob, e / e.sum(1, keepdims=True), atol=1e-5)
    optimised, opt_manifest = load(int8_version / "model.ort.onnx")
    assert opt_manifest.precision == "int8"
    assert np.array_equal(optimised.run(["probabilities"], {"images": x})[0].argmax(1), prob.argmax(1))


@pytest.fixture(scope="module")
def bad_calibration_data(tmp_path_factory):
    """A run folder for the fashion model whose train split (the calibration set) is flat grey; val is real."""
    from tlserve.trainer.demo_data import folder_name, load_arrays

    labels = [folder_name(str(label)) for label in load_arrays()["labels"]]
    return demo_folder(
        tmp_path_factory.mktemp("bad-calibration"),
        labels,
        {"train": 2, "val": 20},
        train_image=np.full((28, 28), 128, np.uint8),
    )


def test_int8_gate_refuses_then_force_publishes(fashion_checkpoint, bad_calibration_data, tmp_path, capsys):
    args = [
        "export",
        str(fashion_checkpoint),
        "--repository",
        str(tmp_path),
        "--precision",
        "int8",
        "--data",
        str(bad_calibration_data),
        "--exporter",
        "torchscript",
    ]
    assert main(args) == 1
    assert "refusing" in capsys.readouterr().out
    assert not (tmp_path / "fashion").exists() or not any((tmp_path / "fashion").iterdir())
    assert main([*args, "--force"]) == 0
    _, manifest = load(tmp_path / "fashion" / "1" / "model.onnx")
    gate = manifest.provenance["export"]["verification"]["model.onnx"]["gate"]
    assert gate["forced"] and gate["drop_points"] > 1.0
    assert manifest.provenance["export"]["verification"]["images"].endswith("(val)")


def test_fp16_variant(export_version, tmp_path):
    version = export_version(tmp_path, precision="fp16").parent
    fp32, manifest = load(version / "model.onnx")
    fp16, manifest16 = load(version / "model.fp16.onnx")
    assert (manifest.precision, manifest16.precision) == ("fp32", "fp16")
    assert [i.type for i in fp16.get_inputs()] == ["tensor(uint8)"]  # I/O types kept
    assert {o.type for o in fp16.get_outputs()} == {"tensor(float)"}
    model = __import__("onnx").load(str(version / "model.fp16.onnx"))
    assert any(t.data_type == 10 for t in model.graph.initializer)  # float16 weights
    producers = {o: n for n in model.graph.node for o in n.output}
    for op in ("Softmax", "Sub", "Div"):  # blocked: they run in float32, behind casts
        node = next(n for n in model.graph.node if n.op_type == op)
        assert producers[node.input[0]].op_type == "Cast", op
    acc32, acc16 = demo_accuracy(fp32, manifest), demo_accuracy(fp16, manifest16)
    assert abs(acc32 - acc16) <= 0.01
    report = manifest.provenance["export"]["verification"]["model.fp16.onnx"]
    assert report["decisive_agreement"] >= 0.98 and report["top1_agreement"] >= 0.95
    print(f"fp16 on CPU: accuracy fp32 {acc32:.4f} fp16 {acc16:.4f}; parity {report}")


def test_float_input_graph(export_version, tmp_path):
    session, manifest = load(export_version(tmp_path, float_input=True, exporter="torchscript"))
    assert manifest.preprocessing.input_dtype == "float32" and not manifest.preprocessing.normalize_in_graph
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert manifest.provenance["export"]["verification"]["model.onnx"]["max_abs_prob"] <= 1e-4
    assert demo_accuracy(session, manifest) >= 0.6
