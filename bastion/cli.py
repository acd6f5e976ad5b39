"""The ``bastion`` command line. Each area registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from bastion.whole_numbers import count_in

# The module whose ``register(subparsers)`` adds each command (the first word after `bastion`)
# and sets its ``func``; for a command several modules add to, each of its sub-commands. A
# command given is parsed with its own module alone: `bastion policy check` need not import the
# server, the gateway and the authorization server (most of a second of CPU) to check a file.
# Anything else (`bastion --help`, `bastion policy --help`, a word that is no command) builds the
# whole parser. tests/test_cli_commands.py holds this table to what each module registers.
COMMANDS = {
    "policy check": "bastion.policy.commands",
    "policy test": "bastion.policy.commands",
    "policy explain": "bastion.policy.commands",
    "policy push": "bastion.server.commands",
    "policy versions": "bastion.server.commands",
    "policy rollback": "bastion.server.commands",
    "serve": "bastion.server.commands",
    "keys": "bastion.server.commands",
    "facts": "bastion.server.commands",
    "changes": "bastion.server.commands",
    "users": "bastion.oauth.commands",
    "clients": "bastion.oauth.commands",
    "signing-keys": "bastion.oauth.commands",
    "identity": "bastion.identity.commands",
    "audit": "bastion.audit.commands",
    "approvals": "bastion.approvals.commands",
    "signals": "bastion.signals.commands",
    "agents": "bastion.agents.commands",
    "alerts": "bastion.signals.alert_commands",
    "tasks": "bastion.delegation.task_commands",
    "connections": "bastion.connections.commands",
    "tools": "bastion.gateway.tool_commands",
    "prompts": "bastion.gateway.tool_commands",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of the command ``argv`` names (`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="bastion", description="Authorization for AI agents and MCP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    given = {" ".join((argv or [])[:n]) for n in (1, 2)}
    named = [module for command, module in COMMANDS.items() if command in given]
    for name in named or COMMAND_MODULES:
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
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
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
