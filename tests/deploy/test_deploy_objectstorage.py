"""model.source=objectStorage: a maintained storage initializer fills the models emptyDir from a bucket."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import CHART, helm_template, manifests, run

pytestmark = pytest.mark.tools

S3 = [
    "--set",
    "model.source=objectStorage",
    "--set",
    "model.objectStorage.uri=s3://ml-models/fashion/3",
    "--set",
    "model.objectStorage.version=3",
    "--set",
    "model.objectStorage.credentialsSecret=s3-credentials",
]
MINIO = [*S3, "--set", "model.objectStorage.endpoint=https://minio.storage.svc:9000"]
MINIO += ["--set", "model.objectStorage.s3Provider=Minio"]
KSERVE = [*S3, "--set", "model.objectStorage.initializer=kserve"]


def pod(*values: str) -> dict:
    return manifests(helm_template(*values))["Deployment/tlserve"]["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_rclone_copies_one_version_into_the_repository_layout(helm):
    spec = pod(helm, *MINIO)
    (fetch,) = spec["initContainers"]
    server = spec["containers"][0]
    image, _, tag = fetch["image"].rpartition(":")
    assert image == "rclone/rclone" and tag and tag != "latest", "a pinned tag"
    assert fetch["command"] == ["rclone"]
    assert fetch["args"][:3] == ["copy", ":s3:ml-models/fashion/3", "/models/fashion/3"]
    assert "--error-on-no-transfer" in fetch["args"], "a wrong prefix fails the pod instead of serving nothing"
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    env = env_of(fetch)
    assert env["RCLONE_S3_ENV_AUTH"] == "true" and env["RCLONE_S3_PROVIDER"] == "Minio"
    assert env["RCLONE_S3_ENDPOINT"] == "https://minio.storage.svc:9000"
    # the server reads the same volume, read-only, as its --repository: <repository>/<name>/<version>/model.onnx
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    assert "--repository=/models" in server["args"]
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert models == {"name": "models", "emptyDir": {"sizeLimit": "2Gi"}}
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True and spec["securityContext"]["runAsNonRoot"]


def test_kserve_storage_initializer_and_repository_layout(helm):
    (fetch,) = pod(helm, *KSERVE)["initContainers"]
    image, _, tag = fetch["image"].rpartition(":")
    assert image == "kserve/storage-initializer" and tag.startswith("v")
    assert "command" not in fetch, "the image's own entrypoint"
    assert fetch["args"] == ["s3://ml-models/fashion/3", "/models/fashion/3"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    whole = pod(helm, *KSERVE, "--set", "model.objectStorage.layout=repository", "--set", "model.name=")
    assert whole["initContainers"][0]["args"] == ["s3://ml-models/fashion/3", "/models"]
    gcs = pod(helm, *S3, "--set", "model.objectStorage.uri=gs://ml-models/fashion/3")
    assert gcs["initContainers"][0]["args"][1] == ":gcs:ml-models/fashion/3"


def test_single_secret_keys_and_workload_identity(helm):
    key_ref = {"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3-session", "key": "token"}}}
    values = [*S3, "--set", "model.objectStorage.credentialsSecret="]
    values += ["--set-json", f"model.objectStorage.env=[{json.dumps(key_ref)}]"]
    (fetch,) = pod(helm, *values)["initContainers"]
    assert "envFrom" not in fetch and key_ref in fetch["env"]


def test_object_storage_is_off_by_default(helm):
    assert "initContainers" not in pod(helm)


@pytest.mark.parametrize(
    "values,message",
    [
        (["--set", "model.source=objectStorage"], "needs model.objectStorage.uri"),
        ([*S3, "--set", "model.name="], "layout=version needs model.name"),
        ([*S3, "--set", "model.objectStorage.rcloneImage=rclone/rclone:latest"], "rcloneImage"),
        ([*S3, "--set", "model.objectStorage.initializer=gsutil"], "model.objectStorage.initializer"),
        ([*S3, "--set", "model.objectStorage.endpoint=minio:9000"], "model.objectStorage.endpoint"),
    ],
)
def test_incomplete_object_storage_values_are_refused(helm, values, message):
    proc = run([helm, "template", "t", str(CHART), *values], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- the rendered rclone init container, run for real against a local S3 API (moto_server) -----------------------

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # the Secret's keys (envFrom)


@pytest.fixture()
def s3_endpoint(moto_server, tmp_path):
    from deploy_processes import free_port, http_get, stop, wait_for

    port = free_port()
    log = tmp_path / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/moto-api/"), "moto_server", proc, log, timeout=120)
        yield url
    finally:
        stop(proc)


def init_container_run(helm, endpoint: str, tmp_path: Path, uri: str) -> tuple[list[str], dict[str, str], Path]:
    """The rendered init container's argv and environment, its volumes as local folders."""
    values = [*S3, "--set", f"model.objectStorage.uri={uri}", "--set", f"model.objectStorage.endpoint={endpoint}"]
    values += ["--set", "model.objectStorage.s3Provider=Other", "--set", "model.objectStorage.region=us-east-1"]
    (fetch,) = pod(helm, *values)["initContainers"]
    models, scratch = tmp_path / "models", tmp_path / "scratch"
    models.mkdir()
    scratch.mkdir()

    def local(value: str) -> str:
        return value.replace("/models", str(models), 1) if value.startswith("/models") else value

    env = {name: (str(scratch) if value == "/tmp" else value) for name, value in env_of(fetch).items()}
    env |= CREDENTIALS if fetch["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}] else {}
    return [*fetch["command"], *map(local, fetch["args"])], env, models


def test_rclone_init_container_fetches_a_version_from_s3(helm, rclone, s3_endpoint, tmp_path, request):
    try:
        repository = Path(request.getfixturevalue("model_repository"))
    except pytest.FixtureLookupError:
        pytest.skip("needs the model_repository fixture (tests/conftest.py: an exported fashion/1/model.onnx)")
    cmd, env, models = init_container_run(helm, s3_endpoint, tmp_path, "s3://ml-models/fashion/3")
    assert cmd[0] == "rclone"
    base = {"PATH": os.environ["PATH"], **env}
    # upload the exported version with the same backend settings, then run the init container's command
    for step in (["mkdir", ":s3:ml-models"], ["copy", str(repository / "fashion" / "1"), ":s3:ml-models/fashion/3"]):
        proc = subprocess.run([rclone, *step], env=base, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([rclone, *cmd[1:]], env=base, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    version = models / "fashion" / "3"
    expected = sorted(p.name for p in (repository / "fashion" / "1").iterdir())
    assert sorted(p.name for p in version.iterdir()) == expected and "model.onnx" in expected
    for name in expected:
        assert (version / name).read_bytes() == (repository / "fashion" / "1" / name).read_bytes()
    from tlserve.server.repository import scan

    assert set(scan(models).models) == {"fashion"} and set(scan(models).models["fashion"]) == {"3"}


def test_rclone_init_container_fails_on_a_wrong_prefix(helm, rclone, s3_endpoint, tmp_path):
    cmd, env, models = init_container_run(helm, s3_endpoint, tmp_path, "s3://ml-models/fashoin/3")
    base = {"PATH": os.environ["PATH"], **env}
    made = subprocess.run([rclone, "mkdir", ":s3:ml-models"], env=base, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([rclone, *cmd[1:]], env=base, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr  # --error-on-no-transfer: the pod fails instead of serving nothing
    assert not any(models.rglob("model.onnx"))
