"""The Open Inference Protocol's tensor datatype names ("UINT8", "FP32", ...) and their numpy dtypes
(little-endian, as tensors travel). No protobuf here: the data plane names dtypes this way too."""

from __future__ import annotations

import numpy as np

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<")
    for name, t in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}


def datatype_of(dtype: np.dtype | str) -> str:
    """The protocol's name for a numpy dtype ("uint8" -> "UINT8")."""
    wanted = np.dtype(dtype)
    for name, candidate in DTYPES.items():
        if candidate == wanted:
            return name
    raise ValueError(f"no Open Inference Protocol datatype for numpy {wanted}")
