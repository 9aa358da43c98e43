"""Export a checkpoint (or a stock torchvision classifier) to a verified, self-describing ONNX version.

``export_checkpoint`` is the Python API behind ``tlserve export``: load the model, trace the
serving graph, verify it against PyTorch on real images, embed the manifest, publish atomically.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from tlserve import __version__
from tlserve.export.graph import ServingGraph
from tlserve.export.metadata import embed_manifest, sidecar
from tlserve.export.publish import MANIFEST_FILE, MODEL_FILE, publish, resolve_version
from tlserve.export.samples import Samples, run_data
from tlserve.export.to_onnx import DEFAULT_OPSET, export_graph
from tlserve.export.verify import check_model, cpu_session, verify_parity
from tlserve.manifest import Manifest, Outputs
from tlserve.trainer.checkpoint import file_sha256, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """How to export; parsed once by the CLI (or given to the API) and passed down."""

    precision: str = "fp32"
    float_input: bool = False
    logits: bool = False
    data: str | None = None
    force: bool = False
    optimized: bool = False
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    verify_images: int = 64
    gate_images: int = 500
    calibration_images: int = 200


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A run directory means its ``checkpoint.pt``."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def serving_manifest(manifest: Manifest, options: ExportOptions) -> Manifest:
    """The manifest as the exported graph's signature makes it: input dtype and output names."""
    pre = manifest.preprocessing
    if options.float_input:
        pre = type(pre)(**{**pre.__dict__, "input_dtype": "float32", "normalize_in_graph": False})
    outputs = Outputs(logits="logits" if options.logits else None)
    return manifest.replace(preprocessing=pre, outputs=outputs)


def export_provenance(options: ExportOptions, source: dict[str, Any], samples: Samples,
                      verification: dict[str, Any]) -> dict[str, Any]:
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "exporter": f"torch.onnx ({options.exporter})", "opset": options.opset, "tlserve": __version__,
            "torch": torch.__version__, "onnx": onnx.__version__, **source,
            "verification": {"images": samples.source, **verification}}


def check_signature(path: Path, manifest: Manifest) -> None:
    """The published file, read back as the server reads it, must agree with its own manifest."""
    session = cpu_session(path)
    dtype = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}
    Manifest.from_metadata(session.get_modelmeta().custom_metadata_map).check_graph(
        [(i.name, i.shape, dtype.get(i.type, i.type)) for i in session.get_inputs()],
        [(o.name, o.shape) for o in session.get_outputs()])


def export_model(model: nn.Module, head_name: str, manifest: Manifest, repository: str | os.PathLike,
                 name: str | None, version: str | int, options: ExportOptions,
                 config: dict[str, Any] | None = None, source: dict[str, Any] | None = None) -> Path:
    """Trace, verify, embed and publish ``model``; returns the published model.onnx."""
    repository = Path(repository)
    name = name or manifest.name
    manifest = serving_manifest(manifest, options)
    graph = ServingGraph(model.eval(), head_name, manifest.preprocessing, uint8_input=not options.float_input,
                         with_logits=options.logits).eval()
    _, val = run_data(manifest, config or {}, options.data, options.verify_images)
    with tempfile.TemporaryDirectory(prefix="tlserve-export-") as work:
        work = Path(work)
        traced = export_graph(graph, manifest.preprocessing.input_size, work / "traced.onnx",
                              input_name=manifest.input_name, opset=options.opset, exporter=options.exporter)
        parity = verify_parity(work / "traced.onnx", graph, val.images)
        version = resolve_version(repository, name, version)
        provenance = {**manifest.provenance,
                      "export": export_provenance(options, source or {}, val, {"fp32": parity.to_dict()})}
        final = manifest.replace(name=name, version=version, precision="fp32", provenance=provenance)
        data = embed_manifest(traced, final).SerializeToString()
        (work / MODEL_FILE).write_bytes(data)
        check_model(work / MODEL_FILE)
        check_signature(work / MODEL_FILE, final)
        target = publish(repository, name, version, {MODEL_FILE: data, MANIFEST_FILE: sidecar(final)})
    return target / MODEL_FILE


def export_checkpoint(checkpoint: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                      version: str | int = "auto", precision: str = "fp32", **options: Any) -> Path:
    """Export a training checkpoint (or a run directory holding ``checkpoint.pt``) to
    ``repository/<name>/<version>/model.onnx`` and return that path. ``options`` are ExportOptions fields."""
    path = checkpoint_file(checkpoint)
    model, manifest, ckpt = load_model(path)
    source = {"source_checkpoint": str(path.resolve()), "source_sha256": file_sha256(path)}
    return export_model(model, model.head_name, manifest, repository, name, version,
                        ExportOptions(precision=precision, **options), ckpt.get("config", {}), source)
