"""`torchrun --nproc_per_node 2 tlserve train` on CPU: DistributedDataParallel over gloo, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_two_process_ddp_run_on_cpu(tiny_data, tmp_path, torch_modules):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tlserve",
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--head-epochs",
        "1",
        "--batch-size",
        "4",
        "--progress",
        "off",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP rank 1/2" in result.stderr and "(gloo)" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["images"] == 24 for r in rows)  # 12 per rank, 2 ranks: the whole training set once
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no stray temp files
    from tlserve.trainer import checkpoint

    manifest = checkpoint.load(out / "checkpoint.pt").manifest
    assert manifest.provenance["world_size"] == 2
    assert result.stdout.count("run directory:") == 1  # only rank 0 reports
