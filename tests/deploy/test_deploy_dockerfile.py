"""The Dockerfile: hadolint, checkov, and what the images promise (no torch to serve, non-root, entrypoint)."""

from __future__ import annotations

import json
import re
import sys

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
    assert "COPY --from=requirements /deps/serve-cpu.txt " in found["cpu-build"]
    assert "COPY --from=requirements /deps/serve.txt " in found["gpu-build"]
    assert "[train]" in found["trainer"] and re.search(r"^USER 10001$", found["trainer"], flags=re.M)
    assert "COPY --from=requirements /deps/train.txt " in found["trainer"]


def requirement_names(extra: str, *args: str) -> set[str]:
    """The names deploy/docker/requirements.py lists for ``extra`` of the real pyproject.toml."""
    script = REPO / "deploy" / "docker" / "requirements.py"
    out = run([sys.executable, str(script), str(REPO / "pyproject.toml"), extra, *args]).stdout
    return {re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower() for line in out.splitlines()}


def test_requirement_lists_swap_in_the_cpu_onnxruntime_and_keep_torch_out_of_serving():
    cpu = requirement_names("serve", "--onnxruntime", "onnxruntime==1.31.1")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu and "grpcio" in cpu and "torch" not in cpu
    assert {"onnxruntime", "onnxruntime-gpu"} <= requirement_names("serve")  # by platform marker, for the CUDA base
    train = requirement_names("train", "--onnxruntime", "onnxruntime==1.31.1")
    assert {"torch", "torchvision", "onnx", "onnxruntime"} <= train, "tlserve export verifies with ONNX Runtime"


def test_dependencies_are_installed_in_a_layer_that_a_source_change_does_not_touch():
    """Each build stage installs its own list from the requirements stage (which alone reads pyproject.toml),
    then the sources with --no-deps."""
    found = stages()
    assert "COPY pyproject.toml deploy/docker/requirements.py" in found["requirements"]
    for name in ("cpu-build", "gpu-build", "trainer"):
        body = found[name]
        deps, source = body.index("COPY --from=requirements /deps/"), body.index("COPY --from=source")
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
