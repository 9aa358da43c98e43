"""House rules that keep the parts apart: generated stubs and docs never drift, the server never imports torch."""

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
