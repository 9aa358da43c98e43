"""The KServe runtime (deploy/kserve/ and the chart's kserve-runtime.yaml) and the example InferenceServices,
validated strictly against KServe's own CRD schemas (vendored in tests/deploy/crds/kserve/) with jsonschema,
and checked against what the server's real argument parser accepts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from crd_schema import CRDValidationError, validate
from deploy_helpers import CHART, GPU_VALUES, REPO, helm_template, run

KSERVE = REPO / "deploy" / "kserve"
CRDS = Path(__file__).resolve().parent / "crds" / "kserve"
CRD_OF = {
    "ServingRuntime": CRDS / "serving.kserve.io_servingruntimes.yaml",
    "ClusterServingRuntime": CRDS / "serving.kserve.io_clusterservingruntimes.yaml",
    "InferenceService": CRDS / "serving.kserve.io_inferenceservices.yaml",
}
RUNTIMES = ("servingruntime.yaml", "clusterservingruntime.yaml")
SERVICES = ("inferenceservice-s3-cpu.yaml", "inferenceservice-gs-gpu.yaml", "inferenceservice-pvc-cpu.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


def chart_runtimes(helm: str, *args: str) -> list[dict]:
    rendered = helm_template(helm, "--set", "kserve.enabled=true", *args)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    return [d for d in docs if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")]


def container(runtime: dict) -> dict:
    (only,) = runtime["spec"]["containers"]
    return only


def parse_serve(args: list[str], name: str = "fashion"):
    """Settings as `tlserve` parses these args, KServe's {{.Name}} filled in as it does."""
    cli = pytest.importorskip("tlserve.cli")
    settings_mod = pytest.importorskip("tlserve.server.settings")
    argv = [a.replace("{{.Name}}", name) for a in args]
    return settings_mod.Settings.from_args(cli.build_parser().parse_args(argv))


def test_the_validator_accepts_kserves_own_triton_runtime():
    """A known-good upstream object: the strict schema must not refuse what KServe ships."""
    validate(
        yaml.safe_load((CRDS / "example-runtime-kserve-tritonserver.yaml").read_text()), CRD_OF["ClusterServingRuntime"]
    )


def break_unknown_container_field(obj: dict) -> None:
    obj["spec"]["containers"][0]["imagee"] = "typo"


def break_unknown_spec_field(obj: dict) -> None:
    obj["spec"]["supportedModelFormat"] = obj["spec"].pop("supportedModelFormats")


def break_type(obj: dict) -> None:
    obj["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"


def break_probe(obj: dict) -> None:
    obj["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "health"  # grpc probes take a number


def break_required(obj: dict) -> None:
    del obj["spec"]["containers"]


def break_metadata(obj: dict) -> None:
    obj["metadata"]["label"] = {"a": "b"}


@pytest.mark.parametrize(
    "breaks, where",
    [
        (break_unknown_container_field, "spec.containers.0: Additional properties are not allowed ('imagee'"),
        (break_unknown_spec_field, "spec: Additional properties are not allowed ('supportedModelFormat'"),
        (break_type, "spec.supportedModelFormats.0.autoSelect: 'yes' is not of type 'boolean'"),
        (break_probe, "spec.containers.0.readinessProbe.grpc.port: 'health' is not of type 'integer'"),
        (break_required, "spec: 'containers' is a required property"),
        (break_metadata, "metadata: Additional properties are not allowed ('label'"),
    ],
)
def test_the_validator_rejects_a_broken_runtime(breaks, where):
    broken = copy.deepcopy(load("servingruntime.yaml"))
    breaks(broken)
    with pytest.raises(CRDValidationError) as raised:
        validate(broken, CRD_OF["ServingRuntime"])
    assert where in str(raised.value)


def test_the_validator_rejects_an_unknown_field_deep_in_an_inference_service():
    broken = copy.deepcopy(load("inferenceservice-s3-cpu.yaml"))
    broken["spec"]["predictor"]["model"]["storageURI"] = broken["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(CRDValidationError, match=r"spec\.predictor\.model: Additional properties .*'storageURI'"):
        validate(broken, CRD_OF["InferenceService"])


def test_the_validator_rejects_a_kind_or_version_the_crd_does_not_serve():
    runtime = load("servingruntime.yaml")
    with pytest.raises(CRDValidationError, match="not served"):
        validate({**runtime, "apiVersion": "serving.kserve.io/v1beta1"}, CRD_OF["ServingRuntime"])
    with pytest.raises(CRDValidationError, match="not served"):
        validate(runtime, CRD_OF["ClusterServingRuntime"])


@pytest.mark.parametrize("name", RUNTIMES + SERVICES)
def test_deploy_kserve_files_fit_kserves_crds(name):
    obj = load(name)
    validate(obj, CRD_OF[obj["kind"]])


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "kserve.kind=ClusterServingRuntime"],
        ["-f", str(GPU_VALUES), "--set", "server.requireGpu=true"],
        ["--set", "reflection.enabled=false", "--set", "server.versionPolicy=all"],
    ],
    ids=["namespaced", "cluster", "gpu", "flags"],
)
def test_chart_runtime_fits_kserves_crds_and_the_real_parser(helm, values):
    (runtime,) = chart_runtimes(helm, *values)
    validate(runtime, CRD_OF[runtime["kind"]])
    assert (runtime["kind"] == "ServingRuntime") == ("metadata" in runtime and "namespace" in runtime["metadata"])
    settings = parse_serve(container(runtime)["args"])
    assert (settings.model_dir, settings.model_name) == ("/mnt/models", "fashion")


def test_chart_runtime_is_off_by_default(helm):
    docs = [d for d in yaml.safe_load_all(helm_template(helm)) if d]
    assert not [d for d in docs if "kserve" in d["apiVersion"]]


def test_chart_runtime_is_the_deploy_file(helm):
    """deploy/kserve/servingruntime.yaml is the chart's runtime at default values (the flags of the `server`
    block aside, which the chart appends)."""
    (runtime,) = chart_runtimes(helm)
    static = load("servingruntime.yaml")
    chart_args, static_args = container(runtime).pop("args"), container(static).pop("args")
    assert chart_args[: len(static_args)] == static_args
    assert runtime["spec"] == static["spec"]
    assert load("clusterservingruntime.yaml")["spec"] == load("servingruntime.yaml")["spec"]


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_contract(name):
    spec = load(name)["spec"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["tlserve-onnx"] == {"name": "tlserve-onnx", "version": "1", "autoSelect": True, "priority": 1}
    assert formats["onnx"]["version"] == "1" and formats["onnx"].get("autoSelect") is False, "never steal Triton's"
    assert spec["protocolVersions"] == ["grpc-v2"] and spec["multiModel"] is False
    server = container(load(name))
    assert server["name"] == "kserve-container"
    settings = parse_serve(server["args"])
    assert (settings.model_dir, settings.model_name, settings.host) == ("/mnt/models", "fashion", "0.0.0.0")
    assert server["args"][server["args"].index("--model-name") + 1] == "{{.Name}}"
    (port,) = server["ports"]  # Knative routes one port
    assert (port["name"], port["containerPort"]) == ("h2c", settings.port)
    assert spec["annotations"] == {
        "prometheus.kserve.io/port": str(settings.metrics_port),
        "prometheus.kserve.io/path": "/metrics",
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == settings.health_port != settings.port, probe
    assert server["readinessProbe"]["grpc"]["service"] == "tlserve.v1.Inference"
    sc = server["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in server["volumeMounts"]


def test_triton_keeps_onnx_and_we_do_not_take_it():
    triton = yaml.safe_load((CRDS / "example-runtime-kserve-tritonserver.yaml").read_text())
    triton_onnx = next(f for f in triton["spec"]["supportedModelFormats"] if f["name"] == "onnx")
    assert triton_onnx["autoSelect"] is True
    ours = {f["name"]: f for f in load("servingruntime.yaml")["spec"]["supportedModelFormats"]}
    assert "tlserve-onnx" not in {f["name"] for f in triton["spec"]["supportedModelFormats"]}
    assert not ours["onnx"].get("autoSelect")


def test_inference_services_cover_s3_gcs_and_pvc_on_cpu_and_gpu():
    runtime_args = container(load("servingruntime.yaml"))["args"]
    schemes, gpus = set(), {}
    for name in SERVICES:
        isvc = load(name)
        model = isvc["spec"]["predictor"]["model"]
        assert model["modelFormat"] == {"name": "tlserve-onnx", "version": "1"}
        assert model["protocolVersion"] == "grpc-v2"
        schemes.add(model["storageUri"].split("://")[0])
        gpus[name] = model["resources"]["limits"].get("nvidia.com/gpu")
        settings = parse_serve(runtime_args + model.get("args", []), name=isvc["metadata"]["name"])  # KServe appends
        if gpus[name]:
            assert model["image"].endswith("-gpu") and (settings.device, settings.require_gpu) == ("cuda", True)
        else:
            assert "image" not in model and settings.device == "auto"
    assert schemes == {"s3", "gs", "pvc"}
    assert sorted(bool(g) for g in gpus.values()) == [False, False, True]


def test_chart_refuses_an_unknown_runtime_kind(helm):
    proc = run(
        [helm, "template", "t", str(CHART), "--set", "kserve.enabled=true", "--set", "kserve.kind=Runtime"], check=False
    )
    assert proc.returncode != 0 and "kserve.kind" in proc.stderr


@pytest.fixture(scope="module")
def model_file(request) -> Path:
    """An exported model.onnx (tests/conftest.py's model_repository), as a bucket would hold it."""
    pytest.importorskip("grpc")
    try:
        return Path(request.getfixturevalue("model_repository")) / "fashion" / "1" / "model.onnx"
    except pytest.FixtureLookupError:
        pytest.skip("needs the model_repository fixture (tests/conftest.py: an exported fashion/1/model.onnx)")


@pytest.fixture(scope="module")
def runtime_process(model_file, tmp_path_factory):
    """`tlserve` run with the ServingRuntime's own command and args, as KServe runs them: {{.Name}} filled in,
    /mnt/models holding what the storage-initializer leaves for storageUri s3://models/fashion/1/model.onnx.
    Only the ports change (0: free ones, read back from the log) and the address (loopback)."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import time

    mnt = tmp_path_factory.mktemp("mnt") / "models"
    mnt.mkdir()
    shutil.copy(model_file, mnt / "model.onnx")
    server = container(load("servingruntime.yaml"))
    assert server["command"] == ["tlserve"]
    ports = re.compile(r"^--(port|metrics-port|health-port)=\d+$")
    args = [
        ports.sub(r"--\1=0", a).replace("{{.Name}}", "fashion").replace("/mnt/models", str(mnt)) for a in server["args"]
    ]
    args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1") for a in args] + ["--device=cpu", "--intra-op-threads=1"]
    log_path = mnt.parent / "serve.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tlserve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **{e["name"]: e["value"] for e in server["env"]}},
        )
        try:
            deadline = time.monotonic() + 180
            while not (found := re.search(r"serving gRPC on 127\.0\.0\.1:(\d+)", log_path.read_text())):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            yield f"127.0.0.1:{found.group(1)}"
        finally:
            proc.terminate()
            proc.wait(60)


HOST = "fashion.serving.example.com"  # what the InferenceService's status.url names; the ingress routes by it


def test_runtime_args_serve_tritonclient_through_the_isvc_host(runtime_process):
    """The documented tritonclient call: the ingress address, the InferenceService host as :authority."""
    tc = pytest.importorskip("tritonclient.grpc")
    import numpy as np

    with tc.InferenceServerClient(runtime_process, channel_args=[("grpc.default_authority", HOST)]) as client:
        assert client.is_server_ready() and client.is_model_ready("fashion")
        meta = client.get_model_metadata("fashion")
        (images,) = meta.inputs
        shape = [1, *(int(d) for d in images.shape[1:])]
        tensor = tc.InferInput("images", shape, images.datatype)
        tensor.set_data_from_numpy(np.full(shape, 128, dtype=np.uint8))
        probabilities = client.infer("fashion", [tensor]).as_numpy("probabilities")
    assert list(meta.versions) == ["1"] and probabilities.shape[0] == 1
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4


def test_runtime_args_serve_grpcurl_through_the_isvc_host(runtime_process, grpcurl):
    """The documented grpcurl calls: reflection lists the OIP service, ModelReady and ModelMetadata answer."""
    import json

    base = [grpcurl, "-plaintext", "-authority", HOST]
    assert "inference.GRPCInferenceService" in run([*base, runtime_process, "list"]).stdout.split()
    ready = run([*base, "-d", '{"name": "fashion"}', runtime_process, "inference.GRPCInferenceService/ModelReady"])
    assert json.loads(ready.stdout) == {"ready": True}
    meta = run([*base, "-d", '{"name": "fashion"}', runtime_process, "inference.GRPCInferenceService/ModelMetadata"])
    assert json.loads(meta.stdout)["platform"] == "onnxruntime_onnx"


@pytest.mark.parametrize("values", [[], ["-f", str(GPU_VALUES)]], ids=["cpu", "gpu"])
def test_helm_lint_strict_with_the_runtime(helm, values):
    run([helm, "lint", "--strict", str(CHART), "--set", "kserve.enabled=true", *values])
