"""`tlserve serve` in a subprocess on 127.0.0.1, for the benchmarks: a free port, and a start that waits
until the Open Inference Protocol says ServerReady (or fails on the server's exit or after 180 s)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
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
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        ready = channel.unary_unary(READY)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            try:
                if oip.ServerReadyResponse.FromString(ready(b"", timeout=2)).ready:
                    return process, address, f"http://127.0.0.1:{metrics_port}/metrics"
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"server did not become ready in {timeout:g} s")
