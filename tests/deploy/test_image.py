"""The cpu image, built with podman (scripts/build_image.sh) and run as a cluster runs it: read-only root
filesystem, a tmpfs on /tmp, the model repository mounted read-only on /models, the image's own user.
From the host, through ports podman publishes on free loopback ports: gRPC health SERVING, a Classify
of a real photo that agrees with ONNX Runtime on the host, /metrics, and a SIGTERM drain that exits 0.

Select them with ``-m image``; they skip with the install command where podman is missing."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from podman_helpers import Container, build, podman, podman_command, readable_copy
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.image, pytest.mark.slow]

MODEL = "fashion"
GRPC_PORT, METRICS_PORT = 50051, 8080  # the image's own (EXPOSE); the host side is chosen by podman
SIZE_BUDGET_MB = 600  # the cpu image measured 414 MB (podman's size) on the debootstrap stand-in base
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
SERVING = health_pb2.HealthCheckResponse.SERVING
LIGHT = ("-e", "TLSERVE_DECODE_THREADS=1", "-e", "TLSERVE_INTRA_OP_THREADS=1")  # a shared 2-core machine


@pytest.fixture(scope="module")
def cmd() -> list[str]:
    return podman_command()


@pytest.fixture(scope="module")
def cpu_image(cmd) -> str:
    return build("cpu")


@pytest.fixture(scope="module")
def models(model_repository, tmp_path_factory):
    return readable_copy(model_repository, tmp_path_factory.mktemp("image") / "models")


def start(cmd, image: str, models) -> Container:
    """The image run read-only with /tmp on tmpfs, /models mounted read-only, as its own user (no --user)."""
    container = Container(
        cmd,
        image,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{models}:/models:ro",
        "--health-interval",
        "disable",  # no systemd timer here; `podman healthcheck run` runs the image's check on demand
        *LIGHT,
        ports=(GRPC_PORT, METRICS_PORT),
    )
    try:
        address = f"127.0.0.1:{container.host_port(GRPC_PORT)}"
        container.wait_until(lambda: health(address) == SERVING)
    except BaseException:
        container.remove()
        raise
    return container


def health(address: str):
    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="")
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
        except grpc.RpcError:
            return None


@pytest.fixture(scope="module")
def served(cmd, cpu_image, models):
    container = start(cmd, cpu_image, models)
    try:
        yield container
    finally:
        container.remove()


def classify_request(data: bytes, top_k: int = 3):
    from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

    return pb.ClassifyRequest(images=[pb.Image(encoded=data)], top_k=top_k)


def host_probabilities(models, data: bytes) -> tuple[list[str], np.ndarray]:
    """The model's labels and its probabilities for ``data``: our preprocessing and ONNX Runtime, on the host."""
    import onnxruntime as ort

    from tlserve.manifest import Manifest
    from tlserve.server.preprocess import ImageLimits, decode, to_model_input

    version = models / MODEL / "1"
    manifest = Manifest.from_json((version / "manifest.json").read_text())
    pre = manifest.preprocessing
    batch = to_model_input(decode(data, pre, ImageLimits(max_image_bytes=1 << 24, max_pixels=1 << 26))[None], pre)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {session.get_inputs()[0].name: batch})
    return list(manifest.labels), probabilities[0]


def clear_photo(models) -> tuple[bytes, str, float]:
    """A real photo whose host top-1 leads the runner-up by at least 0.05 (no near-tie to flip); its label, score."""
    skimage_data = pytest.importorskip("skimage.data")
    for name in PHOTOS:
        data = (Path(skimage_data.data_dir) / name).read_bytes()
        labels, probabilities = host_probabilities(models, data)
        second, first = np.sort(probabilities)[-2:]
        if first - second >= 0.05:
            return data, labels[int(np.argmax(probabilities))], float(first)
    pytest.fail(f"every photo of {PHOTOS} is a near-tie for this model")


def stub(channel: grpc.Channel):
    from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

    return tlserve_pb2_grpc.InferenceStub(channel)


def scrape(container: Container) -> dict[tuple[str, tuple], float]:
    url = f"http://127.0.0.1:{container.host_port(METRICS_PORT)}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_cpu_image_size_is_within_budget(cmd, cpu_image):
    size = int(podman(cmd, "image", "inspect", "--format", "{{.Size}}", cpu_image).stdout)
    assert size < SIZE_BUDGET_MB * 1_000_000, f"{cpu_image} is {size / 1e6:.0f} MB, over {SIZE_BUDGET_MB} MB"


def test_cpu_image_runs_as_uid_10001_with_no_torch(served):
    assert served.exec("id", "-u").stdout.strip() == "10001"
    probe = served.exec("python", "-c", "import importlib.util as u; print(u.find_spec('torch') is None)")
    assert probe.stdout.strip() == "True", probe.stderr


def test_cpu_image_health_is_serving_for_the_host_and_its_own_healthcheck(served, cmd):
    assert health(f"127.0.0.1:{served.host_port(GRPC_PORT)}") == SERVING
    check = podman(cmd, "healthcheck", "run", served.name, check=False)  # the image's HEALTHCHECK command
    assert check.returncode == 0, check.stdout + check.stderr + served.logs()


def test_cpu_image_classifies_a_real_photo_as_onnx_runtime_does_on_the_host(served, models):
    data, label, score = clear_photo(models)
    address = f"127.0.0.1:{served.host_port(GRPC_PORT)}"
    with grpc.insecure_channel(address) as channel:
        reply = stub(channel).Classify(classify_request(data), timeout=60)
    assert reply.model == MODEL and reply.version == "1" and len(reply.results) == 1
    top = reply.results[0].predictions[0]
    assert (top.label, len(reply.results[0].predictions)) == (label, 3)
    assert top.score == pytest.approx(score, abs=0.02)


def test_cpu_image_metrics_count_the_classify_it_answered(served, models):
    key = ("tlserve_requests_total", (("code", "OK"), ("model", MODEL), ("rpc", "Classify")))
    before = scrape(served).get(key, 0.0)
    address = f"127.0.0.1:{served.host_port(GRPC_PORT)}"
    with grpc.insecure_channel(address) as channel:
        stub(channel).Classify(classify_request(clear_photo(models)[0]), timeout=60)
    after = scrape(served)
    assert after[key] == before + 1
    assert after[("tlserve_model_ready", (("model", MODEL), ("version", "1")))] == 1


def test_cpu_image_drains_on_sigterm_and_exits_0(cmd, cpu_image, models):
    """An open ClassifyStream ends with OK when `podman stop` sends SIGTERM; the server then exits 0
    within the stop timeout (a SIGKILL after it would read 137)."""
    container = start(cmd, cpu_image, models)
    try:
        data = clear_photo(models)[0]
        address = f"127.0.0.1:{container.host_port(GRPC_PORT)}"
        more = threading.Event()

        def messages():
            yield classify_request(data, top_k=1)
            more.wait(120)  # the client never half-closes: the stream stays open until the drain ends it

        with grpc.insecure_channel(address) as channel:
            call = stub(channel).ClassifyStream(messages(), timeout=180)
            first = next(call)
            stop = threading.Thread(target=podman, args=(cmd, "stop", "-t", "90", container.name), daemon=True)
            stop.start()
            rest = list(call)  # the server ends the stream as the drain begins
            more.set()
            code = call.code()
        stop.join(120)
        assert first.results and not rest and code == grpc.StatusCode.OK, container.logs()
        state = container.state()
        assert not state["Running"] and state["ExitCode"] == 0, f"{state}\n{container.logs()}"
        assert "shutting down" in container.logs()
    finally:
        container.remove()
