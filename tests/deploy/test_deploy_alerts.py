"""The chart's Prometheus alerts: promtool check rules, promtool test rules (a unit test per alert), names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from deploy_helpers import REPO, contract_metrics, helm_template, metrics_in, run, write_rules

pytestmark = pytest.mark.tools

RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yaml"
# what the alerts must cover: error ratio, p99 latency, queue saturation, model not ready, CUDA fallback,
# confidence drift, class-share drift
REQUIRED = {
    "TlserveConfidenceDrift",
    "TlserveClassShareDrift",
    "TlserveHighErrorRatio",
    "TlserveHighP99Latency",
    "TlserveQueueSaturated",
    "TlserveModelNotReady",
    "TlserveCudaFallback",
}


def render_rules(helm: str, *args: str) -> dict:
    rendered = helm_template(
        helm, "--set", "prometheusRule.enabled=true", *args, "--show-only", "templates/prometheusrule.yaml"
    )
    return yaml.safe_load(rendered)["spec"]


@pytest.fixture(scope="module")
def rules_dir(helm, tmp_path_factory) -> Path:
    """alerts.rules.yaml (rendered with the default values, namespace "serving") beside the unit tests."""
    folder = tmp_path_factory.mktemp("rules")
    write_rules(helm, folder)
    shutil.copy(RULE_TESTS, folder / RULE_TESTS.name)
    return folder


def alerts(rules: dict) -> list[dict]:
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def assert_rule_tests_fail(promtool, helm, folder, value: str, alert: str) -> None:
    """The chart's rules rendered with ``--set value`` fail the promtool unit tests on ``alert``: the value is used."""
    write_rules(helm, folder, "--set", value)
    shutil.copy(RULE_TESTS, folder / RULE_TESTS.name)
    proc = run([promtool, "test", "rules", RULE_TESTS.name], cwd=folder, check=False)
    assert proc.returncode != 0
    assert f"alertname: {alert}" in proc.stdout + proc.stderr


def test_promtool_check_rules(promtool, rules_dir):
    out = run([promtool, "check", "rules", str(rules_dir / "alerts.rules.yaml")]).stdout
    assert "SUCCESS" in out


def test_promtool_test_rules(promtool, rules_dir):
    out = run([promtool, "test", "rules", RULE_TESTS.name], cwd=rules_dir).stdout
    assert "SUCCESS" in out


def test_thresholds_come_from_values(promtool, helm, tmp_path):
    """A stricter error-ratio threshold than the unit tests assume makes them fail: the tests do bite."""
    assert_rule_tests_fail(promtool, helm, tmp_path, "prometheusRule.errorRatio=0.2", "TlserveHighErrorRatio")


@pytest.mark.parametrize(
    "value",
    [
        "prometheusRule.confidenceDriftBaselineQuantile=0.05",  # a baseline of 0.15: the median 0.2 is above it
        "prometheusRule.confidenceDriftFor=1h",  # not yet firing at the unit test's 45 minutes
    ],
)
def test_confidence_drift_quantile_and_duration_come_from_values(promtool, helm, tmp_path, value):
    assert_rule_tests_fail(promtool, helm, tmp_path, value, "TlserveConfidenceDrift")


@pytest.mark.parametrize(
    "value",
    [
        "prometheusRule.classShareDriftDistance=0.6",  # the drifted mix is 0.5 from its baseline
        "prometheusRule.classShareDriftMinPredictions=1500",  # the two pods made 1200 predictions in 30 minutes
        "prometheusRule.classShareDriftWindow=20m",  # 800 predictions in the window: below the minimum
        "prometheusRule.classShareDriftFor=1h",  # not yet firing at the unit test's 70 minutes
    ],
)
def test_class_share_drift_distance_count_window_and_duration_come_from_values(promtool, helm, tmp_path, value):
    assert_rule_tests_fail(promtool, helm, tmp_path, value, "TlserveClassShareDrift")


def test_every_alert_is_required_or_known_and_unit_tested(helm):
    names = {rule["alert"] for rule in alerts(render_rules(helm))}
    assert REQUIRED <= names
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert names == tested
    firing = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert firing == names, "each alert has a case where it fires"


def test_alerts_use_contract_metrics_and_carry_severity_and_summary(helm):
    known = set(contract_metrics())
    for rule in alerts(render_rules(helm)):
        used = metrics_in(rule["expr"])
        assert used and used <= known, (rule["alert"], used - known)
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
