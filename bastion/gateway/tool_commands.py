"""CLI: ``bastion tools list|show|accept`` and ``bastion prompts list|show|accept``: the tool
(prompt) definitions of upstreams with ``pin_tools`` (``pin_prompts``) (docs/gateway.md, "Tool
pins"), what waits for review and how it differs from what was accepted, and accepting it.
Works on the deployment's database (``--database``, or the one in bastion.toml); the gateway's
replicas take an acceptance at the next call or list that finds it not as pinned."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from bastion.audit.actor import cli_actor
from bastion.gateway.tool_pins import PROMPT, TOOL, PinError, ToolPin, ToolPins


def _open(args: argparse.Namespace) -> ToolPins:
    from bastion.db import Database
    from bastion.server.config import command_database

    return ToolPins(Database(command_database(args), role="bastion-cli"))


def _when(epoch: float | None) -> str:
    return (
        "-" if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )


def _state(pin: ToolPin) -> str:
    if pin.pending_digest is None:
        return "pinned"
    return "changed" if pin.digest is not None else "new, held"


def _print_pending(pin: ToolPin) -> None:
    print(f"{pin.server}/{pin.name}: {_state(pin)}")
    print(f"  accepted: {pin.digest or '-'} ({pin.accepted_by or '-'}, {_when(pin.accepted_at)})")
    if pin.pending_digest is not None:
        print(f"  waiting:  {pin.pending_digest} (since {_when(pin.pending_since)})")
        for line in pin.pending_changes():
            print(f"    {line}")


def cmd_list(args: argparse.Namespace) -> int:
    pins = _open(args)
    try:
        found = pins.listed(args.server, args.pending, args.kind)
    finally:
        pins.db.close()
    for pin in found:
        if args.json:
            print(json.dumps(pin.to_json()))
        else:
            print(f"{pin.server}\t{pin.name}\t{_state(pin)}\t{pin.pending_digest or pin.digest}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    pins = _open(args)
    try:
        pin = pins.get(args.server, args.kind, args.name)
    finally:
        pins.db.close()
    if pin is None:
        print(
            f"bastion: no {args.kind} {args.name!r} of {args.server!r} is known",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(pin.to_json(), indent=2))
        return 0
    _print_pending(pin)
    if pin.pending_digest is not None:
        print(
            f"accept with: bastion {args.kind}s accept {args.server} {args.name}"
            f" --digest {pin.pending_digest}"
        )
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    pins = _open(args)
    try:
        before = pins.get(args.server, args.kind, args.name)
        if before is not None and before.pending_digest == args.digest:
            _print_pending(before)  # what is accepted, once more
        pin = pins.accept(args.server, args.kind, args.name, args.digest, cli_actor())
    except PinError as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 2
    finally:
        pins.db.close()
    print(f"accepted {pin.server}/{pin.name} as {pin.digest}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)"
    )
    parser.add_argument("--config", help="bastion.toml (for its database)")


def register(sub: argparse._SubParsersAction) -> None:
    for kind in (TOOL, PROMPT):
        _register(sub, kind)


def _register(sub: argparse._SubParsersAction, kind: str) -> None:
    parser = sub.add_parser(f"{kind}s", help=f"{kind} definitions of upstreams with pin_{kind}s")
    parser.set_defaults(kind=kind)
    commands = parser.add_subparsers(dest=f"{kind}s_command", required=True)

    p = commands.add_parser("list", help=f"the pinned and held {kind}s")
    p.add_argument("--server", help="only this upstream's")
    p.add_argument("--pending", action="store_true", help="only those waiting for review")
    p.add_argument("--json", action="store_true", help=f"one JSON {kind} per line")
    _common(p)
    p.set_defaults(func=cmd_list)

    p = commands.add_parser(
        "show", help=f"a {kind}'s accepted definition and what waits, as a diff"
    )
    p.add_argument("server")
    p.add_argument("name", metavar=kind)
    p.add_argument("--json", action="store_true", help="the definitions in full, as JSON")
    _common(p)
    p.set_defaults(func=cmd_show)

    p = commands.add_parser("accept", help="accept the definition waiting for review")
    p.add_argument("server")
    p.add_argument("name", metavar=kind)
    p.add_argument(
        "--digest", required=True, help="the waiting definition's digest, as `show` prints it"
    )
    _common(p)
    p.set_defaults(func=cmd_accept)
