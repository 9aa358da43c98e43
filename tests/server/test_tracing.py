"""`--tracing`: a span per RPC, children for decode, queue wait, inference and encode, the caller's
W3C traceparent as the parent; spans read back through the SDK's in-memory exporter, and through a
real OTLP/gRPC receiver (opentelemetry-proto's collector service) that the server exports to."""

from __future__ import annotations

import logging
import random
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from serving_helpers import MODEL, LiveServer, photo_bytes, server_settings

from tlserve.server.app import ServerHandle, create_server
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.rpc import RpcCall
from tlserve.server.tracing import Spans, TracingUnavailable, start_tracing

CLASSIFY = "/tlserve.v1.Inference/Classify"
CHILDREN = ["decode", "queue", "inference", "encode"]
WAIT = 60  # seconds a span may take to reach the exporter on a loaded machine
CLOCKS_APART = 1_000_000  # ns: time.time_ns() and time.monotonic_ns() are two clocks, read one after the other


class Caller:
    """A caller's span (a fresh trace each time) and the ``traceparent`` its tracer sends, written by
    OpenTelemetry's W3C propagator."""

    def __init__(self) -> None:
        self.trace_id, self.span_id = random.getrandbits(128) | 1, random.getrandbits(64) | 1
        parent = SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=TraceFlags.SAMPLED)
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(
            carrier, context=set_span_in_context(NonRecordingSpan(parent), Context())
        )
        assert carrier["traceparent"] == f"00-{self.trace_id:032x}-{self.span_id:016x}-01"
        self.metadata = list(carrier.items())


class TracedServer(LiveServer):
    """A live server whose spans go to an injected provider."""

    def __init__(self, settings, provider: TracerProvider | None) -> None:
        self._provider = provider
        super().__init__(settings)

    async def _create(self, settings) -> ServerHandle:
        return create_server(settings, self.registry, self._provider)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(repo_copy, exporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = TracedServer(server_settings(repo_copy, tracing=True, max_images=8), provider).start()
    yield server
    server.close()
    provider.shutdown()


@pytest.fixture
def spans(exporter):
    exporter.clear()
    return exporter


def rpc_span(exporter: InMemorySpanExporter, name: str, trace_id: int) -> ReadableSpan:
    """The server span of ``name`` in ``trace_id``, once it has ended (the caller can hear the answer first)."""
    give_up = time.monotonic() + WAIT
    while time.monotonic() < give_up:
        found = [s for s in exporter.get_finished_spans() if s.name == name and s.context.trace_id == trace_id]
        if found:
            (span,) = found
            return span
        time.sleep(0.01)
    raise AssertionError(f"no span {name!r}; have {[s.name for s in exporter.get_finished_spans()]}")


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    found = [
        s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda s: (s.start_time, s.end_time))


def classify(server, images, metadata=(), **fields) -> pb.ClassifyResponse:
    request = pb.ClassifyRequest(images=images, top_k=2, **fields)
    return server.stub.Classify(request, metadata=metadata, timeout=60)


def photos(*names: str) -> list[pb.Image]:
    return [pb.Image(encoded=photo_bytes(name)) for name in names]


def test_classify_is_one_server_span_under_the_callers_traceparent(traced, spans):
    caller = Caller()
    classify(traced, photos("coffee.png", "chelsea.png"), caller.metadata)
    span = rpc_span(spans, CLASSIFY, caller.trace_id)
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.is_remote
    assert (span.parent.trace_id, span.parent.span_id) == (caller.trace_id, caller.span_id)
    attributes = dict(span.attributes or {})
    assert attributes["tlserve.model"] == MODEL and attributes["tlserve.model.version"] == "1"
    assert attributes["tlserve.batch_size"] == 2
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert attributes["rpc.service"] == "tlserve.v1.Inference" and attributes["rpc.method"] == "Classify"
    assert span.status.status_code is not StatusCode.ERROR


def test_classify_has_decode_queue_inference_and_encode_children_in_order(traced, spans):
    caller = Caller()
    classify(traced, photos("coffee.png"), caller.metadata)
    span = rpc_span(spans, CLASSIFY, caller.trace_id)
    kids = children(spans, span)
    assert [k.name for k in kids] == CHILDREN
    assert all(k.context.trace_id == caller.trace_id for k in kids)
    decode, queue, inference, encode = kids
    assert queue.end_time == inference.start_time  # both from the batcher's one timestamp
    # queue and inference are the batcher's monotonic times converted to the epoch: a clock read apart
    assert decode.end_time <= queue.start_time + CLOCKS_APART and inference.end_time <= encode.start_time + CLOCKS_APART
    assert span.start_time <= kids[0].start_time and kids[-1].end_time <= span.end_time
    assert dict(inference.attributes or {})["tlserve.batch.rows"] >= 1


def test_a_request_split_over_batches_has_a_queue_and_inference_span_per_part(repo_copy):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = TracedServer(server_settings(repo_copy, tracing=True, max_batch_size=2, max_images=8), provider).start()
    try:
        classify(server, photos("coffee.png", "chelsea.png", "rocket.jpg", "astronaut.png", "camera.png"))
        span = next(s for s in _wait_for(exporter, CLASSIFY))
        names = [k.name for k in children(exporter, span)]
        assert names.count("queue") == names.count("inference") == 3  # 5 rows in batches of at most 2
        assert dict(span.attributes or {})["tlserve.batch_size"] == 5
    finally:
        server.close()
        provider.shutdown()


def _wait_for(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    give_up = time.monotonic() + WAIT
    while time.monotonic() < give_up:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"no span {name!r}")


def test_a_failed_call_has_its_status_on_the_span_and_its_trace_id_in_the_log_line(traced, spans, caplog):
    caplog.set_level(logging.INFO, logger="tlserve.server.requests")
    caller = Caller()
    with pytest.raises(grpc.RpcError) as refused:
        classify(traced, [pb.Image(encoded=b"not an image")], caller.metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    span = rpc_span(spans, CLASSIFY, caller.trace_id)
    assert span.status.status_code is StatusCode.UNSET  # the caller's mistake, not the server's fault
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [k.name for k in children(spans, span)] == ["decode"]  # refused while decoding: no queue, no inference
    (record,) = [r for r in caplog.records if r.name == "tlserve.server.requests"]
    assert f"trace_id={caller.trace_id:032x}" in record.getMessage()
    assert record.json_fields["trace_id"] == f"{caller.trace_id:032x}"  # type: ignore[attr-defined]
    assert record.json_fields["code"] == "INVALID_ARGUMENT"  # type: ignore[attr-defined]


def test_a_call_without_traceparent_starts_its_own_trace(traced, spans):
    info = traced.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.name == MODEL
    (span,) = _wait_for(spans, "/tlserve.v1.Inference/GetModelInfo")
    assert span.parent is None
    assert dict(span.attributes or {})["tlserve.model"] == MODEL


def test_each_stream_message_is_a_child_span_with_its_own_stages(traced, spans):
    requests = [pb.ClassifyRequest(images=photos("coffee.png")), pb.ClassifyRequest(images=[pb.Image(encoded=b"x")])]
    caller = Caller()
    answers = list(traced.stub.ClassifyStream(iter(requests), metadata=caller.metadata, timeout=60))
    assert len(answers) == 2 and answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    stream = rpc_span(spans, "/tlserve.v1.Inference/ClassifyStream", caller.trace_id)
    messages = children(spans, stream)
    assert [m.name for m in messages] == ["ClassifyStream message"] * 2
    assert [k.name for k in children(spans, messages[0])] == CHILDREN
    assert dict(messages[0].attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert dict(messages[1].attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_oip_model_infer_is_traced_like_classify(traced, spans):
    size = traced.handle.repository.get(MODEL).manifest.preprocessing.input_size
    request = oip.ModelInferRequest(model_name=MODEL, id="req-1")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, size, size])
    request.raw_input_contents.append(np.zeros((1, 3, size, size), np.uint8).tobytes())
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(traced.channel)
    caller = Caller()
    stub.ModelInfer(request, metadata=caller.metadata, timeout=60)
    span = rpc_span(spans, "/inference.GRPCInferenceService/ModelInfer", caller.trace_id)
    assert [k.name for k in children(spans, span)] == CHILDREN
    assert dict(span.attributes or {})["tlserve.batch_size"] == 1


def test_a_call_refused_by_token_auth_is_a_span_with_its_code(repo_copy, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("infer-token-0123456789 infer\n")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = TracedServer(server_settings(repo_copy, tracing=True, token_file=str(tokens)), provider).start()
    try:
        caller = Caller()
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.ListModels(pb.ListModelsRequest(), metadata=caller.metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        span = rpc_span(exporter, "/tlserve.v1.Inference/ListModels", caller.trace_id)
        assert dict(span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    finally:
        server.close()
        provider.shutdown()


@pytest.mark.parametrize(
    "code, status",
    [
        (grpc.StatusCode.OK, StatusCode.UNSET),
        (grpc.StatusCode.INVALID_ARGUMENT, StatusCode.UNSET),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, StatusCode.UNSET),
        (grpc.StatusCode.INTERNAL, StatusCode.ERROR),
        (grpc.StatusCode.UNAVAILABLE, StatusCode.ERROR),
        (grpc.StatusCode.DEADLINE_EXCEEDED, StatusCode.ERROR),
    ],
)
def test_a_span_is_an_error_for_the_servers_faults_only(code, status):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = Spans(provider.get_tracer("test"))
    call = RpcCall()
    call.model, call.version, call.code = MODEL, "7", code
    with spans.span("call"):
        spans.ended(call)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is status
    assert dict(span.attributes or {}) == {
        "tlserve.model": MODEL,
        "tlserve.model.version": "7",
        "rpc.grpc.status_code": code.value[0],
    }


def test_health_checks_make_no_spans(traced, spans):
    caller = Caller()
    stub = health_pb2_grpc.HealthStub(traced.channel)
    for _ in range(3):
        stub.Check(health_pb2.HealthCheckRequest(), metadata=caller.metadata, timeout=30)
    traced.stub.ListModels(pb.ListModelsRequest(), metadata=caller.metadata, timeout=30)
    rpc_span(spans, "/tlserve.v1.Inference/ListModels", caller.trace_id)  # ended after the checks, on the same channel
    assert not [s for s in spans.get_finished_spans() if "Health" in s.name]


def test_tracing_off_makes_no_spans_and_imports_nothing(live):
    assert live.handle.tracing is None
    assert live.handle.dataplane.spans.enabled is False
    assert live.stub.Classify(pb.ClassifyRequest(images=photos("coffee.png")), timeout=60).results


def test_tracing_asked_for_without_the_packages_is_a_clear_refusal(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "opentelemetry.instrumentation.grpc", None)
    with pytest.raises(TracingUnavailable, match=r"--tracing needs the OpenTelemetry packages .*tlserve\[tracing\]"):
        start_tracing(True, TracerProvider())
    assert start_tracing(False) is None


# --- a real OTLP/gRPC receiver --------------------------------------------------------------------------
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's trace service: keeps every span exported to it."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self):
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        yield resource, span


@pytest.fixture
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collected, f"http://127.0.0.1:{port}"
    server.stop(0)


def test_spans_reach_an_otlp_receiver_named_by_the_otel_environment(repo_copy, receiver, monkeypatch):
    collected, endpoint = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tlserve-under-test")
    server = TracedServer(server_settings(repo_copy, tracing=True), None).start()  # provider from OTEL_*
    caller = Caller()
    try:
        classify(server, photos("coffee.png"), caller.metadata)
    finally:
        server.close()  # shutting down flushes the batch processor to the receiver
    spans = list(collected.spans())
    assert spans, "the receiver got no spans"
    assert {resource["service.name"] for resource, _ in spans} == {"tlserve-under-test"}
    by_name = {span.name: span for _, span in spans}
    rpc = by_name[CLASSIFY]
    assert rpc.trace_id == caller.trace_id.to_bytes(16, "big")
    assert rpc.parent_span_id == caller.span_id.to_bytes(8, "big")
    for name in CHILDREN:
        assert by_name[name].parent_span_id == rpc.span_id and by_name[name].trace_id == rpc.trace_id
    attributes = {a.key: a.value for a in rpc.attributes}
    assert attributes["tlserve.model"].string_value == MODEL
    assert attributes["tlserve.batch_size"].int_value == 1
