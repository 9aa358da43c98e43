"""Concurrent calls and the message memory budget: the default limits serve 64 calls at once on one
channel; a full message memory budget refuses with RESOURCE_EXHAUSTED (trailers-only, so the client's
retry policy retries it); a call's reservation is given back however the call ends, and a stream's
after each message."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import MODEL, photo_bytes

from tlserve.client.channel import RetryPolicy
from tlserve.client.sync import Client
from tlserve.server.admission import Budget
from tlserve.server.budget import GROWTH_COPIES
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

IN_USE = "tlserve_message_memory_bytes"
REJECTIONS = "tlserve_message_memory_rejections_total"


def classify_request(name: str = "coffee.png") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes(name))])


def infer_request(size: int) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[bytes(3 * size * size)])
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, size, size])
    return request


def settle(server, name: str, value: float) -> float | None:
    """The metric once it reads ``value`` (a call's task ends just after its answer reaches the caller),
    or what it reads after a generous wait."""
    for _ in range(600):
        if server.metric(name) == value:
            break
        time.sleep(0.05)
    return server.metric(name)


class HeldStream:
    """A ClassifyStream whose messages the test sends one at a time; each is answered before ``send`` returns."""

    def __init__(self, server) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._answers = server.stub.ClassifyStream(iter(self._outbox.get, None), timeout=120)

    def send(self, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        self._outbox.put(request)
        return next(self._answers)

    def close(self) -> None:
        self._outbox.put(None)
        assert list(self._answers) == []

    def cancel(self) -> None:
        self._answers.cancel()
        self._outbox.put(None)


def test_64_concurrent_calls_on_one_channel_are_served_with_the_default_limits(repo_copy, make_server):
    server = make_server(repo_copy)  # the default concurrency limits and message memory budget
    size = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).input_size
    unblock = threading.Event()

    async def calls() -> list[object]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.handle.port}") as channel:
            task = tlserve_pb2_grpc.InferenceStub(channel)
            oip_stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await task.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)  # connected: the server's SETTINGS known
            server.loop.call_soon_threadsafe(unblock.wait, 60)  # the server's loop stops; the 64 calls pile up
            pending = [task.Classify(classify_request(), timeout=120) for _ in range(32)]
            pending += [oip_stub.ModelInfer(infer_request(size), timeout=120) for _ in range(32)]
            await asyncio.sleep(1.0)  # let them reach the server while its loop is stopped
            unblock.set()
            return await asyncio.gather(*pending, return_exceptions=True)

    try:
        answers = asyncio.run(calls())
    finally:
        unblock.set()
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, [(e.code(), e.details()) for e in errors[:3] if isinstance(e, grpc.RpcError)]
    assert all(len(a.results) == 1 for a in answers[:32])
    assert all(a.model_name == MODEL and a.outputs for a in answers[32:])
    assert settle(server, IN_USE, 0) == 0


def test_a_full_message_budget_refuses_with_resource_exhausted_and_the_client_retries(repo_copy, make_server):
    server = make_server(repo_copy, max_message_memory=1)  # any message in progress fills it
    holder = HeldStream(server)
    assert len(holder.send(classify_request()).results) == 1  # answered; its reservation is held
    request = classify_request("chelsea.png")
    assert server.metric(IN_USE) == classify_request().ByteSize() * GROWTH_COPIES
    retried: dict[str, object] = {}
    policy = RetryPolicy(max_attempts=5, initial_backoff=1.0, max_backoff=2.0)
    client = Client(f"127.0.0.1:{server.handle.port}", retry=policy, timeout=120)

    def classify() -> None:
        try:
            retried["answer"] = client.classify(photo_bytes("chelsea.png"))
        except Exception as exc:  # reported below
            retried["error"] = exc

    caller = threading.Thread(target=classify)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Classify(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "message memory budget is full" in refused.value.details()
        with pytest.raises(grpc.RpcError) as in_stream:  # a stream's message is refused the same way
            list(server.stub.ClassifyStream(iter([request]), timeout=60))
        assert in_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert server.metric(REJECTIONS) == 2
        assert server.metric("tlserve_requests_total", rpc="Classify", model="", code="RESOURCE_EXHAUSTED") == 1
        # health checks are never charged: they answer while the budget is full
        health = health_pb2_grpc.HealthStub(server.channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
        )
        caller.start()
        for _ in range(1200):  # the client's first attempt has been refused
            if server.metric(REJECTIONS) >= 3:
                break
            time.sleep(0.05)
        assert server.metric(REJECTIONS) >= 3
    finally:
        holder.close()  # the held message's reservation is given back: a retry gets through
        if caller.is_alive():
            caller.join(120)
        client.close()
    assert "error" not in retried, retried.get("error")
    assert retried["answer"].results[0].top and server.metric(REJECTIONS) >= 3
    assert settle(server, IN_USE, 0) == 0
    assert len(server.stub.Classify(request, timeout=60).results) == 1  # the server is still up


def test_a_reservation_is_released_after_success_error_and_cancel(repo_copy, make_server):
    server = make_server(repo_copy)
    request = classify_request()
    assert len(server.stub.Classify(request, timeout=60).results) == 1
    assert settle(server, IN_USE, 0) == 0
    with pytest.raises(grpc.RpcError) as failed:
        server.stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name="nope"), images=request.images), timeout=60)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert settle(server, IN_USE, 0) == 0
    held = HeldStream(server)  # a call the server holds, with its message's reservation
    assert len(held.send(request).results) == 1
    assert server.metric(IN_USE) == request.ByteSize() * GROWTH_COPIES
    held.cancel()  # the caller goes away
    assert settle(server, IN_USE, 0) == 0
    assert len(server.stub.Classify(request, timeout=60).results) == 1


def test_a_streams_reservation_follows_its_messages(repo_copy, make_server):
    server = make_server(repo_copy)
    small, large = classify_request("coffee.png"), classify_request("astronaut.png")
    assert small.ByteSize() != large.ByteSize()
    stream = HeldStream(server)
    try:
        assert len(stream.send(small).results) == 1
        assert server.metric(IN_USE) == small.ByteSize() * GROWTH_COPIES
        assert len(stream.send(large).results) == 1
        assert server.metric(IN_USE) == large.ByteSize() * GROWTH_COPIES  # the first message's was given back
    finally:
        stream.close()
    assert settle(server, IN_USE, 0) == 0


def test_an_empty_budget_admits_one_message_of_any_size_and_nothing_always_fits():
    budget = Budget("message memory", 100)
    big = budget.admit(1_000)
    assert big is not None and budget.in_use == 1_000
    assert budget.admit(1) is None
    assert budget.admit(0) is not None
    big.release()
    assert budget.admit(60) is not None and budget.admit(40) is not None and budget.admit(1) is None


def test_a_call_an_outer_interceptor_refuses_gives_its_reservation_back(repo_copy, make_server):
    """The drain gate runs before the wire guard's handler, after its parser reserved: the call's end releases it."""
    server = make_server(repo_copy)

    async def drain() -> None:
        server.handle.lifecycle.begin_drain()

    server.call(drain())
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Classify(classify_request(), timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.metric("tlserve_requests_total", rpc="Classify", model="", code="UNAVAILABLE") == 1
    assert settle(server, IN_USE, 0) == 0
