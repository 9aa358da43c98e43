"""Fixtures of the deployment tests: each ops tool's path, skipping with its install command when missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import find_tool


def tool_fixture(tool: str):
    @pytest.fixture(scope="session", name=tool.replace("-", "_"))
    def path() -> str:
        return find_tool(tool)

    return path


helm, promtool, prometheus, hadolint, checkov, kubernetes_validate, grpcurl = map(
    tool_fixture, ("helm", "promtool", "prometheus", "hadolint", "checkov", "kubernetes-validate", "grpcurl")
)
rclone, moto_server = map(tool_fixture, ("rclone", "moto_server"))


@pytest.fixture(scope="module")
def repository(request) -> Path:
    """The session's exported model repository (a real fashion/1/model.onnx), for tests that serve it."""
    pytest.importorskip("grpc")
    try:
        return Path(request.getfixturevalue("model_repository"))
    except pytest.FixtureLookupError:
        pytest.skip("needs the model_repository fixture (tests/conftest.py: an exported fashion/1/model.onnx)")
