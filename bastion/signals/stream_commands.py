"""CLI: ``bastion signals streams status|configure`` and ``bastion signals subjects
status|sync``: the Shared Signals streams of the deployment and their subjects (docs/signals.md).

``streams status`` shows, per configured transmitter, the stream recorded in the database: its
id, its status, when its verification event arrived, the last error, and the last round of its
subjects. ``streams configure`` reads each transmitter's metadata, reads or creates bastion's
stream, brings it in step (SSF 1.0 §8.1.1.3: the event types bastion asks for, its push
endpoint and token) and says what it changed, and asks for a verification event, as the server
does at start. ``subjects status`` lists each subject bastion added to a stream or failed to add
or remove; ``subjects sync`` adds and removes them now, as the server does every
``subjects_sync_seconds``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from bastion.audit.actor import cli_actor
from bastion.db import Database
from bastion.server.config import ConfigError, ServerConfig, command_database

if TYPE_CHECKING:
    from bastion.signals.settings import Transmitter
    from bastion.signals.ssf import SsfReceiver


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _receiver(args: argparse.Namespace):
    from bastion import outbound_proxy
    from bastion.facts.store import FactStore
    from bastion.oauth.store import OAuthStore
    from bastion.signals.settings import from_config
    from bastion.signals.ssf import SsfReceiver

    config = ServerConfig.load(args.config)
    # `configure` reaches the transmitters: through the server's proxy too.
    outbound_proxy.configure(config.outbound_proxy())
    table = (config.signals or {}).get("ssf")
    if not table:
        raise ConfigError(f"{config.named} has no [signals.ssf] table: no transmitters to show")
    settings = from_config(config, str(config.oauth.get("issuer", "")))
    db = Database(command_database(args, config))
    return SsfReceiver(settings, db, OAuthStore(db), FactStore(db), lambda: None)


def cmd_status(args: argparse.Namespace) -> int:
    receiver = _receiver(args)
    try:
        recorded = {s.transmitter: s for s in receiver.store.streams()}
        rows = []
        for t in receiver.settings.transmitters:
            s = recorded.get(t.name)
            rows.append(
                {
                    "transmitter": t.name,
                    "issuer": t.issuer,
                    "delivery": t.delivery,
                    "stream_id": s.stream_id if s else None,
                    "status": s.status if s else "not configured",
                    "verified_at": s.verified_at if s else None,
                    "detail": s.detail if s else "the server has not configured this stream yet",
                    "updated_at": s.updated_at if s else None,
                    "subjects": s.subjects if s else None,
                }
            )
    finally:
        receiver.store.db.close()
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        for r in rows:
            print(
                f"{r['transmitter']}  {r['delivery']}  {r['status']}  stream={r['stream_id'] or '-'}"
                f"  verified={_when(r['verified_at'])}  updated={_when(r['updated_at'])}"
                f"\n    {r['issuer']}\n    {r['detail']}"
                + (f"\n    subjects: {r['subjects']}" if r["subjects"] else "")
            )
    return 0 if all(r["status"] not in ("error", "not configured") for r in rows) else 1


def _each_transmitter(
    args: argparse.Namespace,
    receiver: SsfReceiver,
    act: Callable[[Transmitter], Awaitable[int]],
    refused: Callable[[Transmitter, Exception], None],
) -> int:
    """``act`` for each transmitter the command names (every one without ``--transmitter``), on
    one event loop: what it returns, and each one that raised (told to ``refused``, then the
    next), counts as failures; the exit status, 1 if any."""
    failed = 0

    async def run() -> None:
        nonlocal failed
        for t in receiver.settings.transmitters:
            if args.transmitter and t.name != args.transmitter:
                continue
            try:
                failed += await act(t)
            except Exception as e:  # noqa: BLE001 - each failure is reported, then the next
                failed += 1
                refused(t, e)

    try:
        anyio.run(run)
    finally:
        receiver.store.db.close()
    return 1 if failed else 0


def cmd_configure(args: argparse.Namespace) -> int:
    from bastion.signals.ssf import StreamNotUpdated

    receiver = _receiver(args)
    actor = cli_actor()

    async def configure(t: Transmitter) -> int:
        try:
            done = await receiver.configure(t, actor)
        except StreamNotUpdated as e:
            # Recorded by configure: the stream is used as it is, and in error.
            print(f"{t.name}: {e}", file=sys.stderr)
            return 1
        print(f"{t.name}: stream {done.stream['stream_id']} configured; verification asked")
        if done.changed:
            print(f"{t.name}: updated at the transmitter: " + "; ".join(done.changed))
        return 0

    def refused(t: Transmitter, e: Exception) -> None:
        message = f"stream not configured: {e}"[:500]
        receiver.store.save_stream(t.name, "error", message, forget_verification=True, actor=actor)
        print(f"{t.name}: {message}", file=sys.stderr)

    return _each_transmitter(args, receiver, configure, refused)


def cmd_subjects_status(args: argparse.Namespace) -> int:
    receiver = _receiver(args)
    try:
        rows = [
            {**row.__dict__}
            for t in receiver.settings.transmitters
            if not args.transmitter or t.name == args.transmitter
            for row in receiver.store.subjects(t.name).values()
        ]
    finally:
        receiver.store.db.close()
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(
                f"{r['transmitter']}  {r['state']}  {r['subject_key']}  user={r['username']}"
                f"  stream={r['stream_id']}  updated={_when(r['updated_at'])}\n    {r['detail']}"
            )
    return 0 if all(r["state"] == "added" for r in rows) else 1


def cmd_subjects_sync(args: argparse.Namespace) -> int:
    receiver = _receiver(args)
    actor = cli_actor()

    async def sync(t: Transmitter) -> int:
        done = await receiver.sync_subjects(t, actor)
        summary = done.summary(receiver.store.subjects(t.name))
        receiver.store.note_subjects(t.name, summary)
        print(f"{t.name}: {done.added} added, {done.removed} removed; {summary}")
        for failure in done.failed:
            print(f"{t.name}: {failure}", file=sys.stderr)
        return len(done.failed)

    def refused(t: Transmitter, e: Exception) -> None:
        print(f"{t.name}: subjects not brought in step: {e}"[:500], file=sys.stderr)

    return _each_transmitter(args, receiver, sync, refused)


def remove_unlinked(args: argparse.Namespace, released: list[tuple[str, str]]) -> list[str]:
    """After ``bastion users unlink`` released the accounts ``released`` ((provider, sub)):
    take each off the stream of every transmitter whose ``linked_accounts`` names its provider,
    now rather than at the server's next round. What was done, a line per account and
    transmitter, to show; a failure is said and left to the server's rounds, never raised (the
    unlink stands)."""
    try:
        config = ServerConfig.load(args.config)
        ssf = (config.signals or {}).get("ssf") or {}
        providers = {
            t.get("linked_accounts") for t in ssf.get("transmitters", []) if isinstance(t, dict)
        }
        if not any(provider in providers for provider, _ in released):
            return []
        receiver = _receiver(args)
    except Exception as e:  # noqa: BLE001 - the server's rounds remove them
        return [f"signals: the accounts were not taken off the streams now ({e}); the server's"
                " next round of subjects does it"]  # fmt: skip
    actor = cli_actor()
    said: list[str] = []

    async def run() -> None:
        for provider, sub in released:
            for t in receiver.settings.transmitters:
                if t.linked_accounts == provider:
                    key = f"iss_sub:{t.linked_issuer}|{sub}"
                    said.append(f"{key}: {await receiver.change_subject(t, key, actor)}")

    try:
        anyio.run(run)
    finally:
        receiver.store.db.close()
    return said


def register_subjects(commands: argparse._SubParsersAction) -> None:
    """``subjects status|sync`` under ``bastion signals`` (`bastion.signals.commands`)."""
    subjects = commands.add_parser(
        "subjects", help="the subjects bastion adds to its streams (SSF 1.0 §8.1.3)"
    )
    actions = subjects.add_subparsers(dest="subjects_command", required=True)
    for name, func, help_text in (
        ("status", cmd_subjects_status, "each subject added, or failed to add or remove"),
        ("sync", cmd_subjects_sync, "add and remove the streams' subjects now"),
    ):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--config", help="bastion.toml (default: ./bastion.toml or BASTION_CONFIG)")
        p.add_argument("--database", help="the database (default: the one in bastion.toml)")
        p.add_argument("--transmitter", help="only this transmitter (its name)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="one JSON object per subject")
        p.set_defaults(func=func)


def register_streams(commands: argparse._SubParsersAction) -> None:
    """``streams status|configure`` under ``bastion signals`` (`bastion.signals.commands`)."""
    streams = commands.add_parser("streams", help="the streams with SSF transmitters")
    actions = streams.add_subparsers(dest="streams_command", required=True)
    for name, func, help_text in (
        ("status", cmd_status, "each transmitter's stream: id, status, verification, last error"),
        ("configure", cmd_configure, "read or create each stream, bring it in step, verify it"),
    ):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--config", help="bastion.toml (default: ./bastion.toml or BASTION_CONFIG)")
        p.add_argument("--database", help="the database (default: the one in bastion.toml)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="one JSON object per transmitter")
        else:
            p.add_argument("--transmitter", help="only this transmitter (its name)")
        p.set_defaults(func=func)
