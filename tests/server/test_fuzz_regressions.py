"""Defects the hostile-caller fuzz (test_fuzz.py) found, one focused test each, through gRPC only."""

from __future__ import annotations

import grpc
import pytest

from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task

MAX_MESSAGE = 600


def model_infer(live, shape: list[int], contents: str) -> grpc.RpcError:
    request = oip.ModelInferRequest(model_name="fashion")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=shape)
    if contents == "raw":
        request.raw_input_contents.append(b"\x07" * 12288)
    else:
        tensor.contents.uint_contents.extend([7] * 12288)
    with pytest.raises(grpc.RpcError) as excinfo:
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(live.channel).ModelInfer(request, timeout=30)
    return excinfo.value


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_oip_shape_of_64_huge_dimensions_is_summarised_not_echoed(live, contents):
    """Was: all 64 dimensions and the 1,200-digit byte count they make, a 2,500-character status."""
    error = model_infer(live, [2**62] * 64, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = error.details()
    assert len(message) <= MAX_MESSAGE, message
    assert "[4611686018427387904, 4611686018427387904," in message and "(64 dimensions)" in message
    assert "has more than 8 dimensions" in message  # refused from the rank, before any count is made


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_oip_shape_whose_count_has_too_many_digits_to_print_is_invalid_argument(live, contents):
    """Was INTERNAL: a count of 18,000 digits passes Python's int-to-str limit (4,300) in the message."""
    error = model_infer(live, [2**62] * 1000, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert len(error.details()) <= MAX_MESSAGE and "(1000 dimensions)" in error.details()


def test_task_tensor_shape_of_many_dimensions_is_summarised_not_echoed(live):
    """Was: every dimension echoed; at 1,000 of them the status outgrew gRPC's metadata limit and the
    caller got RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the reason."""
    image = task.Image(tensor=task.Tensor(shape=[2**62] * 1000, data=b"\x07" * 12288))
    with pytest.raises(grpc.RpcError) as excinfo:
        live.stub.Classify(task.ClassifyRequest(images=[image]), timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = excinfo.value.details()
    assert len(message) <= MAX_MESSAGE and "(1000 dimensions) must be [3, 64, 64]" in message
