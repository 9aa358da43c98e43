"""deploy/training's train.sh, run as the plain Job runs it, under a 2-process CPU torchrun (gloo).

The script, its options (run.yaml), the container's command, arguments and environment all come from the
manifests; only the volumes become temporary folders, the GPU count becomes 2 CPU processes, and a few flags
make the run tiny (1 epoch, 32 px, the tiny demo-data tree). The run ends with the model published into the
"model volume", in the layout the server scans, exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.torch, pytest.mark.slow]

TRAINING = Path(__file__).resolve().parents[2] / "deploy" / "training"
TINY = ["--weights", "none", "--epochs", "1", "--head-epochs", "1", "--image-size", "32", "--batch-size", "4"]
TINY += ["--device", "cpu", "--workers", "0"]


def job_container() -> tuple[dict, dict]:
    job = yaml.safe_load((TRAINING / "job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def shims(folder: Path) -> Path:
    """`torchrun` and `tlserve` on PATH, as in the trainer image, running this interpreter."""
    folder.mkdir()
    for name, module in (("torchrun", "torch.distributed.run"), ("tlserve", "tlserve")):
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        path.chmod(0o755)
    return folder


def local_paths(pod: dict, container: dict, tmp_path: Path, data: Path) -> dict[str, Path]:
    """Each mounted volume's path in the container -> a local folder holding what the volume would."""
    config = yaml.safe_load((TRAINING / "configmap.yaml").read_text())
    sources = {v["name"]: v for v in pod["volumes"]}
    mapping = {}
    for mount in container["volumeMounts"]:
        source = sources[mount["name"]]
        if "emptyDir" in source:
            continue  # /tmp and /dev/shm: the machine's own
        local = tmp_path / mount["name"]
        local.mkdir()
        if "configMap" in source:
            assert source["configMap"]["name"] == config["metadata"]["name"]
            for key, text in config["data"].items():
                (local / key).write_text(text)
        mapping[mount["mountPath"]] = local
    (mapping["/data"] / "fashion").symlink_to(data, target_is_directory=True)
    return mapping


def localise(value: str, mapping: dict[str, Path]) -> str:
    for inside, local in mapping.items():
        if value == inside or value.startswith(inside + "/"):
            return str(local) + value[len(inside) :]
    return value


def test_the_jobs_train_script_trains_under_torchrun_and_publishes_once(tiny_data, tmp_path, torch_modules):
    pod, container = job_container()
    mapping = local_paths(pod, container, tmp_path, tiny_data)
    env = {e["name"]: localise(e["value"], mapping) for e in container["env"] if "value" in e}
    assert env["PET_STANDALONE"] == "1" and env["PET_NPROC_PER_NODE"] == "gpu"
    env["PET_NPROC_PER_NODE"] = "2"  # two CPU processes instead of one per GPU
    env["RUN_ID"] = "tlserve-train-fashion-abcde"  # the Job's name, from its pod label
    env["PATH"] = f"{shims(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"
    env |= {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    cmd = [localise(part, mapping) for part in container["command"]] + container["args"] + TINY
    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "DDP rank 1/2" in result.stderr and "(gloo)" in result.stderr

    models, run_dir = Path(env["MODELS_DIR"]), Path(env["RUNS_DIR"]) / env["RUN_ID"]
    version = models / "fashion" / "1"
    assert (run_dir / "published").read_text().strip() == str(version / "model.onnx")
    assert sorted(p.name for p in (models / "fashion").iterdir()) == ["1"], "published atomically, no staging left"
    from tlserve.export.inspect_model import describe
    from tlserve.server.repository import scan

    assert set(scan(models).models) == {"fashion"} and set(scan(models).models["fashion"]) == {"1"}
    manifest = describe(version / "model.onnx")["manifest"]
    assert manifest.name == "fashion" and manifest.provenance["world_size"] == 2
    assert manifest.preprocessing.input_size == 32, "the tiny flags overrode run.yaml's 64 px"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1

    again = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "was published already" in again.stdout, again.stdout + again.stderr
    assert sorted(p.name for p in (models / "fashion").iterdir()) == ["1"], "a finished run is published once"
