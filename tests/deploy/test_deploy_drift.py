"""Drift in a real scrape: `tlserve serve` with the exported Fashion model, a real Prometheus evaluating the chart's
TlserveConfidenceDrift rule (rendered with a short window and `for`), real images.

Fashion-MNIST validation images keep the live median confidence near the manifest's baseline; real photos of
textures and scenes (grass, gravel, a galaxy field...) that look like no clothing drive it below the baseline's
0.1 quantile, and the alert fires.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import yaml
from deploy_helpers import helm_template

pytestmark = pytest.mark.tools

MODEL = "fashion"
NAMESPACE = "serving"
JOB = "tlserve"
ALERT = "TlserveConfidenceDrift"
WINDOW = "10s"
# real photos the Fashion model is unsure about (object photos it calls "Bag" with confidence instead: the
# confidence alert cannot see those, the class-share panel can)
OUT_OF_DISTRIBUTION = (
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "clock_motion.png",
    "cell.png",
    "microaneurysms.png",
)
SELECTOR = f'job="{JOB}", namespace="{NAMESPACE}", model="{MODEL}", version="1"'
LIVE_MEDIAN = (
    f"histogram_quantile(0.5, sum by (le) (rate(tlserve_prediction_confidence_bucket{{{SELECTOR}}}[{WINDOW}])))"
)


@pytest.fixture(scope="module")
def fashion_images() -> list[bytes]:
    """Fashion-MNIST validation images (the split the baseline was measured on) as PNG files."""
    from PIL import Image

    from tlserve.trainer.demo_data import load_arrays

    images = load_arrays()["val_x"][::25]  # 20 images spread over the split
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


def drift_rules(helm: str, folder: Path) -> str:
    """The chart's rule file with a short rate window and `for`, so the rule can fire within a test."""
    rendered = helm_template(
        helm,
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        f"prometheusRule.confidenceDriftWindow={WINDOW}",
        "--set",
        "prometheusRule.confidenceDriftFor=3s",
        "--show-only",
        "templates/prometheusrule.yaml",
        namespace=NAMESPACE,
        release=JOB,
    )
    path = folder / "alerts.rules.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(rendered)["spec"]))
    return str(path)


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


def drift_rule(prom) -> dict:
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    return rules[ALERT]


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
        return (
            median if median is not None and drift_rule(prom).get("lastEvaluation", "0001").startswith("20") else None
        )

    median = prom.wait_for(familiar, "live median confidence on Fashion-MNIST images", timeout=180)
    assert median > p10, (median, p10)
    rule = drift_rule(prom)
    assert rule["health"] == "ok" and rule["state"] == "inactive", rule

    # out of distribution: the median falls below p10, the counters see the odd labels, and the rule fires
    before = number(prom, f"sum(tlserve_predictions_total{{{SELECTOR}}})") or 0
    seen: set[str] = set()

    def firing():
        seen.update(classify(server, odd_photos))
        rule = drift_rule(prom)
        return rule if rule["state"] == "firing" else None

    rule = prom.wait_for(firing, f"{ALERT} firing on out-of-distribution photos", timeout=240)
    (alert,) = rule["alerts"]
    assert {k: alert["labels"][k] for k in ("namespace", "job", "model", "version", "severity")} == {
        "namespace": NAMESPACE,
        "job": JOB,
        "model": MODEL,
        "version": "1",
        "severity": "warning",
    }
    assert float(alert["value"]) < p10  # the live median when it fired
    assert number(prom, f"sum(tlserve_predictions_total{{{SELECTOR}}})") > before
    for label in seen:
        assert number(prom, f'sum(tlserve_predictions_total{{{SELECTOR}, label="{label}"}})') >= 1, label
