"""Regenerate the flag table in docs/server-contract.md from server/settings.py. Never hand-edit the table.

    python scripts/gen_settings_doc.py            # rewrite the table between the markers (`make docs`)
    python scripts/gen_settings_doc.py --check    # exit 1 if the committed table differs from the settings

Each row comes from one ``Settings`` field: its flag, its environment variable, its default and
its help text (the ``setting(default, help)`` it is declared with).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlserve.server.settings import SettingSpec, setting_specs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "server-contract.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def row(spec: SettingSpec) -> str:
    flag = f"{spec.flag} {spec.metavar}" if spec.metavar else spec.flag
    default = spec.default_text if spec.kind is bool or spec.default == "" else f"`{spec.default_text}`"
    return f"| `{flag}` | `{spec.env}` | {cell(default)} | {cell(spec.help)} |"


def table() -> str:
    return "\n".join(["| flag | environment | default | meaning |", "|---|---|---|---|", *map(row, setting_specs())])


def render(doc: str) -> str:
    """``doc`` with the text between the markers replaced by the generated table."""
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{DOC.relative_to(ROOT)}: markers {BEGIN} ... {END} not found")
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    current = DOC.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{DOC.relative_to(ROOT)}: the settings table is stale; run `make docs`", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        DOC.write_text(wanted)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
