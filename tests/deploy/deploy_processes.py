"""Real processes for the scrape tests: `tlserve serve` as the container runs it, and a Prometheus on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from string import Template

from deploy_helpers import REPO

SCRAPE_TEMPLATE = REPO / "deploy" / "prometheus" / "prometheus.yml.tmpl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (loopback only)
        return reply.read().decode()


def wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120, pause: float = 0.25):
    """Call ``check`` until it returns something truthy; fail early with the log if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{log.read_text()}")
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not done in {timeout}s\n{log.read_text()[-4000:]}")
        time.sleep(pause)


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, as the kubelet sends it; SIGKILL if it outlives ``timeout``. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServeProcess:
    """`tlserve serve` in a subprocess, configured like the image: TLSERVE_* environment plus flags."""

    def __init__(self, repository: Path, workdir: Path, drain_seconds: int = 2, device: str = "cpu") -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = workdir / "serve.log"
        env = {
            **os.environ,
            "TLSERVE_REPOSITORY": str(repository),
            "TLSERVE_DEVICE": device,
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
        }
        tlserve = Path(sys.executable).with_name("tlserve")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(tlserve),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--metrics-port",
                    str(self.metrics_port),
                    "--drain-seconds",
                    str(drain_seconds),
                    "--max-queue-delay-ms",
                    "1",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.target = f"127.0.0.1:{self.port}"

    def wait_serving(self, service: str) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def serving() -> bool:
            with grpc.insecure_channel(self.target) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=2
                    )
                except grpc.RpcError:
                    return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, f"health {service!r} SERVING", self.proc, self.log)

    def metrics_text(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def stop(self) -> int:
        return stop(self.proc)


class PrometheusProcess:
    """A real Prometheus scraping ``targets`` every second, with tmp storage, on a free loopback port."""

    def __init__(self, binary: str, workdir: Path, targets: list[str], namespace: str, rule_files: list[str]) -> None:
        config = Template(SCRAPE_TEMPLATE.read_text()).substitute(
            scrape_interval="1s", targets=json.dumps(targets), namespace=namespace, rule_files=json.dumps(rule_files)
        )
        (workdir / "prometheus.yml").write_text(config)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: http_get(f"{self.url}/-/ready"), "prometheus ready", self.proc, self.log)

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        reply = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def wait_for(self, check, what: str, timeout: float = 90):
        return wait_for(check, what, self.proc, self.log, timeout=timeout)

    def stop(self) -> int:
        return stop(self.proc)
