"""CLI: ``bastion signals set|clear|list``, on the deployment's database (docs/signals.md), and
``bastion signals streams ...`` and ``bastion signals subjects ...``
(`bastion.signals.stream_commands`).

Like the other admin commands it works on the database directly (``--database``, or the one in
bastion.toml): the write goes through the change log, so every running replica sees it. A signal
is checked against the policy in force before it is written, as ``/v1/signals`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bastion import untrusted_json
from bastion.audit.actor import cli_actor
from bastion.cli import add_limit, whole_number
from bastion.decide import Authorizer
from bastion.facts.model import Entity, FactError
from bastion.facts.store import FactStore
from bastion.server.config import ServerConfig, command_database
from bastion.signals.shadow_commands import add_shadow_report
from bastion.signals.store import (
    MAX_LIST,
    SUBJECT_TYPES,
    SignalError,
    SignalSettings,
    check_subject,
    clear_signal,
    list_signals,
    new_signal,
    set_signal,
)
from bastion.signals.stream_commands import register_streams, register_subjects


class CommandError(Exception):
    """A refusal or a mistake the person running the command can fix; the message says how."""


def _subject(text: str) -> Entity:
    type_, sep, id_ = text.partition(":")
    if not sep:
        raise CommandError(f"a subject is Type:id ({', '.join(SUBJECT_TYPES)}), got {text!r}")
    try:
        return check_subject(type_, id_)
    except SignalError as e:
        raise CommandError(str(e)) from None


def _value(text: str) -> Any:
    """``true``, ``false`` and integers as such; anything else (or a JSON string) as text. Read
    as the API reads a body: what it refuses (nesting past its limit, a NUL) is text here."""
    try:
        value = untrusted_json.loads(text, unique_keys=True)
    except untrusted_json.JsonRefused:
        return text
    return value if isinstance(value, (bool, int, str)) else text


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _opened(work: Callable[[FactStore, ServerConfig, argparse.Namespace], int]) -> Callable:
    def run(args: argparse.Namespace) -> int:
        config = ServerConfig.load(args.config)
        store = FactStore.open(command_database(args, config), role="bastion-cli")
        try:
            return work(store, config, args)
        except CommandError as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        finally:
            store.close()

    return run


def cmd_set(store: FactStore, config: ServerConfig, args: argparse.Namespace) -> int:
    with config.reading("signals.api"):
        settings = SignalSettings.from_mapping(config.signals.get("api"))
    try:
        signal = new_signal(
            _subject(args.subject), args.name, _value(args.value), args.source, args.ttl, settings
        )
    except (SignalError, TypeError) as e:
        raise CommandError(str(e)) from None
    policy = store.policy()
    authz = Authorizer("", limits=config.policy_limits())
    if policy is not None:
        authz.load_policy(policy.text, source=policy.source or "policy.polar")
    try:
        result = set_signal(store, signal, actor=cli_actor(), validate=authz.facts.validate)
    except FactError as e:
        raise CommandError(
            f"the policy in force cannot hold this signal: {e}; declare the signal facts it"
            " reads, e.g. declare signal(User, String, Boolean, String, Integer);"
        ) from None
    print(
        f"set {signal.subject!r} {signal.name} = {json.dumps(signal.value)} (source"
        f" {signal.source}) until {_when(signal.expires_at)}; sequence {result.seq}"
    )
    return 0


def cmd_clear(store: FactStore, config: ServerConfig, args: argparse.Namespace) -> int:
    subject = _subject(args.subject)
    result = clear_signal(store, subject, args.name, actor=cli_actor())
    print(f"cleared {result.deleted} signal(s) of {subject!r}; sequence {result.seq}")
    return 0


def cmd_list(store: FactStore, config: ServerConfig, args: argparse.Namespace) -> int:
    subject = _subject(args.subject) if args.subject else None
    for signal in list_signals(store, subject, args.name, limit=args.limit):
        if args.json:
            print(json.dumps(signal.to_json()))
        else:
            print(
                f"{signal.subject!r} {signal.name} = {json.dumps(signal.value)}"
                f"  source {signal.source}  set {_when(signal.set_at)}"
                f"  expires {_when(signal.expires_at)}"
            )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)"
    )
    parser.add_argument("--config", help="bastion.toml ([signals.api] bounds the TTL)")


def register(sub: argparse._SubParsersAction) -> None:
    signals = sub.add_parser(
        "signals",
        help="signals about users, devices, agents, sessions; Shared Signals streams;"
        " the shadow-rule report",
    )
    commands = signals.add_subparsers(dest="signals_command", required=True)
    register_streams(commands)
    register_subjects(commands)
    add_shadow_report(commands)

    p = commands.add_parser("set", help="set a signal (replaces the subject's earlier value)")
    p.add_argument("subject", help=f"Type:id, one of {', '.join(SUBJECT_TYPES)} (User:sam)")
    p.add_argument("name", help="the signal's name, such as device_compliant")
    p.add_argument("value", help="true, false, an integer, or text")
    p.add_argument("--source", required=True, help="who says so, such as mdm")
    p.add_argument(
        "--ttl",
        type=whole_number(2**31),
        help="seconds it lives (default [signals.api].default_ttl_seconds)",
    )
    _common(p)
    p.set_defaults(func=_opened(cmd_set))

    p = commands.add_parser("clear", help="clear a subject's signal, or all of its signals")
    p.add_argument("subject", help="Type:id (User:sam)")
    p.add_argument("name", nargs="?", help="the signal to clear (default: every one)")
    _common(p)
    p.set_defaults(func=_opened(cmd_clear))

    p = commands.add_parser("list", help="live signals")
    p.add_argument("--subject", help="only this subject's (Type:id)")
    p.add_argument("--name", help="only signals of this name")
    add_limit(p, MAX_LIST)
    p.add_argument("--json", action="store_true", help="one JSON signal per line")
    _common(p)
    p.set_defaults(func=_opened(cmd_list))
