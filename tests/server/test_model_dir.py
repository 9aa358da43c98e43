"""Single-model mode (`tlserve serve --model-dir DIR --model-name NAME`) on every layout KServe's
storage-initializer can leave in /mnt/models, made by our own export, answered by unmodified
tritonclient; the task API, health and reflection on the same port; hostile layouts refused at
startup with the path and what was expected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from serving_helpers import MODEL, LiveServer, photo_bytes

from tlserve.cli import build_parser
from tlserve.manifest import METADATA_KEY, Manifest, ManifestError
from tlserve.server.model_dir import ModelDirError, SingleModel, embedded_identity, scan_model_dir
from tlserve.server.onnx_metadata import MetadataError, read_metadata
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task_pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc
from tlserve.server.preprocess import ImageLimits, decode
from tlserve.server.settings import Settings

tc = pytest.importorskip("tritonclient.grpc")

SERVED_AS = "fashion-isvc"  # what KServe passes: the InferenceService name
PHOTOS = ("chelsea.png", "coffee.png")


def make_layout(layout: str, version_dir: Path, root: Path) -> Path:
    """DIR as the storage-initializer leaves it when storageUri points at a file, a version folder, a
    model folder of versions, or a whole repository (all from `tlserve export`)."""
    root.mkdir(parents=True)
    if layout == "file":
        shutil.copy(version_dir / "model.onnx", root / "model.onnx")
    elif layout == "folder":
        shutil.copytree(version_dir, root, dirs_exist_ok=True)
    elif layout == "versions":
        shutil.copytree(version_dir, root / "1")
    elif layout == "repository":
        shutil.copytree(version_dir, root / MODEL / "1")
    return root


def serve_args(model_dir: Path, *extra: str) -> Settings:
    """Settings exactly as `tlserve serve` parses its command line."""
    argv = ["serve", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    argv += ["--device", "cpu", "--drain-seconds", "1", "--intra-op-threads", "1", "--decode-threads", "2", *extra]
    return Settings.from_args(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def photos(exported_version) -> tuple[list[bytes], np.ndarray]:
    """Real photos, encoded and as the uint8 tensor the server makes of them."""
    import onnxruntime as ort

    meta = ort.InferenceSession(str(exported_version / "model.onnx")).get_modelmeta().custom_metadata_map
    pre = Manifest.from_metadata(meta).preprocessing
    encoded = [photo_bytes(name) for name in PHOTOS]
    return encoded, np.stack([decode(data, pre, ImageLimits.from_settings(Settings())) for data in encoded])


@pytest.mark.parametrize("layout", ["file", "folder", "versions", "repository"])
def test_each_layout_is_served_under_the_given_name_on_one_port(layout, exported_version, tmp_path, photos):
    model_dir = make_layout(layout, exported_version, tmp_path / "mnt" / "models")
    server = LiveServer(serve_args(model_dir, "--model-name", SERVED_AS)).start()
    try:
        address = f"127.0.0.1:{server.handle.port}"
        encoded, tensors = photos
        with tc.InferenceServerClient(address) as client:
            assert client.is_server_ready() and client.is_model_ready(SERVED_AS)
            meta = client.get_model_metadata(SERVED_AS)
            assert (meta.name, list(meta.versions)) == (SERVED_AS, ["1"])
            images = tc.InferInput("images", list(tensors.shape), "UINT8")
            images.set_data_from_numpy(tensors)
            result = client.infer(SERVED_AS, [images], outputs=[tc.InferRequestedOutput("probabilities")])
            probabilities = result.as_numpy("probabilities")
        assert probabilities.shape[0] == len(PHOTOS)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        with grpc.insecure_channel(address) as channel:  # the task API, health and reflection on the same port
            classified = tlserve_pb2_grpc.InferenceStub(channel).Classify(
                task_pb.ClassifyRequest(
                    model=task_pb.ModelRef(name=SERVED_AS), images=[task_pb.Image(encoded=e) for e in encoded]
                ),
                timeout=60,
            )
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=f"tlserve.model.{SERVED_AS}"), timeout=30
            )
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert [r.predictions[0].index for r in classified.results] == list(np.argmax(probabilities, axis=1))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert {"inference.GRPCInferenceService", "tlserve.v1.Inference", "grpc.health.v1.Health"} <= set(services)
    finally:
        server.close()


@pytest.mark.parametrize("layout", ["file", "versions", "repository"])
def test_without_a_name_the_files_name_the_model(layout, exported_version, tmp_path):
    """The embedded manifest names a lone file or a model folder; a repository's folder names its model."""
    model_dir = make_layout(layout, exported_version, tmp_path / "models")
    found = scan_model_dir(SingleModel(model_dir))
    assert {name: list(versions) for name, versions in found.models.items()} == {MODEL: ["1"]}


def test_a_layout_broken_while_serving_fails_the_reload_and_the_model_keeps_serving(exported_version, tmp_path):
    model_dir = make_layout("versions", exported_version, tmp_path / "mnt" / "models")
    server = LiveServer(serve_args(model_dir, "--model-name", SERVED_AS)).start()
    try:
        shutil.copy(exported_version / "model.onnx", model_dir / "model.onnx")  # a lone file beside the versions
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.ReloadRepository(task_pb.ReloadRepositoryRequest(), timeout=60)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
        assert str(model_dir) in refused.value.details() and "several layouts" in refused.value.details()
        image = task_pb.Image(encoded=photo_bytes("coffee.png"))
        answer = server.stub.Classify(task_pb.ClassifyRequest(model=task_pb.ModelRef(name=SERVED_AS), images=[image]))
        assert answer.results[0].predictions
    finally:
        server.close()


def test_the_metadata_reader_agrees_with_onnxruntime(exported_version):
    import onnxruntime as ort

    model_file = exported_version / "model.onnx"
    expected = ort.InferenceSession(str(model_file)).get_modelmeta().custom_metadata_map
    assert read_metadata(model_file) == expected and METADATA_KEY in expected
    assert embedded_identity(model_file) == (MODEL, "1")


def test_a_half_written_model_never_passes_the_scan(exported_version, tmp_path):
    """Every cut of the file (a copy still being written) is refused before ONNX Runtime sees it."""
    data = (exported_version / "model.onnx").read_bytes()
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(data)
    near_the_end = range(len(data) - 4000, len(data), 37)  # the manifest is the last field export writes
    cuts = sorted({*range(0, len(data), len(data) // 40), *near_the_end, len(data) - 1, 1}, reverse=True)
    for cut in cuts:
        os.truncate(model_file, cut)
        with pytest.raises((MetadataError, ManifestError)):
            embedded_identity(model_file)
        with pytest.raises(ModelDirError, match=str(model_file)):
            scan_model_dir(SingleModel(tmp_path, SERVED_AS))
    model_file.write_bytes(data)
    assert list(scan_model_dir(SingleModel(tmp_path, SERVED_AS)).models) == [SERVED_AS]


def test_a_model_that_does_not_load_refuses_to_start(exported_version, tmp_path):
    """A version folder whose model.onnx is not a model: no SERVING with nothing to serve, a clear error."""
    model_dir = tmp_path / "models"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(b"\x08\x07" + b"not a graph" * 10)
    server = LiveServer(serve_args(model_dir, "--model-name", SERVED_AS))
    try:
        with pytest.raises(ModelDirError, match=rf"{model_dir}: the model did not load \({SERVED_AS}/1"):
            server.start()
    finally:
        server.close()


def hostile_layouts(exported_version: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (DIR, a regular expression the startup error must match)."""
    cases: dict[str, tuple[Path, str]] = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty"] = (empty, r"holds no model: expected model\.onnx .*found nothing \(empty\)")
    cases["missing"] = (tmp_path / "missing", r"missing does not exist: expected model\.onnx")
    misnamed = tmp_path / "misnamed"
    misnamed.mkdir()
    shutil.copy(exported_version / "model.onnx", misnamed / "fashion-v1.onnx")
    cases["misnamed"] = (misnamed, r"fashion-v1\.onnx: the model file must be named model\.onnx")
    two = make_layout("repository", exported_version, tmp_path / "two")
    shutil.copytree(exported_version, two / "other" / "1")
    cases["two models"] = (two, r"holds several models \(fashion, other\)")
    mixed = make_layout("file", exported_version, tmp_path / "mixed")
    shutil.copytree(exported_version, mixed / "1")
    cases["two layouts"] = (mixed, r"holds several layouts at once: model\.onnx and <version>/model\.onnx \(1\)")
    folder = tmp_path / "dir-model"
    (folder / "model.onnx").mkdir(parents=True)
    cases["model.onnx a folder"] = (folder, r"model\.onnx is not a regular file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"\x08\x07\x12\x04test")  # a complete ONNX header, no tlserve manifest
    cases["not exported"] = (foreign, r"not a complete model exported by `tlserve export`: model has no")
    return cases


def test_hostile_layouts_are_refused_naming_the_path(exported_version, tmp_path):
    for case, (model_dir, message) in hostile_layouts(exported_version, tmp_path).items():
        with pytest.raises(ModelDirError, match=message) as raised:
            scan_model_dir(SingleModel(model_dir, SERVED_AS))
        assert str(model_dir) in str(raised.value), case


def test_serve_exits_2_naming_the_path_and_what_was_expected(tmp_path):
    """The real command: a bad layout is a startup error (status 2), not a server serving nothing."""
    model_dir = tmp_path / "models"
    (model_dir / "lost+found").mkdir(parents=True)
    (model_dir / "README.md").write_text("models go here\n")
    argv = [sys.executable, "-m", "tlserve", "serve", "--model-dir", str(model_dir), "--model-name", SERVED_AS]
    argv += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu"]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.returncode == 2, proc.stderr
    assert f"refusing to start: --model-dir {model_dir} holds no model" in proc.stderr
    assert "expected model.onnx" in proc.stderr and "README.md, lost+found/" in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-name", "x"], "--model-name needs --model-dir"),
        (["--model-dir", "/mnt/models", "--model-name", "a/b"], "--model-name must be"),
        (["--model-dir", "/mnt/models", "--model-name=-x"], "--model-name must be"),
    ],
)
def test_model_name_settings_are_checked(argv, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_args(build_parser().parse_args(["serve", *argv]))
