"""`tlserve inspect MODEL.onnx`: the manifest, the graph's inputs and outputs, the opset and the size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from tlserve.export.metadata import read_manifest
from tlserve.manifest import Manifest


def dims(value_info: onnx.ValueInfoProto) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def dtype(value_info: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `tlserve inspect` prints, as data (the manifest is validated on the way)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": len(model.graph.node),
        "inputs": [(i.name, dtype(i), dims(i)) for i in model.graph.input],
        "outputs": [(o.name, dtype(o), dims(o)) for o in model.graph.output],
        "manifest": read_manifest(model),
    }


def calibration_line(manifest: Manifest) -> str:
    calibration = manifest.calibration
    if calibration is None:
        return "calibration: none (probabilities are the raw softmax)"
    line = f"calibration: {calibration.method}, probabilities = softmax(logits / {calibration.temperature:.4f})"
    if calibration.ece_before is not None and calibration.ece_after is not None:
        line += f", ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f} on {calibration.split}"
    return line


def render(info: dict[str, Any]) -> str:
    manifest = info["manifest"]
    pre = manifest.preprocessing
    lines = [
        f"{info['file']}: {info['size_bytes'] / 1e6:.2f} MB, {info['nodes']} nodes, ir {info['ir_version']}, "
        "opsets " + ", ".join(f"{k} {v}" for k, v in info["opsets"].items()),
        f"model {manifest.name} version {manifest.version}: {manifest.architecture}, {manifest.precision}, "
        f"{manifest.num_classes} labels ({', '.join(manifest.labels[:5])}"
        f"{', ...' if manifest.num_classes > 5 else ''})",
        f"preprocessing: resize {pre.resize_size} {pre.interpolation}, crop {pre.input_size}, "
        f"{pre.input_dtype} {pre.layout}, normalise in graph: {pre.normalize_in_graph}, mean {pre.mean}, "
        f"std {pre.std}",
    ]
    lines.append(calibration_line(manifest))
    lines += [f"input  {name}: {kind} {shape}" for name, kind, shape in info["inputs"]]
    lines += [f"output {name}: {kind} {shape}" for name, kind, shape in info["outputs"]]
    lines += ["manifest:", manifest.to_json(indent=2)]
    return "\n".join(lines)
