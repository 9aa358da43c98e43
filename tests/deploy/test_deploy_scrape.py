"""A real scrape: `tlserve serve` with an exported model, a real Prometheus on 127.0.0.1, promtool, grpcurl.

The metrics the chart's alerts and dashboard rely on must come out of the real server, under the
labels the scrape gives them, and evaluate in a real Prometheus.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
from deploy_helpers import contract_metrics, find_tool, run, write_rules

pytestmark = pytest.mark.tools

MODEL = "fashion"
NAMESPACE = "serving"
JOB = "tlserve"
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    data = pytest.importorskip("skimage.data")
    return [(Path(data.data_dir) / name).read_bytes() for name in PHOTOS]


def serving(repository: Path, workdir: Path, device: str = "cpu"):
    from deploy_processes import ServeProcess

    server = ServeProcess(repository, workdir, device=device)
    try:
        server.wait_serving(f"tlserve.model.{MODEL}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(repository, tmp_path_factory):
    yield from serving(repository, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def cuda_asked(repository, tmp_path_factory):
    """A second server told --device cuda: on a machine without a usable GPU it serves on the CPU."""
    yield from serving(repository, tmp_path_factory.mktemp("serve-cuda"), device="cuda")


def classify(server, photos: list[bytes], bad: bool = False) -> None:
    """One Classify call with every photo (and, with ``bad``, one that is not an image at all)."""
    import grpc

    from tlserve.server.pb.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc

    images = [tlserve_pb2.Image(encoded=b"not an image" if bad else photo) for photo in photos]
    request = tlserve_pb2.ClassifyRequest(model=tlserve_pb2.ModelRef(name=MODEL), images=images, top_k=3)
    with grpc.insecure_channel(server.target) as channel:
        stub = tlserve_pb2_grpc.InferenceStub(channel)
        try:
            reply = stub.Classify(request, timeout=30)
        except grpc.RpcError as exc:
            assert bad and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            return
    assert not bad and len(reply.results) == len(photos)


def alert_rules(tmp: Path) -> list[str]:
    """The chart's rendered alert rules as a rule file, when helm is here (else no rules)."""
    try:
        helm = find_tool("helm")
    except pytest.skip.Exception:
        return []
    return [str(write_rules(helm, tmp, namespace=NAMESPACE, release=JOB))]


@pytest.fixture(scope="module")
def scraped(served, cuda_asked, photos, prometheus, tmp_path_factory):
    """Prometheus scraping both servers while calls arrive, until the p99 over the latency histogram is a number."""
    from deploy_processes import PrometheusProcess

    work = tmp_path_factory.mktemp("prometheus")
    targets = [f"127.0.0.1:{served.metrics_port}", f"127.0.0.1:{cuda_asked.metrics_port}"]
    prom = PrometheusProcess(prometheus, work, targets, NAMESPACE, alert_rules(work))
    try:
        prom.wait_for(lambda: len(prom.query(f'up{{job="{JOB}"}} == 1')) == 2, "targets up")
        classify(served, photos, bad=True)
        p99 = (
            f'histogram_quantile(0.99, sum by (le) (rate(tlserve_request_duration_seconds_bucket{{job="{JOB}"}}[1m])))'
        )

        def quantile_known():
            classify(served, photos)  # keep traffic flowing until rate() has two samples apart
            result = prom.query(p99)
            return result if result and math.isfinite(float(result[0]["value"][1])) else None

        prom.wait_for(quantile_known, "histogram_quantile over tlserve_request_duration_seconds")
        yield prom
    finally:
        prom.stop()


def sample(prom, promql: str) -> float:
    (series,) = prom.query(promql)
    return float(series["value"][1])


def test_prometheus_scrapes_request_counter_and_latency_quantile(scraped):
    ok = sample(
        scraped, f'sum(tlserve_requests_total{{job="{JOB}", namespace="{NAMESPACE}", model="{MODEL}", code="OK"}})'
    )
    assert ok >= 2
    assert sample(scraped, f'sum(tlserve_requests_total{{job="{JOB}", code="INVALID_ARGUMENT"}})') >= 1
    p99 = sample(
        scraped,
        f'histogram_quantile(0.99, sum by (le) (rate(tlserve_request_duration_seconds_bucket{{job="{JOB}"}}[1m])))',
    )
    assert 0 < p99 < math.inf
    assert sample(scraped, f'max(tlserve_model_ready{{job="{JOB}", model="{MODEL}"}})') == 1
    assert sample(scraped, f'sum(tlserve_batch_size_count{{job="{JOB}", model="{MODEL}"}})') >= 1


def test_dashboard_queries_run_on_the_scraped_series(scraped):
    from test_deploy_dashboard import dashboard, exprs

    empty = []
    for expr in exprs(dashboard()):
        promql = (
            expr.replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$job", ".*")
            .replace("$model", ".*")
        )
        if not scraped.query(promql):
            empty.append(expr)
    # only what this run cannot produce may come back empty: errors other than INVALID_ARGUMENT's ratio
    # is there; GPU series need NVML, queue rejections and load failures need a full queue or a bad file
    allowed = ("tlserve_gpu_", "tlserve_queue_rejections_total", "tlserve_model_load_failures_total")
    assert all(any(a in e for a in allowed) for e in empty), empty


def test_chart_alert_rules_evaluate_on_the_scraped_series(scraped, cuda_asked, helm):
    instance = f"127.0.0.1:{cuda_asked.metrics_port}"
    fell_back = sample(scraped, f'max(tlserve_cuda_fallback{{instance="{instance}"}})') == 1
    # no usable GPU here: the CUDA-asked server runs on the CPU and TlserveCudaFallback must go pending
    expected = "pending" if fell_back else "inactive"

    def evaluated():
        rules = {r["name"]: r for g in scraped.api("rules")["groups"] for r in g["rules"]}
        done = rules and all(r.get("lastEvaluation", "0001").startswith("20") for r in rules.values())
        return rules if done and rules["TlserveCudaFallback"]["state"] in (expected, "firing") else None

    rules = scraped.wait_for(evaluated, f"rules evaluated, TlserveCudaFallback {expected}")
    assert {"TlserveHighErrorRatio", "TlserveModelNotReady", "TlserveCudaFallback"} <= rules.keys()
    assert all(r["health"] == "ok" for r in rules.values()), rules
    quiet = {name: r["state"] for name, r in rules.items() if name != "TlserveCudaFallback"}
    assert set(quiet.values()) == {"inactive"}, quiet
    if fell_back:
        (alert,) = rules["TlserveCudaFallback"]["alerts"]
        assert {k: alert["labels"][k] for k in ("namespace", "job", "model", "severity")} == {
            "namespace": NAMESPACE,
            "job": JOB,
            "model": MODEL,
            "severity": "warning",
        }
    # the rules' selectors match the real series: their left-hand sides come back non-empty
    for name in ("TlserveHighP99Latency", "TlserveModelNotReady"):
        lhs = re.split(r"\)\s*[<>]", rules[name]["query"])[0] + ")"
        assert scraped.query(lhs), (name, lhs)


def test_promtool_check_metrics_on_our_metrics(served, photos, promtool):
    classify(served, photos)
    text = served.metrics_text()
    proc = run([promtool, "check", "metrics"], stdin=text, check=False)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    families = set(re.findall(r"^# TYPE (tlserve_[a-z0-9_]+) ", text, flags=re.M))
    families = {f for f in families if not f.endswith("_created")}  # prometheus_client's creation times
    contract = contract_metrics()
    assert families <= set(contract) | {n.removesuffix("_total") for n in contract}, families
    need_nvml = {"tlserve_gpu_memory_used_bytes", "tlserve_gpu_utilization_ratio"}
    for name in set(contract) - need_nvml:
        assert re.search(rf"^# TYPE {name} ", text, flags=re.M), f"{name} missing from /metrics"
    # labelled series appear once touched: these are after ordinary traffic
    for name in (
        "tlserve_requests_total",
        "tlserve_request_duration_seconds_bucket",
        "tlserve_batch_size_bucket",
        "tlserve_queue_duration_seconds_bucket",
        "tlserve_inference_duration_seconds_bucket",
        "tlserve_queue_depth",
        "tlserve_inflight_requests",
        "tlserve_model_ready",
        "tlserve_model_info",
        "tlserve_cuda_fallback",
    ):
        assert re.search(rf'^{name}{{.*model="{MODEL}"', text, flags=re.M), f"{name} has no {MODEL} series"


def test_grpcurl_through_reflection(served, photos, grpcurl):
    services = run([grpcurl, "-plaintext", served.target, "list"]).stdout.split()
    assert {"tlserve.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        services
    )
    health = run(
        [
            grpcurl,
            "-plaintext",
            "-d",
            json.dumps({"service": f"tlserve.model.{MODEL}"}),
            served.target,
            "grpc.health.v1.Health/Check",
        ]
    ).stdout
    assert json.loads(health) == {"status": "SERVING"}
    request = {"model": {"name": MODEL}, "images": [{"encoded": base64.b64encode(photos[0]).decode()}], "topK": 2}
    reply = json.loads(
        run(
            [grpcurl, "-plaintext", "-d", "@", served.target, "tlserve.v1.Inference/Classify"],
            stdin=json.dumps(request),
        ).stdout
    )
    (result,) = reply["results"]
    assert reply["model"] == MODEL and len(result["predictions"]) == 2


def test_sigterm_drains_and_exits_cleanly(repository, tmp_path):
    """The container's PID 1 is `tlserve serve`: SIGTERM must end it with status 0 (no tini needed)."""
    from deploy_processes import ServeProcess

    server = ServeProcess(repository, tmp_path, drain_seconds=1)
    try:
        server.wait_serving("")
    finally:
        status = server.stop()
    assert status == 0, server.log.read_text()
