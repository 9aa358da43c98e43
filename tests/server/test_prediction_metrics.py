"""Prediction metrics: the top-1 confidence histogram, per-label counts (bounded by --max-label-metrics) and the
manifest's baseline as gauges, on the real exported model and on the recorder itself."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from serving_helpers import MODEL, PHOTOS, photo_bytes, write_with_manifest

from tlserve.manifest import Baseline, Manifest, Preprocessing
from tlserve.server.metrics import CONFIDENCE_BUCKETS, Metrics
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.predictions import PredictionMetrics

LABELS = ("cat", "dog", "bird")
VERSION = {"model": MODEL, "version": "1"}


def manifest(baseline: Baseline | None = None) -> Manifest:
    return Manifest("pets", "3", "mobilenet_v2", LABELS, Preprocessing(64, 64), baseline=baseline)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# --- the recorder, on its own registry -------------------------------------------------------------------------
def test_recorder_counts_top1_confidences_and_labels():
    registry = CollectorRegistry()
    recorder = PredictionMetrics(Metrics(registry), "pets", "3", manifest(), max_label_metrics=3)
    recorder.attach()
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.84, 0.06], [0.2, 0.3, 0.5], [0.96, 0.02, 0.02]], np.float32)
    recorder.record(probabilities)
    key = {"model": "pets", "version": "3"}
    assert sample(registry, "tlserve_prediction_confidence_count", **key) == 4
    assert sample(registry, "tlserve_prediction_confidence_sum", **key) == pytest.approx(0.7 + 0.84 + 0.5 + 0.96)
    assert sample(registry, "tlserve_prediction_confidence_bucket", **key, le="0.5") == 1
    assert sample(registry, "tlserve_prediction_confidence_bucket", **key, le="0.85") == 3
    assert sample(registry, "tlserve_prediction_confidence_bucket", **key, le="+Inf") == 4
    counts = {label: sample(registry, "tlserve_predictions_total", **key, label=label) for label in LABELS}
    assert counts == {"cat": 2, "dog": 1, "bird": 1}


def test_recorder_exports_the_baseline_and_detach_removes_every_series():
    registry = CollectorRegistry()
    baseline = Baseline(200, {"0.1": 0.55, "0.5": 0.9}, {"cat": 0.5, "dog": 0.25, "bird": 0.25}, "pets (val)")
    recorder = PredictionMetrics(Metrics(registry), "pets", "3", manifest(baseline), max_label_metrics=64)
    recorder.attach()
    key = {"model": "pets", "version": "3"}
    assert sample(registry, "tlserve_confidence_baseline", **key, quantile_level="0.1") == 0.55
    assert sample(registry, "tlserve_confidence_baseline", **key, quantile_level="0.5") == 0.9
    assert sample(registry, "tlserve_prediction_share_baseline", **key, label="dog") == 0.25
    assert sample(registry, "tlserve_predictions_total", **key, label="bird") == 0  # zero before traffic: rate() works
    recorder.detach()
    recorder.record(np.array([[0.9, 0.05, 0.05]], np.float32))  # late: dropped, not resurrected
    text = "\n".join(
        f"{s.name}{s.labels}" for family in registry.collect() for s in family.samples if s.labels.get("model")
    )
    assert text == ""


def test_more_labels_than_the_limit_keep_the_histogram_and_drop_per_label_series():
    registry = CollectorRegistry()
    baseline = Baseline(10, {"0.5": 0.8}, {"cat": 0.4, "dog": 0.4, "bird": 0.2})
    recorder = PredictionMetrics(Metrics(registry), "pets", "3", manifest(baseline), max_label_metrics=2)
    recorder.attach()
    recorder.record(np.array([[0.2, 0.7, 0.1]], np.float32))
    key = {"model": "pets", "version": "3"}
    assert sample(registry, "tlserve_prediction_confidence_count", **key) == 1
    assert sample(registry, "tlserve_confidence_baseline", **key, quantile_level="0.5") == 0.8
    names = {s.name for family in registry.collect() for s in family.samples}
    assert not names & {"tlserve_predictions_total", "tlserve_prediction_share_baseline"}


def test_buckets_are_probabilities_finer_near_one():
    assert all(0 < b < 1 for b in CONFIDENCE_BUCKETS) and list(CONFIDENCE_BUCKETS) == sorted(CONFIDENCE_BUCKETS)
    assert sum(b >= 0.9 for b in CONFIDENCE_BUCKETS) >= 4


# --- the real server on the exported fashion model -------------------------------------------------------------
@pytest.fixture(scope="module")
def published(repo_copy) -> Manifest:
    """The manifest of the served version, as its sidecar says (the same as the one inside the file)."""
    return Manifest.from_json((repo_copy / MODEL / "1" / "manifest.json").read_text())


def classify(live, names=PHOTOS) -> pb.ClassifyResponse:
    images = [pb.Image(encoded=photo_bytes(name)) for name in names]
    return live.stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=MODEL), images=images, top_k=1), timeout=60)


def test_classify_observes_every_top1_and_counts_its_label(live, published):
    before = live.metric("tlserve_prediction_confidence_count", **VERSION) or 0
    labels = published.labels
    counts_before = {label: live.metric("tlserve_predictions_total", **VERSION, label=label) for label in labels}
    reply = classify(live)
    assert live.metric("tlserve_prediction_confidence_count", **VERSION) == before + len(PHOTOS)
    served = [r.predictions[0] for r in reply.results]
    for label in labels:
        grown = live.metric("tlserve_predictions_total", **VERSION, label=label) - counts_before[label]
        assert grown == sum(p.label == label for p in served), label
    # the top scores as served are what the histogram saw: each lands in its bucket
    for edge in (0.5, 0.9, 0.99):
        assert live.metric("tlserve_prediction_confidence_bucket", **VERSION, le=str(edge)) >= sum(
            p.score <= edge for p in served
        )


def test_the_manifest_baseline_is_exported_as_gauges(live, published):
    baseline = published.baseline
    assert baseline is not None, "export writes a baseline for a model with labelled validation images"
    assert set(baseline.quantiles) == {"0.05", "0.1", "0.25", "0.5", "0.75", "0.9", "0.95"}
    for quantile, value in baseline.quantiles.items():
        assert live.metric("tlserve_confidence_baseline", **VERSION, quantile_level=quantile) == pytest.approx(value)
    for label, share in baseline.class_share.items():
        assert live.metric("tlserve_prediction_share_baseline", **VERSION, label=label) == pytest.approx(share)


def infer_request(output: str | None) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=[2, 3, 64, 64])
    request.raw_input_contents.append(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), np.uint8).tobytes())
    if output:
        request.outputs.add(name=output)
    return request


@pytest.mark.parametrize("output, counted", [(None, 2), ("probabilities", 2), ("embedding", 0)])
def test_oip_infer_counts_predictions_only_when_it_returns_them(live, output, counted):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(live.channel)
    before = live.metric("tlserve_prediction_confidence_count", **VERSION)
    stub.ModelInfer(infer_request(output), timeout=60)
    assert live.metric("tlserve_prediction_confidence_count", **VERSION) == before + counted


def test_max_label_metrics_below_the_label_count_drops_per_label_series(repo_copy, make_server):
    server = make_server(repo_copy, max_label_metrics=5)  # fashion has 10 labels
    classify(server, PHOTOS[:2])
    assert server.metric("tlserve_prediction_confidence_count", **VERSION) == 2
    assert server.metric("tlserve_confidence_baseline", **VERSION, quantile_level="0.5") is not None
    names = {s.name for family in server.registry.collect() for s in family.samples}
    assert not names & {"tlserve_predictions_total", "tlserve_prediction_share_baseline"}


def test_a_model_without_a_baseline_serves_without_baseline_gauges(exported_version, tmp_path, make_server):
    write_with_manifest(exported_version / "model.onnx", tmp_path / MODEL / "1" / "model.onnx", baseline=None)
    server = make_server(tmp_path)
    classify(server, PHOTOS[:1])
    assert server.metric("tlserve_prediction_confidence_count", **VERSION) == 1
    assert server.metric("tlserve_confidence_baseline", **VERSION, quantile_level="0.1") is None


def test_an_unloaded_version_takes_its_series_with_it(exported_version, tmp_path, make_server):
    from serving_helpers import copy_version

    copy_version(exported_version, tmp_path / MODEL / "1")
    server = make_server(tmp_path, version_policy="latest:1")
    classify(server, PHOTOS[:1])
    copy_version(exported_version, tmp_path / MODEL / "2")
    server.reload()
    assert server.metric("tlserve_prediction_confidence_count", **VERSION) is None
    assert server.metric("tlserve_confidence_baseline", **VERSION, quantile_level="0.1") is None
    assert server.metric("tlserve_prediction_confidence_count", model=MODEL, version="2") == 0
    assert server.metric("tlserve_confidence_baseline", model=MODEL, version="2", quantile_level="0.1") is not None
