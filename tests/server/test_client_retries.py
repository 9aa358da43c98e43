"""tlserve.client's retries are gRPC's own (a retryPolicy in the channel's service config): a call is tried
again after a RESOURCE_EXHAUSTED refusal until the server takes it (attempts counted by gRPC's channelz: each one is
a call on the subchannel), where the same call with retries off fails; and with ``wait_for_ready`` a call
outlives a server restart on the same port within its deadline."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

# gRPC's own channelz data (what the grpcio-channelz service serves), read as the JSON C-core writes: that
# package's proto lags grpcio's JSON (it fails to parse fields newer than itself)
from grpc._cython import cygrpc  # noqa: E402
from serving_helpers import MODEL, photo_bytes, photo_path

from tlserve.client import NO_RETRIES, Client, RetryPolicy
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

# patient backoffs (each pause is random up to the bound), so the attempts left outlast what the test waits for
PATIENT = RetryPolicy(max_attempts=5, initial_backoff=2.0, max_backoff=10.0, multiplier=2.0)
FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500))


def wait_until(condition, what: str, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"never saw {what} in {timeout:.0f}s")
        time.sleep(0.01)


def attempts(target: str) -> tuple[int, int]:
    """(attempts started, attempts failed) on the subchannels of the channels to ``target``."""
    started = failed = 0
    for channel in json.loads(cygrpc.channelz_get_top_channels(0)).get("channel", []):
        if not channel["data"].get("target", "").endswith(target):
            continue
        for ref in channel.get("subchannelRef", []):
            data = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))["subchannel"]["data"]
            started += int(data.get("callsStarted", 0))
            failed += int(data.get("callsFailed", 0))
    return started, failed


def test_service_config_names_both_apis_and_the_codes():
    config = json.loads(RetryPolicy().service_config())["methodConfig"][0]
    assert {n["service"] for n in config["name"]} == {"tlserve.v1.Inference", "inference.GRPCInferenceService"}
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert config["retryPolicy"]["maxAttempts"] == 5
    assert "retryPolicy" not in json.loads(NO_RETRIES.service_config())["methodConfig"][0]


def test_a_call_outlives_a_server_restart_on_the_same_port(repo_copy, make_server):
    """gRPC retries what a server answered; a call that reaches no server at all (the channel has failed to
    connect) is not retried by the policy but waits, with ``wait_for_ready``, within its deadline."""
    first = make_server(repo_copy)
    port = first.handle.port
    with Client(f"127.0.0.1:{port}", timeout=120, wait_for_ready=True, options=FAST_RECONNECT) as client:
        assert client.classify(photo_path("coffee.png")).model == MODEL  # connected to the first server
        first.close()
        with Client(f"localhost:{port}", timeout=30) as impatient:
            with pytest.raises(grpc.RpcError) as err:
                impatient.classify(photo_path("coffee.png"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # nothing serves the port now

        states: list[grpc.ChannelConnectivity] = []
        client.channel.subscribe(states.append)
        try:
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(client.classify, photo_path("coffee.png"))
                wait_until(lambda: grpc.ChannelConnectivity.TRANSIENT_FAILURE in states, "a failed connection")
                second = make_server(repo_copy, port=port)  # the same port number, bound again
                answer = call.result(timeout=150)
        finally:
            client.channel.unsubscribe(states.append)
    assert (answer.model, len(answer.results)) == (MODEL, 1)
    assert second.metric("tlserve_requests_total", rpc="Classify", model=MODEL, code="OK") == 1


def test_resource_exhausted_is_retried_until_the_server_takes_the_call(repo_copy, make_server):
    """The concurrent-call cap refuses with RESOURCE_EXHAUSTED; the policy tries again once the slot is free.
    The request (a 460 KB photo) is over gRPC's default 256 KiB retry buffer: the client raises it, or the
    call would be committed at once and never retried."""
    server = make_server(repo_copy, max_concurrent_rpcs=1)
    target = f"127.0.0.1:{server.handle.port}"
    release = threading.Event()
    request = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))])

    def one_then_hold():
        yield request
        release.wait(120)

    stream = server.stub.ClassifyStream(one_then_hold(), timeout=180)
    try:
        assert len(next(stream).results) == 1  # the server's one call slot is held by this stream
        with Client(f"localhost:{server.handle.port}", retry=NO_RETRIES, timeout=30) as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.model_info()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with Client(target, retry=PATIENT, timeout=120) as client, ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.classify, photo_path("coffee.png"))
            wait_until(lambda: attempts(target)[1] >= 1, "a refused attempt")
            release.set()
            list(stream)  # the slot is free once the stream has ended
            answer = call.result(timeout=150)
            started, failed = attempts(target)
    finally:
        release.set()
    assert (answer.model, len(answer.results)) == (MODEL, 1)
    assert failed >= 1 and started == failed + 1  # refused attempts, then the one that was answered
