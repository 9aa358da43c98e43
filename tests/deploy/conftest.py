"""Fixtures of the deployment tests: each ops tool, skipping with its install command when missing."""
from __future__ import annotations

import pytest
from deploy_helpers import find_tool


@pytest.fixture(scope="session")
def helm() -> str:
    return find_tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="session")
def prometheus() -> str:
    return find_tool("prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")


@pytest.fixture(scope="session")
def checkov() -> str:
    return find_tool("checkov")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return find_tool("kubernetes-validate")


@pytest.fixture(scope="session")
def grpcurl() -> str:
    return find_tool("grpcurl")
