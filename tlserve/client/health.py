"""The grpc.health.v1 service names the server reports (docs/server-contract.md), and waiting for SERVING."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tlserve.client.channel import INFERENCE_SERVICE

MODEL_SERVICE_PREFIX = "tlserve.model."
SERVING = health_pb2.HealthCheckResponse.SERVING
POLL_SECONDS = 0.25


def health_service(model: str | None = None) -> str:
    """``tlserve.model.<name>`` for a model, else ``tlserve.v1.Inference`` (SERVING while any model is ready)."""
    return f"{MODEL_SERVICE_PREFIX}{model}" if model else INFERENCE_SERVICE


def wait_ready(channel: grpc.Channel, timeout: float, model: str | None = None) -> None:
    """Poll grpc.health.v1 until the server (or ``model``) reports SERVING; TimeoutError after ``timeout`` s."""
    stub = health_pb2_grpc.HealthStub(channel)
    service = health_service(model)
    give_up = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < give_up:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            if status == SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"{service} not SERVING after {timeout:.0f}s (last: {last})")
