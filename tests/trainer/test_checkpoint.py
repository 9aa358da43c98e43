"""Checkpoints: one typed builder, plain data on disk, and nothing but tensors and plain data loaded back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch


class RunsCode:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture()
def small(torch_modules):
    from tlserve.manifest import Manifest, Preprocessing
    from tlserve.trainer.models import build_model

    model, config = build_model("mobilenet_v2", 3, weights=None, head="mlp:8", dropout=0.2, image_size=32)
    manifest = Manifest("small", "0", "mobilenet_v2", ["a", "b", "c"], Preprocessing(input_size=32, resize_size=36))
    return model, config, manifest


def test_build_save_load_round_trip_in_plain_data(small, tmp_path):
    import torch

    from tlserve.trainer import checkpoint

    model, config, manifest = small
    assert (config.classifier, config.first_layer, config.head) == ("classifier.1", "features.0.0", "mlp:8")
    provenance = {"val": {"accuracy": np.float64(0.5)}, "dataset": {"name": Path("d")}, "torch": torch.__version__}
    manifest = manifest.replace(provenance=provenance)
    built = checkpoint.build(model, config, manifest, epoch=3, train_config={"data": Path("/data/x"), "lr": 0.1})
    checkpoint.save(built, tmp_path / "checkpoint.pt")
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # numpy and Path values were made plain
    assert raw["format"] == checkpoint.CHECKPOINT_FORMAT and raw["model"]["classifier"] == "classifier.1"
    loaded, back = checkpoint.load_model(tmp_path / "checkpoint.pt")
    assert back.model == config and back.epoch == 3 and back.config == {"data": "/data/x", "lr": 0.1}
    assert back.manifest.provenance == {"val": {"accuracy": 0.5}, "dataset": {"name": "d"}, "torch": torch.__version__}
    assert back.manifest.replace(provenance={}) == manifest.replace(provenance={})
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_format_1_checkpoints_still_load(small, tmp_path):
    import torch

    from tlserve.trainer import checkpoint

    model, config, manifest = small
    old = {  # what the trainer wrote before the typed config: no layer names
        "format": "tlserve.checkpoint/1",
        "arch": "mobilenet_v2",
        "head": "mlp:8",
        "dropout": 0.2,
        "image_size": 32,
        "model_state": model.state_dict(),
        "manifest": manifest.to_dict(),
        "config": {"data": "d"},
    }
    torch.save(old, tmp_path / "old.pt")
    _, back = checkpoint.load_model(tmp_path / "old.pt")
    assert back.model == config and back.config == {"data": "d"}


def test_a_config_that_does_not_match_its_architecture_is_refused(small, tmp_path):
    from tlserve.trainer import checkpoint
    from tlserve.trainer.torchfile import CheckpointError

    model, config, manifest = small
    wrong = checkpoint.build(model, dataclasses.replace(config, classifier="features.0.0"), manifest)
    checkpoint.save(wrong, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is not what mobilenet_v2 builds"):
        checkpoint.load_model(tmp_path / "checkpoint.pt")


def test_the_temperature_round_trips_and_must_agree_with_the_manifest(small, tmp_path):
    import torch

    from tlserve.manifest import Calibration
    from tlserve.trainer import checkpoint
    from tlserve.trainer.torchfile import CheckpointError

    model, config, manifest = small
    assert checkpoint.build(model, config, manifest).temperature is None
    calibrated = manifest.replace(calibration=Calibration(temperature=1.8, ece_before=0.1, ece_after=0.02))
    built = checkpoint.build(model, config, calibrated)
    assert built.temperature == 1.8
    checkpoint.save(built, tmp_path / "checkpoint.pt")
    back = checkpoint.load(tmp_path / "checkpoint.pt")
    assert back.temperature == 1.8 and back.manifest.calibration == calibrated.calibration
    with pytest.raises(ValueError, match="disagrees"):
        built.replace(temperature=2.0)
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**raw, "temperature": None}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="disagrees"):
        checkpoint.load(tmp_path / "mismatch.pt")
    old = {key: value for key, value in raw.items() if key != "temperature"}  # written before calibration existed
    old["manifest"] = manifest.to_dict()
    torch.save(old, tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt").temperature is None


def test_unreadable_and_foreign_files_are_refused_by_name(torch_modules, tmp_path):
    import torch

    from tlserve.trainer import checkpoint
    from tlserve.trainer.torchfile import CheckpointError

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    for name in ("junk.pt", "state.pt"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a tlserve checkpoint"):
            checkpoint.load(tmp_path / name)


def malicious_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """(marker, files): a torch.save'd checkpoint-looking dict and a bare pickle, each carrying RunsCode."""
    import pickle

    import torch

    marker = tmp_path / "code-ran"
    as_checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"format": "tlserve.checkpoint/2", "manifest": RunsCode(marker)}, as_checkpoint)
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    return marker, [as_checkpoint, bare]


def test_a_malicious_pickle_is_refused_and_never_runs(torch_modules, tmp_path):
    from tlserve.trainer import checkpoint
    from tlserve.trainer.torchfile import CheckpointError

    marker, files = malicious_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError) as refused:
            checkpoint.load_model(path)
        message = str(refused.value)
        assert message.startswith(f"{path} is not a tlserve checkpoint") and "unsafe pickle" in message
        assert "Traceback" not in message and "weights_only" not in message
    assert not marker.exists()


def test_export_cli_refuses_a_malicious_checkpoint_with_exit_1(torch_modules, tmp_path, capsys):
    from tlserve.cli import main

    marker, (path, _) = malicious_files(tmp_path)
    assert main(["export", str(path), "--repository", str(tmp_path / "models")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"tlserve export: {path} is not a tlserve checkpoint") and "unsafe pickle" in out
    assert not marker.exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("where", ["--weights", "--resume"])
def test_train_cli_refuses_a_malicious_weights_file_or_last_pt(tiny_data, tmp_path, capsys, torch_modules, where):
    from tlserve.cli import main

    marker, (path, _) = malicious_files(tmp_path)
    out = tmp_path / "run"
    if where == "--resume":
        out.mkdir()
        path = path.rename(out / "last.pt")
    args = ["train", "--data", str(tiny_data), "--out", str(out), "--image-size", "32", "--progress", "off"]
    args += ["--weights", str(path)] if where == "--weights" else ["--weights", "none", "--resume"]
    assert main(args) == 1
    assert f"{path} is not a tlserve checkpoint" in capsys.readouterr().out and not marker.exists()
