"""`tlserve serve` and `tlserve predict` as a user runs them: real processes, signals included."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from serving_helpers import MODEL, copy_version, photo_path

from tlserve.client import wait_ready
from tlserve.manifest import Manifest
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

DEMO = Path(__file__).resolve().parents[2] / "trainer" / "demo_data" / "fashion_mnist_subset.npz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tlserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlserve", *args]


@pytest.fixture(scope="module")
def image_folder(exported_version, tmp_path_factory) -> Path:
    """An ImageFolder tree of real demo test images, named by the model's own labels."""
    ort = pytest.importorskip("onnxruntime")
    meta = ort.InferenceSession(str(exported_version / "model.onnx")).get_modelmeta().custom_metadata_map
    labels = Manifest.from_metadata(meta).labels
    data = np.load(DEMO)
    root = tmp_path_factory.mktemp("images")
    for i in range(len(labels) * 3):
        x, y = data["test_x"][i], int(data["test_y"][i]) % len(labels)
        (root / labels[y]).mkdir(exist_ok=True)
        Image.fromarray(x).save(root / labels[y] / f"{i}.png")
    return root


@pytest.fixture
def served(exported_version, tmp_path):
    repo = tmp_path / "models"
    (repo / MODEL).mkdir(parents=True)
    copy_version(exported_version, repo / MODEL / "1")
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        tlserve(
            "serve",
            "--repository",
            str(repo),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--device",
            "cpu",
            "--drain-seconds",
            "2",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc, port, repo, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_predict_prints_accuracy_and_rate_for_an_image_folder(served, image_folder):
    _, port, _, _ = served
    out = subprocess.run(
        tlserve(
            "predict",
            "--target",
            f"127.0.0.1:{port}",
            "--images",
            str(image_folder),
            "--wait-ready",
            "60",
            "--show",
            "2",
            "--batch-size",
            "7",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    count = sum(1 for _ in image_folder.rglob("*.png"))
    assert re.fullmatch(rf"test accuracy via gRPC: [01]\.\d{{4}} \(n={count}\)", lines[-2]), lines
    assert lines[-1].startswith("predictions per second: ")
    assert len([line for line in lines if "(true: " in line]) == 2


def test_sighup_reloads_and_sigterm_stops_gracefully(served, exported_version):
    proc, port, repo, log = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_ready(channel, 60)
        stub = tlserve_pb2_grpc.InferenceStub(channel)
        copy_version(exported_version, repo / MODEL / "2")
        proc.send_signal(signal.SIGHUP)
        give_up = time.monotonic() + 60
        while stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version != "2" and time.monotonic() < give_up:
            time.sleep(0.1)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version == "2"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log.seek(0)
    text = log.read()
    assert "shutting down" in text and "model fashion/2 unloaded" in text


def test_predict_reports_an_unreachable_server():
    out = subprocess.run(
        tlserve("predict", "--target", f"127.0.0.1:{free_port()}", str(photo_path("coffee.png"))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


@pytest.mark.parametrize(
    "args,env,said",
    [
        (["--device", "tpu"], {}, "tlserve serve: --device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
        (
            [],
            {"TLSERVE_MAX_IMAGES": "lots"},
            "argument --max-images: 'lots' (from TLSERVE_MAX_IMAGES) is not a valid int",
        ),
    ],
)
def test_serve_refuses_a_bad_setting_before_starting(args, env, said, tmp_path):
    out = subprocess.run(
        tlserve("serve", "--repository", str(tmp_path), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 2 and said in out.stderr, out.stderr
