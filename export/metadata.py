"""The manifest inside an ONNX file (``metadata_props``) and beside it (``manifest.json``)."""

from __future__ import annotations

import onnx

from tlserve.manifest import METADATA_KEY, Manifest


def embed_manifest(model: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """Set the manifest JSON under METADATA_KEY (other metadata kept), plus doc string and model version."""
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = manifest.to_json()
    onnx.helper.set_model_props(model, props)
    model.producer_name = "tlserve"
    model.doc_string = (
        f"{manifest.name} version {manifest.version}: {manifest.architecture}, "
        f"{manifest.num_classes} classes, {manifest.precision}"
    )
    if manifest.version.isdigit():
        model.model_version = int(manifest.version)
    return model


def read_manifest(model: onnx.ModelProto) -> Manifest:
    return Manifest.from_metadata({p.key: p.value for p in model.metadata_props})


def sidecar(manifest: Manifest) -> bytes:
    return (manifest.to_json(indent=2) + "\n").encode()
