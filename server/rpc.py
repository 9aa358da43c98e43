"""The one helper every servicer uses: count and time the call, map exceptions to a gRPC status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from tlserve.server.errors import to_status
from tlserve.server.metrics import Metrics


class RpcCall:
    """What the handler tells the helper while it runs: the model it resolved."""

    def __init__(self) -> None:
        self.model = ""


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as an absolute ``time.monotonic()`` value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@contextlib.asynccontextmanager
async def observe_rpc(metrics: Metrics, context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[RpcCall]:
    """Wrap one call: ``tlserve_requests_total{rpc,model,code}``, the duration histogram, and on
    error ``context.abort`` with the mapped status (unknown errors: logged, INTERNAL)."""
    call = RpcCall()
    started = time.monotonic()

    def record(code: grpc.StatusCode) -> None:  # before the status reaches the caller
        metrics.requests.labels(rpc, call.model, code.name).inc()
        metrics.request_duration.labels(rpc, call.model).observe(time.monotonic() - started)

    try:
        yield call
    except asyncio.CancelledError:
        record(grpc.StatusCode.CANCELLED)
        raise
    except grpc.aio.AbortError:
        record(context.code() or grpc.StatusCode.UNKNOWN)
        raise
    except Exception as exc:
        code, message = to_status(exc)
        record(code)
        await context.abort(code, message)
    else:
        record(grpc.StatusCode.OK)
