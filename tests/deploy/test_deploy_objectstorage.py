"""model.source=objectStorage: a maintained storage initializer fills the models emptyDir from a bucket."""

from __future__ import annotations

import json

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
