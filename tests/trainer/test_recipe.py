"""The recipe's options run together end to end: partial + SGD + EMA + early stopping + loss balance + MLP head."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.torch


def test_partial_sgd_ema_patience_mlp_head_run(tiny_data, tmp_path, torch_modules):
    import torch

    from tlserve.cli import main
    from tlserve.trainer.checkpoint import load_model

    config = tmp_path / "run.yaml"
    config.write_text("strategy: partial\nunfreeze: 1\noptimizer: sgd\nlr: 0.05\nema: 0.9\nepochs: 3\n")
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(tiny_data),
                "--out",
                str(tmp_path / "run"),
                "--weights",
                "none",
                "--image-size",
                "32",
                "--batch-size",
                "8",
                "--patience",
                "1",
                "--balance",
                "loss",
                "--head",
                "mlp:16",
                "--dropout",
                "0.1",
                "--augment",
                "classic",
                "--progress",
                "off",
            ]
        )
        == 0
    )
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 3 and {r["phase"] for r in rows} == {"partial"}
    model, ckpt = load_model(run / "checkpoint.pt")
    prov = ckpt.manifest.provenance
    assert prov["strategy"] == "partial" and prov["head"] == "mlp:16"
    assert prov["stopped_early"] == (len(rows) < 3)
    assert prov["best_epoch"] == max(rows, key=lambda r: r["val_accuracy"])["epoch"]
    assert [
        m.out_features for m in model.get_submodule(ckpt.model.classifier).modules() if isinstance(m, torch.nn.Linear)
    ] == [16, 3]
    assert ckpt.config["optimizer"] == "sgd" and ckpt.config["ema"] == 0.9
    assert (ckpt.model.head, ckpt.model.dropout, ckpt.model.classifier) == ("mlp:16", 0.1, "classifier.1")
