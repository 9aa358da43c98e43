"""In-process servers for the server tests: a real gRPC server on port 0 in a background event
loop, serving a copy of the session's exported model repository (so tests may add versions)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serving_helpers import MODEL, LiveServer, server_settings


@pytest.fixture(scope="session")
def exported_version(model_repository) -> Path:
    """The folder of the session's exported model (``fashion/1``)."""
    return Path(model_repository) / MODEL / "1"


@pytest.fixture(scope="module")
def repo_copy(exported_version, tmp_path_factory) -> Path:
    """A private repository holding a copy of the exported version, for one test module."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(exported_version, root / MODEL / "1")
    return root


@pytest.fixture(scope="module")
def live(repo_copy):
    server = LiveServer(
        server_settings(repo_copy, max_images=8, max_image_bytes=2_000_000, max_pixels=4_000_000)
    ).start()
    yield server
    server.close()


@pytest.fixture
def make_server():
    """Factory for servers with custom settings; all are closed after the test."""
    servers: list[LiveServer] = []

    def make(repository: Path, start: bool = True, **overrides) -> LiveServer:
        server = LiveServer(server_settings(repository, **overrides))
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.close()
