"""A model exported with ``--outputs probabilities`` (one output, the shape generic OIP clients expect),
served for real and called with unmodified tritonclient: metadata and ModelConfig list the one output,
the classification extension and ModelStreamInfer answer from it, and the task API's Embed refuses with
FAILED_PRECONDITION while Classify goes on."""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("torch")
from serving_helpers import LiveServer, photo_bytes, server_settings  # noqa: E402

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task_pb  # noqa: E402
from tlserve.server.preprocess import ImageLimits, decode  # noqa: E402

pytestmark = pytest.mark.torch
MODEL = "fashion-probs"
MAX_IMAGES = 6
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png")


@pytest.fixture(scope="module")
def repository(tmp_path_factory, export_version):
    root = tmp_path_factory.mktemp("single-output")
    export_version(root, name=MODEL, version="1", outputs="probabilities")
    return root


@pytest.fixture(scope="module")
def served(repository):
    server = LiveServer(server_settings(repository, max_images=MAX_IMAGES, max_queue_delay_ms=1.0)).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(served):
    with tc.InferenceServerClient(f"127.0.0.1:{served.handle.port}") as c:
        yield c


@pytest.fixture(scope="module")
def manifest(served):
    return served.handle.repository.get(MODEL).manifest


@pytest.fixture(scope="module")
def tensors(served, manifest) -> np.ndarray:
    limits = ImageLimits.from_settings(served.handle.settings)
    return np.stack([decode(photo_bytes(name), manifest.preprocessing, limits) for name in PHOTOS])


def images_input(batch: np.ndarray):
    tensor = tc.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def parse_classes(entries) -> list[tuple[float, int, str]]:
    """Triton's classification strings ``score:index:label``."""
    return [(float(s), int(i), label) for s, i, label in (e.decode().split(":", 2) for e in entries)]


def test_manifest_and_sidecar_name_only_probabilities(repository, manifest):
    assert (manifest.outputs.probabilities, manifest.outputs.embedding, manifest.outputs.logits) == (
        "probabilities",
        None,
        None,
    )
    sidecar = json.loads((repository / MODEL / "1" / "manifest.json").read_text())
    assert sidecar["outputs"] == {"probabilities": "probabilities", "embedding": None, "logits": None}
    assert sidecar["provenance"]["export"]["verification"]["model.onnx"]["max_abs_embedding"] is None


def test_metadata_and_model_config_show_one_output(client, manifest):
    meta = client.get_model_metadata(MODEL)
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [
        ("probabilities", "FP32", [-1, manifest.num_classes])
    ]
    config = client.get_model_config(MODEL).config
    assert (config.name, config.max_batch_size) == (MODEL, MAX_IMAGES)
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probabilities", tc.model_config_pb2.TYPE_FP32, [manifest.num_classes])
    ]


def test_infer_without_named_outputs_returns_the_one_output(client, tensors, manifest):
    result = client.infer(MODEL, [images_input(tensors)])
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(PHOTOS), manifest.num_classes)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_classification_extension_on_the_one_output(client, tensors, manifest):
    probabilities = client.infer(MODEL, [images_input(tensors)]).as_numpy("probabilities")
    requested = [tc.InferRequestedOutput("probabilities", class_count=3)]
    result = client.infer(MODEL, [images_input(tensors)], outputs=requested)
    assert result.get_output("probabilities").datatype == "BYTES"
    top3 = result.as_numpy("probabilities")
    assert top3.shape == (len(PHOTOS), 3)
    for entries, row in zip(top3, probabilities):
        parsed = parse_classes(entries)
        assert [i for _, i, _ in parsed] == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [manifest.labels[i] for _, i, _ in parsed]
        np.testing.assert_allclose([s for s, _, _ in parsed], np.sort(row)[::-1][:3], atol=1e-6)


def test_model_stream_infer_answers_in_order_with_classes(served, tensors, manifest):
    results: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(f"127.0.0.1:{served.handle.port}") as streaming:
        streaming.start_stream(callback=lambda result, error: results.put((result, error)))
        for n in (1, 2, 3):
            streaming.async_stream_infer(
                MODEL,
                [images_input(tensors[:n])],
                outputs=[tc.InferRequestedOutput("probabilities", class_count=2)],
                request_id=f"r{n}",
            )
        answers = [results.get(timeout=60) for _ in range(3)]
        streaming.stop_stream()
    assert [error for _, error in answers] == [None, None, None]
    assert [r.get_response().id for r, _ in answers] == ["r1", "r2", "r3"]
    for n, (result, _) in zip((1, 2, 3), answers):
        classes = result.as_numpy("probabilities")
        assert classes.shape == (n, 2)
        assert all(label in manifest.labels for row in classes for _, _, label in parse_classes(row))


def test_task_api_classifies_and_embed_is_failed_precondition(served, manifest):
    images = [task_pb.Image(encoded=photo_bytes(name)) for name in PHOTOS]
    classified = served.stub.Classify(task_pb.ClassifyRequest(images=images, top_k=2), timeout=60)
    assert [len(r.predictions) for r in classified.results] == [2] * len(PHOTOS)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Embed(task_pb.EmbedRequest(images=images), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == f"model '{MODEL}' has no embedding output"
    info = served.stub.GetModelInfo(task_pb.GetModelInfoRequest(), timeout=60)
    assert (info.name, info.embedding_size, info.ready) == (MODEL, 0, True)
