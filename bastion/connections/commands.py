"""CLI: ``bastion connections list|revoke|rekey|new-key`` (docs/identity.md, "Per-user
credentials toward upstream servers").

Like the other admin commands it works on the deployment's database (``--database``, or the one
in bastion.toml) with its configuration (the upstreams with ``auth = "per_user"``, and the
``[oauth]`` key directory, or ``BASTION_CONNECTION_KEYS``, for the keys). ``revoke`` also
revokes the tokens at the upstream's authorization server when it offers RFC 7009 revocation.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

import anyio

from bastion.audit.actor import cli_actor


class CommandError(Exception):
    """A mistake the person running the command can fix; the message says how."""


def _open(args: argparse.Namespace, keys_needed: bool = True):
    """The deployment's connections. Without ``keys_needed`` (list, revoke), a key file gone
    missing under stored connections is said, and the connections are worked on without it:
    that is how an administrator gives them up (`ConnectionKeysMissing` says so)."""
    from cryptography.fernet import Fernet

    from bastion import outbound_proxy
    from bastion.connections.sealing import ConnectionKeysError, ConnectionKeysMissing, Sealer
    from bastion.connections.service import Connections, connections_from_config
    from bastion.connections.store import ConnectionStore
    from bastion.db import Database
    from bastion.gateway.config import GatewayConfig
    from bastion.oauth.settings import OAuthSettings
    from bastion.server.config import ServerConfig, command_database

    config = ServerConfig.load(args.config)
    # `revoke` reaches the upstream's authorization server: through the server's proxy too.
    outbound_proxy.configure(config.outbound_proxy())
    with config.reading("gateway"):
        gateway = GatewayConfig.from_mapping(config.gateway or {})
    with config.reading("oauth"):
        oauth = OAuthSettings.from_mapping(config.oauth)
    per_user = {u.name: (u.url, u.oauth) for u in gateway.upstreams if u.auth == "per_user"}
    if not per_user:
        raise CommandError(
            f'{config.named} has no upstream with auth = "per_user"; give --config the file'
            " that has one"
        )
    db = Database(command_database(args, config), role="bastion-cli")
    try:
        # The key file is the server's to make (`load_keys`).
        return connections_from_config(db, per_user, oauth.key_dir, oauth.issuer, make_keys=False)
    except ConnectionKeysMissing as e:
        if keys_needed:
            db.close()
            raise CommandError(str(e)) from None
        print(
            f"bastion: {e.path} is missing: the stored tokens cannot be opened, so a"
            " connection revoked now is not revoked at the upstream",
            file=sys.stderr,
        )
        # A key of this run only, never written: it opens nothing stored.
        keys = Sealer([Fernet.generate_key()])
        return Connections(ConnectionStore(db), keys, per_user, oauth.issuer)
    except ConnectionKeysError as e:
        db.close()
        raise CommandError(str(e)) from None


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    connections = _open(args, keys_needed=False)
    try:
        found = connections.listed(args.user, args.upstream)
    finally:
        connections.store.db.close()
    for c in found:
        if args.json:
            print(json.dumps(c.to_json()))
        else:
            print(
                f"{c.subject}\t{c.upstream}\tsince {_when(c.created_at)}"
                f"\taccess token until {_when(c.expires_at)}\t{c.scope or '-'}"
            )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    connections = _open(args, keys_needed=False)
    try:
        done = anyio.run(lambda: connections.revoke(args.user, args.upstream, actor=cli_actor()))
    finally:
        connections.store.db.close()
    if not done:
        print(f"bastion: {args.user} has no connection to {args.upstream}", file=sys.stderr)
        return 2
    print(f"revoked {args.user}'s connection to {args.upstream}")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    connections = _open(args)
    try:
        count = connections.rekey()
    finally:
        connections.store.db.close()
    print(f"re-sealed {count} connection(s) under the first key")
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    from cryptography.fernet import Fernet

    print(Fernet.generate_key().decode())
    return 0


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)"
    )
    parser.add_argument(
        "--config", help="bastion.toml (its per_user upstreams and [oauth] key_dir)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("connections", help="users' connections to upstream MCP servers")
    commands = parser.add_subparsers(dest="connections_command", required=True)

    p = commands.add_parser("list", help="the connections (never their tokens)")
    p.add_argument("--user", help="only this user's")
    p.add_argument("--upstream", help="only this upstream's")
    p.add_argument("--json", action="store_true", help="one JSON connection per line")
    _common(p)
    p.set_defaults(func=_guarded(cmd_list))

    p = commands.add_parser("revoke", help="revoke a user's connection, here and upstream")
    p.add_argument("user")
    p.add_argument("upstream")
    _common(p)
    p.set_defaults(func=_guarded(cmd_revoke))

    p = commands.add_parser("rekey", help="seal every connection again under the first key")
    _common(p)
    p.set_defaults(func=_guarded(cmd_rekey))

    p = commands.add_parser("new-key", help="print a new connection key (to put first)")
    p.set_defaults(func=_guarded(cmd_new_key))
