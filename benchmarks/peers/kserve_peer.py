"""KServe as a peer in the serving benchmark: its server process (``kserve_onnx.py`` in KServe's own
venv), readiness over the Open Inference Protocol, its answer's top class, its CPU, and its stop.

KServe binds 0.0.0.0 (HTTP) and [::] (gRPC), so the benchmark runs it inside a private network
namespace (peers/netns.py); the ports are still picked free on loopback."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import grpc
import numpy as np
from served import free_port, wait_ready

from tlserve.server.pb.inference import messages_pb2 as oip

from . import kserve_venv

MODE = "KServe OIP uint8"
PEER_MODEL = Path(__file__).with_name("kserve_onnx.py")
VENV = Path(__file__).resolve().parents[2] / ".bench" / "kserve-venv"
SERVICE = "/inference.GRPCInferenceService/"


def ensure_venv() -> Path:
    """KServe's venv interpreter, built at VENV first if needed (needs the package registry)."""
    kserve_venv.log.setLevel(logging.INFO)
    return kserve_venv.ensure_venv(VENV)


def start_checked(
    model_file: Path, name: str, log_file: Path, extra: list[str], oip_payload: bytes, raw_top: int
) -> tuple[subprocess.Popen, str, str]:
    """KServe serving ``model_file`` as ``name``: its process, gRPC address and version, once its top class
    for ``oip_payload`` is ``raw_top`` (raw ORT's); a disagreement stops it and exits."""
    process, address = start_kserve(ensure_venv(), model_file, name, log_file, extra)
    try:
        top = top_class(address, oip_payload)
        if top != raw_top:
            raise SystemExit(f"KServe's top class for the photo is {top}, raw ORT's {raw_top}")
        return process, address, server_version(address)
    except BaseException:
        stop_kserve(process)
        raise


def kserve_argv(
    python: Path, model_file: Path, name: str, grpc_port: int, http_port: int, extra: list[str]
) -> list[str]:
    """The peer model's command line: KServe's ModelServer flags with their defaults but the ports, then ``extra``."""
    return [str(python), str(PEER_MODEL), "--model_name", name, "--model_file", str(model_file),
            "--grpc_port", str(grpc_port), "--http_port", str(http_port), *extra]  # fmt: skip


def start_kserve(
    python: Path, model_file: Path, name: str, log_file: Path, extra: list[str], timeout: float = 180
) -> tuple[subprocess.Popen, str]:
    """The KServe process (leader of its own process group) and its gRPC address, once ServerReady and
    ModelReady(name) both say ready; its output goes to ``log_file``."""
    grpc_port, http_port = free_port(), free_port()
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            kserve_argv(python, model_file, name, grpc_port, http_port, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"127.0.0.1:{grpc_port}"
    try:
        with grpc.insecure_channel(address) as channel:
            wait_ready(process, lambda: both_ready(channel, name), timeout)
    except (RuntimeError, TimeoutError) as exc:
        stop_kserve(process)
        raise SystemExit(f"KServe {exc}; the end of {log_file}:\n{tail(log_file)}") from None
    except BaseException:
        stop_kserve(process)
        raise
    return process, address


def both_ready(channel: grpc.Channel, name: str) -> bool:
    """ServerReady and ModelReady(name), each over OIP."""
    server = oip.ServerReadyResponse.FromString(channel.unary_unary(SERVICE + "ServerReady")(b"", timeout=2))
    model_ready = oip.ModelReadyRequest(name=name).SerializeToString()
    model = oip.ModelReadyResponse.FromString(channel.unary_unary(SERVICE + "ModelReady")(model_ready, timeout=2))
    return server.ready and model.ready


def server_version(address: str) -> str:
    """``name version`` from the server's OIP ServerMetadata."""
    with grpc.insecure_channel(address) as channel:
        meta = oip.ServerMetadataResponse.FromString(channel.unary_unary(SERVICE + "ServerMetadata")(b"", timeout=30))
    return f"{meta.name} {meta.version}"


def top_class(address: str, oip_payload: bytes) -> int:
    """The top class of KServe's answer to one serialised ModelInferRequest (raw float32 probabilities)."""
    with grpc.insecure_channel(address) as channel:
        response = oip.ModelInferResponse.FromString(
            channel.unary_unary(SERVICE + "ModelInfer")(oip_payload, timeout=60)
        )
    return int(np.argmax(np.frombuffer(response.raw_output_contents[0], dtype=np.float32)))


def stop_kserve(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to KServe's process group (workers included), then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def tree_cpu(pid: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds of process ``pid`` and all its live descendants (Linux /proc), each
    with what its exited, waited-for children spent: a server that forks workers is counted whole."""
    stats: dict[int, list[str]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    if pid not in stats:
        raise ProcessLookupError(pid)
    ticks, todo = 0, [pid]
    while todo:
        current = todo.pop()
        ticks += sum(int(f) for f in stats[current][11:15])  # utime, stime, cutime, cstime
        todo += children.get(current, [])
    return ticks / os.sysconf("SC_CLK_TCK")
