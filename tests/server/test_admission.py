"""Admit before you work: every cost a caller can make the server pay is checked before the work starts.

Through the real server where the outcome is deterministic (pixel budget, concurrent-call cap, typed
OIP sizes, shapes, health under a big typed request), and through the real decoder and batcher on a
blocked pool where the outcome depends on timing (decode budget full, deadline before decoding, byte
queue). A header-valid image whose pixel data is missing (``pixel_bomb_png``) tells whether decoding
ran: it would fail as "corrupt image data".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import CollectorRegistry
from serving_helpers import MODEL, photo_bytes, photo_path, png_bytes
from test_batcher import Recorder, batching, rows
from test_preprocess import pixel_bomb_png

from tlserve.manifest import Preprocessing
from tlserve.server.admission import Budget
from tlserve.server.batcher import Batcher
from tlserve.server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from tlserve.server.images import INLINE_PIXELS, ImageDecoder
from tlserve.server.metrics import Metrics
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.preprocess import ImageLimits, read_header

PRE = Preprocessing(input_size=32, resize_size=36)
LIMITS = ImageLimits(max_image_bytes=1_000_000, max_pixels=4_000_000, max_request_pixels=6_000_000)


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=60, **kwargs)
    return err.value


def serving(server) -> bool:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == 1


def no_traceback_logged(caplog) -> bool:
    return not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# --- the per-request pixel budget, from headers ------------------------------------------------
def test_request_pixel_budget_refused_from_the_headers(repo_copy, make_server):
    server = make_server(repo_copy, max_pixels=1_000_000, max_request_pixels=2_500_000)
    bombs = [pb.Image(encoded=pixel_bomb_png(1000, 1000))] * 3  # each allowed, together 3 MP
    err = refused(server.stub.Classify, pb.ClassifyRequest(images=bombs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3000000 pixels together, over the per-request limit of 2500000" in err.details()  # not "corrupt"
    two = server.stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))] * 2))
    assert len(two.results) == 2 and serving(server)


# --- the decode budget: reserved before decoding, refused at once when full ----------------------
def large_photo() -> bytes:
    """A real photo over INLINE_PIXELS, so that a request of it alone is decoded on the pool."""
    data = png_bytes(Image.open(photo_path("coffee.png")).convert("RGB").resize((800, 600)))
    assert read_header(data, PRE, LIMITS).pixels > INLINE_PIXELS
    return data


def run_decoder(body, budget: Budget, workers: int = 1):
    """``body(decoder, gate)`` on a decoder whose pool's workers are all blocked until ``gate`` opens."""
    gate = threading.Event()

    async def main():
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(workers):
                pool.submit(gate.wait, 30)
            decoder = ImageDecoder(LIMITS, 8, pool, threads=workers, budget=budget, headers=ThreadPoolExecutor(1))
            try:
                return await body(decoder, gate)
            finally:
                gate.set()

    return asyncio.run(main())


def test_full_decode_budget_is_resource_exhausted_at_once_and_counted():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    image = large_photo()
    cost = ImageDecoder(LIMITS, 8, ThreadPoolExecutor(1)).reservation([read_header(image, PRE, LIMITS)], 1, PRE)
    budget = Budget("decoding", int(cost * 1.5), metrics.decode_bytes, metrics.decode_rejections)

    async def body(decoder, gate):
        first = asyncio.ensure_future(decoder.batch([image], PRE))
        while not budget.in_use:  # the first request is admitted and waits for a decoding thread
            await asyncio.sleep(0.01)
        held = registry.get_sample_value("tlserve_decode_admitted_bytes")
        # refused while the pool is still blocked: answered at once, not queued behind the admitted work
        with pytest.raises(ResourceExhausted, match="decoding budget is full"):
            await decoder.batch([image], PRE)
        gate.set()
        return held, await first, budget.in_use

    held, batch, after = run_decoder(body, budget)
    assert held == cost  # the reservation, visible as a gauge
    assert batch.shape == (1, 3, 32, 32) and after == 0  # released once decoded
    assert registry.get_sample_value("tlserve_decode_rejections_total") == 1


def test_request_larger_than_the_whole_decode_budget_is_invalid_argument():
    async def body(decoder, gate):
        with pytest.raises(InvalidArgument, match="more than the server's budget"):
            await decoder.batch([pixel_bomb_png(1000, 1000)], PRE)

    run_decoder(body, Budget("decoding", 1_000_000))


def test_budget_is_released_only_when_a_cancelled_request_has_stopped_decoding():
    budget = Budget("decoding", 1 << 30)

    async def body(decoder, gate):
        task = asyncio.ensure_future(decoder.batch([photo_bytes("coffee.png")] * 2, PRE))
        while not budget.in_use:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.05)
        held_after_cancel = budget.in_use  # the blocked worker has not finished: still reserved
        gate.set()
        for _ in range(500):
            if not budget.in_use:
                break
            await asyncio.sleep(0.01)
        return held_after_cancel, budget.in_use

    held_after_cancel, finally_held = run_decoder(body, budget)
    assert held_after_cancel > 0 and finally_held == 0


# --- the caller's deadline, before decoding ---------------------------------------------------------
@pytest.mark.parametrize("side", [500, 600])  # a lone image admitted and decoded in one call, and in two
def test_expired_deadline_is_answered_before_any_decoding(side):
    async def body(decoder, gate):
        gate.set()
        with pytest.raises(DeadlineExceeded, match="before decoding"):
            await decoder.batch([pixel_bomb_png(side, side)], PRE, deadline=time.monotonic() - 1)
        with pytest.raises(InvalidArgument, match="corrupt image data"):  # the same image, decoded
            await decoder.batch([pixel_bomb_png(side, side)], PRE, deadline=time.monotonic() + 60)

    run_decoder(body, Budget("decoding", 1 << 30))


def test_deadline_passed_while_waiting_for_a_thread_skips_the_decode():
    async def body(decoder, gate):
        two = [pixel_bomb_png(600, 600)] * 2  # two images: headers on their thread, then the (blocked) pool
        waiting = asyncio.ensure_future(decoder.batch(two, PRE, time.monotonic() + 0.2))
        await asyncio.sleep(0.3)
        gate.set()
        with pytest.raises(DeadlineExceeded, match="waited for a decoding thread"):
            await waiting

    run_decoder(body, Budget("decoding", 1 << 30))


# --- the batch queue, bounded in bytes ----------------------------------------------------------------
def test_batch_queue_is_bounded_in_bytes():
    gate = threading.Event()
    registry = CollectorRegistry()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            options = batching(max_batch_size=1, max_queue_delay=0, max_queue_size=100, max_queue_bytes=100)
            batcher = Batcher("m", Recorder(gate), options, pool, Metrics(registry))
            batcher.start()
            running = asyncio.ensure_future(batcher.submit(rows([(0, 1)])[0]))
            await asyncio.sleep(0.05)  # the worker holds it at the gate; the queue is empty again
            big = np.zeros((1, 200), dtype=np.uint8)  # over the limit alone: an empty queue still takes it
            queued = [asyncio.ensure_future(batcher.submit(big))]
            await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted, match=r"200 bytes waiting; limits 100 requests, 100 bytes"):
                await batcher.submit(np.zeros((1, 8), dtype=np.uint8))
            gate.set()
            results = await asyncio.gather(running, *queued)
            after = await batcher.submit(np.zeros((1, 8), dtype=np.uint8))  # drained: room again
            await batcher.stop()
            return results, after

    results, after = asyncio.run(main())
    assert len(results) == 2 and after["double"].shape == (1, 8)
    assert registry.get_sample_value("tlserve_queue_rejections_total", {"model": "m"}) == 1


# --- the cap on concurrent calls, through the real server --------------------------------------------------
def test_concurrent_rpc_cap_answers_resource_exhausted(repo_copy, make_server):
    server = make_server(repo_copy, max_concurrent_rpcs=2)
    release = threading.Event()
    request = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))])

    def one_then_hold():
        yield request
        release.wait(60)

    streams = []
    try:
        for _ in range(2):  # each stream holds one of the two slots until released
            streams.append(server.stub.ClassifyStream(one_then_hold(), timeout=120))
            assert len(next(streams[-1]).results) == 1  # answered: the server holds it
        err = refused(server.stub.GetModelInfo, pb.GetModelInfoRequest())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    finally:
        release.set()
        for stream in streams:
            list(stream)
    for _ in range(200):  # the slots come back once the streams have ended
        try:
            assert server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == MODEL
            break
        except grpc.RpcError:
            time.sleep(0.05)
    else:
        pytest.fail("the server never took calls again")


# --- OIP typed contents: sizes checked before conversion -------------------------------------------------
def typed_request(rows_: int, size: int, value: int = 7, datatype: str = "UINT8") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype=datatype, shape=[rows_, 3, size, size])
    tensor.contents.uint_contents.extend([value] * (rows_ * 3 * size * size))
    return request


@pytest.fixture(scope="module")
def oip_server(repo_copy):
    from serving_helpers import LiveServer, server_settings

    server = LiveServer(server_settings(repo_copy, max_images=4, max_message_bytes=16 << 20)).start()
    yield server
    server.close()


def oip_stub(server):
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)


def input_size(server) -> int:
    return server.handle.repository.get(MODEL).manifest.preprocessing.input_size


def test_typed_request_over_the_row_limit_is_refused_before_conversion(oip_server, caplog):
    size = input_size(oip_server)
    # 300 is out of UINT8's range: a conversion would refuse that first; the row count is refused before it
    err = refused(oip_stub(oip_server).ModelInfer, typed_request(5, size, value=300))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5 images in one request exceeds the limit of 4" in err.details()
    err = refused(oip_stub(oip_server).ModelInfer, typed_request(2, size, value=300))  # within limits: converted
    assert "out of the UINT8 range" in err.details()
    assert no_traceback_logged(caplog) and serving(oip_server)


def test_health_answers_while_a_big_typed_request_is_converted(oip_server):
    size = input_size(oip_server)
    stub = oip_stub(oip_server)
    futures = [stub.ModelInfer.future(typed_request(4, size), timeout=120) for _ in range(4)]
    assert serving(oip_server)  # answered while the typed requests are being converted and run
    assert all(len(f.result().outputs) >= 1 for f in futures)


# --- every caller-made shape error is INVALID_ARGUMENT, never INTERNAL, and logs no traceback --------------
def raw_request(shape, raw: bytes = b"") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[raw])
    request.inputs.add(name="images", datatype="UINT8", shape=shape)
    return request


@pytest.mark.parametrize(
    "shape, raw, message",
    [
        ([1] * 70, b"\0", "has more than 8 dimensions"),
        ([0, 2**62, 2**62], b"", "is too large"),
        ([-1, 3, 64, 64], b"", "negative dimension"),
        ([2**62, 3, 64, 64], b"", "images in one request exceeds the limit"),  # before the raw length
        ([3, 64, 64], b"\0" * 3 * 64 * 64, "must have shape [N, 3,"),
        ([0, 3, "S", "S"], b"", "the request has no images"),
        ([1, 3, 7, 7], b"\0" * 147, "must have shape [N, 3,"),
        ([1, 1, 1, 1, 1, 1, 1, 1], b"\0", "must have shape [N, 3,"),
    ],
    ids=["rank-70", "zero-and-huge", "negative", "overflow", "rank-3", "zero-rows", "wrong-size", "rank-8"],
)
def test_caller_shapes_are_invalid_argument_without_a_traceback(oip_server, caplog, shape, raw, message):
    size = input_size(oip_server)
    shape = [size if d == "S" else d for d in shape]
    with caplog.at_level(logging.INFO):
        err = refused(oip_stub(oip_server).ModelInfer, raw_request(shape, raw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in err.details() and len(err.details()) < 400
    assert no_traceback_logged(caplog)


def test_task_api_tensor_with_a_huge_shape_is_invalid_argument(oip_server, caplog):
    image = pb.Image(tensor=pb.Tensor(shape=[1] * 100_000, data=b"\0"))
    err = refused(oip_server.stub.Classify, pb.ClassifyRequest(images=[image]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # 100,000 one-byte dimensions parse into 800 kB: the wire guard refuses them before protobuf does
    assert "packed values would take 800000 bytes" in err.details() and len(err.details()) < 300
    assert no_traceback_logged(caplog)


# --- errors describe, never echo ---------------------------------------------------------------------------
def test_a_1mb_model_name_gets_not_found_with_a_short_message(oip_server):
    name = "m" * 1_000_000
    err = refused(oip_server.stub.Classify, pb.ClassifyRequest(model=pb.ModelRef(name=name), images=[]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "... (1000000 characters) not found" in err.details() and len(err.details()) < 300
    err = refused(oip_stub(oip_server).ModelInfer, oip.ModelInferRequest(model_name=name))
    assert err.code() == grpc.StatusCode.NOT_FOUND and len(err.details()) < 300
    err = refused(oip_stub(oip_server).ModelInfer, oip.ModelInferRequest(model_name=MODEL, model_version=name))
    assert err.code() == grpc.StatusCode.NOT_FOUND and len(err.details()) < 300


def test_long_input_output_and_datatype_names_are_quoted_short(oip_server):
    size = input_size(oip_server)
    long = "x" * 100_000
    renamed = raw_request([1, 3, size, size], b"\0" * 3 * size * size)
    renamed.inputs[0].name = long
    datatype = raw_request([1, 3, size, size], b"\0" * 3 * size * size)
    datatype.inputs[0].datatype = long
    output = raw_request([1, 3, size, size], b"\0" * 3 * size * size)
    output.outputs.add(name=long)
    for request in (renamed, datatype, output):
        err = refused(oip_stub(oip_server).ModelInfer, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(100000 characters)" in err.details() and len(err.details()) < 400, err.details()
