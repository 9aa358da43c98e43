"""Tensors between Open Inference Protocol messages and numpy arrays.

Inputs arrive either as ``raw_input_contents`` (little-endian, row-major bytes, one entry per
input) or as the typed repeated field that matches the datatype; FP16 has no typed field and
travels raw only. Outputs always go back raw, which every client reads and which costs no
per-element conversion; an output asked for as classes goes back as BYTES strings. Every problem
is an :class:`InvalidArgument` naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from tlserve.server.dataplane import Answer, RequestedOutput, TopK
from tlserve.server.errors import InvalidArgument, count_text, shape_text
from tlserve.server.oip.datatypes import DTYPES, datatype_of
from tlserve.server.pb.inference import messages_pb2 as pb

TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
CLASSIFICATION = "classification"  # the output parameter that asks for top classes (Triton's extension)


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {shape_text(shape)} has a negative dimension")
    return math.prod(int(d) for d in shape)  # Python ints: a huge shape cannot overflow to a small count


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """An input tensor from its raw bytes (zero-copy, read-only view)."""
    dtype = _dtype(name, datatype)
    expected = element_count(name, shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {name!r}: {len(raw)} raw bytes, but {datatype} shape {shape_text(shape)} "
            f"needs {count_text(expected)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_typed(name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> np.ndarray:
    """An input tensor from the typed repeated field of its datatype, range-checked for narrow types."""
    dtype = _dtype(name, datatype)
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    values = getattr(contents, field)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: {len(values)} values in {field}, but shape {shape_text(shape)} needs {count_text(count)}"
        )
    wide = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"input {name!r}: values out of the {datatype} range [{info.min}, {info.max}]")
    return wide.astype(dtype, copy=False).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input of a request by name, from raw or typed contents (never both)."""
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        if raws and tensor.HasField("contents"):
            raise InvalidArgument(f"input {tensor.name!r}: typed contents and raw_input_contents together")
        if raws:
            arrays[tensor.name] = decode_raw(tensor.name, tensor.datatype, tensor.shape, raws[i])
        else:
            arrays[tensor.name] = decode_typed(tensor.name, tensor.datatype, tensor.shape, tensor.contents)
    return arrays


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """The outputs a request names, each with its classification count (0: the tensor itself)."""
    return [
        RequestedOutput(o.name, o.parameters[CLASSIFICATION].int64_param if CLASSIFICATION in o.parameters else 0)
        for o in request.outputs
    ]


def infer_response(model: str, version: str, request_id: str, outputs: Mapping[str, Answer]) -> pb.ModelInferResponse:
    """The response to ModelInfer: each output as a tensor, or as classification strings."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, answer in outputs.items():
        if isinstance(answer, TopK):
            encode_bytes(response, name, classification(answer))
        else:
            encode_outputs(response, {name: answer})
    return response


def classification(top: TopK) -> np.ndarray:
    """Triton's classification extension: [N, k] strings "score:index:label", best first."""
    return np.array(
        [
            [f"{s:f}:{i}:{top.labels[i]}".encode() for i, s in zip(row_i, row_s)]
            for row_i, row_s in zip(top.indices.tolist(), top.scores.tolist())
        ],
        dtype=object,
    )


def encode_outputs(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray]) -> None:
    """Append each output to ``response`` as a tensor header plus raw little-endian bytes."""
    for name, array in outputs.items():
        array = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())


def _dtype(name: str, datatype: str) -> np.dtype:
    if datatype not in DTYPES:
        raise InvalidArgument(f"input {name!r}: unsupported datatype {datatype!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[datatype]


def encode_bytes(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append a BYTES output: each element as a 4-byte little-endian length and its bytes."""
    parts = []
    for item in array.ravel():
        parts += [len(item).to_bytes(4, "little"), item]
    response.outputs.add(name=name, datatype="BYTES", shape=array.shape)
    response.raw_output_contents.append(b"".join(parts))
