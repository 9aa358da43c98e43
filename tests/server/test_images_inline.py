"""A request of one small image is admitted and decoded in one call on the decoding pool.

The real decoder on real pools. With the header thread blocked the small image is still decoded (to
the same pixels as the pool path), so it needs no header thread; every admission step keeps its order
and answer in that call: the budget (refused at once, counted, released), the deadline, a bad header,
a cancelled caller (its image never started, nothing reserved). Through a real server: one JPEG
classified alone equals the same JPEG in a two-image request (the pool path).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from serving_helpers import photo_path
from test_preprocess import pixel_bomb_png

from tlserve.manifest import Preprocessing
from tlserve.server.admission import Budget
from tlserve.server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from tlserve.server.images import INLINE_PIXELS, ImageDecoder
from tlserve.server.metrics import Metrics
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.preprocess import ImageLimits, decode, read_header

PRE = Preprocessing(input_size=32, resize_size=36)
FLOAT_PRE = Preprocessing(input_size=32, resize_size=36, input_dtype="float32", normalize_in_graph=False)
LIMITS = ImageLimits(max_image_bytes=1_000_000, max_pixels=4_000_000, max_request_pixels=6_000_000)


def small_jpeg(size: int = 224) -> bytes:
    buf = io.BytesIO()
    Image.open(photo_path("chelsea.png")).convert("RGB").resize((size, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Gates:
    """``hold_pool()`` / ``hold_headers()`` block the decode pool's or the header thread's one worker until
    the event they return is set (every gate opens when the test ends)."""

    def __init__(self, pool: ThreadPoolExecutor, headers: ThreadPoolExecutor) -> None:
        self._pool, self._headers = pool, headers
        self._held: list[threading.Event] = []

    def _hold(self, executor: ThreadPoolExecutor) -> threading.Event:
        gate = threading.Event()
        self._held.append(gate)
        executor.submit(gate.wait, 30)
        return gate

    def hold_pool(self) -> threading.Event:
        return self._hold(self._pool)

    def hold_headers(self) -> threading.Event:
        return self._hold(self._headers)

    def open_all(self) -> None:
        for gate in self._held:
            gate.set()


def run_gated(body, budget: Budget, limits: ImageLimits = LIMITS):
    """``body(decoder, gates)`` on the real decoder with one decode thread and one header thread (see Gates)."""

    async def main():
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as headers:
            gates = Gates(pool, headers)
            decoder = ImageDecoder(limits, 8, pool, threads=1, budget=budget, headers=headers)
            try:
                return await body(decoder, gates)
            finally:
                gates.open_all()

    return asyncio.run(main())


def metered_budget(capacity: int) -> tuple[Budget, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    return Budget("decoding", capacity, metrics.decode_bytes, metrics.decode_rejections), registry


def test_small_image_needs_no_header_thread_and_decodes_to_the_pool_paths_pixels():
    image = small_jpeg()
    assert read_header(image, PRE, LIMITS).pixels <= INLINE_PIXELS
    budget = Budget("decoding", 1 << 30)

    async def body(decoder, gates):
        headers = gates.hold_headers()
        alone = await asyncio.wait_for(decoder.batch([image], PRE), 60)  # the header thread is still blocked
        floats = await asyncio.wait_for(decoder.batch([image], FLOAT_PRE), 60)
        in_use = budget.in_use
        headers.set()
        pair = await decoder.batch([image, image], PRE)  # two images: header thread, then the pool
        return alone, floats, in_use, pair

    alone, floats, in_use, pair = run_gated(body, budget)
    assert alone.shape == (1, 3, 32, 32) and alone.dtype == np.uint8 and in_use == 0
    np.testing.assert_array_equal(alone[0], decode(image, PRE, LIMITS))
    np.testing.assert_array_equal(pair, np.concatenate([alone, alone]))
    assert floats.dtype == np.float32 and floats.shape == (1, 3, 32, 32)


def test_small_image_is_refused_at_once_when_the_budget_is_full_and_counted():
    small = small_jpeg()
    budget, registry = metered_budget(1 << 20)

    async def body(decoder, gates):
        held = budget.take(budget.capacity - 100)  # what other requests hold; the small image needs more than 100
        with pytest.raises(ResourceExhausted, match="decoding budget is full"):
            await asyncio.wait_for(decoder.batch([small], PRE), 60)
        held.release()
        return await decoder.batch([small], PRE), budget.in_use

    batch, after = run_gated(body, budget)
    assert batch.shape == (1, 3, 32, 32) and after == 0
    assert registry.get_sample_value("tlserve_decode_rejections_total") == 1


def test_small_image_larger_than_the_whole_budget_is_invalid_argument():
    async def body(decoder, gates):
        with pytest.raises(InvalidArgument, match="more than the server's budget"):
            await decoder.batch([small_jpeg()], PRE)

    run_gated(body, Budget("decoding", 1000))


def test_small_image_deadline_passed_on_the_pool_queue_skips_the_decode():
    """A header-valid image without pixel data would fail as "corrupt image data" had it been decoded."""
    bomb = pixel_bomb_png(200, 200)

    async def body(decoder, gates):
        pool_gate = gates.hold_pool()
        waiting = asyncio.ensure_future(decoder.batch([bomb], PRE, time.monotonic() + 0.2))
        await asyncio.sleep(0.3)
        pool_gate.set()
        with pytest.raises(DeadlineExceeded, match="before decoding"):
            await waiting
        with pytest.raises(InvalidArgument, match="image 0: corrupt image data"):  # the same image, decoded
            await decoder.batch([bomb], PRE, time.monotonic() + 60)

    run_gated(body, Budget("decoding", 1 << 30))


def test_small_image_bad_header_names_the_image_and_reserves_nothing():
    budget = Budget("decoding", 1 << 30)

    async def body(decoder, gates):
        with pytest.raises(InvalidArgument, match="image 0: not a decodable PNG/JPEG"):
            await decoder.batch([b"GIF89a" + bytes(64)], PRE)
        with pytest.raises(InvalidArgument, match="over the per-request limit"):
            await decoder.batch([pixel_bomb_png(100, 100)], PRE)
        return budget.in_use

    limits = ImageLimits(max_image_bytes=1_000_000, max_pixels=4_000_000, max_request_pixels=5000)
    assert run_gated(body, budget, limits) == 0


def test_cancelled_caller_of_a_small_image_is_never_decoded_nor_reserved():
    """The budget is full, so a started admission would be refused and counted: a cancelled one is not."""
    small = small_jpeg()
    budget, registry = metered_budget(1 << 20)

    async def body(decoder, gates):
        held = budget.take(budget.capacity)  # what other requests hold
        blocker = gates.hold_pool()
        cancelled = asyncio.ensure_future(decoder.batch([small], PRE))
        refused = asyncio.ensure_future(decoder.batch([small], PRE))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches the executor's queue on the loop's next turns
        blocker.set()
        with pytest.raises(ResourceExhausted):
            await refused
        held.release()
        return cancelled.cancelled()

    assert run_gated(body, budget)
    assert registry.get_sample_value("tlserve_decode_rejections_total") == 1  # the refused call's, not the cancelled
    assert budget.in_use == 0


def test_one_jpeg_classified_alone_equals_it_in_a_two_image_request(repo_copy, make_server):
    server = make_server(repo_copy)
    image = pb.Image(encoded=small_jpeg())
    alone = server.stub.Classify(pb.ClassifyRequest(images=[image], top_k=3), timeout=60)
    pair = server.stub.Classify(pb.ClassifyRequest(images=[image, image], top_k=3), timeout=60)
    assert len(alone.results) == 1 and len(pair.results) == 2
    for result in pair.results:
        assert [p.index for p in result.predictions] == [p.index for p in alone.results[0].predictions]
        np.testing.assert_allclose(
            [p.score for p in result.predictions], [p.score for p in alone.results[0].predictions], rtol=1e-5
        )
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=small_jpeg()[:4000])]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0: corrupt image data" in err.value.details()
