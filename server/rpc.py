"""The one path every RPC takes, unary calls and each message of a stream alike: count and time
it, and turn an exception into a gRPC status (or, on a stream that answers errors in-band, into
the message the caller is shown). Security and tracing plug in here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from tlserve.server.errors import to_status
from tlserve.server.metrics import Metrics

if TYPE_CHECKING:
    from tlserve.server.model import ServedModel


class RpcCall:
    """One call (or stream message) while it runs: the model it resolved, and for an in-band
    stream the caller-safe error message it ended with (None when it succeeded)."""

    def __init__(self) -> None:
        self.model = ""
        self.error: str | None = None
        self.code = grpc.StatusCode.OK
        self.started = time.monotonic()

    def serves(self, model: ServedModel) -> ServedModel:
        """Label the call with the model it resolved; returns the model."""
        self.model = model.name
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


@contextlib.asynccontextmanager
async def observe_rpc(
    metrics: Metrics, context: grpc.aio.ServicerContext, rpc: str, in_band: bool = False
) -> AsyncIterator[RpcCall]:
    """Wrap one call or stream message: record it (before the status reaches the caller) and map an
    error to its status (unknown errors: logged, INTERNAL). The error is swallowed and its status set
    on ``context`` (the handler then returns, or a stream handler stops when ``call.error`` is set);
    with ``in_band`` it is only kept in ``call.error``, for the stream to answer.

    The status is set rather than raised with ``context.abort``: gRPC keeps the abort exception on
    the call until the cyclic garbage collector runs, and through its traceback every frame of the
    handler, the request message among them (120 MB for a 13 MB typed OIP request)."""
    call = RpcCall()
    try:
        yield call
    except asyncio.CancelledError:
        record_rpc(metrics, rpc, call, grpc.StatusCode.CANCELLED)
        raise
    except grpc.aio.AbortError:
        record_rpc(metrics, rpc, call, context.code() or grpc.StatusCode.UNKNOWN)
        raise
    except Exception as exc:
        code, call.error = to_status(exc)
        call.code = code
        exc.__traceback__ = None  # the frames down to the raise hold the request: let them go now
        record_rpc(metrics, rpc, call, code)
        if not in_band:
            context.set_code(code)
            context.set_details(call.error)
    else:
        record_rpc(metrics, rpc, call, grpc.StatusCode.OK)
