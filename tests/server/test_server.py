"""The task API end to end: a real gRPC server on port 0 serving a model made by our export."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import MODEL, PHOTOS, photo_bytes, photo_path, png_bytes

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb


def health(live, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(live.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def classify(live, images, top_k=3, **ref) -> pb.ClassifyResponse:
    return live.stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(**ref), images=images, top_k=top_k), timeout=30)


def encoded(*names: str) -> list[pb.Image]:
    return [pb.Image(encoded=photo_bytes(n)) for n in names]


def test_health_services_report_serving(live):
    for service in ("", "tlserve.v1.Inference", f"tlserve.model.{MODEL}"):
        assert health(live, service) == health_pb2.HealthCheckResponse.SERVING


def test_classify_real_photos_png_jpeg_grey_rgba(live):
    info = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    response = classify(live, encoded(*PHOTOS), top_k=3)
    assert (response.model, response.version) == (MODEL, "1")
    assert len(response.results) == len(PHOTOS)
    for result in response.results:
        scores = [p.score for p in result.predictions]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert all(p.label == info.labels[p.index] for p in result.predictions)


def test_top_k_is_clamped_to_label_count(live):
    info = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    response = classify(live, encoded("coffee.png"), top_k=1000)
    predictions = response.results[0].predictions
    assert len(predictions) == len(info.labels)
    assert sum(p.score for p in predictions) == pytest.approx(1.0, abs=1e-4)
    assert len(classify(live, encoded("coffee.png"), top_k=0).results[0].predictions) == 1


def test_model_info_and_list_models(live):
    info = live.stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name=MODEL)), timeout=10)
    assert info.name == MODEL and info.version == "1" and info.ready
    assert info.provider == "CPUExecutionProvider" and info.requested_device == "cpu"
    assert len(info.labels) >= 2 and info.input_size > 0 and info.resize_size >= info.input_size
    assert info.embedding_size > 0 and '"labels"' in info.manifest_json
    listed = live.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.name, m.version) for m in listed.models] == [(MODEL, "1")]


def test_raw_tensor_equals_encoded_image_of_same_pixels(live):
    from PIL import Image

    info = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    # A square photo already at resize_size is only centre-cropped, so both paths see the same pixels.
    rgb = np.asarray(Image.open(photo_path("chelsea.png")).convert("RGB").resize((info.resize_size,) * 2))
    off = int(round((info.resize_size - info.input_size) / 2.0))
    crop = rgb[off : off + info.input_size, off : off + info.input_size].transpose(2, 0, 1)
    tensor = pb.Image(tensor=pb.Tensor(shape=list(crop.shape), data=crop.tobytes()))
    png = pb.Image(encoded=png_bytes(Image.fromarray(rgb)))
    a, b = classify(live, [tensor, png], top_k=5).results
    assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
    np.testing.assert_allclose([p.score for p in a.predictions], [p.score for p in b.predictions], atol=1e-6)


def test_raw_tensor_is_classified_and_bad_shape_refused(live):
    size = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).input_size
    good = pb.Image(tensor=pb.Tensor(shape=[3, size, size], data=bytes(3 * size * size)))
    assert len(classify(live, [good]).results) == 1
    bad = pb.Image(tensor=pb.Tensor(shape=[3, size, size + 1], data=bytes(3 * size * (size + 1))))
    with pytest.raises(grpc.RpcError) as err:
        classify(live, [good, bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1" in err.value.details() and "shape" in err.value.details()


def test_corrupt_image_is_invalid_argument_and_server_stays_up(live):
    data = photo_bytes("chelsea.png")
    before = live.metric("tlserve_requests_total", rpc="Classify", model=MODEL, code="INVALID_ARGUMENT") or 0
    for bad, why in ((b"definitely not an image", "not a decodable"), (data[: len(data) // 3], "corrupt")):
        with pytest.raises(grpc.RpcError) as err:
            classify(live, [pb.Image(encoded=data), pb.Image(encoded=bad)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("image 1:") and why in err.value.details()
        assert "Traceback" not in err.value.details()
    assert live.metric("tlserve_requests_total", rpc="Classify", model=MODEL, code="INVALID_ARGUMENT") == before + 2
    assert health(live, "tlserve.v1.Inference") == health_pb2.HealthCheckResponse.SERVING
    assert len(classify(live, encoded("chelsea.png")).results) == 1


def test_empty_image_message_and_no_images(live):
    with pytest.raises(grpc.RpcError) as err:
        classify(live, [pb.Image()])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        classify(live, [])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_and_version_are_not_found(live):
    for ref in (dict(name="nope"), dict(name=MODEL, version="99")):
        with pytest.raises(grpc.RpcError) as err:
            classify(live, encoded("coffee.png"), **ref)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert live.metric("tlserve_requests_total", rpc="Classify", model="", code="NOT_FOUND") >= 1


def test_embed_returns_one_vector_per_image(live):
    size = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).embedding_size
    response = live.stub.Embed(pb.EmbedRequest(images=encoded("chelsea.png", "coffee.png", "chelsea.png")), timeout=30)
    vectors = np.array([e.values for e in response.embeddings])
    assert vectors.shape == (3, size)
    np.testing.assert_allclose(vectors[0], vectors[2], rtol=1e-5, atol=0)
    assert not np.allclose(vectors[0], vectors[1], rtol=1e-3, atol=0)


def test_classify_stream_answers_each_request_in_order(live):
    names = ("chelsea.png", "coffee.png", "rocket.jpg")
    singles = [classify(live, encoded(n)).results[0].predictions[0].index for n in names]
    requests = iter([pb.ClassifyRequest(images=encoded(n), top_k=1) for n in names])
    responses = list(live.stub.ClassifyStream(requests, timeout=30))
    assert [r.results[0].predictions[0].index for r in responses] == singles


def test_classify_stream_answers_a_bad_message_in_band_and_goes_on(live):
    good = pb.ClassifyRequest(images=encoded("coffee.png"), top_k=1)
    bad = pb.ClassifyRequest(images=[pb.Image(encoded=b"definitely not an image")], top_k=1)
    unknown = pb.ClassifyRequest(model=pb.ModelRef(name="nope"), images=encoded("coffee.png"))
    call = live.stub.ClassifyStream(iter([good, bad, unknown, good]), timeout=30)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK and len(responses) == 4
    assert [bool(r.results) for r in responses] == [True, False, False, True]
    assert [r.HasField("error") for r in responses] == [False, True, True, False]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[1].error.message.startswith("image 0:") and "not a decodable" in responses[1].error.message
    assert responses[2].error.code == grpc.StatusCode.NOT_FOUND.value[0] and "'nope'" in responses[2].error.message
    assert live.metric("tlserve_requests_total", rpc="ClassifyStream", model="", code="NOT_FOUND") >= 1


def test_metrics_recorded_and_served_over_http(live):
    import urllib.request

    classify(live, encoded("coffee.png", "chelsea.png"))
    assert live.metric("tlserve_requests_total", rpc="Classify", model=MODEL, code="OK") >= 1
    assert live.metric("tlserve_request_duration_seconds_count", rpc="Classify", model=MODEL) >= 1
    assert live.metric("tlserve_batch_size_sum", model=MODEL) >= 2
    assert live.metric("tlserve_inference_duration_seconds_count", model=MODEL) >= 1
    assert live.metric("tlserve_model_ready", model=MODEL, version="1") == 1
    assert (
        live.metric("tlserve_model_info", model=MODEL, version="1", provider="CPUExecutionProvider", precision="fp32")
        == 1
    )
    assert live.metric("tlserve_cuda_fallback", model=MODEL) == 0
    assert live.metric("tlserve_queue_duration_seconds_count", model=MODEL) >= 1
    assert live.metric("tlserve_queue_depth", model=MODEL) == 0
    assert live.metric("tlserve_inflight_requests", model=MODEL) == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{live.handle.metrics_port}/metrics", timeout=5).read().decode()
    assert 'tlserve_requests_total{code="OK",model="fashion",rpc="Classify"}' in text


def test_reflection_lists_services(live):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(live.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert {"tlserve.v1.Inference", "grpc.health.v1.Health"} <= names


@pytest.mark.torch
@pytest.mark.parametrize("fast_decode", [False, True], ids=["full-decode", "fast-decode"])
def test_served_scores_equal_trainer_transform_plus_onnxruntime(
    live, repo_copy, make_server, exported_version, fast_decode
):
    """The whole server path (decode, resize, crop, batch, ORT) against the reference pipeline: the
    trainer's eval transform for PNGs and JPEGs (the default); a drafted JPEG (--fast-decode)
    against the same draft decode, and its top class against the trainer's."""
    pytest.importorskip("torch")
    import onnxruntime as ort
    from PIL import Image

    from tlserve.manifest import Manifest
    from tlserve.server.preprocess import ImageLimits, decode
    from tlserve.trainer.transforms import EvalTransform

    server = make_server(repo_copy, fast_decode=True) if fast_decode else live
    session = ort.InferenceSession(str(exported_version / "model.onnx"), providers=["CPUExecutionProvider"])
    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    names = PHOTOS + ("grace_hopper.jpg",)
    trainer = np.stack([EvalTransform(manifest.preprocessing)(Image.open(photo_path(n))).numpy() for n in names])
    draft = server.handle.settings.fast_decode
    limits = ImageLimits.from_settings(server.handle.settings)
    served = np.stack([decode(photo_bytes(n), manifest.preprocessing, limits, draft=draft) for n in names])
    assert draft == fast_decode
    assert any(draft and n.endswith(".jpg") for n in names) == bool((served != trainer).any())
    expected, reference = (
        session.run([manifest.outputs.probabilities], {manifest.input_name: b})[0] for b in (served, trainer)
    )
    response = classify(server, encoded(*names), top_k=len(manifest.labels))
    for row, result, trained in zip(expected, response.results, reference):
        got = np.zeros_like(row)
        got[[p.index for p in result.predictions]] = [p.score for p in result.predictions]
        np.testing.assert_allclose(got, row, rtol=1e-5, atol=1e-6)
        assert got.argmax() == trained.argmax()


@pytest.mark.tools
def test_metrics_pass_promtool_lint(live):
    import shutil
    import subprocess
    import urllib.request

    promtool = shutil.which("promtool") or pytest.skip("promtool not installed (make tools)")
    classify(live, encoded("coffee.png"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{live.handle.metrics_port}/metrics", timeout=5).read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_request_larger_than_max_batch_is_split_and_kept_in_order(repo_copy, make_server):
    server = make_server(repo_copy, max_batch_size=2)
    names = ("chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "logo.png")
    together = classify(server, encoded(*names), top_k=1).results
    alone = [classify(server, encoded(n), top_k=1).results[0] for n in names]
    assert [r.predictions[0].index for r in together] == [r.predictions[0].index for r in alone]
    np.testing.assert_allclose(
        [r.predictions[0].score for r in together], [r.predictions[0].score for r in alone], rtol=1e-4
    )
    assert server.metric("tlserve_batch_size_bucket", model=MODEL, le="2.0") == server.metric(
        "tlserve_batch_size_count", model=MODEL
    )
