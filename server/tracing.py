"""OpenTelemetry tracing, off unless ``--tracing``: a span per RPC with children for decode, queue
wait, inference and encode.

The RPC span comes from opentelemetry-instrumentation-grpc's aio server interceptor, which also
takes the caller's W3C ``traceparent`` from the call's metadata (the propagators named by
``OTEL_PROPAGATORS``, W3C trace context and baggage by default). The provider is built once, at
the entry point, from the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``...), or injected (tests); nothing here sets
OpenTelemetry's global provider. The packages (the ``tracing`` extra) are imported only when
tracing is on: without them the server starts as long as it is off.

:class:`Spans` is what the request path holds. Built without a tracer (tracing off) every method
returns at its first line: no span object is made and no context is read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc

from tlserve import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from tlserve.server.batcher import BatchTiming
    from tlserve.server.rpc import RpcCall

INSTALL_HINT = "pip install 'tlserve[tracing]'"
SERVICE_NAME = "tlserve"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES names the service
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")  # probes and tooling make no spans
# span attributes (the RPC span also carries the instrumentation's rpc.* ones)
MODEL, VERSION, BATCH_SIZE, STATUS_CODE = (
    "tlserve.model",
    "tlserve.model.version",
    "tlserve.batch_size",
    "rpc.grpc.status_code",
)
BATCH_ROWS = "tlserve.batch.rows"  # on an inference span: the rows of the whole batch it ran in
NOTHING: AbstractContextManager[None] = contextlib.nullcontext()
# the codes that make a server span's status ERROR (OpenTelemetry's gRPC conventions, as the instrumentation
# applies them): the server's faults; a caller's mistake (INVALID_ARGUMENT, NOT_FOUND...) leaves it unset
SERVER_ERRORS = frozenset(
    getattr(grpc.StatusCode, name)
    for name in ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)


class TracingUnavailable(Exception):
    """``--tracing`` was asked for and the OpenTelemetry packages are not installed."""


class Spans:
    """The child spans and attributes of the current RPC's span (no-ops without a tracer)."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self._tracer = tracer
        if tracer is not None:
            from opentelemetry import trace

            self._current_span = trace.get_current_span
            self._status, self._error = trace.Status, trace.StatusCode.ERROR

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str) -> AbstractContextManager[Any]:
        """A child span of the current one around a ``with`` block."""
        if self._tracer is None:
            return NOTHING
        # the status is the RPC span's (see ended()); no stack traces go to the collector
        return self._tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False)

    def annotate(self, key: str, value: int | str) -> None:
        """Set one attribute on the current span."""
        if self._tracer is None:
            return
        self._current_span().set_attribute(key, value)

    def ended(self, call: RpcCall) -> None:
        """The call's model, version and code on the current span (the RPC's, or a stream message's);
        status ERROR for the codes of :data:`SERVER_ERRORS`."""
        if self._tracer is None:
            return
        span = self._current_span()
        if call.model:
            span.set_attribute(MODEL, call.model)
            span.set_attribute(VERSION, call.version)
        span.set_attribute(STATUS_CODE, call.code.value[0])
        if call.code in SERVER_ERRORS:
            span.set_status(self._status(self._error, call.code.name))

    def batched(self, timings: Sequence[BatchTiming]) -> None:
        """A ``queue`` and an ``inference`` span for each part the batcher ran, from its timestamps."""
        if self._tracer is None:
            return
        offset = time.time_ns() - time.monotonic_ns()  # monotonic seconds -> epoch nanoseconds
        for timing in timings:
            if not timing.finished:  # the batch failed or the part never ran: the RPC span has the error
                continue
            enqueued, started, finished = (offset + int(t * 1e9) for t in timing.times)
            self._tracer.start_span("queue", start_time=enqueued).end(end_time=started)
            inference = self._tracer.start_span("inference", start_time=started, attributes={BATCH_ROWS: timing.rows})
            inference.end(end_time=finished)

    def trace_id(self) -> str:
        """The current trace's id (32 hex digits), or "" when tracing is off or there is no trace."""
        if self._tracer is None:
            return ""
        context = self._current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else ""


class Tracing:
    """One server's tracing: its provider, the interceptor that opens a span per RPC, and the Spans
    of its request path. ``shutdown()`` flushes a provider it built (an injected one is the caller's)."""

    def __init__(self, provider: TracerProvider, *, owned: bool) -> None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        untraced = [filters.service_name(UNTRACED_SERVICES[0]), filters.service_prefix(UNTRACED_SERVICES[1])]
        self.provider = provider
        self._owned = owned
        self.interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(
            tracer_provider=provider, filter_=filters.negate(filters.any_of(*untraced))
        )
        self.spans = Spans(provider.get_tracer("tlserve.server", __version__))

    def shutdown(self) -> None:
        """Export what is still buffered and stop (blocking; at most the exporter's timeout)."""
        if self._owned:
            self.provider.shutdown()


def provider_from_environment() -> TracerProvider:
    """A provider exporting over OTLP/gRPC in batches, configured by the standard ``OTEL_*`` variables."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def start_tracing(enabled: bool, provider: TracerProvider | None = None) -> Tracing | None:
    """The server's tracing when ``enabled`` (``provider``, or one from the environment), else None.
    Raises :class:`TracingUnavailable` when the packages are missing."""
    if not enabled:
        return None
    try:
        return (
            Tracing(provider, owned=False) if provider is not None else Tracing(provider_from_environment(), owned=True)
        )
    except ImportError as exc:
        raise TracingUnavailable(
            f"--tracing needs the OpenTelemetry packages ({exc.name or exc} is missing): {INSTALL_HINT}"
        ) from None
