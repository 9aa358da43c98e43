"""The drain, in process: calls in flight finish, new ones are refused UNAVAILABLE, open streams end
with OK after the message they are answering, and health says NOT_SERVING throughout."""

from __future__ import annotations

import asyncio
import queue
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import MODEL, HeldLease, copy_version, photo_bytes

from tlserve.server.drain import SHUTTING_DOWN
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def fresh_repo(exported_version, tmp_path):
    (tmp_path / MODEL).mkdir()
    copy_version(exported_version, tmp_path / MODEL / "1")
    return tmp_path


def begin_stop(server, grace: float):
    """``handle.stop(grace)`` started on the server's loop; the concurrent future of its end."""
    return asyncio.run_coroutine_threadsafe(server.handle.stop(grace=grace), server.loop)


def test_calls_in_flight_finish_and_new_calls_are_refused(fresh_repo, exported_version, make_server):
    server = make_server(fresh_repo, drain_seconds=60)
    old = server.handle.repository.get(MODEL)
    copy_version(exported_version, fresh_repo / MODEL / "2")
    with HeldLease(server, old):  # the reload below waits for this lease to unload version 1
        reload_call = server.stub.ReloadRepository.future(pb.ReloadRepositoryRequest(), timeout=60)
        while server.metric("tlserve_model_ready", model=MODEL, version="1") != 0:
            time.sleep(0.01)  # until the reload is in flight, draining version 1
        stopped = begin_stop(server, grace=60)
        health = health_pb2_grpc.HealthStub(server.channel)
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status != NOT_SERVING:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and refused.value.details() == SHUTTING_DOWN
        assert not reload_call.done() and not stopped.done()
    assert list(reload_call.result(timeout=60).loaded) == [f"{MODEL}/2"]  # answered, not cancelled
    stopped.result(timeout=60)
    assert server.metric("tlserve_requests_total", rpc="Classify", model="", code="UNAVAILABLE") == 1
    assert server.metric("tlserve_requests_total", rpc="ReloadRepository", model="", code="OK") == 1


def stream_until_drain(server, stream_method, first_request, grace: float = 60):
    """Open a stream, get one answer, begin the drain; (answers, final code, stop future)."""
    requests: queue.Queue = queue.Queue()

    def messages():
        while (message := requests.get()) is not None:
            yield message

    requests.put(first_request)
    call = stream_method(messages(), timeout=120)
    answers = [next(call)]
    stopped = begin_stop(server, grace)
    answers += list(call)  # the server ends the stream: the iterator stops, no error
    requests.put(None)
    return answers, call.code(), stopped


def test_an_open_classify_stream_ends_with_ok_when_the_drain_begins(repo_copy, make_server):
    server = make_server(repo_copy)
    request = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("chelsea.png"))], top_k=1)
    answers, code, stopped = stream_until_drain(server, server.stub.ClassifyStream, request)
    assert code == grpc.StatusCode.OK and len(answers) == 1 and answers[0].results
    stopped.result(timeout=60)


def test_an_open_oip_stream_ends_with_ok_when_the_drain_begins(repo_copy, make_server):
    from tlserve.server.pb.inference import grpc_service_pb2_grpc

    server = make_server(repo_copy)
    size = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).input_size
    request = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[bytes(3 * size * size)])
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, size, size])
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    answers, code, stopped = stream_until_drain(server, stub.ModelStreamInfer, request)
    assert code == grpc.StatusCode.OK and len(answers) == 1 and not answers[0].error_message
    stopped.result(timeout=60)
