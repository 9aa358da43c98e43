"""The chart's custom resources against the operators' own CRD schemas (vendored in tests/deploy/crds/).

kubernetes-validate knows only the built-in kinds, so test_deploy_chart skips these; here each one is checked with
crd_schema (jsonschema, strict on unknown fields like the apiserver), and each check is shown to refuse a broken
object."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("jsonschema")

from crd_schema import crd_path, errors  # noqa: E402
from deploy_helpers import CHART, contract_metrics, helm_template, manifests, metrics_in, run, set_path  # noqa: E402
from test_deploy_chart import VARIANTS  # noqa: E402

pytestmark = pytest.mark.tools

CRD_FILES = {
    "ServiceMonitor": crd_path("prometheus-operator", "monitoring.coreos.com_servicemonitors.yaml"),
    "PrometheusRule": crd_path("prometheus-operator", "monitoring.coreos.com_prometheusrules.yaml"),
    "ScaledObject": crd_path("keda", "keda.sh_scaledobjects.yaml"),
}
MONITORING = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true"]
KEDA = ["--set", "keda.enabled=true", "--set", "autoscaling.enabled=false"]
CRD_VARIANTS = {
    **VARIANTS,
    "monitoring": [*MONITORING, "--set", "serviceMonitor.labels.release=kps", "--set", "prometheusRule.labels.x=y"],
    "monitoring-https": [*VARIANTS["tls-auth"], *MONITORING],
    "keda": [*KEDA, *MONITORING],
    "keda-fallback-auth": [
        *KEDA,
        "--set",
        "keda.cpuUtilization=0",
        "--set",
        "keda.fallback.failureThreshold=3",
        "--set",
        "keda.fallback.replicas=4",
        "--set",
        "keda.prometheus.authenticationRef=prometheus-auth",
        "--set",
        "keda.prometheus.metric=tlserve_queue_depth",
        "--set",
        "keda.prometheus.target=8",
        "--set",
        "keda.prometheus.activationThreshold=1",
    ],
}


def custom_resources(rendered: str) -> dict[str, dict]:
    return {key: doc for key, doc in manifests(rendered).items() if doc["kind"] in CRD_FILES}


@pytest.mark.parametrize("variant", CRD_VARIANTS)
def test_rendered_custom_resources_match_their_crds(helm, variant):
    resources = custom_resources(helm_template(helm, *CRD_VARIANTS[variant]))
    for key, doc in resources.items():
        assert errors(doc, CRD_FILES[doc["kind"]]) == [], key
    if variant.startswith(("monitoring", "keda")):
        assert resources, "the variant renders custom resources"


def rendered_resource(helm, kind: str) -> dict:
    (doc,) = [d for d in custom_resources(helm_template(helm, *CRD_VARIANTS["keda"])).values() if d["kind"] == kind]
    return doc


BROKEN = [
    ("ServiceMonitor", "spec.endpoints.0.intervall", "15s", "'intervall' was unexpected"),
    ("ServiceMonitor", "spec.endpoints.0.scheme", "ftp", "'ftp' is not one of"),
    ("ServiceMonitor", "spec.selektor", {}, "'selektor' was unexpected"),
    ("ServiceMonitor", "metadata.labels.team", 7, "7 is not of type 'string'"),
    ("ServiceMonitor", "apiVersion", "monitoring.coreos.com/v2", "monitoring.coreos.com/v2 is not served by"),
    ("ServiceMonitor", "kind", "PodMonitor", "PodMonitor monitoring.coreos.com/v1 is not served by"),
    ("PrometheusRule", "spec.groups.0.rules.0.for", 300, "300 is not of type 'string'"),
    ("PrometheusRule", "spec.groups.0.name", None, "'name' is a required property"),
    ("PrometheusRule", "spec.groups.0.rules.0.labels.severity", ["critical"], "is not of type 'string'"),
    ("ScaledObject", "spec.triggers.0.type", None, "'type' is a required property"),
    ("ScaledObject", "spec.minReplicaCount", "2", "'2' is not of type 'integer'"),
    ("ScaledObject", "spec.pollingInterval", "15s", "'15s' is not of type 'integer'"),
    ("ScaledObject", "spec.scaleTargetRef.name", None, "'name' is a required property"),
    ("ScaledObject", "spec.triggers.0.metadata.threshold", 16, "16 is not of type 'string'"),
    ("ScaledObject", "spec.advanced.horizontalPodAutoscalerConfig.behaviour", {}, "'behaviour' was unexpected"),
]


@pytest.mark.parametrize("kind,path,value,message", BROKEN, ids=[f"{b[0]}:{b[1]}" for b in BROKEN])
def test_broken_custom_resources_are_refused(helm, kind, path, value, message):
    good = rendered_resource(helm, kind)
    assert errors(good, CRD_FILES[kind]) == []
    found = errors(set_path(good, path, value), CRD_FILES[kind])
    assert any(message in line for line in found), found


def test_keda_and_the_hpa_are_never_both_rendered(helm):
    proc = run([helm, "template", "t", str(CHART), "--set", "keda.enabled=true"], check=False)
    assert proc.returncode != 0
    assert "keda.enabled and autoscaling.enabled would both scale the Deployment" in proc.stderr
    docs = manifests(helm_template(helm, *KEDA))
    assert "ScaledObject/tlserve" in docs and "HorizontalPodAutoscaler/tlserve" not in docs
    assert "replicas" not in docs["Deployment/tlserve"]["spec"], "KEDA's HPA owns the replica count"
    hpa = manifests(helm_template(helm))
    assert "HorizontalPodAutoscaler/tlserve" in hpa and "ScaledObject/tlserve" not in hpa


@pytest.mark.parametrize(
    "values,message",
    [
        (["--set", "keda.prometheus.serverAddress="], "keda.enabled needs keda.prometheus.serverAddress"),
        (["--set", "server.maxConcurrentRpcs=0"], "keda.prometheus.target is needed"),
        (["--set", "keda.fallback.replicas=3", "--set", "keda.fallback.failureThreshold=3"], "keda.cpuUtilization=0"),
        (["--set", "keda.prometheus.metric=tlserve_requests_total"], "keda.prometheus.metric"),
    ],
)
def test_incomplete_keda_values_are_refused(helm, values, message):
    proc = run([helm, "template", "t", str(CHART), *KEDA, *values], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_scaledobject_scales_the_deployment_on_the_scraped_in_flight_requests(helm, promtool, tmp_path):
    docs = manifests(helm_template(helm, *KEDA, "--set", "serviceMonitor.enabled=true"))
    spec = docs["ScaledObject/tlserve"]["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tlserve"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 10)
    prometheus, cpu = spec["triggers"]
    assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}
    assert prometheus["type"] == "prometheus" and prometheus["metricType"] == "AverageValue"
    query = prometheus["metadata"]["query"]
    assert query == 'sum(tlserve_inflight_requests{namespace="serving", job="tlserve"})'
    assert metrics_in(query) == {"tlserve_inflight_requests"} and "tlserve_inflight_requests" in contract_metrics()
    # the job label Prometheus gives the series is the name of the Service the ServiceMonitor selects
    assert docs["ServiceMonitor/tlserve"]["spec"]["selector"]["matchLabels"].items() <= (
        docs["Service/tlserve"]["metadata"]["labels"].items()
    )
    # per-pod target: 2/3 of the per-pod cap on concurrent calls
    server = docs["Deployment/tlserve"]["spec"]["template"]["spec"]["containers"][0]
    assert "--max-concurrent-rpcs=64" in server["args"] and prometheus["metadata"]["threshold"] == "42"
    raised = manifests(helm_template(helm, *KEDA, "--set", "server.maxConcurrentRpcs=48"))
    assert raised["ScaledObject/tlserve"]["spec"]["triggers"][0]["metadata"]["threshold"] == "32"
    rules = tmp_path / "query.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [{"record": "keda:q", "expr": query}]}]}))
    run([promtool, "check", "rules", str(rules)])  # the query is valid PromQL
