"""Triton's perf_analyzer, unmodified, measuring an in-process server through the Open Inference
Protocol: it needs ModelMetadata, ModelConfig, ModelInfer and ModelStatistics to agree."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from serving_helpers import MODEL, LiveServer, server_settings

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "perf_analyzer not installed: run `bash scripts/install_perf_analyzer.sh`"


def perf_analyzer() -> str | None:
    local = ROOT / ".tools" / "bin" / "perf_analyzer"
    return str(local) if os.access(local, os.X_OK) else shutil.which("perf_analyzer")


@pytest.fixture(scope="module")
def served(repo_copy):
    server = LiveServer(server_settings(repo_copy, max_images=8)).start()
    yield server
    server.close()


@pytest.mark.tools
def test_perf_analyzer_reports_throughput_and_server_statistics(served):
    binary = perf_analyzer()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    command = [
        binary,
        "-i",
        "grpc",
        "-u",
        f"127.0.0.1:{served.handle.port}",
        "-m",
        MODEL,
        "-b",
        "2",
        "--concurrency-range",
        "1:2",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "40",
        "--max-trials",
        "4",
        "--stability-percentage",
        "100",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    throughputs = [float(t) for t in re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", result.stdout)]
    assert len(throughputs) == 2 and min(throughputs) > 0, result.stdout
    server_counts = [int(n) for n in re.findall(r"Server:\s+Inference count: (\d+)", result.stdout)]
    assert len(server_counts) == 2 and min(server_counts) > 0, result.stdout
    assert served.metric("tlserve_requests_total", rpc="ModelInfer", model=MODEL, code="OK") > 0
