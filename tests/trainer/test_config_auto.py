"""The resolved config (defaults < YAML < flags) and the evidence-based `auto` strategy."""

from __future__ import annotations

import pytest


def test_yaml_config_with_cli_overrides(tmp_path):
    from tlserve.trainer.config import TrainConfig, resolve

    path = tmp_path / "run.yaml"
    path.write_text("arch: resnet18\nepochs: 9\nhead-epochs: 3\nstrategy: finetune\nlr: 0.01\n")
    cfg = resolve({"epochs": 4, "lr": None, "data": "d", "out": "o"}, str(path))
    assert (cfg.arch, cfg.epochs, cfg.head_epochs, cfg.strategy, cfg.lr) == ("resnet18", 4, 3, "finetune", 0.01)
    assert cfg.batch_size == TrainConfig().batch_size
    path.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        resolve({}, str(path))
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="magic")


@pytest.mark.parametrize(
    "per_class,probe,tuned,expected",
    [
        (10, 0.70, 0.69, ("small and similar", "feature-extract")),
        (10, 0.50, 0.70, ("small and different", "two-phase")),
        (500, 0.90, 0.91, ("large and similar", "two-phase")),
        (500, 0.60, 0.90, ("large and different", "finetune")),
    ],
)
def test_auto_decides_the_scenario_from_the_evidence(per_class, probe, tuned, expected):
    pytest.importorskip("torch")
    from tlserve.trainer.auto import decide

    assert decide(per_class, probe, tuned, small_per_class=100, margin=0.02) == expected


@pytest.mark.torch
def test_auto_run_records_its_evidence_in_the_manifest(tiny_data, tmp_path, torch_modules, capsys):
    from tlserve.cli import main
    from tlserve.trainer import checkpoint

    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(tmp_path),
                "--strategy",
                "auto",
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--head-epochs",
                "0",
                "--auto-epochs",
                "1",
                "--batch-size",
                "8",
                "--progress",
                "off",
            ]
        )
        == 0
    )
    manifest = checkpoint.load(tmp_path / "checkpoint.pt").manifest
    auto = manifest.provenance["auto"]
    assert auto["choice"] == manifest.provenance["strategy"] != "auto"
    assert auto["per_class"] == 8 and 0 <= auto["probe_accuracy"] <= 1 and 0 <= auto["finetune_accuracy"] <= 1
    assert auto["scenario"].startswith("small and ")
    assert "linear probe" in (tmp_path / "report.md").read_text()
    assert "linear probe" in capsys.readouterr().out  # the evidence table is printed
