"""Atomic publish: versions appear whole or not at all, are never overwritten, and `auto` counts up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlserve.export.publish import PublishError, publish, resolve_version

MODEL = b"\x08\x0a" + os.urandom(1 << 20)  # stands in for model.onnx bytes (1 MiB)


def visible_versions(repository: Path, name: str = "m") -> list[str]:
    """Versions as a reader of the repository sees them (folders holding a model.onnx)."""
    return sorted(p.parent.name for p in (repository / name).glob("*/model.onnx") if not p.parent.name.startswith("."))


@pytest.fixture
def repo(tmp_path) -> Path:
    publish(tmp_path, "m", "1", {"model.onnx": b"version one", "manifest.json": b"{}"})
    return tmp_path


def test_auto_takes_the_next_integer(repo):
    (repo / "m" / "7").mkdir()
    (repo / "m" / "latest").mkdir()
    (repo / "m" / ".staging-9-abc").mkdir()
    assert resolve_version(repo, "m", "auto") == "8"
    assert resolve_version(repo, "new-model", "auto") == "1"
    assert resolve_version(repo, "m", "2") == "2"


def test_never_overwrites_an_existing_version(repo):
    with pytest.raises(PublishError, match="never overwritten"):
        resolve_version(repo, "m", "1")
    with pytest.raises(PublishError, match="never overwritten"):
        publish(repo, "m", "1", {"model.onnx": b"impostor"})
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == b"version one"
    assert sorted(os.listdir(repo / "m")) == ["1"]


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", ".."])
def test_rejects_bad_versions(repo, bad):
    with pytest.raises(PublishError):
        resolve_version(repo, "m", bad)


def test_crash_before_the_rename_leaves_no_version(repo, monkeypatch):
    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        publish(repo, "m", "2", {"model.onnx": MODEL, "manifest.json": b"{}"})
    assert visible_versions(repo) == ["1"]
    assert sorted(os.listdir(repo / "m")) == ["1"]  # the staging folder is cleaned up too
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == b"version one"


def test_killed_mid_publish_leaves_no_visible_version(repo):
    """A process SIGKILLed after writing the model but before the rename: nothing half-written is visible."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tlserve.export import publish as pub
        real_fsync = os.fsync
        def fsync_then_die(fd):
            real_fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)  # killed with model.onnx written, before the rename
        pub.os.fsync = fsync_then_die
        pub.publish(Path({str(repo)!r}), "m", "2", {{"model.onnx": os.urandom(1 << 20), "manifest.json": b"{{}}"}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()
    assert visible_versions(repo) == ["1"]
    assert not (repo / "m" / "2").exists()
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == b"version one"
    # the leftover is hidden staging that readers skip, and the next auto version is still 2
    assert all(p.startswith(".staging-") for p in os.listdir(repo / "m") if p != "1")
    assert resolve_version(repo, "m", "auto") == "2"
    publish(repo, "m", "2", {"model.onnx": MODEL})
    assert visible_versions(repo) == ["1", "2"]


def test_server_scan_sees_only_complete_versions(repo):
    scan = pytest.importorskip("tlserve.server.repository").scan
    (repo / "m" / ".staging-2-dead").mkdir()
    (repo / "m" / ".staging-2-dead" / "model.onnx").write_bytes(b"half")
    assert set(scan(repo).models["m"]) == {"1"}
