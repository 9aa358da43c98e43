"""Unmodified tritonclient against an in-process server on port 0, with real photos and a model
file made by our export: metadata, config, inference equal to the task API's, classification,
statistics, the stream, and every refusal answered with the right status while the server
stays ready."""

import queue
import shutil

import grpc
import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
from serving_helpers import LiveServer, photo_bytes, server_settings  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tlserve.server.pb.inference import grpc_service_pb2_grpc  # noqa: E402
from tlserve.server.pb.inference import messages_pb2 as oip_pb  # noqa: E402
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task_pb  # noqa: E402
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc  # noqa: E402
from tlserve.server.preprocess import ImageLimits, decode, to_model_input  # noqa: E402

MAX_IMAGES = 6
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")


@pytest.fixture(scope="module")
def served(repo_copy):
    server = LiveServer(server_settings(repo_copy, max_images=MAX_IMAGES, max_queue_delay_ms=1.0)).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(served):
    with tc.InferenceServerClient(address(served)) as c:
        yield c


@pytest.fixture(scope="module")
def model(served):
    return served.handle.repository.get("fashion")


@pytest.fixture(scope="module")
def encoded() -> list[bytes]:
    return [photo_bytes(name) for name in PHOTOS]


@pytest.fixture(scope="module")
def tensors(served, model, encoded) -> np.ndarray:
    """The photos preprocessed exactly as the server does for encoded images."""
    pre, limits = model.manifest.preprocessing, ImageLimits.from_settings(served.handle.settings)
    return np.stack([decode(data, pre, limits, draft=served.handle.settings.fast_decode) for data in encoded])


def address(served) -> str:
    return f"127.0.0.1:{served.handle.port}"


def images_input(batch: np.ndarray, datatype: str = "UINT8"):
    tensor = tc.InferInput("images", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


def status_of(excinfo) -> str:
    return excinfo.value.status()


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion") and client.is_model_ready("fashion", "1")
    assert not client.is_model_ready("fashion", "99") and not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta.name == "tlserve" and {"model_configuration", "statistics", "classification"} <= set(meta.extensions)


def test_model_metadata_matches_the_manifest(client, model):
    meta = client.get_model_metadata("fashion")
    size = model.manifest.preprocessing.input_size
    assert (meta.name, list(meta.versions), meta.platform) == ("fashion", ["1"], "onnxruntime_onnx")
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("images", "UINT8", [-1, 3, size, size])]
    outputs = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
    assert outputs["probabilities"] == ("FP32", [-1, model.manifest.num_classes])
    assert outputs["embedding"][0] == "FP32" and outputs["embedding"][1][0] == -1


def test_model_config_for_perf_analyzer(client, model):
    config = client.get_model_config("fashion").config
    size = model.manifest.preprocessing.input_size
    assert (config.name, config.platform, config.max_batch_size) == ("fashion", "onnxruntime_onnx", MAX_IMAGES)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("images", tc.model_config_pb2.TYPE_UINT8, [3, size, size])
    ]
    dims = {o.name: list(o.dims) for o in config.output}
    assert dims["probabilities"] == [model.manifest.num_classes]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000


def test_inference_equals_the_task_api(served, client, model, encoded, tensors):
    requested = [tc.InferRequestedOutput("probabilities"), tc.InferRequestedOutput("embedding")]
    result = client.infer("fashion", [images_input(tensors)], outputs=requested, request_id="photos")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("fashion", "1", "photos")
    probabilities, embedding = result.as_numpy("probabilities"), result.as_numpy("embedding")
    assert probabilities.shape == (len(PHOTOS), model.manifest.num_classes)

    with grpc.insecure_channel(address(served)) as channel:
        task = tlserve_pb2_grpc.InferenceStub(channel)
        images = [task_pb.Image(encoded=data) for data in encoded]
        classified = task.Classify(task_pb.ClassifyRequest(images=images, top_k=model.manifest.num_classes))
        embedded = task.Embed(task_pb.EmbedRequest(images=images))
    for row, result_row in zip(probabilities, classified.results):
        task_scores = np.zeros_like(row)
        for p in result_row.predictions:
            task_scores[p.index] = p.score
        np.testing.assert_allclose(row, task_scores, rtol=1e-5, atol=1e-6)
        assert result_row.predictions[0].index == int(np.argmax(row))
    np.testing.assert_allclose(embedding, np.array([e.values for e in embedded.embeddings]), rtol=1e-5, atol=1e-5)


def test_every_output_when_none_is_named(client, tensors):
    result = client.infer("fashion", [images_input(tensors[:1])])
    names = {o.name for o in result.get_response().outputs}
    assert {"probabilities", "embedding"} <= names


def test_classification_extension(client, model, tensors):
    probabilities = client.infer("fashion", [images_input(tensors)]).as_numpy("probabilities")
    result = client.infer(
        "fashion", [images_input(tensors)], outputs=[tc.InferRequestedOutput("probabilities", class_count=3)]
    )
    assert result.get_output("probabilities").datatype == "BYTES"
    top3 = result.as_numpy("probabilities")
    assert top3.shape == (len(PHOTOS), 3)
    for entries, row in zip(top3, probabilities):
        parsed = [entry.decode().split(":", 2) for entry in entries]
        assert [int(i) for _, i, _ in parsed] == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [model.manifest.labels[int(i)] for _, i, _ in parsed]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], np.sort(row)[::-1][:3], atol=1e-6)


def test_statistics_count_what_happened(client, tensors):
    def stats():
        return client.get_inference_statistics("fashion").model_stats[0]

    before = stats()
    for n in (1, 2, 3):
        client.infer("fashion", [images_input(tensors[:n])])
    with pytest.raises(InferenceServerException):
        client.infer("fashion", [images_input(tensors.astype(np.float32), "FP32")])
    after = stats()
    assert (after.name, after.version) == ("fashion", "1")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count >= 6
    assert after.execution_count > before.execution_count
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.inference_stats.queue.count > before.inference_stats.queue.count
    assert after.last_inference > 0


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("fp32", "StatusCode.INVALID_ARGUMENT", "input 'images' of model 'fashion' must be UINT8, got FP32"),
        ("shape", "StatusCode.INVALID_ARGUMENT", "must have shape [N, 3,"),
        ("bytes", "StatusCode.INVALID_ARGUMENT", "raw bytes, but UINT8 shape"),
        ("too_many", "StatusCode.INVALID_ARGUMENT", f"exceeds the limit of {MAX_IMAGES}"),
        ("output", "StatusCode.INVALID_ARGUMENT", "has no output 'logits_nope'"),
        ("input_name", "StatusCode.INVALID_ARGUMENT", "takes one input 'images'"),
        ("model", "StatusCode.NOT_FOUND", "model 'no-such-model' not found"),
        ("version", "StatusCode.NOT_FOUND", "has no version '99'"),
    ],
)
def test_refusals_keep_the_server_serving(client, tensors, case, code, message):
    one = tensors[:1]
    calls = {
        "fp32": lambda: client.infer("fashion", [images_input(one.astype(np.float32), "FP32")]),
        "shape": lambda: client.infer("fashion", [images_input(np.ascontiguousarray(one[:, :, 1:, :]))]),
        "bytes": lambda: client.infer("fashion", [_short_input(one)]),
        "too_many": lambda: client.infer("fashion", [images_input(np.repeat(one, MAX_IMAGES + 1, axis=0))]),
        "output": lambda: client.infer(
            "fashion", [images_input(one)], outputs=[tc.InferRequestedOutput("logits_nope")]
        ),
        "input_name": lambda: client.infer("fashion", [_renamed_input(one)]),
        "model": lambda: client.infer("no-such-model", [images_input(one)]),
        "version": lambda: client.infer("fashion", [images_input(one)], model_version="99"),
    }
    with pytest.raises(InferenceServerException) as excinfo:
        calls[case]()
    assert status_of(excinfo) == code
    assert message in excinfo.value.message()
    assert client.is_server_ready() and client.is_model_ready("fashion")
    assert client.infer("fashion", [images_input(one)]).as_numpy("probabilities").shape[0] == 1


def _short_input(batch: np.ndarray):
    tensor = images_input(batch)
    tensor._raw_content = tensor._raw_content[:-3]
    return tensor


def _renamed_input(batch: np.ndarray):
    tensor = tc.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def test_typed_contents_equal_raw_contents(served, client, tensors):
    """tritonclient always sends raw bytes; the typed path goes through our own stub."""
    request = oip_pb.ModelInferRequest(model_name="fashion")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=tensors[:2].shape)
    tensor.contents.uint_contents.extend(tensors[:2].ravel().tolist())
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(address(served)) as channel:
        response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    typed = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
    raw = client.infer("fashion", [images_input(tensors[:2])]).as_numpy("probabilities")
    np.testing.assert_allclose(typed, raw, rtol=1e-6, atol=1e-7)


def test_stream_answers_errors_in_band(served, tensors):
    results: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(address(served)) as streaming:
        streaming.start_stream(callback=lambda result, error: results.put((result, error)))
        streaming.async_stream_infer("fashion", [images_input(tensors[:1])], request_id="good")
        streaming.async_stream_infer(
            "fashion", [images_input(tensors[:1].astype(np.float32), "FP32")], request_id="bad"
        )
        streaming.async_stream_infer("fashion", [images_input(tensors[:2])], request_id="good again")
        answers = [results.get(timeout=60) for _ in range(3)]
        streaming.stop_stream()
    good = [r.get_response().id for r, e in answers if e is None]
    errors = [str(e) for r, e in answers if e is not None]
    assert sorted(good) == ["good", "good again"]
    assert len(errors) == 1 and "must be UINT8, got FP32" in errors[0]


def test_versions_map_to_the_repository(make_server, exported_version, tmp_path, tensors):
    """Two versions side by side: each answers under its own version string, with its own statistics."""
    for version in ("1", "2"):
        shutil.copytree(exported_version, tmp_path / "fashion" / version)
    server = make_server(tmp_path, version_policy="all")
    with tc.InferenceServerClient(address(server)) as c:
        assert list(c.get_model_metadata("fashion").versions) == ["2", "1"]
        assert c.is_model_ready("fashion", "1") and c.is_model_ready("fashion", "2")
        assert c.infer("fashion", [images_input(tensors[:1])]).get_response().model_version == "2"
        pinned = c.infer("fashion", [images_input(tensors[:2])], model_version="1")
        assert pinned.get_response().model_version == "1"
        stats = {s.version: s for s in c.get_inference_statistics("fashion").model_stats}
        assert sorted(stats) == ["1", "2"]
        assert stats["1"].inference_stats.success.count == stats["2"].inference_stats.success.count == 1
        assert [s.name for s in c.get_inference_statistics().model_stats] == ["fashion", "fashion"]
        with pytest.raises(InferenceServerException) as excinfo:
            c.get_model_config("no-such-model")
        assert status_of(excinfo) == "StatusCode.NOT_FOUND"


@pytest.mark.slow
def test_float_input_model_takes_fp32_raw_and_typed(make_server, exported_version, export_version, tmp_path, tensors):
    """A model exported with float input (the caller normalises) answers FP32, raw or typed, as the
    uint8 model answers the same photos; UINT8 is refused by name."""
    shutil.copytree(exported_version, tmp_path / "fashion" / "1")
    export_version(tmp_path, name="fashion-float", version="1", float_input=True)
    server = make_server(tmp_path)
    float_model = server.handle.repository.get("fashion-float")
    floats = to_model_input(tensors, float_model.manifest.preprocessing)
    assert floats.dtype == np.float32
    with tc.InferenceServerClient(address(server)) as c:
        assert [i.datatype for i in c.get_model_metadata("fashion-float").inputs] == ["FP32"]
        expected = c.infer("fashion", [images_input(tensors)]).as_numpy("probabilities")
        raw = c.infer("fashion-float", [images_input(floats, "FP32")]).as_numpy("probabilities")
        with pytest.raises(InferenceServerException) as excinfo:
            c.infer("fashion-float", [images_input(tensors)])
        assert "must be FP32, got UINT8" in excinfo.value.message()
    request = oip_pb.ModelInferRequest(model_name="fashion-float")
    request.inputs.add(name="images", datatype="FP32", shape=floats.shape).contents.fp32_contents.extend(floats.ravel())
    request.outputs.add(name="probabilities")
    response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request)
    typed = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(raw.shape)
    np.testing.assert_allclose(raw, expected, atol=1e-4)
    np.testing.assert_array_equal(typed, raw)
