"""Helpers of the image tests: podman (as root, with runc), building a target with scripts/build_image.sh,
and a container run detached whose ports podman publishes on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from deploy_helpers import REPO

INSTALL = "bash scripts/install_tools.sh  (apt-get install -y podman runc debootstrap; see docs/deployment.md)"
BUILD_TIMEOUT = 3600  # a cold trainer build downloads torch; the cpu target's cold build is a few minutes
LABEL = "org.tlserve.test=image"


def podman_command() -> list[str]:
    """``podman --runtime runc`` (crun refuses hybrid cgroups); skips with the install command where it cannot run."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: run `{INSTALL}`")
    if os.geteuid() != 0:
        pytest.skip("the image tests build with rootful podman and debootstrap: run them as root")
    return ["podman", "--runtime", "runc"]


def podman(cmd: list[str], *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build(target: str) -> str:
    """Build ``target`` with scripts/build_image.sh (cached layers make a rebuild cheap); its tag."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_image.sh"), target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert proc.returncode == 0, f"build_image.sh {target} -> {proc.returncode}\n{proc.stderr[-8000:]}"
    return proc.stdout.strip().splitlines()[-1]


def readable_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` that any uid may read (the image's user is 10001; pytest's folders are 0700)."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


class Container:
    """``podman run -d`` of an image with its container ports published on free 127.0.0.1 ports.
    ``remove()`` always removes it (call it in a ``finally``)."""

    def __init__(self, cmd: list[str], image: str, *run_args: str, ports: tuple[int, ...] = ()) -> None:
        self.cmd = cmd
        self.name = f"tlserve-test-{uuid.uuid4().hex[:12]}"
        publish = [arg for port in ports for arg in ("-p", f"127.0.0.1::{port}")]
        podman(cmd, "run", "-d", "--name", self.name, "--label", LABEL, *publish, *run_args, image)

    def host_port(self, port: int) -> int:
        out = podman(self.cmd, "port", self.name, f"{port}/tcp").stdout.strip()
        return int(out.splitlines()[0].rsplit(":", 1)[1])

    def state(self) -> dict:
        return json.loads(podman(self.cmd, "inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        proc = podman(self.cmd, "logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-8000:]

    def exec(self, *args: str) -> subprocess.CompletedProcess:
        return podman(self.cmd, "exec", self.name, *args, check=False)

    def wait_until(self, ready, timeout: float = 240) -> None:
        """Poll ``ready()`` until true; fails with the logs if the container exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                pytest.fail(f"container {self.name} exited: {self.state()}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        pytest.fail(f"container {self.name} not ready after {timeout:g} s\n{self.logs()}")

    def remove(self) -> None:
        podman(self.cmd, "rm", "-f", "-t", "0", self.name, check=False)
