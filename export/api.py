"""Export a checkpoint (or a stock torchvision classifier) to a verified, self-describing ONNX version.

``export_checkpoint`` is the Python API behind ``tlserve export``: load the model, trace the
serving graph, verify it against PyTorch on real images, embed the manifest, publish atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from tlserve import __version__
from tlserve.contract import MANIFEST_FILE, MODEL_FILE, ORT_DTYPES
from tlserve.export.baseline import confidence_baseline
from tlserve.export.graph import DEFAULT_OUTPUTS, EMBEDDING, LOGITS, ServingGraph, output_selection
from tlserve.export.metadata import embed_manifest, sidecar
from tlserve.export.publish import publish, resolve_version
from tlserve.export.samples import run_data
from tlserve.export.to_onnx import DEFAULT_OPSET, export_graph
from tlserve.export.variants import Variant, build_variants
from tlserve.export.verify import check_model, cpu_session
from tlserve.manifest import PRECISIONS, Manifest, Outputs, Preprocessing
from tlserve.trainer.checkpoint import load_model
from tlserve.trainer.torchfile import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """How to export; parsed once by the CLI (or given to the API) and passed down."""

    precision: str = "fp32"
    float_input: bool = False
    outputs: str | tuple[str, ...] = DEFAULT_OUTPUTS  # see graph.output_selection; "probabilities" is required
    logits: bool = False  # add "logits" to ``outputs`` (the older spelling of --outputs ...,logits)
    data: str | None = None
    force: bool = False
    optimized: bool = False
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    verify_images: int = 64
    gate_images: int = 500
    calibration_images: int = 200
    baseline_images: int = 500  # labelled validation images behind the manifest's confidence baseline


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A run directory means its ``checkpoint.pt``."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def graph_outputs(options: ExportOptions) -> tuple[str, ...]:
    """The graph's outputs, in graph order: ``options.outputs``, plus ``logits`` when ``options.logits``."""
    chosen = output_selection(options.outputs)
    return output_selection((*chosen, LOGITS)) if options.logits and LOGITS not in chosen else chosen


def serving_manifest(manifest: Manifest, options: ExportOptions) -> Manifest:
    """The manifest as the exported graph's signature makes it: input dtype and output names."""
    pre = manifest.preprocessing
    if options.float_input:
        pre = dataclasses.replace(pre, input_dtype="float32", normalize_in_graph=False)
    chosen = graph_outputs(options)
    outputs = Outputs(embedding=EMBEDDING if EMBEDDING in chosen else None, logits=LOGITS if LOGITS in chosen else None)
    return manifest.replace(preprocessing=pre, outputs=outputs)


def export_provenance(options: ExportOptions, source: dict[str, Any], verification: dict[str, Any]) -> dict[str, Any]:
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": f"torch.onnx ({options.exporter})",
        "opset": options.opset,
        "tlserve": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        **source,
        "verification": verification,
    }


def check_signature(path: Path, manifest: Manifest) -> None:
    """The published file, read back as the server reads it, must agree with its own manifest."""
    session = cpu_session(path)
    Manifest.from_metadata(session.get_modelmeta().custom_metadata_map).check_graph(
        [(i.name, i.shape, ORT_DTYPES.get(i.type, i.type)) for i in session.get_inputs()],
        [(o.name, o.shape) for o in session.get_outputs()],
    )


def export_model(
    model: nn.Module,
    head_name: str,
    manifest: Manifest,
    repository: str | os.PathLike,
    name: str | None,
    version: str | int,
    options: ExportOptions,
    config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Trace, verify, embed and publish ``model``; returns the published model.onnx. The manifest's
    calibration temperature, when it has one, is folded into the graph (and so into the parity reference)."""
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {options.precision!r}")
    repository = Path(repository)
    name = name or manifest.name
    resolve_version(repository, name, version)  # fail fast on an existing version, before any work
    manifest = serving_manifest(manifest, options)
    temperature = manifest.calibration.temperature if manifest.calibration else None
    graph = ServingGraph(
        model.eval(),
        head_name,
        manifest.preprocessing,
        uint8_input=not options.float_input,
        outputs=graph_outputs(options),
        temperature=temperature,
    ).eval()
    if temperature is not None:
        log.info(
            "folding the calibration temperature %.4f into the graph: probabilities = softmax(logits / T)", temperature
        )
    gate = options.gate_images if options.precision == "int8" else options.verify_images
    calibration, val = run_data(
        manifest,
        config or {},
        options.data,
        max(gate, options.verify_images),
        options.calibration_images,
        labelled_limit=options.baseline_images,
    )
    with tempfile.TemporaryDirectory(prefix="tlserve-export-") as work:
        traced = Path(work) / "traced.onnx"
        export_graph(
            graph,
            manifest.preprocessing.input_size,
            traced,
            input_name=manifest.input_name,
            opset=options.opset,
            exporter=options.exporter,
        )
        variants = build_variants(
            traced,
            graph,
            val.subset(options.verify_images),
            val,
            calibration,
            options.precision,
            options.optimized,
            options.force,
            manifest.input_name,
        )
        version = resolve_version(repository, name, version)
        verification = {"images": val.source, **{v.file_name: v.verification for v in variants}}
        provenance = {**manifest.provenance, "export": export_provenance(options, source or {}, verification)}
        baseline = confidence_baseline(variants[0].path, graph, val, manifest.labels)
        base = manifest.replace(name=name, version=version, provenance=provenance, baseline=baseline)
        files = {v.file_name: sealed(v, base.replace(precision=v.precision)) for v in variants}
        files[MANIFEST_FILE] = sidecar(base.replace(precision=variants[0].precision))
        target = publish(repository, name, version, files)
    return target / MODEL_FILE


def sealed(variant: Variant, manifest: Manifest) -> bytes:
    """The variant's bytes with its manifest embedded, checked again exactly as they will be published."""
    data = embed_manifest(onnx.load(str(variant.path)), manifest).SerializeToString()
    variant.path.write_bytes(data)
    check_model(variant.path)
    check_signature(variant.path, manifest)
    return data


def export_checkpoint(
    checkpoint: str | os.PathLike,
    repository: str | os.PathLike,
    name: str | None = None,
    version: str | int = "auto",
    precision: str = "fp32",
    **options: Any,
) -> Path:
    """Export a training checkpoint (or a run directory holding ``checkpoint.pt``) to
    ``repository/<name>/<version>/model.onnx`` and return that path. ``options`` are ExportOptions fields."""
    path = checkpoint_file(checkpoint)
    model, ckpt = load_model(path)
    return export_model(
        model,
        ckpt.model.classifier,
        ckpt.manifest,
        repository,
        name,
        version,
        ExportOptions(precision=precision, **options),
        dict(ckpt.config),
        {"source_checkpoint": run_relative(path), "source_sha256": file_sha256(path)},
    )


def run_relative(path: Path) -> str:
    """``<run folder name>/<file name>``: names the checkpoint without a local absolute path."""
    path = path.resolve()
    return f"{path.parent.name}/{path.name}"


def unique_labels(categories: list[str]) -> list[str]:
    """ImageNet's category names repeat twice ("crane", "maillot"); later repeats get their class index."""
    seen: set[str] = set()
    labels = []
    for index, label in enumerate(categories):
        labels.append(label if label not in seen else f"{label} ({index})")
        seen.add(label)
    return labels


def cached_weights(arch: str):
    """The arch's DEFAULT weights, unless only another member's file is in the torch hub cache (an
    air-gapped machine with a pre-filled cache): then that one, so no download is attempted."""
    from torchvision import models as tvm

    enum = tvm.get_model_weights(arch)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = [member for member in enum if (cache / os.path.basename(member.url)).is_file()]
    if enum.DEFAULT in cached or not cached:
        return enum.DEFAULT
    log.info("%s: DEFAULT weights are not cached, using the cached %s", arch, cached[0].name)
    return cached[0]


def export_pretrained(
    arch: str,
    repository: str | os.PathLike,
    name: str | None = None,
    version: str | int = "auto",
    weights: str = "DEFAULT",
    precision: str = "fp32",
    **options: Any,
) -> Path:
    """Export a stock torchvision classifier with its own labels (``weights.meta["categories"]``) and its
    own eval preprocessing (``weights.transforms()``); returns the published model.onnx."""
    from torchvision import models as tvm

    from tlserve.trainer.models import head_name, resolve_weights
    from tlserve.trainer.preprocessing import weights_transform_values

    enum = cached_weights(arch) if weights == "DEFAULT" else resolve_weights(arch, weights)
    if enum is None:
        raise ValueError(f"--pretrained needs published weights for {arch}, got {weights!r}")
    model = tvm.get_model(arch, weights=enum).eval()
    weights_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    source = {
        "source_weights": f"{type(enum).__name__}.{enum.name}",
        "source_url": enum.url,
        "source_sha256": file_sha256(weights_file) if weights_file.is_file() else None,
    }
    top1 = enum.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    manifest = Manifest(
        name=name or arch,
        version="0",
        architecture=arch,
        labels=unique_labels(list(enum.meta["categories"])),
        preprocessing=Preprocessing(**weights_transform_values(arch, enum.name)),
        provenance={
            "strategy": "pretrained",
            "weights": enum.name,
            "dataset": {"name": "ImageNet-1k"},
            "val": {"accuracy": None if top1 is None else top1 / 100},
        },
    )
    return export_model(
        model,
        head_name(model),
        manifest,
        repository,
        name,
        version,
        ExportOptions(precision=precision, **options),
        {},
        source,
    )
