"""helm/tlserve: lint, render, validate against the Kubernetes schemas, and check what the chart promises."""

from __future__ import annotations

import json

import pytest
import yaml
from deploy_helpers import CHART, GPU_VALUES, helm_template, manifests, run

pytestmark = pytest.mark.tools

FEATURES = [
    "--set",
    "service.headless.enabled=true",
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "autoscaling.customMetric.enabled=true",
]
# TLS from an existing Secret, token auth from another
SECURED = [
    "--set",
    "tls.enabled=true",
    "--set",
    "tls.secretName=tlserve-tls",
    "--set",
    "auth.enabled=true",
    "--set",
    "auth.tokenSecretName=tlserve-tokens",
]
VARIANTS = {
    "defaults": [],
    "gpu": ["-f", str(GPU_VALUES)],
    "gpu-all-features": ["-f", str(GPU_VALUES), *FEATURES],
    "pvc-created": ["--set", "model.pvc.existingClaim=", "--set", "model.pvc.create=true"],
    "baked-image": ["--set", "model.source=image", "--set", "autoscaling.enabled=false"],
    "network-policy": [
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prometheus",
    ],
    "init-container": [
        "--set",
        "model.source=initContainer",
        "--set",
        "model.initContainer.url=https://models.example.com/fashion.onnx",
    ],
    "keda": ["--set", "keda.enabled=true", "--set", "autoscaling.enabled=false"],
    "object-storage": [
        "--set",
        "model.source=objectStorage",
        "--set",
        "model.objectStorage.uri=s3://ml-models/fashion/3",
        "--set",
        "model.objectStorage.credentialsSecret=s3-credentials",
    ],
    "tls-auth": [*SECURED, "--set", "tls.metrics=true", "--set", "serviceMonitor.enabled=true"],
    "cert-manager-mtls": [
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.certManager.enabled=true",
        "--set",
        "tls.certManager.issuerRef.name=tlserve-ca",
        "--set",
        "tls.clientCA.enabled=true",
        "--set",
        "tls.clientCA.secretName=tlserve-client-ca",
        "--set",
        "reflection.enabled=false",
    ],
}
# Custom resources: kubernetes-validate has no schema for them; test_deploy_crds.py checks them against their CRDs.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "ScaledObject"}


def deployment(rendered: str) -> dict:
    return manifests(rendered)["Deployment/tlserve"]


def container(rendered: str) -> dict:
    (server,) = deployment(rendered)["spec"]["template"]["spec"]["containers"]
    return server


@pytest.mark.parametrize("values", [[], ["-f", str(GPU_VALUES)]], ids=["defaults", "gpu"])
def test_helm_lint_strict(helm, values):
    out = run([helm, "lint", "--strict", str(CHART), *values]).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("kube", ["1.27.0", "1.37.0"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_pass_kubernetes_validate_strict(helm, kubernetes_validate, tmp_path, variant, kube):
    rendered = helm_template(helm, *VARIANTS[variant], "--kube-version", kube)
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    proc = run([kubernetes_validate, "--strict", "-k", kube, str(path)])
    kinds = {doc.split("/")[0] for doc in manifests(rendered)}
    passed = proc.stdout.count(" passed for resource ")
    assert passed == len(manifests(rendered)) - len(kinds & CRD_KINDS), proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout + proc.stderr


def test_probes_are_native_grpc_on_the_contract_health_services(helm):
    server = container(helm_template(helm))
    grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "health")  # the health-only port
    assert server["livenessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert server["readinessProbe"]["grpc"] == {"port": grpc_port, "service": "tlserve.model.fashion"}
    startup = server["startupProbe"]
    assert startup["grpc"]["port"] == grpc_port
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for slow model loads"
    anymodel = container(helm_template(helm, "--set", "model.name="))
    assert anymodel["readinessProbe"]["grpc"]["service"] == "tlserve.v1.Inference"


@pytest.mark.parametrize("drain,pre_stop", [(10, 5), (60, 0), (3, 20)])
def test_termination_grace_exceeds_prestop_plus_drain(helm, drain, pre_stop):
    rendered = helm_template(helm, "--set", f"server.drainSeconds={drain}", "--set", f"preStopSleepSeconds={pre_stop}")
    pod = deployment(rendered)["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert f"--drain-seconds={drain}" in server["args"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    if pre_stop:
        assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pre_stop)]
    else:
        assert "lifecycle" not in server


def test_too_short_termination_grace_is_refused(helm):
    proc = run([helm, "template", "t", str(CHART), "--set", "terminationGracePeriodSeconds=12"], check=False)
    assert proc.returncode != 0
    assert "must exceed preStopSleepSeconds + server.drainSeconds" in proc.stderr


def test_args_are_accepted_by_the_real_serve_parser(helm):
    """Every flag the chart passes exists in `tlserve serve`, with the value the chart meant."""
    cli = pytest.importorskip("tlserve.cli")
    settings_mod = pytest.importorskip("tlserve.server.settings")
    server = container(helm_template(helm, "-f", str(GPU_VALUES), "--set", "server.maxQueueDelayMs=0.5"))
    assert server["command"] == ["tlserve"]
    args = cli.build_parser().parse_args(server["args"])
    assert args.command == "serve"
    settings = settings_mod.Settings.from_args(args)
    assert (str(settings.repository), settings.port, settings.metrics_port) == ("/models", 50051, 8080)
    assert settings.device == "cuda" and settings.require_gpu is True
    assert settings.max_batch_size == 64 and settings.max_queue_size == 256
    assert settings.max_message_bytes == 4194304 and settings.drain_seconds == 10
    assert settings.max_concurrent_rpcs == 64 and settings.max_decode_bytes == 268435456
    assert settings.max_concurrent_streams == 100 and settings.max_message_memory == 201326592


QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity_bytes(text) -> int:
    """A Kubernetes memory quantity ("2Gi", "1500M", 2147483648) in bytes."""
    text = str(text)
    for suffix, factor in sorted(QUANTITY.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


@pytest.mark.parametrize("values", [[], ["-f", str(GPU_VALUES)]], ids=["defaults", "gpu"])
def test_memory_limit_covers_the_servers_memory_budget(helm, values):
    """resources.limits.memory >= memory_budget() of the flags the chart passes (one model version)."""
    cli = pytest.importorskip("tlserve.cli")
    settings_mod = pytest.importorskip("tlserve.server.settings")
    budget_mod = pytest.importorskip("tlserve.server.budget")
    server = container(helm_template(helm, *values))
    settings = settings_mod.Settings.from_args(cli.build_parser().parse_args(server["args"]))
    budget = budget_mod.memory_budget(settings, models=1)
    limit = quantity_bytes(server["resources"]["limits"]["memory"])
    assert limit >= budget.total, budget.table()
    assert quantity_bytes("2Gi") == 2 << 30 and quantity_bytes("1500M") == 1_500_000_000


def test_gpu_values_schedule_on_gpu_nodes(helm):
    rendered = helm_template(helm, "-f", str(GPU_VALUES))
    pod = deployment(rendered)["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"].endswith(":0.1.0-gpu")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    cpu = container(helm_template(helm))
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu["image"].endswith(":0.1.0-cpu")


def test_pod_runs_non_root_with_read_only_root_and_writable_tmp(helm):
    pod = deployment(helm_template(helm))["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert "/tmp" in mounts and mounts["/models"]["readOnly"] is True
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    assert pod["automountServiceAccountToken"] is False


def test_model_sources(helm):
    pvc = deployment(helm_template(helm))["spec"]["template"]["spec"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "tlserve-models", "readOnly": True}} in pvc[
        "volumes"
    ]

    created = manifests(helm_template(helm, *VARIANTS["pvc-created"]))
    assert "PersistentVolumeClaim/tlserve-models" in created

    baked = deployment(helm_template(helm, *VARIANTS["baked-image"]))["spec"]
    assert baked["replicas"] == 2
    assert [v["name"] for v in baked["template"]["spec"]["volumes"]] == ["tmp"]

    init = deployment(helm_template(helm, *VARIANTS["init-container"]))["spec"]["template"]["spec"]
    (fetch,) = init["initContainers"]
    env = {e["name"]: e["value"] for e in fetch["env"]}
    assert env["TARGET"] == "/models/fashion/1" and env["MODEL_URL"].endswith("fashion.onnx")
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]
    assert any(v["name"] == "models" and "emptyDir" in v for v in init["volumes"])

    proc = run([helm, "template", "t", str(CHART), "--set", "model.source=initContainer"], check=False)
    assert proc.returncode != 0 and "model.initContainer.url" in proc.stderr


def test_services_hpa_pdb_and_monitoring(helm):
    docs = manifests(helm_template(helm, "-f", str(GPU_VALUES), *FEATURES))
    service, headless = docs["Service/tlserve"], docs["Service/tlserve-headless"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc" and ports["grpc"]["port"] == 50051
    assert ports["metrics"]["port"] == 8080
    assert headless["spec"]["clusterIP"] == "None"
    # the ServiceMonitor picks the main Service only, so each pod is scraped once
    selector = docs["ServiceMonitor/tlserve"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert not selector.items() <= headless["metadata"]["labels"].items()
    assert docs["ServiceMonitor/tlserve"]["spec"]["endpoints"][0]["port"] == "metrics"

    metrics = docs["HorizontalPodAutoscaler/tlserve"]["spec"]["metrics"]
    assert metrics[0]["resource"]["name"] == "cpu"
    assert metrics[1]["pods"]["metric"]["name"] == "tlserve_queue_depth"
    assert docs["PodDisruptionBudget/tlserve"]["spec"]["maxUnavailable"] == 1
    assert "replicas" not in docs["Deployment/tlserve"]["spec"], "the HPA owns the replica count"
    assert "PrometheusRule/tlserve" in docs and "ConfigMap/tlserve-dashboard" in docs


@pytest.mark.parametrize(
    "bad,message",
    [
        ("typo=1", "Additional property typo is not allowed"),
        ("server.maxBatchSize=0", "server.maxBatchSize"),
        ("model.source=s3", "model.source"),
        ("server.device=tpu", "server.device"),
        ("prometheusRule.errorRatio=1.5", "prometheusRule.errorRatio"),
        ("prometheusRule.classShareDriftDistance=1.5", "prometheusRule.classShareDriftDistance"),
        ("prometheusRule.classShareDriftMinPredictions=0", "prometheusRule.classShareDriftMinPredictions"),
        ("prometheusRule.classShareDriftWindow=30", "prometheusRule.classShareDriftWindow"),
    ],
)
def test_values_schema_rejects_bad_values(helm, bad, message):
    proc = run([helm, "template", "t", str(CHART), "--set", bad], check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_default_values_document_every_server_flag():
    """The chart's `server` block covers the contract's flags it does not set itself."""
    import re

    from deploy_helpers import CONTRACT

    flags = set(re.findall(r"`--([a-z-]+)", CONTRACT.read_text()))
    chart_sets = {"repository", "host", "port", "metrics-port"}
    # set from the tls, auth and reflection values (test_security_values_pass_the_security_flags)
    chart_sets |= {"tls-cert", "tls-key", "tls-client-ca", "metrics-tls", "health-port", "token-file"}
    chart_sets |= {"reflection", "no-reflection", "public-reflection"}
    values = yaml.safe_load((CHART / "values.yaml").read_text())["server"]
    kebab = {re.sub(r"([A-Z])", lambda m: "-" + m.group(1).lower(), k) for k in values} - {"log-level"}
    assert kebab == flags - chart_sets


# Accepted checkov findings, each with its reason.
CHECKOV_ACCEPTED = {
    "CKV_K8S_11": "no CPU limit: CFS throttling raises inference tail latency; the HPA scales on the request",
}


def test_checkov_kubernetes_on_hardened_values(helm, checkov, tmp_path):
    """With a digest-pinned image and the NetworkPolicy on, checkov finds nothing but the accepted CPU limit."""
    rendered = helm_template(
        helm,
        "-f",
        str(GPU_VALUES),
        *FEATURES,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "image.digest=sha256:" + "0" * 64,
        *SECURED,
        "--set",
        "tls.metrics=true",
    )
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    proc = run(
        [
            checkov,
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "--output",
            "json",
            "--skip-check",
            ",".join(CHECKOV_ACCEPTED),
            "--file",
            str(path),
        ],
        check=False,
    )
    report = json.loads(proc.stdout)
    failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] > 50 and not failed, failed
    policy = manifests(rendered)["NetworkPolicy/tlserve"]
    assert [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]] == ["grpc", "metrics"]
    assert all(doc["metadata"]["namespace"] == "serving" for doc in manifests(rendered).values())


def test_defaults_are_plaintext_without_auth_and_say_so(helm):
    server = container(helm_template(helm))
    assert not [a for a in server["args"] if a.startswith(("--tls", "--token"))]
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "WARNING: neither tls.enabled nor auth.enabled" in notes


def test_security_values_pass_the_security_flags(helm):
    """The flags the chart derives from tls/auth/reflection parse in the real `tlserve serve`."""
    cli = pytest.importorskip("tlserve.cli")
    settings_mod = pytest.importorskip("tlserve.server.settings")
    server = container(helm_template(helm, *VARIANTS["tls-auth"], "--set", "reflection.enabled=false"))
    settings = settings_mod.Settings.from_args(cli.build_parser().parse_args(server["args"]))
    assert (settings.tls_cert, settings.tls_key) == ("/etc/tlserve/tls/tls.crt", "/etc/tlserve/tls/tls.key")
    assert settings.token_file == "/etc/tlserve/auth/tokens" and settings.metrics_tls is True
    assert settings.tls_client_ca == "" and settings.reflection is False and settings.health_port == 8081
    mtls = container(helm_template(helm, *VARIANTS["cert-manager-mtls"]))
    settings = settings_mod.Settings.from_args(cli.build_parser().parse_args(mtls["args"]))
    assert settings.tls_client_ca == "/etc/tlserve/client-ca/ca.crt" and settings.token_file == ""
    same_secret = container(helm_template(helm, *SECURED, "--set", "tls.clientCA.enabled=true"))
    assert "--tls-client-ca=/etc/tlserve/tls/ca.crt" in same_secret["args"]


@pytest.mark.parametrize("variant", ["tls-auth", "cert-manager-mtls"])
def test_secrets_are_mounted_whole_and_read_only(helm, variant):
    pod = deployment(helm_template(helm, *VARIANTS[variant]))["spec"]["template"]["spec"]
    server = pod["containers"][0]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets, "the certificates and tokens come from Secrets"
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    for name, secret in secrets.items():
        assert mounts[name]["readOnly"] is True
        assert "subPath" not in mounts[name], "a subPath mount never sees a rotated Secret"
        assert secret["defaultMode"] == 0o440
    expected = {"tls": "tlserve-tls", "auth-tokens": "tlserve-tokens"}
    if variant == "cert-manager-mtls":
        expected = {"tls": "tlserve-tls", "tls-client-ca": "tlserve-client-ca"}
    assert {n: s["secretName"] for n, s in secrets.items()} == expected


@pytest.mark.parametrize("variant", [(), tuple(VARIANTS["cert-manager-mtls"])], ids=["plaintext", "mtls"])
def test_probes_ask_the_plaintext_health_port(helm, variant):
    """Kubelet gRPC probes cannot speak TLS, and the serving port caps concurrent calls (a saturated pod
    would fail liveness): with or without TLS they ask the health-only port."""
    server = container(helm_template(helm, *variant))
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["health"] == 8081 and f"--health-port={ports['health']}" in server["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["grpc"]["port"] == ports["health"], probe
    service = manifests(helm_template(helm, *variant))["Service/tlserve"]
    assert "health" not in {p["name"] for p in service["spec"]["ports"]}, "only the kubelet asks the health port"


def test_cert_manager_certificate_writes_the_mounted_secret(helm):
    docs = manifests(helm_template(helm, *VARIANTS["cert-manager-mtls"]))
    certificate = docs["Certificate/tlserve"]
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    pod = docs["Deployment/tlserve"]["spec"]["template"]["spec"]
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert spec["secretName"] == tls["secret"]["secretName"] == "tlserve-tls"
    assert spec["issuerRef"] == {"name": "tlserve-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert {"tlserve", "tlserve.serving.svc", "tlserve-headless.serving.svc.cluster.local"} <= set(spec["dnsNames"])
    assert spec["privateKey"]["rotationPolicy"] == "Always" and "server auth" in spec["usages"]
    assert spec["duration"] == "2160h" and spec["renewBefore"] == "360h"
    assert set(spec) <= {"secretName", "issuerRef", "commonName", "dnsNames", "duration", "renewBefore"} | {
        "privateKey",
        "usages",
    }
    own = manifests(helm_template(helm, *VARIANTS["cert-manager-mtls"], "--set", "tls.secretName=own"))
    assert own["Certificate/tlserve"]["spec"]["secretName"] == "own"
    assert "Certificate/tlserve" not in manifests(helm_template(helm, *VARIANTS["tls-auth"]))


def test_metrics_tls_makes_the_scrape_https(helm):
    docs = manifests(helm_template(helm, *VARIANTS["tls-auth"]))
    (endpoint,) = docs["ServiceMonitor/tlserve"]["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "tlserve-tls", "key": "ca.crt"}},
        "serverName": "tlserve.serving.svc",
    }
    annotations = docs["Deployment/tlserve"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    plain = manifests(helm_template(helm, "--set", "serviceMonitor.enabled=true"))
    assert "scheme" not in plain["ServiceMonitor/tlserve"]["spec"]["endpoints"][0]


@pytest.mark.parametrize(
    "values,message",
    [
        (["--set", "tls.enabled=true"], "tls.enabled needs tls.secretName"),
        (["--set", "auth.enabled=true"], "auth.enabled needs auth.tokenSecretName"),
        (["--set", "tls.metrics=true"], "need tls.enabled=true"),
        (["--set", "tls.clientCA.enabled=true"], "need tls.enabled=true"),
        (
            ["--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true"],
            "tls.certManager.enabled needs tls.certManager.issuerRef.name",
        ),
        (["--set", "tls.certManager.duration=90d"], "tls.certManager.duration"),
    ],
)
def test_incomplete_security_values_are_refused(helm, values, message):
    proc = run([helm, "template", "t", str(CHART), *values], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
