"""The file-level contract between export and server (stdlib only): file names and ONNX type names.

A version folder ``<repository>/<name>/<version>/`` holds :data:`MODEL_FILE` (always; its precision
is in its manifest), optionally :data:`FP16_FILE` (the server prefers it on CUDA) and
:data:`OPTIMIZED_FILE`, and the readable :data:`MANIFEST_FILE` sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

MODEL_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"
OPTIMIZED_FILE = "model.ort.onnx"
MANIFEST_FILE = "manifest.json"

# ONNX Runtime's type string of a tensor (``NodeArg.type``) -> the numpy dtype name the manifest uses
ORT_DTYPES: Mapping[str, str] = MappingProxyType(
    {
        "tensor(uint8)": "uint8",
        "tensor(float)": "float32",
        "tensor(float16)": "float16",
        "tensor(double)": "float64",
        "tensor(int64)": "int64",
        "tensor(int32)": "int32",
    }
)
