"""`tlserve` subcommands of the export part (registered by tlserve.cli; no heavy imports at module level)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this part's subcommands. Each sets `func` to a handler taking the parsed args."""
