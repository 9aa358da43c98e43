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
from dataclasses import dataclass

import numpy as np

from tlserve.server.dataplane import Answer, RequestedOutput, TopK
from tlserve.server.errors import InvalidArgument, count_text, quote, shape_text
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


MAX_INPUTS = 16  # more input tensors than any model takes are refused before they are looked at
MAX_OUTPUTS = 64
MAX_RANK = 8
MAX_BYTES = 1 << 62  # a shape describing more is refused as such, whatever its contents


@dataclass(frozen=True)
class TensorHeader:
    """An input tensor's name, datatype and shape, checked, before any of its contents is read."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def element_count(name: str, shape: Sequence[int]) -> int:
    """The elements ``shape`` describes, in Python ints; a negative, too many or too large dimensions
    are refused (numpy would raise its own errors on them)."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"input {quote(name)}: shape {shape_text(shape)} has more than {MAX_RANK} dimensions")
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"input {quote(name)}: shape {shape_text(dims)} has a negative dimension")
    count = math.prod(dims)  # Python ints: a huge shape cannot overflow to a small count
    if count == 0 and math.prod(d for d in dims if d) > MAX_BYTES:  # numpy refuses even an empty one
        raise InvalidArgument(f"input {quote(name)}: shape {shape_text(dims)} is too large")
    return count


def input_headers(request: pb.ModelInferRequest) -> dict[str, TensorHeader]:
    """Every input's header, checked against its typed value count with nothing converted:
    O(number of inputs), safe on the event loop. A raw input's byte length is checked by
    :func:`decode_inputs`, off the loop: protobuf copies a bytes field on every access, so even
    ``len(request.raw_input_contents[i])`` costs a copy of the whole tensor."""
    if len(request.inputs) > MAX_INPUTS:
        raise InvalidArgument(f"{len(request.inputs)} input tensors; at most {MAX_INPUTS} are accepted")
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in order"
        )
    headers: dict[str, TensorHeader] = {}
    for tensor in request.inputs:
        name = tensor.name
        if name in headers:
            raise InvalidArgument(f"input {quote(name)} is given twice")
        if raws and tensor.HasField("contents"):
            raise InvalidArgument(f"input {quote(name)}: typed contents and raw_input_contents together")
        _dtype(name, tensor.datatype)
        count = element_count(name, tensor.shape)
        if not raws:
            field = _typed_field(name, tensor.datatype)
            values = len(getattr(tensor.contents, field))
            if values != count:
                raise InvalidArgument(
                    f"input {quote(name)}: {values} values in {field}, but shape {shape_text(tensor.shape)} "
                    f"needs {count_text(count)}"
                )
        headers[name] = TensorHeader(name, tensor.datatype, tuple(int(d) for d in tensor.shape))
    return headers


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """An input tensor from its raw bytes (zero-copy, read-only view)."""
    dtype = _dtype(name, datatype)
    expected = element_count(name, shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {quote(name)}: {len(raw)} raw bytes, but {datatype} shape {shape_text(shape)} "
            f"needs {count_text(expected)}"
        )
    return _reshaped(name, np.frombuffer(raw, dtype=dtype), shape)


def decode_typed(name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> np.ndarray:
    """An input tensor from the typed repeated field of its datatype, range-checked for narrow types."""
    dtype = _dtype(name, datatype)
    field = _typed_field(name, datatype)
    values = getattr(contents, field)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {quote(name)}: {len(values)} values in {field}, but shape {shape_text(shape)} "
            f"needs {count_text(count)}"
        )
    try:  # straight into the tensor's dtype: one array of its width, and numpy refuses out-of-range values
        array = np.fromiter(values, dtype=dtype, count=count)
    except OverflowError:
        info = np.iinfo(dtype)
        raise InvalidArgument(
            f"input {quote(name)}: values out of the {datatype} range [{info.min}, {info.max}]"
        ) from None
    return _reshaped(name, array, shape)


# Raw contents whose shapes describe this many bytes together are converted on the event loop: taking
# them out of the message is one copy of that size (tens of microseconds), cheaper than the hop to a
# thread and back, which the profile showed as the largest cost per call (docs/benchmarks.md). Raw
# bytes longer than their shape says are refused after that one copy, which the message size limit
# bounds (gRPC has already parsed the whole message on the loop by then).
INLINE_RAW_BYTES = 256 << 10


def converts_inline(request: pb.ModelInferRequest, headers: Mapping[str, TensorHeader]) -> bool:
    """Whether :func:`decode_inputs` of ``request`` is cheap enough for the event loop: raw contents
    only (typed values are converted one by one) of at most INLINE_RAW_BYTES by their headers."""
    if not request.raw_input_contents:
        return False
    described = sum(h.count * _dtype(h.name, h.datatype).itemsize for h in headers.values())
    return described <= INLINE_RAW_BYTES


def decode_inputs(
    request: pb.ModelInferRequest, headers: Mapping[str, TensorHeader] | None = None
) -> dict[str, np.ndarray]:
    """Every input of a request by name, from raw or typed contents (never both). Proportional to
    the request's size: call it off the event loop, with the :func:`input_headers` already checked
    (read again when not given). Each raw input is taken from the message once (one copy), its
    length checked, then viewed in place."""
    headers = input_headers(request) if headers is None else headers
    raws = request.raw_input_contents
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        header = headers[tensor.name]
        if raws:
            arrays[header.name] = decode_raw(header.name, header.datatype, header.shape, raws[i])
        else:
            arrays[header.name] = decode_typed(header.name, header.datatype, header.shape, tensor.contents)
    return arrays


def _reshaped(name: str, flat: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    try:
        return flat.reshape(tuple(shape))
    except ValueError:  # element_count refuses what numpy would; this keeps any other refusal the caller's
        raise InvalidArgument(f"input {quote(name)}: cannot take shape {shape_text(shape)}") from None


def _typed_field(name: str, datatype: str) -> str:
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(f"input {quote(name)}: {datatype} has no typed contents; send it in raw_input_contents")
    return field


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """The outputs a request names, each with its classification count (0: the tensor itself)."""
    if len(request.outputs) > MAX_OUTPUTS:
        raise InvalidArgument(f"{len(request.outputs)} requested outputs; at most {MAX_OUTPUTS} are accepted")
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
        raise InvalidArgument(
            f"input {quote(name)}: unsupported datatype {quote(datatype)} (supported: {', '.join(DTYPES)})"
        )
    return DTYPES[datatype]


def encode_bytes(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append a BYTES output: each element as a 4-byte little-endian length and its bytes."""
    parts = []
    for item in array.ravel():
        parts += [len(item).to_bytes(4, "little"), item]
    response.outputs.add(name=name, datatype="BYTES", shape=array.shape)
    response.raw_output_contents.append(b"".join(parts))
