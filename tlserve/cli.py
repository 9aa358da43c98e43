"""The `tlserve` console command: one parser, subcommands registered by each part.

Each part's ``cli`` module exposes ``register(subparsers)``, adding its subcommands with
``set_defaults(func=handler)``. Those modules import nothing heavy at module level, so
`tlserve serve` never pulls in torch and `tlserve --help` works with any extra installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import tlserve
from tlserve import __version__

COMMAND_MODULES = ("tlserve.trainer.cli", "tlserve.export.cli", "tlserve.server.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlserve", description=tlserve.__doc__.split(": ", 1)[1])
    parser.add_argument("--version", action="version", version=f"tlserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result = args.func(args)
    return int(result or 0)
