"""`tlserve serve` in a subprocess on 127.0.0.1, for the benchmarks: a free port, and a start that waits
until the Open Inference Protocol says ServerReady (or fails on the server's exit or after 180 s)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from tlserve.server.pb.inference import messages_pb2 as oip

READY = "/inference.GRPCInferenceService/ServerReady"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_argv(repository: Path, port: int, metrics_port: int, extra: list[str]) -> list[str]:
    """The `tlserve serve` arguments: loopback only, CPU, the given ports, then ``extra``."""
    return ["serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--device", "cpu", *extra]  # fmt: skip


def start_server(
    repository: Path, extra: list[str], log_level: str = "WARNING", timeout: float = 180
) -> tuple[subprocess.Popen, str, str]:
    """The server process, its gRPC address and its metrics URL, once it is ready."""
    port, metrics_port = free_port(), free_port()
    argv = serve_argv(repository, port, metrics_port, extra)
    process = subprocess.Popen([sys.executable, "-m", "tlserve", "--log-level", log_level, *argv])
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        ready = channel.unary_unary(READY)
        try:
            wait_ready(process, lambda: oip.ServerReadyResponse.FromString(ready(b"", timeout=2)).ready, timeout)
        except (RuntimeError, TimeoutError) as exc:
            process.terminate()
            raise SystemExit(f"server {exc}") from None
    return process, address, f"http://127.0.0.1:{metrics_port}/metrics"


def wait_ready(process: subprocess.Popen, check: Callable[[], bool], timeout: float, pause: float = 0.5) -> None:
    """Until ``check()`` is true (a failed RPC counts as not yet): RuntimeError when ``process`` exits
    first, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            if check():
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready in {timeout:g} s")
        time.sleep(pause)
