"""`--log-format json` and the request log lines, as a user's process writes them: `tlserve serve` in
a subprocess (without the OpenTelemetry packages importable, so it also shows that the server starts
without them while tracing is off), every line of its output parsed as JSON."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from serving_helpers import MODEL, photo_bytes

from tlserve.server.logs import JsonFormatter
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

# `python -m tlserve` with every opentelemetry import failing, as on an install without the tracing extra
WITHOUT_OTEL = "import sys; sys.modules['opentelemetry'] = None; from tlserve.cli import main; sys.exit(main())"
REQUEST_FIELDS = {"rpc", "code", "duration_ms", "model", "version", "request_id", "trace_id"}


def tlserve_without_otel(*args: str, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-c", WITHOUT_OTEL, "--log-level", "INFO", "serve", *args]
    return subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, **kwargs)


def json_lines(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


def wait_serving(process: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    """The gRPC port from the JSON "serving gRPC on HOST:PORT" line."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
        for line in log.read_text().splitlines():
            message = json.loads(line)["message"]
            if message.startswith("serving gRPC on "):
                return int(message.split()[3].rsplit(":", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"not serving after {timeout}s:\n{log.read_text()}")


def test_json_formatter_writes_one_object_a_line_with_the_records_fields():
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.LogRecord("tlserve.x", logging.ERROR, __file__, 1, "a %s", ("message",), sys.exc_info())
    record.json_fields = {"model": "m", "code": "INTERNAL", "message": "not this"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "a message" and entry["level"] == "ERROR" and entry["logger"] == "tlserve.x"
    assert entry["model"] == "m" and entry["code"] == "INTERNAL"
    assert "ValueError: two\nlines" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def test_serve_writes_json_request_lines_and_starts_without_opentelemetry(repo_copy, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        args = ["--repository", str(repo_copy), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
        args += ["--device", "cpu", "--drain-seconds", "2", "--log-format", "json", "--log-requests", "all"]
        process = tlserve_without_otel(*args, stdout=out, stderr=subprocess.STDOUT)
        try:
            port = wait_serving(process, log)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = tlserve_pb2_grpc.InferenceStub(channel)
                good = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))])
                stub.Classify(good, metadata=[("x-request-id", "req-good")], timeout=60)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=b"junk")]), timeout=60)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
    entries = json_lines(log)
    requests = [e for e in entries if e["logger"] == "tlserve.server.requests"]
    assert [e["rpc"] for e in requests] == ["Classify", "Classify"]
    ok, failed = requests
    assert REQUEST_FIELDS <= set(ok) and REQUEST_FIELDS <= set(failed)
    assert (ok["code"], ok["model"], ok["version"], ok["request_id"]) == ("OK", MODEL, "1", "req-good")
    assert failed["code"] == "INVALID_ARGUMENT" and failed["level"] == "INFO"
    assert len(failed["request_id"]) == 16 and failed["request_id"] != ok["request_id"]  # generated
    assert failed["trace_id"] == "" and "error" in failed  # tracing off: no trace
    assert ok["duration_ms"] > 0 and isinstance(failed["duration_ms"], float)
    assert any(e["message"] == "stopped" for e in entries)


def test_tracing_asked_for_without_the_packages_refuses_to_start_with_the_reason(tmp_path):
    out = tlserve_without_otel(
        "--repository", str(tmp_path), "--port", "0", "--metrics-port", "0", "--tracing", stderr=subprocess.PIPE
    )
    _, stderr = out.communicate(timeout=120)
    assert out.returncode == 2
    assert "refusing to start: --tracing needs the OpenTelemetry packages" in stderr
    assert "pip install 'tlserve[tracing]'" in stderr
