"""The ``bastion`` command line. Each area registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# Modules that define ``register(subparsers)``; each adds its commands and sets ``func``.
COMMAND_MODULES = [
    "bastion.policy.commands",
    "bastion.server.commands",
    "bastion.oauth.commands",
    "bastion.audit.commands",
    "bastion.approvals.commands",
    "bastion.signals.commands",
    "bastion.agents.commands",
    "bastion.signals.alert_commands",
    "bastion.delegation.task_commands",
    "bastion.connections.commands",
]


def count_in(text: str, most: int) -> int | None:
    """``text`` as a whole number from 1 to ``most`` in plain digits (no sign, space, ``_`` or
    other script's digits, which `int` takes), or None."""
    if text.isascii() and text.isdigit() and len(text) <= len(str(most)):
        value = int(text)
        return value if 1 <= value <= most else None
    return None


def whole_number(most: int) -> Callable[[str], int]:
    """An argument's type: a whole number from 1 to ``most``; anything else is a usage error."""

    def parse(text: str) -> int:
        value = count_in(text, most)
        if value is None:
            raise argparse.ArgumentTypeError(f"give a whole number from 1 to {most}, not {text!r}")
        return value

    return parse


def add_limit(parser: argparse.ArgumentParser, most: int) -> None:
    """A listing's ``--limit``: as many as the API's ``limit`` allows, 100 unless given."""
    parser.add_argument(
        "--limit", type=whole_number(most), default=100, help=f"at most this many (1 to {most})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion", description="Authorization for AI agents and MCP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
