"""The wire guard: a request bloated with embedded messages is refused before protobuf parses it."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import MODEL, photo_bytes

from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.wire import FieldCounter, Malformed, TooLarge, TooMany

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
CLASSIFY = "/tlserve.v1.Inference/Classify"
DESCRIPTOR = oip.ModelInferRequest.DESCRIPTOR


def parsed_count(message) -> int:
    """Embedded messages as the parsed message holds them (map entries included)."""
    total = 0
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for entry in value.values():  # the entry, and its value when that is a message
                total += 1 + (1 + parsed_count(entry) if hasattr(entry, "ListFields") else 0)
        elif field.is_repeated:
            total += len(value) + sum(parsed_count(v) for v in value)
        else:
            total += 1 + parsed_count(value)
    return total


requests = st.builds(
    lambda inputs, outputs, params, raw: _request(inputs, outputs, params, raw),
    st.integers(0, 6),
    st.integers(0, 4),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**40), 2**40), max_size=4),
    st.binary(max_size=300),
)


def _request(inputs: int, outputs: int, params: dict, raw: bytes) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL, id="r", raw_input_contents=[raw] * inputs)
    for key, value in params.items():
        request.parameters[key].int64_param = value
    for i in range(inputs):
        tensor = request.inputs.add(name=f"in{i}", datatype="UINT8", shape=[1, len(raw)])
        tensor.parameters["binary_data_size"].int64_param = len(raw)
        if i % 2:
            tensor.contents.uint_contents.extend(range(5))
    for i in range(outputs):
        request.outputs.add(name=f"out{i}").parameters["classification"].int64_param = 3
    return request


@settings(max_examples=200, deadline=None)
@given(requests)
def test_the_count_bounds_what_protobuf_builds(request):
    data = request.SerializeToString()
    count = FieldCounter(10_000).count(data, DESCRIPTOR)
    assert parsed_count(request) <= count <= len(data) // 2  # every embedded message is a field of two bytes or more
    with pytest.raises(TooMany):
        FieldCounter(count - 1).count(data, DESCRIPTOR)
    assert FieldCounter(count).count(data, DESCRIPTOR) == count


def test_the_count_by_hand():
    request = oip.ModelInferRequest(model_name="m")
    request.outputs.add(name="o").parameters["classification"].int64_param = 3
    # model_name, outputs; in it name, parameters entry; in that key, value; in that int64_param
    assert FieldCounter(100).count(request.SerializeToString(), DESCRIPTOR) == 7


def test_the_count_stops_past_the_limit_and_rejects_bad_wire_format():
    counter = FieldCounter(100)
    with pytest.raises(TooMany):
        counter.count(b"\x2a\x00" * 2_000_000, DESCRIPTOR)  # stops at 101, not 2 million
    assert not counter.needs_walk(200) and counter.needs_walk(201)  # 2 bytes per field at least
    for bad in (b"\x2a\x05\x00", b"\x0a", b"\x0b\x0c", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(Malformed):
            counter.count(bad, DESCRIPTOR)


def test_packed_values_may_grow_as_32_bit_values_do_and_no_more():
    request = oip.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8").contents.uint_contents.extend([1] * 100_000)
    assert FieldCounter(100).count(request.SerializeToString(), DESCRIPTOR) > 0  # 4 bytes for each 1-byte value
    request.inputs[0].contents.int64_contents.extend([1] * 100_000)  # 8 bytes for each
    with pytest.raises(TooLarge):
        FieldCounter(100).count(request.SerializeToString(), DESCRIPTOR)


def raw_call(server, method: str, data: bytes, **kwargs):
    return server.channel.unary_unary(method)(data, timeout=30, **kwargs)


def assert_invalid(server, method: str, data: bytes, text: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        raw_call(server, method, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert text in err.value.details(), err.value.details()


def still_serving(server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    check = health.Check(health_pb2.HealthCheckRequest(service="tlserve.v1.Inference"), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    ok = server.stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))]), timeout=30)
    assert ok.results[0].predictions


def test_bloated_requests_are_refused_before_parsing(live):
    empty_inputs = b"\x2a\x00" * 1_000_000  # 2 MB of empty `inputs`: about 85 MiB once parsed
    assert_invalid(live, INFER, empty_inputs, "more than 4096 fields")
    nested = oip.ModelInferRequest(model_name=MODEL)
    tensor = nested.inputs.add(name="images")
    for i in range(5000):  # few top-level fields, the bloat one level down
        tensor.parameters[str(i)].bool_param = True
    assert_invalid(live, INFER, nested.SerializeToString(), "fields")
    assert_invalid(live, CLASSIFY, b"\x12\x00" * 100_000, "fields")  # 100,000 empty images
    small_ints = oip.ModelInferRequest(model_name=MODEL)
    small_ints.inputs.add(name="images", datatype="INT64", shape=[1, 500_000]).contents.int64_contents.extend(
        [0] * 500_000
    )  # 0.5 MB on the wire, 4 MB parsed (and more in the arena); the shape adds 16
    assert_invalid(live, INFER, small_ints.SerializeToString(), "packed values would take 4000016 bytes")
    assert live.metric("tlserve_requests_total", rpc="ModelInfer", model="", code="INVALID_ARGUMENT") >= 3
    still_serving(live)


def test_a_typed_request_within_the_limits_is_served(live):
    size = live.handle.repository.get(MODEL).manifest.preprocessing.input_size
    request = oip.ModelInferRequest(model_name=MODEL)
    values = np.random.default_rng(0).integers(0, 256, 3 * size * size)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, size, size]).contents.uint_contents.extend(values)
    assert len(request.SerializeToString()) > 8192  # walked
    answer = oip.ModelInferResponse.FromString(raw_call(live, INFER, request.SerializeToString()))
    assert answer.outputs


def test_malformed_bytes_are_invalid_argument_not_unknown(live, caplog):
    caplog.set_level(logging.INFO, logger="tlserve.server.requests")
    assert_invalid(live, INFER, b"\x0a\xff", "not a valid inference.v2.ModelInferRequest message")  # small: parsed
    assert_invalid(live, INFER, b"\x0b" * 10_000, "groups are not proto3")  # large: walked
    assert_invalid(live, CLASSIFY, b"\x12\x05\x00", "not a valid tlserve.v1.ClassifyRequest message")
    logged = [r.json_fields for r in caplog.records if r.name == "tlserve.server.requests"]
    assert {"rpc": "Classify", "code": "INVALID_ARGUMENT"}.items() <= logged[-1].items()  # logged like any call
    assert "not a valid tlserve.v1.ClassifyRequest message" in logged[-1]["error"]
    still_serving(live)


def test_a_stream_answers_up_to_the_bloated_message_then_ends_with_it(live):
    size = live.handle.repository.get(MODEL).manifest.preprocessing.input_size
    good = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[np.zeros(3 * size * size, np.uint8).tobytes()])
    good.inputs.add(name="images", datatype="UINT8", shape=[1, 3, size, size])
    stream = live.channel.stream_stream(STREAM)
    call = stream(iter([good.SerializeToString(), b"\x2a\x00" * 10_000, good.SerializeToString()]), timeout=60)
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for answer in call:
            answers.append(answer)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fields (" in err.value.details()
    assert len(answers) == 1  # the first message was answered; nothing after the bloated one was read
    still_serving(live)


def test_the_limit_is_a_setting(repo_copy, make_server):
    server = make_server(repo_copy, max_request_fields=16)
    request = oip.ModelInferRequest(model_name=MODEL)
    for i in range(20):
        request.outputs.add(name=f"o{i}")
    assert len(request.SerializeToString()) > 32
    assert_invalid(server, INFER, request.SerializeToString(), "more than 16 fields")
    assert_invalid(server, CLASSIFY, pb.ClassifyRequest(images=[pb.Image()] * 17).SerializeToString(), "more than 16")
    still_serving(server)
