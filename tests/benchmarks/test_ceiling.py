"""benchmarks/ceiling.py: the most a Python gRPC server could serve, from one sitting's raw and floor cells."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_serving as bench  # noqa: E402
from ceiling import ceiling, ceiling_table  # noqa: E402
from peers import grpc_floor  # noqa: E402


def cell(mode: str, c: int, img_s: float, server_ms: float = 0.0, bench_ms: float = 0.0) -> bench.Cell:
    return bench.Cell(mode, c, img_s, 2.0, 4.0, 100, 1.0, server_ms, bench_ms)


def test_one_caller_waits_for_the_compute_and_then_a_bare_round_trip():
    raw = cell("raw ORT", 1, 200.0, bench_ms=10.0)  # 5 ms a call
    floor = cell(grpc_floor.MODE, 1, 1000.0, server_ms=0.5, bench_ms=0.4)  # 1 ms a round trip
    top = ceiling(raw, floor, cores=2)
    assert top.bound == "round trip"
    assert top.images_per_s == pytest.approx(1 / (0.005 + 0.001))


def test_many_callers_share_the_cores_between_compute_server_and_client():
    raw = cell("raw ORT", 8, 200.0, bench_ms=9.0)
    floor = cell(grpc_floor.MODE, 8, 2000.0, server_ms=0.6, bench_ms=0.4)
    top = ceiling(raw, floor, cores=2)
    assert top.bound == "CPU"
    assert top.images_per_s == pytest.approx(2000 / 10.0)
    assert (top.compute_ms, top.floor_cpu_ms) == pytest.approx((9.0, 1.0))


def test_the_compute_costs_no_more_than_raw_could_have_spent_on_every_core():
    raw = cell("raw ORT", 8, 250.0, bench_ms=11.0)  # its spinning-off CPU per image exceeds 2 cores / 250 img/s
    floor = cell(grpc_floor.MODE, 8, 2000.0, server_ms=0.6, bench_ms=0.4)
    top = ceiling(raw, floor, cores=2)
    assert top.compute_ms == pytest.approx(8.0)
    assert top.images_per_s == pytest.approx(2000 / 9.0)


def test_a_cheap_round_trip_leaves_the_cpu_bound_at_one_caller():
    raw = cell("raw ORT", 1, 400.0, bench_ms=9.0)  # a compute that uses one core of two
    floor = cell(grpc_floor.MODE, 1, 100_000.0, server_ms=2.0, bench_ms=1.0)
    assert ceiling(raw, floor, cores=1).bound == "CPU"


def test_the_table_gives_each_served_path_as_a_share_of_the_ceiling():
    cells = [
        cell("raw ORT", 8, 210.0, bench_ms=9.0),
        cell("OIP uint8", 8, 150.0, server_ms=10.0, bench_ms=0.5),
        cell(grpc_floor.MODE, 8, 2000.0, server_ms=0.6, bench_ms=0.4),
    ]
    lines = ceiling_table(cells, "raw ORT", grpc_floor.MODE, ["OIP uint8"], cores=2).splitlines()
    assert "OIP uint8 ÷ ceiling" in lines[0]
    assert lines[2] == "| 8 | 9.00 | 1.00 | 200.0 | CPU | 0.95 | 0.75 |"


def test_a_sample_reports_the_benchmark_process_cpu_per_measured_call():
    sample = bench.Sample()
    sample.add(40, 1.0, [0.01] * 40, server_cpu=(0.08, 40), bench_cpu=0.02)
    result = sample.cell("OIP uint8", 8)
    assert result.bench_cpu_ms == pytest.approx(0.5)
    assert result.server_cpu_ms == pytest.approx(2.0)
