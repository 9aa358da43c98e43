"""Limits answered with the right status while the server stays SERVING; batched == unbatched."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from serving_helpers import MODEL, PHOTOS, photo_bytes, png_bytes
from test_preprocess import pixel_bomb_png

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb


def assert_refused(live, images, code, text):
    with pytest.raises(grpc.RpcError) as err:
        live.stub.Classify(pb.ClassifyRequest(images=images), timeout=30)
    assert err.value.code() == code and text in err.value.details(), err.value.details()
    check = health_pb2_grpc.HealthStub(live.channel).Check(
        health_pb2.HealthCheckRequest(service="tlserve.v1.Inference"), timeout=5
    )
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert live.stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))]), timeout=30)


def test_too_many_images(live):  # live: max_images=8
    images = [pb.Image(encoded=photo_bytes("chelsea.png"))] * 9  # 2.2 MB: within --max-message-bytes
    assert_refused(live, images, grpc.StatusCode.INVALID_ARGUMENT, "9 images in one request exceeds the limit of 8")


def test_oversized_image(live):  # live: max_image_bytes=2_000_000
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    big = png_bytes(Image.fromarray(noise))
    assert len(big) > 2_000_000
    assert_refused(live, [pb.Image(encoded=big)], grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit of 2000000")


@pytest.mark.parametrize("side", [3000, 100_000])
def test_pixel_bomb(live, side):  # live: max_pixels=4_000_000
    assert_refused(live, [pb.Image(encoded=pixel_bomb_png(side, side))], grpc.StatusCode.INVALID_ARGUMENT, "pixels")


def test_message_larger_than_max_message_bytes(repo_copy, make_server):
    server = make_server(repo_copy, max_message_bytes=600_000)
    blob = pb.Image(encoded=b"\xff" * 700_000)
    assert_refused(server, [blob], grpc.StatusCode.RESOURCE_EXHAUSTED, "")


def test_batched_results_equal_unbatched(repo_copy, make_server):
    images = [photo_bytes(n) for n in PHOTOS + ("grace_hopper.jpg",)] * 2
    alone = make_server(repo_copy, max_batch_size=1)
    batched = make_server(repo_copy, max_batch_size=8, max_queue_delay_ms=100)

    def scores(response):
        return sorted((p.index, p.score) for p in response.results[0].predictions)

    reference = [
        scores(alone.stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=b)], top_k=100), timeout=30))
        for b in images
    ]
    futures = [
        batched.stub.Classify.future(pb.ClassifyRequest(images=[pb.Image(encoded=b)], top_k=100), timeout=30)
        for b in images
    ]
    together = [scores(f.result()) for f in futures]
    # one request with all 14 images runs as real multi-row batches (8 + 6), whatever the timing
    in_one = batched.stub.Classify(
        pb.ClassifyRequest(images=[pb.Image(encoded=b) for b in images], top_k=100), timeout=60
    )
    in_one = [sorted((p.index, p.score) for p in result.predictions) for result in in_one.results]
    for ref, got, got_in_one in zip(reference, together, in_one):
        for candidate in (got, got_in_one):
            assert [i for i, _ in ref] == [i for i, _ in candidate]
            np.testing.assert_allclose([s for _, s in ref], [s for _, s in candidate], rtol=1e-4, atol=1e-6)
    assert alone.metric("tlserve_batch_size_sum", model=MODEL) == alone.metric("tlserve_batch_size_count", model=MODEL)
    # every row went through the batcher, and some batches held several rows
    assert batched.metric("tlserve_batch_size_sum", model=MODEL) == 2 * len(images)
    assert batched.metric("tlserve_batch_size_count", model=MODEL) <= len(images) + 2
