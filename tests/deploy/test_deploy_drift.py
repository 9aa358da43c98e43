"""Drift in a real scrape: `tlserve serve` with the exported Fashion model, a real Prometheus evaluating the chart's
TlserveConfidenceDrift and TlserveClassShareDrift rules (rendered with a short window and `for`), real images.

Fashion-MNIST validation images keep the live median confidence and the live label mix near the manifest's baseline.
Photos of objects (a cat, a camera, a rocket...) that the model calls "Bag" or "Shirt" with confidence leave the
median confidence high but pile the predictions onto those labels: TlserveClassShareDrift fires, TlserveConfidenceDrift
stays quiet. Photos of textures and scenes (grass, gravel, a galaxy field...) that look like no clothing drive the
median confidence below the baseline's 0.1 quantile, and TlserveConfidenceDrift fires.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import CHART, write_rules

pytestmark = pytest.mark.tools

MODEL = "fashion"
NAMESPACE = "serving"
JOB = "tlserve"
ALERT = "TlserveConfidenceDrift"
SHARE_ALERT = "TlserveClassShareDrift"
WINDOW = "10s"
SHARE_DISTANCE = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["classShareDriftDistance"]
MIN_PREDICTIONS = 20  # a few calls' worth within WINDOW
# real photos the Fashion model is unsure about
OUT_OF_DISTRIBUTION = (
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "clock_motion.png",
    "cell.png",
    "microaneurysms.png",
)
# real photos of objects the Fashion model is confidently wrong about (most are "Bag" at 0.7-1.0)
CONFIDENTLY_WRONG = (
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "camera.png",
    "motorcycle_right.png",
    "page.png",
    "horse.png",
    "coins.png",
)
SELECTOR = f'job="{JOB}", namespace="{NAMESPACE}", model="{MODEL}", version="1"'
LIVE_MEDIAN = (
    f"histogram_quantile(0.5, sum by (le) (rate(tlserve_prediction_confidence_bucket{{{SELECTOR}}}[{WINDOW}])))"
)
LIVE_SHARE = (
    f"sum by (label) (rate(tlserve_predictions_total{{{SELECTOR}}}[{WINDOW}]))"
    f" / scalar(sum(rate(tlserve_predictions_total{{{SELECTOR}}}[{WINDOW}])))"
)
# the total-variation distance of the live label mix from the baseline, as TlserveClassShareDrift computes it
LIVE_DISTANCE = (
    f"0.5 * sum(abs({LIVE_SHARE} - on (label) max by (label) (tlserve_prediction_share_baseline{{{SELECTOR}}})))"
)
PREDICTIONS_IN_WINDOW = f"sum(increase(tlserve_predictions_total{{{SELECTOR}}}[{WINDOW}]))"


@pytest.fixture(scope="module")
def fashion_images() -> list[bytes]:
    """Fashion-MNIST validation images (the split the baseline was measured on) as PNG files."""
    from PIL import Image

    from tlserve.trainer.demo_data import load_arrays

    images = load_arrays()["val_x"][::10]  # 50 images spread over the split, a label mix close to the baseline's
    files = []
    for array in images:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files


@pytest.fixture(scope="module")
def odd_photos() -> list[bytes]:
    data = pytest.importorskip("skimage.data")
    return [(Path(data.data_dir) / name).read_bytes() for name in OUT_OF_DISTRIBUTION]


@pytest.fixture(scope="module")
def object_photos() -> list[bytes]:
    data = pytest.importorskip("skimage.data")
    return [(Path(data.data_dir) / name).read_bytes() for name in CONFIDENTLY_WRONG]


def drift_rules(helm: str, folder: Path) -> str:
    """The chart's rule file with a short rate window and `for`, so the rule can fire within a test."""
    return str(
        write_rules(
            helm,
            folder,
            "--set",
            f"prometheusRule.confidenceDriftWindow={WINDOW}",
            "--set",
            "prometheusRule.confidenceDriftFor=3s",
            "--set",
            f"prometheusRule.classShareDriftWindow={WINDOW}",
            "--set",
            "prometheusRule.classShareDriftFor=3s",
            "--set",
            f"prometheusRule.classShareDriftMinPredictions={MIN_PREDICTIONS}",
            namespace=NAMESPACE,
            release=JOB,
        )
    )


def classify(server, images: list[bytes]) -> list[str]:
    """One Classify call; the top-1 label of each image."""
    import grpc

    from tlserve.server.pb.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc

    request = tlserve_pb2.ClassifyRequest(
        model=tlserve_pb2.ModelRef(name=MODEL), images=[tlserve_pb2.Image(encoded=i) for i in images], top_k=1
    )
    with grpc.insecure_channel(server.target) as channel:
        reply = tlserve_pb2_grpc.InferenceStub(channel).Classify(request, timeout=60)
    return [result.predictions[0].label for result in reply.results]


def number(prom, promql: str) -> float | None:
    result = prom.query(promql)
    value = float(result[0]["value"][1]) if result else math.nan
    return value if math.isfinite(value) else None


def drift_rule(prom, name: str = ALERT) -> dict:
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    return rules[name]


def evaluated(rule: dict) -> bool:
    return rule.get("lastEvaluation", "0001").startswith("20")


@pytest.fixture(scope="module")
def watched(repository, helm, prometheus, tmp_path_factory):
    """A server and a Prometheus scraping it every second with the chart's rules."""
    from deploy_processes import PrometheusProcess, ServeProcess

    server = ServeProcess(repository, tmp_path_factory.mktemp("serve-drift"))
    prom = None
    try:
        server.wait_serving(f"tlserve.model.{MODEL}")
        work = tmp_path_factory.mktemp("prometheus-drift")
        prom = PrometheusProcess(
            prometheus, work, [f"127.0.0.1:{server.metrics_port}"], NAMESPACE, [drift_rules(helm, work)]
        )
        prom.wait_for(lambda: prom.query(f'up{{job="{JOB}"}} == 1'), "target up")
        yield server, prom
    finally:
        if prom is not None:
            prom.stop()
        server.stop()


def fired(prom, server, photos, alert_name: str, what: str) -> tuple[dict, set[str]]:
    """Classify ``photos`` until ``alert_name`` fires: its one alert (labels checked), the labels served meanwhile."""
    seen: set[str] = set()

    def firing():
        seen.update(classify(server, photos))
        rule = drift_rule(prom, alert_name)
        return rule if rule["state"] == "firing" else None

    rule = prom.wait_for(firing, f"{alert_name} firing on {what}", timeout=240)
    (alert,) = rule["alerts"]
    assert {k: alert["labels"][k] for k in ("namespace", "job", "model", "version", "severity")} == {
        "namespace": NAMESPACE,
        "job": JOB,
        "model": MODEL,
        "version": "1",
        "severity": "warning",
    }
    return alert, seen


def test_confidently_wrong_photos_skew_the_label_mix_and_the_class_share_alert_fires(
    watched, fashion_images, object_photos
):
    """Runs first in this module: its quiet phase expects a window of Fashion traffic only."""
    server, prom = watched
    prom.wait_for(lambda: number(prom, f"count(tlserve_prediction_share_baseline{{{SELECTOR}}})"), "baseline scraped")

    # in distribution: enough predictions to count, a label mix close to the baseline's, the rule quiet
    def familiar():
        classify(server, fashion_images)
        distance = number(prom, LIVE_DISTANCE)
        count = number(prom, PREDICTIONS_IN_WINDOW) or 0
        return (
            distance
            if distance is not None and count >= MIN_PREDICTIONS and evaluated(drift_rule(prom, SHARE_ALERT))
            else None
        )

    distance = prom.wait_for(familiar, "live label mix of Fashion-MNIST images", timeout=180)
    assert distance < SHARE_DISTANCE, distance
    rule = drift_rule(prom, SHARE_ALERT)
    assert rule["health"] == "ok" and rule["state"] == "inactive", rule

    # confidently wrong: the predictions pile onto a few labels, the median confidence stays above the baseline's p10
    alert, seen = fired(prom, server, object_photos, SHARE_ALERT, "confidently misclassified photos")
    assert float(alert["value"]) > SHARE_DISTANCE  # the distance when it fired
    moved = re.search(r"\((\S+) [0-9.]+% live vs [0-9.]+% baseline\)$", alert["annotations"]["summary"])
    assert moved and moved.group(1) in seen, (alert["annotations"]["summary"], seen)
    p10 = number(prom, f'max(tlserve_confidence_baseline{{{SELECTOR}, quantile_level="0.1"}})')
    assert number(prom, LIVE_MEDIAN) > p10
    assert drift_rule(prom)["state"] == "inactive", "the confidence alert cannot see confident mistakes"


def test_odd_photos_pull_the_live_median_below_the_baseline_and_the_alert_fires(watched, fashion_images, odd_photos):
    server, prom = watched
    p10 = prom.wait_for(
        lambda: number(prom, f'max(tlserve_confidence_baseline{{{SELECTOR}, quantile_level="0.1"}})'),
        "baseline scraped",
    )
    assert 0 < p10 < number(prom, f'max(tlserve_confidence_baseline{{{SELECTOR}, quantile_level="0.5"}})') <= 1

    # in distribution: the live median is a number, above the baseline's p10, and the rule stays quiet
    def familiar():
        classify(server, fashion_images)
        median = number(prom, LIVE_MEDIAN)
        return median if median is not None and evaluated(drift_rule(prom)) else None

    median = prom.wait_for(familiar, "live median confidence on Fashion-MNIST images", timeout=180)
    assert median > p10, (median, p10)
    rule = drift_rule(prom)
    assert rule["health"] == "ok" and rule["state"] == "inactive", rule

    # out of distribution: the median falls below p10, the counters see the odd labels, and the rule fires
    before = number(prom, f"sum(tlserve_predictions_total{{{SELECTOR}}})") or 0
    alert, seen = fired(prom, server, odd_photos, ALERT, "out-of-distribution photos")
    assert float(alert["value"]) < p10  # the live median when it fired
    assert number(prom, f"sum(tlserve_predictions_total{{{SELECTOR}}})") > before
    for label in seen:
        assert number(prom, f'sum(tlserve_predictions_total{{{SELECTOR}, label="{label}"}})') >= 1, label
