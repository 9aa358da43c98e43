"""House rules that keep the parts apart: generated stubs and docs never drift, the server never imports torch,
the data plane knows no transport and the servicers only convert."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_protos():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, f"server/pb is stale: run `make proto`\n{result.stderr}"


def test_settings_table_matches_the_settings():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_settings_doc.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, f"docs/server-contract.md is stale: run `make docs`\n{result.stderr}"


def test_server_never_imports_torch_trainer_or_export():
    modules = sorted(
        "tlserve.server." + ".".join(p.relative_to(ROOT / "server").with_suffix("").parts)
        for p in (ROOT / "server").rglob("*.py")
        if p.stem != "__init__" and "pb" not in p.relative_to(ROOT / "server").parts
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or "
        "m.startswith(('tlserve.trainer', 'tlserve.export')))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"server pulled in: {result.stdout.strip()}"


def imported_modules(path: Path) -> list[str]:
    """Every module a file's import statements name."""
    tree = ast.parse(path.read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    return names + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_data_plane_imports_no_grpc_and_pulls_in_no_protobuf():
    transport = ("grpc", "google.protobuf", "tlserve.server.pb", "tlserve.server.rpc")
    direct = [m for m in imported_modules(ROOT / "server" / "dataplane.py") if within(m, transport)]
    assert direct == [], f"server/dataplane.py imports {direct}"
    code = (
        "import sys, tlserve.server.dataplane\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('google.protobuf', 'tlserve.server.pb')))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the data plane pulled in: {result.stdout.strip()}"


def test_servicers_only_convert():
    """No lease, no manifest, no repository in a servicer: the data plane does those."""
    for path in (ROOT / "server" / "servicer.py", ROOT / "server" / "oip" / "servicer.py"):
        text = path.read_text()
        found = [word for word in (".lease(", ".manifest", "repository") if word in text]
        assert found == [], f"{path.relative_to(ROOT)} uses {found}"
