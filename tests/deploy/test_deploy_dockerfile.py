"""The Dockerfile: hadolint, checkov, and what the images promise (no torch to serve, non-root, entrypoint)."""

from __future__ import annotations

import json
import re

import pytest
from deploy_helpers import REPO, run

DOCKERFILE = REPO / "Dockerfile"


def stages() -> dict[str, str]:
    """Stage name -> its instructions (the text up to the next FROM, comments left out)."""
    text = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(), flags=re.M)
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", part).group(1): "FROM " + part for part in parts}


@pytest.mark.tools
def test_hadolint_clean(hadolint):
    proc = run([hadolint, "--no-color", str(DOCKERFILE)], check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.tools
def test_checkov_dockerfile_clean(checkov):
    proc = run(
        [
            checkov,
            "--framework",
            "dockerfile",
            "--skip-download",
            "--quiet",
            "--output",
            "json",
            "--file",
            str(DOCKERFILE),
        ],
        check=False,
    )
    report = json.loads(proc.stdout)
    summary = report["summary"]
    assert summary["passed"] > 0
    failed = [f"{c['check_id']} {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and proc.returncode == 0, failed


def test_serving_targets_have_no_torch_and_run_tlserve_serve_as_non_root():
    found = stages()
    assert {"cpu", "gpu", "trainer"} <= found.keys()
    assert re.match(r"FROM nvidia/cuda:13\.[0-9.]+-cudnn-runtime-", found["gpu"])
    assert list(found)[-1] == "cpu", "the default target is the slim CPU image"
    for name in ("cpu", "gpu"):
        chain = found[name] + found[f"{name}-build"]
        assert "[serve]" in found[f"{name}-build"] and "[train]" not in chain and "torch" not in chain
        assert re.search(r"^USER 10001$", found[name], flags=re.M)
        assert 'ENTRYPOINT ["tlserve", "serve"]' in found[name]
        assert "TMPDIR=/tmp" in found[name] and "HOME=/tmp" in found[name]
        assert "ARG MODEL_REPOSITORY=" in found[name] and "COPY ${MODEL_REPOSITORY} /models" in found[name]
    assert "onnxruntime==" in found["cpu-build"], "the slim image swaps in the CPU build of ONNX Runtime"
    assert "[train]" in found["trainer"] and re.search(r"^USER 10001$", found["trainer"], flags=re.M)
    assert "onnxruntime==" in found["trainer"], "tlserve export verifies with ONNX Runtime; the train extra has none"


def test_dependencies_are_installed_in_a_layer_that_a_source_change_does_not_touch():
    """pyproject.toml alone feeds the dependency layer; the sources come after it and install with --no-deps."""
    for name, body in stages().items():
        if "--from=source" not in body:
            continue
        deps, source = body.index("COPY pyproject.toml deploy/docker/requirements.py"), body.index("--from=source")
        assert deps < source, name
        assert "-r /deps/requirements.txt" in body[deps:source], name
        assert re.search(r"pip install --no-cache-dir --no-deps \"/src\[(serve|train)\]\"", body[source:]), name


def test_dockerignore_lets_the_build_inputs_through():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", "everything is left out unless let through"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), flags=re.M):
        words = [w for w in line.split() if not w.startswith("--")]
        if "--from=" not in line:
            sources += words[:-1]
    assert "pyproject.toml" in sources and "server/" in sources
    for path in set(sources) - {"${MODEL_REPOSITORY}"}:
        assert any(path.rstrip("/") == a or path.startswith(a + "/") for a in allowed), path
