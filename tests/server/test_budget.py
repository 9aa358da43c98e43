"""The memory budget: each term from its setting, the defaults within 1.5 GiB, and `serve --print-memory-budget`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tlserve.server.budget import (
    BASELINE_BYTES,
    GROWTH_COPIES,
    MESSAGE_COPIES,
    MIB,
    ORT_RUN_BYTES,
    RECEIVE_COPIES,
    SESSION_COPIES,
    memory_budget,
)
from tlserve.server.errors import quote, shape_text
from tlserve.server.settings import Settings, setting_specs


def test_defaults_fit_in_one_and_a_half_gib():
    budget = memory_budget(Settings())
    assert budget.total <= 1536 * MIB, budget.table()


def test_defaults_admit_64_calls_for_less_than_24_cost_with_every_copy_charged_per_call():
    s = Settings()
    budget = memory_budget(s)
    before = 24 * s.max_message_bytes * MESSAGE_COPIES  # the old default: 24 calls, each charged 10 copies
    assert s.max_concurrent_rpcs >= 64 and s.max_concurrent_streams >= 100
    assert budget.parts["received messages"] + budget.parts["message memory"] <= before


def test_each_term_follows_its_setting():
    s = Settings(
        max_decode_bytes=100 * MIB,
        max_concurrent_rpcs=3,
        max_message_bytes=2 * MIB,
        max_queue_bytes=7 * MIB,
        max_message_memory=50 * MIB,
    )
    budget = memory_budget(s, models=2)
    assert budget.parts == {
        "baseline": BASELINE_BYTES,
        "decoding": 100 * MIB,
        "received messages": 3 * 2 * MIB * RECEIVE_COPIES,
        "message memory": 50 * MIB,
        "batch queues": 2 * 7 * MIB,
        "inference": 2 * ORT_RUN_BYTES,
    }
    assert budget.total == sum(budget.parts.values())
    assert "--max-decode-bytes" in budget.table() and f"{budget.total // MIB} MiB" in budget.table()
    assert RECEIVE_COPIES + GROWTH_COPIES == MESSAGE_COPIES


def test_message_memory_term_holds_at_least_the_one_message_it_always_admits():
    s = Settings(max_message_bytes=8 * MIB, max_message_memory=1 * MIB)
    assert memory_budget(s).parts["message memory"] == 8 * MIB * GROWTH_COPIES
    assert "--max-message-memory" in memory_budget(s).table()
    (spec,) = [spec for spec in setting_specs() if spec.name == "max_message_memory"]
    assert f"({GROWTH_COPIES} bytes per message byte" in spec.help  # the flag's help quotes the reservation


def test_instances_multiply_the_run_and_separate_sessions_add_their_weights():
    one = memory_budget(Settings(), models=2, model_bytes=10 * MIB)
    shared = memory_budget(Settings(model_instances=3, instance_sessions="shared"), models=2, model_bytes=10 * MIB)
    separate = memory_budget(Settings(model_instances=3), models=2, model_bytes=10 * MIB)
    assert "extra sessions" not in one.parts and "extra sessions" not in shared.parts
    assert shared.parts["inference"] == separate.parts["inference"] == 2 * 3 * ORT_RUN_BYTES
    assert separate.parts["extra sessions"] == 2 * 2 * SESSION_COPIES * 10 * MIB
    assert separate.total - shared.total == separate.parts["extra sessions"]
    assert "2 more session(s)" in separate.table()


def test_no_rpc_cap_has_no_memory_bound():
    with pytest.raises(ValueError, match="--max-concurrent-rpcs 0"):
        memory_budget(Settings(max_concurrent_rpcs=0))


def test_serve_prints_the_budget_for_its_flags_and_repository(tmp_path):
    for version in ("1", "2"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "model.onnx").write_bytes(b"")  # counted, never loaded
    command = [sys.executable, "-m", "tlserve", "serve", "--repository", str(tmp_path), "--print-memory-budget"]
    out = subprocess.run([*command, "--version-policy", "all"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = memory_budget(Settings(version_policy="all"), models=2)
    assert "2 model version(s)" in out.stdout and out.stdout.splitlines()[-1].split() == [
        "total",
        str(expected.total // MIB),
        "MiB",
    ]
    separate = subprocess.run([*command, "--model-instances", "2"], capture_output=True, text=True, timeout=60)
    assert separate.returncode == 0 and "extra sessions" in separate.stdout  # the files are empty: 0 MiB each
    refused = subprocess.run([*command, "--max-concurrent-rpcs", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no memory bound" in refused.stderr


def test_quote_cuts_long_caller_strings():
    assert quote("fashion") == "'fashion'"
    cut = quote("x" * 1_000_000)
    assert cut == repr("x" * 100) + "... (1000000 characters)"
    assert quote("y" * 50, limit=10) == repr("y" * 10) + "... (50 characters)"


def test_shape_text_shows_at_most_a_few_dimensions():
    assert shape_text([1, 3, 64, 64]) == "[1, 3, 64, 64]"
    assert shape_text([1] * 70) == "[1, 1, 1, 1, 1, 1, ...] (70 dimensions)"


def test_glibc_keeps_large_blocks_returnable():
    import platform

    from tlserve.server.allocator import keep_large_blocks_returnable

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc's")
    assert keep_large_blocks_returnable() is True
