"""benchmarks/bench_serving.py --peer kserve, the parts that need neither KServe nor the network: the
venv's pins and key, the tables with KServe rows, and the CPU of a process tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_serving as bench  # noqa: E402
from peers import kserve_peer, kserve_venv  # noqa: E402


def test_the_venv_pins_this_interpreters_onnxruntime_and_numpy_exactly():
    import numpy

    pins = kserve_venv.pins()
    assert pins[0] == "kserve==0.21.*"
    assert any(p.startswith("onnxruntime") and p.endswith(f"=={onnxruntime.__version__}") for p in pins), pins
    assert f"numpy=={numpy.__version__}" in pins


def test_the_venv_key_names_python_and_pins_whatever_their_order():
    key = kserve_venv.venv_key(["numpy==2.4.6", "kserve==0.21.*"], (3, 11))
    assert key == kserve_venv.venv_key(["kserve==0.21.*", "numpy==2.4.6"], (3, 11))
    assert key.splitlines() == ["python 3.11", "kserve==0.21.*", "numpy==2.4.6"]
    assert key != kserve_venv.venv_key(["kserve==0.21.*", "numpy==2.4.7"], (3, 11))
    assert key != kserve_venv.venv_key(["kserve==0.21.*", "numpy==2.4.6"], (3, 12))


def test_a_venv_with_the_same_key_is_reused_and_left_alone(tmp_path):
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("")
    marker = tmp_path / "kept"
    marker.write_text("")
    (tmp_path / kserve_venv.KEY_FILE).write_text(kserve_venv.venv_key(kserve_venv.pins(), sys.version_info[:2]))
    assert kserve_venv.ensure_venv(tmp_path) == python
    assert marker.exists()


def cell(mode: str, c: int, img_s: float, cpu_ms: float = 0.0, batch: float = 1.0) -> bench.Cell:
    return bench.Cell(mode, c, img_s, 2.0, 4.0, 100, batch, cpu_ms)


CELLS = [
    cell("raw ORT", 1, 200.0, batch=1.0),
    cell("OIP uint8", 1, 150.0, cpu_ms=1.5),
    cell("task JPEG", 1, 100.0, cpu_ms=3.0),
    cell(kserve_peer.MODE, 1, 100.0, cpu_ms=2.0),
    cell("raw ORT", 8, 400.0, batch=8.0),
    cell("OIP uint8", 8, 360.0, cpu_ms=1.0, batch=4.0),
    cell("task JPEG", 8, 200.0, cpu_ms=2.0, batch=4.0),
    cell(kserve_peer.MODE, 8, 240.0, cpu_ms=2.5),
]


def test_kserve_rows_sit_in_the_table_against_raw_at_their_concurrency():
    rows = [[f.strip() for f in line.strip("|").split("|")] for line in bench.table(CELLS).splitlines()[2:]]
    kserve = {int(r[1]): r for r in rows if r[0] == kserve_peer.MODE}
    assert kserve[1][5] == "0.50"  # 100 / raw's 200
    assert kserve[8][5] == "0.60"  # 240 / raw's 400
    assert kserve[8][7:] == ["1.0", "2.50", "0.00"]  # mean batch, server CPU ms, client CPU ms


def test_the_peer_table_gives_tlserve_over_kserve_per_concurrency():
    lines = bench.peer_table(CELLS, kserve_peer.MODE).splitlines()
    assert "tlserve OIP uint8 ÷ KServe OIP uint8 img/s" in lines[0]
    assert lines[2:] == ["| 1 | 1.50 | 0.75 |", "| 8 | 1.50 | 0.40 |"]


def test_a_server_without_a_batcher_counts_one_image_per_execution():
    sample = bench.Sample()
    sample.add(30, 1.0, [0.01] * 30, batches=(35.0, 35.0), server_cpu=(0.07, 35))
    result = sample.cell(kserve_peer.MODE, 8)
    assert result.mean_batch == 1.0
    assert abs(result.server_cpu_ms - 2.0) < 1e-9


def test_tree_cpu_counts_the_children_of_a_process():
    burn = "import time\nwhile time.process_time() < 0.4: pass\nprint('done', flush=True)\nimport sys; sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        assert kserve_peer.tree_cpu(os.getpid()) - bench.process_cpu(os.getpid()) >= 0.3
        assert kserve_peer.tree_cpu(child.pid) >= 0.3
    finally:
        child.communicate("")
