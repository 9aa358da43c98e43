"""Fixtures of the deployment tests: each ops tool's path, skipping with its install command when missing."""

from __future__ import annotations

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
