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


def _evidence(holdout, probe_only, two_phase_only, both):
    from tlserve.trainer.auto import Evidence

    return Evidence(holdout, both + probe_only, both + two_phase_only, probe_only, two_phase_only)


@pytest.mark.parametrize(
    "holdout,probe_only,two_phase_only,both,expected",
    [
        # 10/class (20 hold-out images): a 3-image lead (15 points) is within noise; two-phase stays
        (20, 4, 1, 10, ("probe ahead, within noise", "two-phase")),
        # the same hold-out, the probe right on 6 images the rehearsal missed and never the reverse
        (20, 6, 0, 8, ("unfreezing hurt", "feature-extract")),
        # 200/class (400 images): 30 against 10 disagreements is clear (z = 3.2)
        (400, 30, 10, 280, ("unfreezing hurt", "feature-extract")),
        # a clear z but a lead within the margin: not worth giving up fine-tuning
        (2000, 30, 0, 1500, ("unfreezing helped or tied", "two-phase")),
        (400, 10, 30, 280, ("unfreezing helped or tied", "two-phase")),
        (400, 0, 0, 300, ("unfreezing helped or tied", "two-phase")),
    ],
)
def test_auto_overrules_two_phase_only_on_clear_evidence(holdout, probe_only, two_phase_only, both, expected):
    pytest.importorskip("torch")
    from tlserve.trainer.auto import decide

    assert decide(_evidence(holdout, probe_only, two_phase_only, both), margin=0.02) == expected


def test_auto_scores_the_best_epoch_of_each_phase_on_the_same_images(torch_modules):
    torch, _ = torch_modules
    from tlserve.trainer.auto import compare

    right = [
        ("head", [1, 0, 0, 0, 1]),
        ("head", [1, 1, 0, 0, 1]),  # the best head epoch: 3 right
        ("full", [0, 1, 1, 1, 0]),  # the first of two best full epochs: 3 right
        ("full", [1, 1, 1, 0, 0]),
        ("full", [0, 0, 0, 0, 1]),
    ]
    found = compare([(phase, torch.tensor(c, dtype=torch.bool)) for phase, c in right])
    assert (found.holdout, found.probe_correct, found.two_phase_correct) == (5, 3, 3)
    assert (found.probe_only, found.two_phase_only) == (2, 2)  # images 0, 4 against 2, 3
    assert found.z == 0.0


def test_the_rehearsal_is_the_runs_own_two_phase_schedule():
    pytest.importorskip("torch")
    from tlserve.trainer.auto import rehearsal_plan
    from tlserve.trainer.config import TrainConfig

    def shape(**kw):
        return [(p.name, p.epochs, p.lr, p.bn_inference) for p in rehearsal_plan(TrainConfig(**kw))]

    assert shape(epochs=10, head_epochs=4) == [("head", 4, 3e-3, False), ("full", 6, 1e-3, True)]
    assert shape(epochs=1, head_epochs=0) == [("head", 1, 3e-3, False), ("full", 1, 1e-3, True)]
    assert shape(epochs=6, head_epochs=6) == [("head", 5, 3e-3, False), ("full", 1, 1e-3, True)]
    assert shape(epochs=10, head_epochs=4, auto_epochs=5) == [("head", 2, 3e-3, False), ("full", 3, 1e-3, True)]
    with pytest.raises(ValueError, match="auto_epochs"):
        TrainConfig(auto_epochs=1)


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
    assert auto["per_class"] == 8 and auto["holdout"] == 6 and auto["rehearsal_epochs"] == [1, 1]
    # both candidates scored on the same images: right on both = right on one minus right on it alone
    both = auto["probe_accuracy"] * 6 - auto["probe_only"]
    assert both == pytest.approx(auto["two_phase_accuracy"] * 6 - auto["two_phase_only"]) and both >= 0
    assert "two-phase rehearsal" in (tmp_path / "report.md").read_text()
    assert "linear probe" in capsys.readouterr().out  # the evidence table is printed
    # the chosen strategy trains exactly as a run that named it: same seed, same weights
    named = tmp_path / "named"
    args = ["--data", str(tiny_data), "--out", str(named), "--image-size", "32", "--epochs", "1"]
    args += ["--head-epochs", "0", "--batch-size", "8", "--progress", "off", "--strategy", auto["choice"]]
    assert main(["train", *args]) == 0
    torch, _ = torch_modules
    ours = checkpoint.load(tmp_path / "checkpoint.pt").model_state
    theirs = checkpoint.load(named / "checkpoint.pt").model_state
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
