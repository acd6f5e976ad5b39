"""CLI: ``bastion agents suspend|resume|list``, the kill switch on the deployment's database
(docs/signals.md). Like the other admin commands it writes to the database directly
(``--database``, or the one in bastion.toml); every running replica applies the change from the
change log, refuses the suspended caller's next call and ends its streams."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from datetime import UTC, datetime

from bastion.db import DatabaseUnavailable
from bastion.facts.store import FactStore
from bastion.server.config import ConfigError, ServerConfig
from bastion.signals.suspensions import KINDS, SuspensionError, resume, stored, suspend, suspension


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment (a container without one)
        return "cli"


def _store(args: argparse.Namespace) -> FactStore:
    config = ServerConfig.load(args.config)
    database = args.database or os.environ.get("BASTION_DATABASE") or config.database
    return FactStore.open(database, role="bastion-cli")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "until resumed"
    return "until " + datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_suspend(store: FactStore, args: argparse.Namespace) -> int:
    expires = time.time() + args.minutes * 60 if args.minutes else None
    s = suspension(args.kind, args.id, expires)
    result = suspend(store, s, _actor())
    print(f"suspended {s.kind} {s.id} {_when(s.expires_at)} (sequence {result.seq})")
    return 0


def cmd_resume(store: FactStore, args: argparse.Namespace) -> int:
    s = suspension(args.kind, args.id)
    if not any(x == s for x in (suspension(x.kind, x.id) for x in stored(store))):
        print(f"bastion: {s.kind} {s.id!r} is not suspended", file=sys.stderr)
        return 1
    result = resume(store, s, _actor())
    print(f"resumed {s.kind} {s.id} (sequence {result.seq})")
    return 0


def cmd_list(store: FactStore, args: argparse.Namespace) -> int:
    for s in stored(store):
        print(json.dumps(s.to_json()) if args.json else f"{s.kind}\t{s.id}\t{_when(s.expires_at)}")
    return 0


def _run(work):
    def run(args: argparse.Namespace) -> int:
        try:
            store = _store(args)
        except (ConfigError, DatabaseUnavailable, OSError) as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        try:
            return work(store, args)
        except (SuspensionError, DatabaseUnavailable) as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        finally:
            store.close()

    return run


def _minutes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("minutes must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("minutes must be 1 or more (leave it out: until resumed)")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    agents = sub.add_parser("agents", help="the kill switch: suspend, resume, list")
    commands = agents.add_subparsers(dest="agents_command", required=True)
    for name, func, help_text in (
        ("suspend", cmd_suspend, "refuse every call of an agent, user or session; end its streams"),
        ("resume", cmd_resume, "lift a suspension"),
        ("list", cmd_list, "the suspensions in force"),
    ):
        p = commands.add_parser(name, help=help_text)
        if name != "list":
            p.add_argument("id", help="the OAuth client id, user name or Mcp-Session-Id")
            p.add_argument(
                "--kind", choices=list(KINDS), default="agent", help="what id names (default agent)"
            )
        if name == "suspend":
            p.add_argument("--minutes", type=_minutes, help="lift it by itself after this long")
        if name == "list":
            p.add_argument("--json", action="store_true", help="one JSON suspension per line")
        p.add_argument(
            "--database",
            help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)",
        )
        p.add_argument("--config", help="bastion.toml")
        p.set_defaults(func=_run(func))
