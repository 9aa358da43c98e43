"""`kill -9` mid-run, then `--resume`: the same final metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]
ARGS = [
    "--weights",
    "none",
    "--image-size",
    "32",
    "--epochs",
    "4",
    "--head-epochs",
    "1",
    "--batch-size",
    "8",
    "--threads",
    "1",
    "--workers",
    "0",
    "--progress",
    "off",
    "--seed",
    "3",
]


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "tlserve", "train", "--data", str(data), "--out", str(out), *ARGS, *extra]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_matches_uninterrupted_run(tiny_data, tmp_path, torch_modules):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(tiny_data, full), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cmd(tiny_data, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (killed / "metrics.jsonl").exists():
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before_kill = len(_metrics(killed))
    assert proc.returncode == -signal.SIGKILL and 1 <= done_before_kill < 4
    assert not (killed / "report.md").exists()
    subprocess.run(_cmd(tiny_data, killed, "--resume"), check=True, env=env, capture_output=True)
    expected, resumed = _metrics(full), _metrics(killed)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed):
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
