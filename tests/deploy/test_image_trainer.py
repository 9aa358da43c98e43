"""The trainer image, built with podman (scripts/build_image.sh trainer) and run as a cluster job runs it:
read-only root filesystem, /tmp on tmpfs, the image's own user, the demo data and the torch hub cache
(ImageNet MobileNetV2 weights) mounted read-only, one writable output volume. One epoch of training on a
small demo subset, then an export, both inside the image; the checkpoint and the ONNX file land on the volume.

Select with ``-m image``. Its cold build installs torch (about 3 GB of wheels) once per machine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from podman_helpers import build, podman, podman_command, readable_copy

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.torch]

WEIGHTS = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
SIZE_BUDGET_GB = 12  # torch with its CUDA 13 libraries; measured in docs/deployment.md
JOB = ("--read-only", "--tmpfs", "/tmp", "--network", "none", "-e", "OMP_NUM_THREADS=1")


@pytest.fixture(scope="module")
def cmd() -> list[str]:
    return podman_command()


@pytest.fixture(scope="module")
def trainer_image(cmd) -> str:
    return build("trainer")


@pytest.fixture(scope="module")
def torch_cache(tmp_path_factory) -> Path:
    """A torch hub cache holding torchvision's MobileNetV2 ImageNet file (from the host's, as scripts/fetch_weights.sh
    leaves it), readable by the image's user."""
    torch = pytest.importorskip("torch")
    host = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS
    if not host.is_file() or hashlib.sha256(host.read_bytes()).hexdigest() != WEIGHTS_SHA256:
        pytest.skip(f"{host} missing or changed: run `make weights`")
    cache = tmp_path_factory.mktemp("trainer-torch") / "torch"
    (cache / "hub" / "checkpoints").mkdir(parents=True)
    (cache / "hub" / "checkpoints" / WEIGHTS).write_bytes(host.read_bytes())
    return readable_copy(cache, cache.parent / "readable")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo data as an ImageFolder tree (`tlserve demo-data`), readable by the image's user."""
    out = tmp_path_factory.mktemp("trainer-data") / "data"
    subprocess.run([sys.executable, "-m", "tlserve", "demo-data", str(out)], check=True, capture_output=True)
    return readable_copy(out, out.parent / "readable")


def job(cmd, image: str, volumes: dict[Path, str], *args: str) -> subprocess.CompletedProcess:
    """``podman run --rm`` of the image's entrypoint (`tlserve`) with ``args``, as the image's user."""
    mounts = [arg for host, spec in volumes.items() for arg in ("-v", f"{host}:{spec}")]
    return podman(cmd, "run", "--rm", *JOB, *mounts, image, *args, timeout=1800, check=False)


def test_trainer_image_size_is_within_budget(cmd, trainer_image):
    size = int(podman(cmd, "image", "inspect", "--format", "{{.Size}}", trainer_image).stdout)
    assert size < SIZE_BUDGET_GB * 1_000_000_000, f"{trainer_image} is {size / 1e9:.1f} GB"


def test_trainer_image_trains_one_epoch_and_exports_as_uid_10001(cmd, trainer_image, torch_cache, demo_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 10001, 0)  # the job's volume: writable by the image's user only
    volumes = {demo_data: "/data:ro", torch_cache: "/cache/torch:ro", out: "/out"}
    train = job(
        cmd, trainer_image, volumes,
        "train", "--data", "/data", "--out", "/out/run", "--name", "fashion", "--image-size", "64",
        "--strategy", "feature-extract", "--epochs", "1", "--max-per-class", "10", "--threads", "1",
        "--calibrate", "off", "--progress", "off",
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    epochs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 1 and epochs[0]["images"] == 100  # 10 classes x 10 images, one epoch
    assert (out / "run" / "checkpoint.pt").stat().st_uid == 10001  # written by the image's user

    export = job(
        cmd, trainer_image, volumes, "export", "/out/run", "--repository", "/out/models", "--name", "fashion",
        "--version", "1",
    )  # fmt: skip
    assert export.returncode == 0, export.stdout[-4000:] + export.stderr[-4000:]
    manifest = json.loads((out / "models" / "fashion" / "1" / "manifest.json").read_text())
    assert manifest["architecture"] == "mobilenet_v2" and len(manifest["labels"]) == 10
    assert manifest["provenance"]["weights"] == "IMAGENET1K_V1"  # the mounted cache, no download (--network none)
    assert (out / "models" / "fashion" / "1" / "model.onnx").stat().st_size > 1_000_000
