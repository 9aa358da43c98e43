"""proto/ under buf: lint with the rules in buf.yaml, and no breaking change against the previous commit's
proto (read with `git show`, so it works in any clone with history; skipped, saying why, without one).
The .proto files also ship inside the Python package, for clients in other languages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
PREFIX = Path("tlserve/server/pb")  # the import prefix the files use for each other (scripts/gen_proto.py)
PROTO_FILES = sorted(p.relative_to(PROTO).as_posix() for p in PROTO.rglob("*.proto"))


def find_buf() -> str:
    tools = Path(os.environ.get("TLSERVE_TOOLS_DIR", ROOT / ".tools")) / "bin" / "buf"
    found = str(tools) if tools.is_file() else shutil.which("buf")
    if not found:
        pytest.skip("buf not installed: run scripts/install_tools.sh (npm @bufbuild/buf into .tools/bin)")
    return found


def stage(files: dict[str, bytes], into: Path) -> Path:
    """A buf module: ``files`` (paths relative to proto/) under the import prefix, and buf.yaml at its root."""
    for name, data in files.items():
        path = into / PREFIX / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    shutil.copyfile(ROOT / "buf.yaml", into / "buf.yaml")
    return into


def working_tree() -> dict[str, bytes]:
    return {name: (PROTO / name).read_bytes() for name in PROTO_FILES}


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=60)


def previous_proto() -> tuple[str, dict[str, bytes]]:
    """The proto/ files of the commit to compare with: $TLSERVE_PROTO_BASE (a git ref, e.g. the merge-base
    with main in CI) or HEAD~1. Skips when there is no git history to compare with."""
    if git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: no previous proto/ to compare with")
    ref = os.environ.get("TLSERVE_PROTO_BASE") or "HEAD~1"
    resolved = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if resolved.returncode != 0:
        pytest.skip(f"no previous commit {ref!r} (first commit, or a shallow clone: fetch with --depth 2 or more)")
    commit = resolved.stdout.decode().strip()
    listed = git("ls-tree", "-r", "--name-only", commit, "--", "proto")
    names = [n for n in listed.stdout.decode().splitlines() if n.endswith(".proto")]
    if not names:
        pytest.skip(f"commit {commit[:12]} has no proto/ to compare with")
    files = {}
    for name in names:
        shown = git("show", f"{commit}:{name}")
        assert shown.returncode == 0, shown.stderr.decode()
        files[name.removeprefix("proto/")] = shown.stdout
    return commit, files


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([find_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.tools
def test_buf_lint(tmp_path):
    done = buf("lint", cwd=stage(working_tree(), tmp_path / "now"))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.tools
def test_no_breaking_change_against_the_previous_commit(tmp_path):
    commit, files = previous_proto()
    before = stage(files, tmp_path / "before")
    done = buf("breaking", str(stage(working_tree(), tmp_path / "now")), "--against", str(before), cwd=tmp_path)
    assert done.returncode == 0, f"breaking changes against {commit[:12]}:\n{done.stdout}{done.stderr}"


@pytest.mark.tools
def test_breaking_check_catches_a_renumbered_field(tmp_path):
    now = working_tree()
    changed = dict(now)
    name = "tlserve/v1/tlserve.proto"
    changed[name] = now[name].replace(b"uint32 top_k = 3;", b"uint32 top_k = 4;")
    assert changed[name] != now[name]
    before = stage(now, tmp_path / "before")
    done = buf("breaking", str(stage(changed, tmp_path / "now")), "--against", str(before), cwd=tmp_path)
    assert done.returncode != 0 and "top_k" in done.stdout + done.stderr


def test_proto_files_are_package_data():
    """Importable as tlserve.proto in this install (editable or not), each equal to proto/."""
    package = resources.files("tlserve.proto")
    for name in PROTO_FILES:
        assert package.joinpath(name).read_bytes() == (PROTO / name).read_bytes(), name


@pytest.mark.slow
def test_the_wheel_carries_the_proto_files(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, source / name)
    for folder in ("tlserve", "server", "trainer", "export", "proto"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("tlserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tlserve/proto/{name}" for name in PROTO_FILES} <= names
    assert "tlserve/client/__init__.py" in names
