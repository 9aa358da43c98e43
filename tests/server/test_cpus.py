"""available_cpus(): the cgroup quota (v2 and v1) and the affinity mask, read from fake cgroup trees."""

from __future__ import annotations

import os

import pytest

from tlserve.server.cpus import available_cpus, cgroup_cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def write(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
    ids=["v2", "v2-unlimited", "v1", "v1-cpuacct", "v1-unlimited", "unreadable", "no-cgroup"],
)
def test_quota_from_cgroup_files(tmp_path, files, quota):
    assert cgroup_cpu_quota(write(tmp_path, files)) == quota


def test_quota_caps_the_affinity_and_rounds_up(tmp_path):
    assert available_cpus(write(tmp_path, {"cpu.max": "50000 100000"})) == 1  # half a CPU: one thread
    assert available_cpus(write(tmp_path, {"cpu.max": "150000 100000"})) == min(AFFINITY, 2)


def test_no_quota_means_the_affinity_mask_not_the_node(tmp_path):
    assert available_cpus(tmp_path) == AFFINITY
    huge = write(tmp_path / "huge", {"cpu.max": "6400000 100000"})  # 64 CPUs allowed: the mask still decides
    assert available_cpus(huge) == AFFINITY
