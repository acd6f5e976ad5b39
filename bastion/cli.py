"""The ``bastion`` command line. Each area registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime

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
    "bastion.gateway.tool_commands",
]


def count_in(text: str, most: int, least: int = 1) -> int | None:
    """``text`` as a whole number from ``least`` to ``most`` in plain digits (no sign, space,
    ``_`` or other script's digits, which `int` takes), or None."""
    if text.isascii() and text.isdigit() and len(text) <= len(str(most)):
        value = int(text)
        return value if least <= value <= most else None
    return None


def whole_number(most: int, least: int = 1) -> Callable[[str], int]:
    """An argument's type: a whole number from ``least`` (1 unless given) to ``most``; anything
    else is a usage error."""

    def parse(text: str) -> int:
        value = count_in(text, most, least)
        if value is None:
            raise argparse.ArgumentTypeError(
                f"give a whole number from {least} to {most}, not {text!r}"
            )
        return value

    return parse


_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_epoch(text: str, now: float, option: str = "--since") -> float:
    """A time given as ``--since`` (``option``) is: a duration back from now (``90s``, ``30m``,
    ``24h``, ``7d``) or an ISO 8601 time (``2026-12-01T09:00:00Z``), as epoch seconds.
    `ValueError` names ``option`` and what it may be."""
    m = _DURATION.match(text.strip())
    if m:
        return now - int(m.group(1)) * _SECONDS[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{option} {text!r}: give a duration (90s, 30m, 24h, 7d) or an ISO 8601 time"
            " (2026-12-01T09:00:00Z)"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


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


def input_error(error: BaseException) -> str | None:
    """What to tell a person of ``error``, if it is one they fix outside bastion (a setting, a
    path, a file, the database server), else None: those end every command the same way, one
    line and exit status 2, whichever command met them (`main`). A command's own refusals
    (a fact the policy cannot use, an unknown user) are its own to say."""
    import sqlite3

    import psycopg

    from bastion.db import DatabaseSettingError, DatabaseUnavailable, first_line, storage_full
    from bastion.server.config import ConfigError

    if isinstance(error, (ConfigError, DatabaseSettingError, DatabaseUnavailable)):
        return str(error)
    if isinstance(error, OSError) and storage_full(error):
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}the storage is full ({error.strerror or error}): make room, then retry"
    if isinstance(error, OSError):
        if error.filename is not None and error.strerror:
            return f"{error.filename}: {error.strerror}"
        return str(error) or error.__class__.__name__
    if isinstance(error, UnicodeError):
        return f"not UTF-8 text: {error}"
    if isinstance(error, sqlite3.Error):
        return f"the database refused: {error}"
    if isinstance(error, psycopg.Error):
        return f"the database refused: {first_line(error)}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:
        message = input_error(error)
        if message is None:
            raise
        print(f"bastion: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
