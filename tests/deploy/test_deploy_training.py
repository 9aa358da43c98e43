"""deploy/training: the Kubeflow TrainJob against Kubeflow Trainer's CRD, the plain Jobs, PVCs and ConfigMap against
the Kubernetes schemas (kubernetes-validate --strict), and the wiring between them and the serving chart.
(tests/trainer/test_cluster_training.py runs the jobs' train.sh itself under torchrun.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("jsonschema")

from crd_schema import CRDS, crd_path, errors  # noqa: E402
from deploy_helpers import REPO, helm_template, manifests, run, set_path  # noqa: E402

pytestmark = pytest.mark.tools

TRAINING = REPO / "deploy" / "training"
BUILT_IN = ["job.yaml", "demo-data.yaml", "pvcs.yaml", "configmap.yaml", "networkpolicy.yaml"]
TRAINJOB_CRD = crd_path("kubeflow-trainer", "trainer.kubeflow.org_trainjobs.yaml")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((TRAINING / name).read_text()) if d]


def trainjob() -> dict:
    (doc,) = docs("trainjob.yaml")
    return doc


def job_pod() -> dict:
    (job,) = docs("job.yaml")
    return job["spec"]["template"]["spec"]


def named(doc: dict) -> dict:
    """kubernetes-validate needs metadata.name; `kubectl create` fills it in from generateName."""
    doc = copy.deepcopy(doc)
    meta = doc["metadata"]
    if "generateName" in meta:
        meta["name"] = meta.pop("generateName") + "x7k2p"
    return doc


def kubernetes_validate_strict(tool: str, documents: list[dict], path: Path, kube: str):
    path.write_text(yaml.safe_dump_all([named(d) for d in documents], sort_keys=False))
    return run([tool, "--strict", "-k", kube, str(path)], check=False)


@pytest.mark.parametrize("kube", ["1.27.0", "1.37.0"])
def test_built_in_kinds_pass_kubernetes_validate_strict(kubernetes_validate, tmp_path, kube):
    documents = [d for name in BUILT_IN for d in docs(name)]
    proc = kubernetes_validate_strict(kubernetes_validate, documents, tmp_path / "training.yaml", kube)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(documents) == 7, proc.stdout


@pytest.mark.parametrize(
    "path,value",
    [
        ("spec.template.spec.containers.0.volumeMount", []),  # a typo of volumeMounts
        ("spec.backoffLimit", "2"),
        ("spec.template.spec.containers.0.name", None),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_kubernetes_validate_refuses_a_broken_job(kubernetes_validate, tmp_path, path, value):
    (job,) = docs("job.yaml")
    job = set_path(job, path, value)
    proc = kubernetes_validate_strict(kubernetes_validate, [job], tmp_path / "broken.yaml", "1.37.0")
    assert proc.returncode != 0 and " passed for resource " not in proc.stdout, proc.stdout + proc.stderr


def test_trainjob_matches_the_kubeflow_trainer_crd():
    assert errors(trainjob(), TRAINJOB_CRD) == []


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: t["spec"]["trainer"].update(numNodes="2"), "'2' is not of type 'integer'"),
        (lambda t: t["spec"]["trainer"].update(gpus=1), "'gpus' was unexpected"),
        (lambda t: t["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
        (lambda t: t["spec"]["runtimePatches"][0].pop("manager"), "'manager' is a required property"),
        (
            lambda t: t["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
                "template"
            ]["spec"]["template"]["spec"].update(hostNetwork=True),
            "'hostNetwork' was unexpected",  # the patch admits only the fields Kubeflow lets managers set
        ),
        (lambda t: t.update(apiVersion="trainer.kubeflow.org/v1"), "trainer.kubeflow.org/v1 is not served by"),
    ],
    ids=["type", "unknown-field", "required", "patch-manager", "patch-field", "version"],
)
def test_broken_trainjobs_are_refused(mutate, message):
    broken = copy.deepcopy(trainjob())
    mutate(broken)
    found = errors(broken, TRAINJOB_CRD)
    assert any(message in line for line in found), found


def runtime_patch(doc: dict) -> tuple[dict, dict]:
    (patch,) = doc["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return replicated | {"pod": pod}, container


def test_trainjob_patches_the_torch_distributed_runtime_it_names():
    runtime_text = (CRDS / "kubeflow-trainer" / "example-runtime-torch-distributed.yaml").read_text()
    runtime = yaml.safe_load("\n".join(line for line in runtime_text.splitlines() if "{{" not in line))
    doc = trainjob()
    assert doc["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": runtime["kind"],
        "name": runtime["metadata"]["name"],
    }
    assert "torch" in runtime["spec"]["mlPolicy"], "torchrun's PET_* variables come from the torch policy"
    (runtime_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (runtime_container,) = runtime_job["template"]["spec"]["template"]["spec"]["containers"]
    replicated, container = runtime_patch(doc)
    assert replicated["name"] == runtime_job["name"] and container["name"] == runtime_container["name"]
    trainer = doc["spec"]["trainer"]
    assert trainer["numNodes"] >= 2, "multi-node"
    assert trainer["numProcPerNode"] == trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]


def env_values(env: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in env}


def test_both_jobs_run_the_same_script_on_the_same_volumes():
    pod = job_pod()
    (job_container,) = pod["containers"]
    doc = trainjob()
    trainer = doc["spec"]["trainer"]
    replicated, trainjob_container = runtime_patch(doc)
    assert trainer["command"] == job_container["command"] == ["sh", "/etc/tlserve/train/train.sh"]
    assert trainer["image"] == job_container["image"] and trainer["image"].endswith("-trainer")
    job_env, trainjob_env = env_values(job_container["env"]), env_values(trainer["env"])
    # the Job launches torchrun standalone itself; Kubeflow's torch runtime sets PET_* on each node
    assert {k: v for k, v in job_env.items() if not k.startswith("PET_")}.keys() == trainjob_env.keys()
    assert job_env["RUN_ID"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert trainjob_env["RUN_ID"] == "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
    for key in ("DATA_DIR", "RUNS_DIR", "MODELS_DIR", "MODEL_NAME", "TRAIN_CONFIG", "TORCH_HOME"):
        assert job_env[key] == trainjob_env[key], key
    assert job_container["volumeMounts"] == trainjob_container["volumeMounts"]
    assert pod["volumes"] == replicated["pod"]["volumes"]
    assert pod["securityContext"] == replicated["pod"]["securityContext"]
    assert job_container["securityContext"] == trainjob_container["securityContext"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {d["metadata"]["name"] for d in docs("pvcs.yaml")}
    (config,) = docs("configmap.yaml")
    assert {"train.sh", "run.yaml"} <= set(config["data"])
    assert [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v] == [config["metadata"]["name"]]
    mounts = {m["mountPath"]: m for m in job_container["volumeMounts"]}
    assert job_env["TRAIN_CONFIG"] == "/etc/tlserve/train/run.yaml" and "/etc/tlserve/train" in mounts
    assert mounts["/data"].get("readOnly") is True and not mounts["/models"].get("readOnly")
    assert job_env["DATA_DIR"].startswith("/data/") and job_env["RUNS_DIR"] == "/runs"


def test_run_yaml_holds_only_real_train_options():
    train_config = pytest.importorskip("tlserve.trainer.config")
    (config,) = docs("configmap.yaml")
    options = yaml.safe_load(config["data"]["run.yaml"])
    assert set(options) <= set(train_config.FIELD_NAMES), "tlserve train --config refuses unknown options"
    assert train_config.TrainConfig(**options).image_size == 64


def test_published_models_land_where_the_serving_deployment_polls(helm):
    """The jobs write <MODELS_DIR>/<MODEL_NAME>/<version> on the claim the chart mounts as --repository; with
    server.pollInterval the server loads the new version without a restart (latest:1 retires the old one)."""
    pod = job_pod()
    (container,) = pod["containers"]
    env = env_values(container["env"])
    models_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["MODELS_DIR"])
    models_claim = next(v for v in pod["volumes"] if v["name"] == models_mount["name"])["persistentVolumeClaim"]
    rendered = manifests(helm_template(helm, "--set", "server.pollInterval=30"))
    serving = rendered["Deployment/tlserve"]["spec"]["template"]["spec"]
    (server,) = serving["containers"]
    (volume,) = [v for v in serving["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["claimName"] == models_claim["claimName"] == "tlserve-models"
    assert "--poll-interval=30" in server["args"] and "--version-policy=latest:1" in server["args"]
    assert "--repository=/models" in server["args"]
    assert server["readinessProbe"]["grpc"]["service"] == f"tlserve.model.{env['MODEL_NAME']}"
    (models_pvc,) = [d for d in docs("pvcs.yaml") if d["metadata"]["name"] == "tlserve-models"]
    assert models_pvc["spec"]["accessModes"] == ["ReadWriteMany"], "written by training, read by every replica"
    namespaces = {d["metadata"]["namespace"] for name in [*BUILT_IN, "trainjob.yaml"] for d in docs(name)}
    assert namespaces == {rendered["Deployment/tlserve"]["metadata"]["namespace"]}, "a claim is namespaced"


def test_only_training_pods_reach_training_pods():
    """torchrun's rendezvous store and the collectives between nodes are unauthenticated TCP."""
    (policy,) = docs("networkpolicy.yaml")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    replicated, _ = runtime_patch(trainjob())
    (job,) = docs("job.yaml")
    (demo,) = docs("demo-data.yaml")
    assert selector.items() <= replicated["template"]["spec"]["template"]["metadata"]["labels"].items()
    for pod_job in (job, demo):
        assert selector.items() <= pod_job["spec"]["template"]["metadata"]["labels"].items()


# Accepted checkov findings on the training manifests, each with its reason.
CHECKOV_ACCEPTED = {
    "CKV_K8S_43": "the manifests name the project's registry by tag; pin your build's digest when you copy them",
    "CKV_K8S_15": "IfNotPresent: a pinned tag or digest never changes under a node's cache",
}


def test_checkov_kubernetes_on_the_training_manifests(checkov):
    proc = run(
        [checkov, "--framework", "kubernetes", "--skip-download", "--quiet", "--output", "json"]
        + ["--skip-check", ",".join(CHECKOV_ACCEPTED), "--directory", str(TRAINING)],
        check=False,
    )
    report = json.loads(proc.stdout)
    failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] > 100 and not failed, failed
