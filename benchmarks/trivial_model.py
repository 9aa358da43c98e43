"""A model repository holding a trivial ONNX graph with a real model's signature, so a serving
benchmark measures the front end (transport, decode, batching) and not the network.

``images`` uint8 [N, 3, S, S] -> per-channel mean [N, 3] as ``embedding`` -> one MatMul to
``classes`` scores -> ``probabilities`` (softmax) [N, classes]; the manifest is written into the
file as ``tlserve export`` writes it. It runs in microseconds per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_trivial(root: Path, name: str = "trivial", size: int = 224, classes: int = 1000) -> Path:
    """``root/name/1/model.onnx`` (returns ``root``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tlserve.manifest import METADATA_KEY, Manifest, Preprocessing

    manifest = Manifest(
        name=name,
        version="1",
        architecture="trivial",
        labels=[f"class {i}" for i in range(classes)],
        preprocessing=Preprocessing(input_size=size, resize_size=round(size * 256 / 224)),
    )
    weights = np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32) / 64
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels", "axes"], ["embedding"], keepdims=0),
            helper.make_node("MatMul", ["embedding", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "trivial",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {METADATA_KEY: manifest.to_json()})
    onnx.checker.check_model(model)
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version / "model.onnx"))
    (version / "manifest.json").write_text(manifest.to_json(indent=2))
    return root
