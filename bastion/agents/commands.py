"""CLI: ``bastion agents list|show|update|suspend|resume``: the agent registry (docs/delegation.md)
and the kill switch (docs/signals.md), one command family. Like the other admin commands it
writes to the deployment's database directly (``--database``, or the one in bastion.toml); every
running replica applies the change from the change log: a suspended caller's next call through
the gateway is refused and its streams end, the token endpoint issues it nothing and
introspection calls its tokens inactive; an owner or parent changed is a fact the policy sees."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bastion.agents.identity import AgentError
from bastion.agents.registry import STATUSES, list_agents, show_agent, update_agent
from bastion.audit.actor import cli_actor
from bastion.cli import whole_number
from bastion.facts.store import FactStore
from bastion.names import readable
from bastion.oauth.store import OAuthStore
from bastion.server.config import command_database
from bastion.signals.suspensions import (
    KINDS,
    MAX_SUSPENSION_SECONDS,
    SuspensionError,
    resume,
    stored,
    suspend,
    suspension,
    until,
)


def _store(args: argparse.Namespace) -> FactStore:
    return FactStore.open(command_database(args), role="bastion-cli")


def cmd_suspend(store: FactStore, args: argparse.Namespace) -> int:
    expires = time.time() + args.minutes * 60 if args.minutes else None
    s = suspension(args.kind, args.id, expires)
    if s.kind == "agent" and not args.unregistered and not _known_agent(store, s.id):
        # A mistyped id would be "suspended" and hold nothing while the agent runs on.
        print(
            f"bastion: no agent (OAuth client) {s.id!r} is registered here (bastion agents"
            " list); for an agent another issuer names (a trusted issuer's agent_claims), give"
            " --unregistered",
            file=sys.stderr,
        )
        return 2
    result = suspend(store, s, cli_actor())
    print(f"suspended {s.kind} {s.id} {until(s.expires_at)} (sequence {result.seq})")
    return 0


def _known_agent(store: FactStore, client_id: str) -> bool:
    """Whether ``client_id`` is a registered client, or a client id metadata document's URL
    (fetched when used, never registered)."""
    from bastion.oauth.client_metadata_document import is_client_id_url

    return is_client_id_url(client_id) or OAuthStore(store.db).client(client_id) is not None


def cmd_resume(store: FactStore, args: argparse.Namespace) -> int:
    s = suspension(args.kind, args.id)
    if not any(x == s for x in (suspension(x.kind, x.id) for x in stored(store))):
        print(f"bastion: {s.kind} {s.id!r} is not suspended", file=sys.stderr)
        return 2
    result = resume(store, s, cli_actor())
    print(f"resumed {s.kind} {s.id} (sequence {result.seq})")
    return 0


def cmd_list(store: FactStore, args: argparse.Namespace) -> int:
    if args.suspended:
        # The suspensions in force, of every kind (agents, users, sessions).
        for s in stored(store):
            out = (
                json.dumps(s.to_json())
                if args.json
                else f"{s.kind}\t{readable(s.id)}\t{until(s.expires_at)}"
            )
            print(out)
        return 0
    for a in list_agents(OAuthStore(store.db), store, args.status):
        if args.json:
            print(json.dumps(a.to_json()))
        else:
            status = f"stopped: {a.stopped}" if a.stopped else a.status
            owner = readable(a.owner) if a.owner else "-"
            parent = readable(a.parent) if a.parent else "-"
            print(f"{readable(a.client_id)}\t{readable(a.name)}\t{status}\towner {owner}\t{parent}")
    return 0


def cmd_show(store: FactStore, args: argparse.Namespace) -> int:
    print(json.dumps(show_agent(OAuthStore(store.db), store, args.id).to_json(), indent=2))
    return 0


def cmd_update(store: FactStore, args: argparse.Namespace) -> int:
    parent = None if args.no_parent else (args.parent if args.parent is not None else ...)
    if args.no_parent and args.parent is not None:
        print("bastion: give --parent or --no-parent, not both", file=sys.stderr)
        return 2
    agent, _seq = update_agent(
        OAuthStore(store.db),
        store,
        args.id,
        cli_actor(),
        name=args.name,
        purpose=args.purpose,
        owner=args.owner,
        parent=parent,
    )
    print(json.dumps(agent.to_json(), indent=2))
    return 0


def _run(work):
    def run(args: argparse.Namespace) -> int:
        store = _store(args)
        try:
            return work(store, args)
        except (SuspensionError, AgentError) as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        finally:
            store.close()

    return run


def register(sub: argparse._SubParsersAction) -> None:
    agents = sub.add_parser(
        "agents", help="agents (OAuth clients): list, show, update; the kill switch"
    )
    commands = agents.add_subparsers(dest="agents_command", required=True)
    for name, func, help_text in (
        ("list", cmd_list, "agents with owner, parent and status (--suspended: suspensions)"),
        ("show", cmd_show, "one agent: name, purpose, owner, parent, status"),
        ("update", cmd_update, "change an agent's owner, name, purpose or parent"),
        (
            "suspend",
            cmd_suspend,
            "refuse an agent's, user's or session's every gateway call and new token; end its"
            " streams (the decision API only as its policy says: docs/signals.md)",
        ),
        ("resume", cmd_resume, "lift a suspension"),
    ):
        p = commands.add_parser(name, help=help_text)
        if name in ("show", "update"):
            p.add_argument("id", help="the agent's OAuth client id")
        if name in ("suspend", "resume"):
            p.add_argument("id", help="the OAuth client id, user name or Mcp-Session-Id")
            p.add_argument(
                "--kind", choices=list(KINDS), default="agent", help="what id names (default agent)"
            )
        if name == "suspend":
            p.add_argument(
                "--minutes",
                type=whole_number(MAX_SUSPENSION_SECONDS // 60),
                help="lift it by itself after this long (at most 10 years; leave it out: until"
                " resumed)",
            )
            p.add_argument(
                "--unregistered",
                action="store_true",
                help="suspend an agent id no client registered here has (one a trusted issuer"
                " names); without it such an id is refused as a likely typo",
            )
        if name == "list":
            p.add_argument("--json", action="store_true", help="one JSON object per line")
            p.add_argument("--status", choices=list(STATUSES), help="only agents of this status")
            p.add_argument(
                "--suspended",
                action="store_true",
                help="list the suspensions in force instead (agents, users and sessions)",
            )
        if name == "update":
            p.add_argument("--owner", help="the user who owns the agent")
            p.add_argument("--name", help="the agent's name")
            p.add_argument("--purpose", help="what the agent is for")
            p.add_argument("--parent", help="the client id of the agent's parent")
            p.add_argument("--no-parent", action="store_true", help="the agent has no parent")
        p.add_argument(
            "--database",
            help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)",
        )
        p.add_argument("--config", help="bastion.toml")
        p.set_defaults(func=_run(func))
