"""The data plane on its own, no gRPC call in between: a real exported model, real photos, run on
the event loop of an in-process server (whose repository it shares)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving_helpers import MODEL, PHOTOS, photo_bytes, write_with_manifest

from tlserve.manifest import Outputs
from tlserve.server.dataplane import DataPlane, RequestedOutput, TopK
from tlserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tlserve.server.images import ImageDecoder
from tlserve.server.preprocess import ImageLimits, decode
from tlserve.server.settings import Settings

MAX_IMAGES = 8  # the live fixture's limit
LIMITS = ImageLimits.from_settings(Settings())


@pytest.fixture(scope="module")
def plane(live) -> DataPlane:
    return live.handle.dataplane


@pytest.fixture(scope="module")
def model(plane):
    return plane.model(MODEL)


@pytest.fixture(scope="module")
def photos(live, model) -> np.ndarray:
    """uint8 [N, 3, S, S]: the photos preprocessed as the server does (JPEGs drafted unless
    --fast-decode), for the tensor path."""
    draft = live.handle.settings.fast_decode
    return np.stack([decode(photo_bytes(n), model.manifest.preprocessing, LIMITS, draft=draft) for n in PHOTOS])


def test_lookup_names_the_model_or_refuses(plane, model):
    assert (model.name, model.version) == (MODEL, "1")
    assert plane.model(MODEL, "1") is model and plane.model() is model
    assert plane.models() == [model] and plane.models(MODEL, "1") == [model] and plane.models("nope") == []
    assert plane.ready_versions(MODEL) == ["1"] and plane.ready()
    with pytest.raises(NotFound, match="model 'nope' not found"):
        plane.model("nope")
    with pytest.raises(NotFound, match="has no version '99'"):
        plane.model(MODEL, "99")


def test_images_and_tensors_give_the_same_classes(live, plane, model, photos):
    images = [photo_bytes(n) for n in PHOTOS]
    top = live.call(plane.classify(model, images, 3))
    assert isinstance(top, TopK) and top.indices.shape == top.scores.shape == (len(PHOTOS), 3)
    assert (np.diff(top.scores, axis=1) <= 0).all() and list(top.labels) == list(model.manifest.labels)
    answers = live.call(plane.infer(model, {model.input_name: photos}, [RequestedOutput("probabilities", 3)]))
    np.testing.assert_array_equal(answers["probabilities"].indices, top.indices)
    np.testing.assert_allclose(answers["probabilities"].scores, top.scores, rtol=1e-5, atol=1e-6)
    assert live.call(plane.classify(model, images[:1], 0)).indices.shape == (1, 1)  # 0 means 1


def test_every_output_when_none_is_requested_and_embeddings(live, plane, model, photos):
    answers = live.call(plane.infer(model, {model.input_name: photos[:2]}))
    assert list(answers) == model.output_names
    assert answers["probabilities"].shape == (2, model.manifest.num_classes)
    vectors = live.call(plane.embed(model, [photo_bytes("chelsea.png"), photo_bytes("coffee.png")]))
    assert vectors.shape == (2, model.embedding_size)
    np.testing.assert_allclose(vectors, answers["embedding"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case, message",
    [
        ("dtype", "input 'images' of model 'fashion' must be UINT8, got FP32"),
        ("shape", "must have shape [N, 3, "),
        ("name", "takes one input 'images', got ['pixels']"),
        ("two inputs", "takes one input 'images', got ['extra', 'images']"),
        ("too many", f"{MAX_IMAGES + 1} images in one request exceeds the limit of {MAX_IMAGES}"),
        ("no rows", "the request has no images"),
        ("output", "has no output 'logits_nope'"),
        ("negative classes", "classification count must be positive, got -1"),
        ("classes of a non-score output", "only available on an output with one score per label"),
    ],
)
def test_wrong_input_or_output_is_invalid_argument(live, plane, model, photos, case, message):
    one = photos[:1]
    inputs = {
        "dtype": {"images": one.astype(np.float32)},
        "shape": {"images": np.ascontiguousarray(one[:, :, 1:, :])},
        "name": {"pixels": one},
        "two inputs": {"images": one, "extra": one},
        "too many": {"images": np.repeat(one, MAX_IMAGES + 1, axis=0)},
        "no rows": {"images": one[:0]},
    }.get(case, {"images": one})
    requested = {
        "output": [RequestedOutput("logits_nope")],
        "negative classes": [RequestedOutput("probabilities", -1)],
        "classes of a non-score output": [RequestedOutput("embedding", 2)],
    }.get(case, [])
    with pytest.raises(InvalidArgument) as err:
        live.call(plane.infer(model, inputs, requested))
    assert message in str(err.value)
    assert live.call(plane.infer(model, {"images": one}))["probabilities"].shape[0] == 1  # still serving


def test_bad_images_are_invalid_argument(live, plane, model):
    with pytest.raises(InvalidArgument, match="^image 1: not a decodable"):
        live.call(plane.classify(model, [photo_bytes("coffee.png"), b"not an image"], 1))
    with pytest.raises(InvalidArgument, match="the request has no images"):
        live.call(plane.classify(model, [], 1))
    with pytest.raises(InvalidArgument, match="exceeds the limit of 8"):
        live.call(plane.embed(model, [photo_bytes("coffee.png")] * (MAX_IMAGES + 1)))


def test_embed_without_an_embedding_output_is_failed_precondition(exported_version, tmp_path, make_server):
    write_with_manifest(
        exported_version / "model.onnx", tmp_path / MODEL / "1" / "model.onnx", outputs=Outputs(embedding=None)
    )
    server = make_server(tmp_path)
    plane = server.handle.dataplane
    with pytest.raises(FailedPrecondition, match="has no embedding output"):
        server.call(plane.embed(plane.model(MODEL), [photo_bytes("coffee.png")]))


def test_unloading_refuses_new_leases_while_the_request_in_flight_finishes(repo_copy, make_server):
    server = make_server(repo_copy)
    image = [photo_bytes("coffee.png")]
    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(gate.wait)  # the decoder's one worker is busy until the gate opens
        plane = DataPlane(server.handle.repository, ImageDecoder(LIMITS, MAX_IMAGES, pool))

        async def scenario():
            model = plane.model(MODEL)
            in_flight = asyncio.ensure_future(plane.classify(model, image, 1))
            await asyncio.sleep(0)  # it takes its lease and waits for the decoder
            unloading = asyncio.ensure_future(model.unload(grace=120))
            await asyncio.sleep(0)  # unloading has begun: the model is no longer ready
            refusals = []
            for call in (lambda: plane.classify(model, image, 1), lambda: plane.classify(plane.model(MODEL), image, 1)):
                try:
                    await call()
                except Unavailable as exc:
                    refusals.append(str(exc))
            waiting = not unloading.done() and not in_flight.done()
            gate.set()
            return refusals, waiting, await in_flight, await unloading

        try:
            refusals, waiting, top, _ = server.call(scenario())
        finally:
            gate.set()
    assert refusals == [f"model '{MODEL}' version 1 is not ready", f"model '{MODEL}' has no ready version"]
    assert waiting, "the unload must wait for the request that holds a lease"
    assert top.indices.shape == (1, 1)
