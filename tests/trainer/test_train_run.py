"""A tiny real training run through `tlserve train`: loadable checkpoint, manifest, report files."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import pytest

pytestmark = pytest.mark.torch


TINY = ["--weights", "none", "--image-size", "32", "--epochs", "2", "--head-epochs", "1", "--batch-size", "8"]


class Captured(logging.Handler):
    """The trainer's log records while ``main`` runs (pytest's own handlers stay in place)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train(data, out, *extra) -> tuple[int, list[str], str]:
    """``tlserve train`` through ``main``: (exit code, the trainer's log lines, stdout)."""
    from tlserve.cli import main

    logger, handler, stdout = logging.getLogger("tlserve.trainer"), Captured(), io.StringIO()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stdout):
            rc = main(["train", "--data", str(data), "--out", str(out), *TINY, "--progress", "off", *extra])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return rc, handler.lines, stdout.getvalue()


@pytest.fixture(scope="module")
def tiny_train(tiny_data, tmp_path_factory, torch_modules):
    out = tmp_path_factory.mktemp("run")
    rc, lines, stdout = train(tiny_data, out, "--name", "tiny")
    assert rc == 0
    return out, lines, stdout


@pytest.fixture(scope="module")
def tiny_run(tiny_train):
    return tiny_train[0]


def test_run_directory_holds_every_file(tiny_run):
    for name in (
        "checkpoint.pt",
        "last.pt",
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
        "config.yaml",
        "confusion_matrix.png",
        "per_class.json",
        "per_class.md",
        "report.md",
        "calibration.json",
        "reliability.png",
    ):
        assert (tiny_run / name).stat().st_size > 0, name


def test_metrics_has_one_line_per_epoch(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["phase"] for r in rows] == ["head", "full"]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["train_loss"] > 0 for r in rows)


def test_checkpoint_loads_with_its_manifest(tiny_run, tiny_data):
    import torch

    from tlserve.trainer.checkpoint import load_model

    model, ckpt = load_model(tiny_run / "checkpoint.pt")
    manifest = ckpt.manifest
    assert manifest.name == "tiny" and manifest.version == "0" and manifest.architecture == "mobilenet_v2"
    assert manifest.labels == tuple(sorted(p.name for p in (tiny_data / "train").iterdir()))
    pre = manifest.preprocessing
    assert (pre.input_size, pre.interpolation, pre.input_dtype, pre.normalize_in_graph) == (
        32,
        "bilinear",
        "uint8",
        True,
    )
    from torchvision.models import MobileNet_V2_Weights

    own = MobileNet_V2_Weights.DEFAULT.transforms()  # weights none: the arch's DEFAULT transforms
    assert pre.resize_size == round(32 * own.resize_size[0] / own.crop_size[0])
    prov = manifest.provenance
    assert prov["dataset"]["train"] == 24 and prov["dataset"]["val"] == 12 and prov["dataset"]["test"] == 12
    assert prov["strategy"] == "two-phase" and prov["epochs"] == 2 and "created" in prov
    assert prov["dataset"]["name"] == tiny_data.name and prov["weights"] == "none"
    assert str(tiny_data) not in str(prov) and str(tiny_run) not in str(prov)  # no local paths
    assert 0.0 <= prov["val"]["accuracy"] <= 1.0 and 0.0 <= prov["test"]["accuracy"] <= 1.0
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, manifest.num_classes)
    assert (ckpt.model.classifier, ckpt.model.first_layer) == ("classifier.1", "features.0.0")
    assert ckpt.epoch == prov["best_epoch"] and ckpt.config["data"] == str(tiny_data)


def test_checkpoint_manifest_matches_the_eval_transform(tiny_run, tiny_data):
    """The eval pipeline is built from the manifest's own values."""
    from PIL import Image

    from tlserve.trainer import checkpoint
    from tlserve.trainer.transforms import EvalTransform

    manifest = checkpoint.load(tiny_run / "checkpoint.pt").manifest
    image = next((tiny_data / "test").rglob("*.png"))
    with Image.open(image) as img:
        tensor = EvalTransform(manifest.preprocessing)(img)
    assert tuple(tensor.shape) == (3, 32, 32) and str(tensor.dtype) == "torch.uint8"


def test_resolved_config_is_saved(tiny_run):
    import yaml

    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["image_size"] == 32 and config["weights"] == "none" and config["epochs"] == 2


def test_demo_data_writes_an_image_folder(tmp_path):
    from PIL import Image

    from tlserve.cli import main

    assert main(["demo-data", str(tmp_path)]) == 0
    counts = {split: len(list((tmp_path / split).rglob("*.png"))) for split in ("train", "val", "test")}
    assert counts == {"train": 2000, "val": 500, "test": 1000}
    assert len(list((tmp_path / "train").iterdir())) == 10
    with Image.open(next((tmp_path / "test" / "Trouser").iterdir())) as img:
        assert img.size == (28, 28) and img.mode == "L"


def test_report_files_are_valid_images_and_tables(tiny_run, tiny_data):
    from PIL import Image

    for name in ("loss.png", "accuracy.png", "confusion_matrix.png", "reliability.png"):
        with Image.open(tiny_run / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] >= 300
    labels = sorted(p.name for p in (tiny_data / "train").iterdir())
    metrics = json.loads((tiny_run / "per_class.json").read_text())
    assert metrics["split"] == "test" and list(metrics["classes"]) == labels
    assert sum(c["support"] for c in metrics["classes"].values()) == 12
    assert sum(map(sum, metrics["confusion_matrix"])) == 12
    assert all(0.0 <= c[k] <= 1.0 for c in metrics["classes"].values() for k in ("precision", "recall", "f1"))
    table = (tiny_run / "per_class.md").read_text().splitlines()
    assert table[0].startswith("| class | precision") and len(table) == 2 + len(labels) + 1
    assert all(line.count("|") == 6 for line in table)
    report = (tiny_run / "report.md").read_text()
    for link in ("(loss.png)", "(accuracy.png)", "(confusion_matrix.png)", "(reliability.png)", "| test_accuracy |"):
        assert link in report


EPOCH_LINE = re.compile(
    r"^epoch (\d+)/2 \[(head|full)\] train loss \d+\.\d{4} acc [01]\.\d{4} \| val loss \d+\.\d{4} acc [01]\.\d{4} "
    r"\| lr \d\.\d\de[+-]\d\d \| \d+ img/s \| ETA (\d+s|\d+m\d\ds|\d+h\d\dm)( \*)?$"
)


def test_one_line_per_epoch_with_losses_accuracies_lr_speed_and_eta(tiny_train):
    _, lines, _ = tiny_train
    epochs = [m for m in map(EPOCH_LINE.match, lines) if m]
    assert [(m.group(1), m.group(2)) for m in epochs] == [("1", "head"), ("2", "full")], lines
    assert epochs[0].group(4) == " *"  # the first epoch is always the best so far
    assert not [line for line in lines if line.startswith("epoch ") and not EPOCH_LINE.match(line)]


def test_metrics_rows_carry_the_epoch_lines_figures(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["images"] == 24 and row["images_per_second"] > 0 and row["seconds"] > 0
        assert row["last_batch_lr"] > 0


def test_the_end_says_where_the_report_and_curves_are(tiny_train):
    out, _, stdout = tiny_train
    assert f"run directory: {out}\nreport: {out / 'report.md'}" in stdout
    assert f"curves: {out / 'loss.png'}, {out / 'accuracy.png'}" in stdout
    assert f"reliability diagram: {out / 'reliability.png'}" in stdout
    assert "temperature:" in stdout and "test_ece:" in stdout


def test_calibration_is_stored_in_checkpoint_manifest_report_and_json(tiny_run):
    from tlserve.trainer import checkpoint

    ckpt = checkpoint.load(tiny_run / "checkpoint.pt")
    calibration = ckpt.manifest.calibration
    assert calibration is not None and ckpt.temperature == calibration.temperature > 0
    assert (calibration.method, calibration.split, calibration.bins) == ("temperature", "test", 15)
    figures = json.loads((tiny_run / "calibration.json").read_text())
    assert figures["temperature"] == ckpt.temperature and figures["fitted_on"] == "val"
    assert set(figures["splits"]) == {"val", "test"}
    assert figures["splits"]["val"]["images"] == 12 and figures["splits"]["test"]["images"] == 12
    assert figures["splits"]["test"]["ece_after"] == calibration.ece_after
    test_accuracy = ckpt.manifest.provenance["test"]["accuracy"]
    assert figures["splits"]["test"]["accuracy"] == pytest.approx(test_accuracy)  # top-1 unchanged
    report = (tiny_run / "report.md").read_text()
    assert "## Calibration" in report and "| test | 12 |" in report and "| temperature |" in report


def test_calibrate_off_leaves_the_temperature_absent(tiny_data, tmp_path, torch_modules):
    import torch

    from tlserve.trainer import checkpoint

    rc, _, stdout = train(tiny_data, tmp_path, "--calibrate", "off")
    assert rc == 0
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
    assert ckpt.temperature is None and ckpt.manifest.calibration is None
    assert "calibration" not in ckpt.manifest.to_dict()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["temperature"] is None
    assert not (tmp_path / "calibration.json").exists() and not (tmp_path / "reliability.png").exists()
    assert "reliability" not in (tmp_path / "report.md").read_text() and "reliability" not in stdout
    assert "temperature" not in stdout
