"""The server's own UNAVAILABLE and RESOURCE_EXHAUSTED reach the caller as trailers-only responses, so a
client's gRPC retry policy retries them; the refused request is freed at once, not at the next GC."""

from __future__ import annotations

import asyncio
import gc
import weakref

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tlserve.client.channel import ChannelSecurity, RetryPolicy, channel_options
from tlserve.server.errors import InvalidArgument, ResourceExhausted, Unavailable
from tlserve.server.metrics import Metrics
from tlserve.server.rpc import RpcObserver

METHOD = "/tlserve.v1.Inference/Classify"  # a method the client's retry policy names


class Held:
    """Stands for the request a handler's frame holds."""


async def serve_failing(failures: list[Exception], held: list[weakref.ref]):
    """A real gRPC server whose one method, through the server's own RpcObserver, fails with each of
    ``failures`` in turn and then answers ``b"ok"``; returns (server, port, attempts)."""
    observer = RpcObserver(Metrics(CollectorRegistry()))
    attempts = []

    async def classify(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request_stand_in = Held()
        held.append(weakref.ref(request_stand_in))
        async with observer.observe(context, "Classify"):
            attempts.append(request)
            if len(attempts) <= len(failures):
                raise failures[len(attempts) - 1]
            return b"ok"

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(classify)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("tlserve.v1.Inference", {"Classify": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, attempts


async def call(port: int, policy: RetryPolicy) -> bytes:
    options = channel_options(ChannelSecurity(), policy)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        return await channel.unary_unary(METHOD)(b"request", timeout=30)


def test_unavailable_and_resource_exhausted_are_retried_by_the_client_policy():
    async def scenario():
        failures = [Unavailable("model 'fashion' has no ready version"), ResourceExhausted("the queue is full")]
        server, port, attempts = await serve_failing(failures, [])
        try:
            assert await call(port, RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)) == b"ok"
        finally:
            await server.stop(None)
        return len(attempts)

    assert asyncio.run(scenario()) == 3


def test_other_refusals_are_not_retried_and_without_retries_the_caller_sees_the_status():
    async def scenario(failure: Exception, policy: RetryPolicy):
        server, port, attempts = await serve_failing([failure], [])
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(port, policy)
        finally:
            await server.stop(None)
        return refused.value, len(attempts)

    retrying = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    error, attempts = asyncio.run(scenario(InvalidArgument("3 images exceed the limit of 2"), retrying))
    assert (error.code(), error.details(), attempts) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "3 images exceed the limit of 2",
        1,
    )
    error, attempts = asyncio.run(scenario(Unavailable("draining"), RetryPolicy(max_attempts=1)))
    assert (error.code(), error.details(), attempts) == (grpc.StatusCode.UNAVAILABLE, "draining", 1)


def test_a_refused_request_is_freed_without_the_garbage_collector():
    async def scenario():
        held: list[weakref.ref] = []
        server, port, _ = await serve_failing([ResourceExhausted("the decode budget is spent")] * 5, held)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(port, RetryPolicy(max_attempts=1))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for _ in range(200):  # the handler returns just after the status is sent
                if held and held[0]() is None:
                    break
                await asyncio.sleep(0.01)
            return held[0]() is None
        finally:
            await server.stop(None)

    gc.disable()
    try:
        assert asyncio.run(scenario()), "the refused call's frames outlived it (kept by the abort exception)"
    finally:
        gc.enable()
