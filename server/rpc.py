"""The one path every RPC takes, unary calls and each message of a stream alike: count and time
it, put its model, version and status on its span, write its request log line, and turn an
exception into a gRPC status (or, on a stream that answers errors in-band, into the message the
caller is shown). Security plugs in ahead of it, as interceptors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import grpc

from tlserve.server.errors import to_status
from tlserve.server.metrics import Metrics
from tlserve.server.request_log import RequestLog
from tlserve.server.tracing import Spans

if TYPE_CHECKING:
    from tlserve.server.model import ServedModel


class RpcCall:
    """One call (or stream message) while it runs: the model it resolved, its status code, and for
    an in-band stream the caller-safe error message it ended with (None when it succeeded)."""

    def __init__(self) -> None:
        self.model = ""
        self.version = ""
        self.error: str | None = None
        self.code = grpc.StatusCode.OK
        self.started = time.monotonic()

    def serves(self, model: ServedModel) -> ServedModel:
        """Label the call with the model it resolved; returns the model."""
        self.model = model.name
        self.version = model.version
        return model


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as an absolute ``time.monotonic()`` value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def record_rpc(metrics: Metrics, rpc: str, call: RpcCall, code: grpc.StatusCode) -> None:
    """``tlserve_requests_total{rpc,model,code}`` and the duration histogram, for one call or message."""
    count, duration = metrics.rpc_children(rpc, call.model, code.name)
    count.inc()
    duration.observe(time.monotonic() - call.started)


# Statuses a client's gRPC retry policy may retry: they must go out as a trailers-only response
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


async def answer(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with ``code``; the handler then returns.

    A status set on the context goes out after the response headers, and a client's retry policy treats
    a call whose headers arrived as committed: never retried. So a retryable status is sent with
    ``context.abort``, which sends it at once as a trailers-only response. gRPC keeps the abort exception
    until the cyclic garbage collector runs, and through its traceback every frame of the handler, the
    request message among them (120 MB for a 13 MB typed OIP request): so it is caught here, its
    traceback dropped, and the handler returns; gRPC raises it again from its own frame, which holds
    nothing of ours. Other statuses are only set."""
    if code not in RETRYABLE:
        context.set_code(code)
        context.set_details(details)
        return
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError as aborted:
        aborted.__traceback__ = None
        aborted.__context__ = None


class RpcObserver:
    """What every call reports as it ends: its metrics, its span's attributes, its request log line."""

    def __init__(self, metrics: Metrics, spans: Spans | None = None, requests: RequestLog | None = None) -> None:
        self.metrics = metrics
        self.spans = spans or Spans()
        self._traced = self.spans.enabled  # off: no span is made and no context read
        self._requests = requests or RequestLog()
        self._log_all, self._log_failed = self._requests.all, self._requests.failed

    @contextlib.asynccontextmanager
    async def observe(
        self, context: grpc.aio.ServicerContext, rpc: str, in_band: bool = False
    ) -> AsyncIterator[RpcCall]:
        """Wrap one call or stream message (see :meth:`message`): record it (before
        the status reaches the caller) and map an error to its status (unknown errors: logged,
        INTERNAL). The error is swallowed and its status set on ``context`` (the handler then returns,
        or a stream handler stops when ``call.error`` is set); with ``in_band`` it is only kept in
        ``call.error``, for the stream to answer.

        See :func:`answer` for how the status is sent."""
        call = RpcCall()
        try:
            yield call
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            call.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            call.code, call.error = to_status(exc)
            exc.__traceback__ = None  # the frames down to the raise hold the request: let them go now
            if not in_band:
                await answer(context, call.code, call.error)
        finally:
            self._ended(context, rpc, call)

    def message(self, context: grpc.aio.ServicerContext, rpc: str) -> AbstractAsyncContextManager[RpcCall]:
        """:meth:`observe` for one message of a stream that answers errors in-band; traced, each
        message is a span of its own (``"<rpc> message"``), a child of the stream's."""
        if not self._traced:
            return self.observe(context, rpc, in_band=True)
        return self._traced_message(context, rpc)

    @contextlib.asynccontextmanager
    async def _traced_message(self, context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[RpcCall]:
        with self.spans.span(f"{rpc} message"):
            async with self.observe(context, rpc, in_band=True) as call:
                yield call

    def refused(self, context: grpc.aio.ServicerContext, rpc: str, code: grpc.StatusCode, details: str) -> None:
        """Record a call refused before any handler ran (the drain gate, the wire guard) as every other call
        is recorded: metrics, span, request log. Sending the status is the caller's."""
        call = RpcCall()
        call.code, call.error = code, details
        self._ended(context, rpc, call)

    def _ended(self, context: grpc.aio.ServicerContext, rpc: str, call: RpcCall) -> None:
        record_rpc(self.metrics, rpc, call, call.code)
        if self._traced:
            self.spans.ended(call)
        if self._log_all or (self._log_failed and call.code is not grpc.StatusCode.OK):
            self._requests.write(context, rpc, call, self.spans.trace_id())
