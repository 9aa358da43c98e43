"""The Grafana dashboard shipped in the chart: valid JSON, the panels the issue asks for, contract metrics only."""

from __future__ import annotations

import json

import pytest
import yaml
from deploy_helpers import CHART, contract_metrics, helm_template, manifests, metrics_in

DASHBOARD = CHART / "dashboards" / "tlserve.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_panels_cover_throughput_latency_batches_queue_and_errors():
    all_exprs = "\n".join(exprs(dashboard()))
    assert "rate(tlserve_requests_total" in all_exprs
    assert 'code!="OK"' in all_exprs
    for quantile in ("0.5", "0.9", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (model, le) (rate(tlserve_request_duration_seconds_bucket"
            in all_exprs
        )
    for metric in (
        "tlserve_batch_size_bucket",
        "tlserve_queue_depth",
        "tlserve_queue_duration_seconds_bucket",
        "tlserve_inference_duration_seconds_bucket",
        "tlserve_inflight_requests",
        "tlserve_cuda_fallback",
    ):
        assert metric in all_exprs


def test_dashboard_uses_only_contract_metrics_and_its_variables():
    board = dashboard()
    known = set(contract_metrics())
    used = set().union(*(metrics_in(e) for e in exprs(board)))
    assert used <= known, used - known
    assert {"tlserve_requests_total", "tlserve_request_duration_seconds", "tlserve_batch_size"} <= used
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job", "model"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]


def test_class_share_distance_panel_draws_the_alert_threshold():
    """The distance panel computes TlserveClassShareDrift's statistic and draws the chart's default threshold."""
    (panel,) = [p for p in dashboard()["panels"] if p["title"].startswith("Class-share distance")]
    (target,) = panel["targets"]
    assert metrics_in(target["expr"]) == {"tlserve_predictions_total", "tlserve_prediction_share_baseline"}
    rule = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]
    assert f"[{rule['classShareDriftWindow']}]" in target["expr"]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, rule["classShareDriftDistance"]]
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"


@pytest.mark.tools
def test_configmap_carries_the_dashboard_for_the_grafana_sidecar(helm):
    configmap = manifests(helm_template(helm))["ConfigMap/tlserve-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["tlserve.json"]) == dashboard()
    disabled = helm_template(helm, "--set", "dashboard.enabled=false")
    assert "ConfigMap/tlserve-dashboard" not in manifests(disabled)
    assert yaml.safe_load(disabled.split("---")[1])  # the rest still renders
