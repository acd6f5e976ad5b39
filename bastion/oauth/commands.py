"""``bastion users ...``, ``bastion clients ...`` and ``bastion signing-keys ...``: the admin side
of the authorization server, working on the database named by --database, BASTION_DATABASE or
bastion.toml."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bastion import untrusted_json
from bastion.agents.identity import AgentError
from bastion.audit.actor import cli_actor
from bastion.db import Database
from bastion.oauth.ciba import CIBA_GRANT_TYPE
from bastion.oauth.errors import OAuthError
from bastion.oauth.jwt_bearer import JWT_BEARER_GRANT_TYPE
from bastion.oauth.settings import OAuthSettings, SettingsError
from bastion.oauth.store import Client, KeyRetirementRefused, OAuthStore
from bastion.oauth.token_exchange import TOKEN_EXCHANGE_GRANT_TYPE
from bastion.oauth.users import UserError, change_password, create_user, validate_new_user

if TYPE_CHECKING:
    from bastion.oauth.keys import KeyRing


class CommandError(Exception):
    pass


def _config(args: argparse.Namespace):
    from bastion.server.config import ServerConfig

    return ServerConfig.load(args.config)


def _database(args: argparse.Namespace) -> Database:
    from bastion.server.config import command_database

    return Database(command_database(args))


def _settings(args: argparse.Namespace) -> OAuthSettings:
    config = _config(args)
    if not config.oauth:
        raise CommandError("this command needs the [oauth] table of bastion.toml (give --config)")
    with config.reading("oauth"):
        return OAuthSettings.from_mapping(config.oauth)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise CommandError("the passwords differ")
    return first


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def users_create(args: argparse.Namespace) -> int:
    password = _password(args)
    validate_new_user(args.username, password)  # before the store is made
    store = OAuthStore(_database(args))
    create_user(store, args.username, password, time.time(), actor=cli_actor())
    print(f"created user {args.username}")
    return 0


def users_set_password(args: argparse.Namespace) -> int:
    store = OAuthStore(_database(args))
    if not any(user[0] == args.username for user in store.users()):
        raise CommandError(f"no user {args.username!r}")
    change_password(store, args.username, _password(args), time.time(), actor=cli_actor())
    print(
        f"password of {args.username} changed; their sessions are ended and their grants"
        " revoked (agents must send them through sign-in again)"
    )
    return 0


def users_list(args: argparse.Namespace) -> int:
    for username, created, disabled in OAuthStore(_database(args)).users():
        state = f"disabled {_when(disabled)}" if disabled else "active"
        print(f"{username}\tcreated {_when(created)}\t{state}")
    return 0


def users_disable(args: argparse.Namespace) -> int:
    if not OAuthStore(_database(args)).disable_user(args.username, time.time(), actor=cli_actor()):
        raise CommandError(f"no active user {args.username!r}")
    print(f"disabled {args.username}; their sessions, consents and grants are revoked")
    return 0


def users_enable(args: argparse.Namespace) -> int:
    store = OAuthStore(_database(args))
    state = store.user_state(args.username)
    if state is None:
        raise CommandError(f"no user {args.username!r}")
    if state == "enabled" or not store.enable_user(args.username, actor=cli_actor()):
        raise CommandError(f"user {args.username!r} is not disabled")
    print(
        f"enabled {args.username}; they sign in again, and nothing issued before the disable"
        " (grants, approvals, tokens) comes back"
    )
    return 0


def users_unlink(args: argparse.Namespace) -> int:
    # identity/ and signals/ build on oauth/; the command reaches them only when it runs (the
    # command line composes the rooms, as the server does).
    from bastion.identity.accounts import release_account
    from bastion.signals.stream_commands import remove_unlinked

    released = release_account(_database(args), args.username, actor=cli_actor())
    if not released:
        raise CommandError(f"{args.username!r} is bound to no account of an identity provider")
    print(
        f"released {args.username} from {len(released)} provider account(s); the next person"
        " of a provider whose user_claim names it (signing in, or by a token or an ID-JAG) is"
        " bound to it"
    )
    # Their accounts off the Shared Signals streams now, not at the server's next round.
    for line in remove_unlinked(args, released):
        print(line)
    return 0


def _key_source(args: argparse.Namespace) -> dict:
    """The public keys of a private_key_jwt client: a JWKS file, or a jwks_uri."""
    if args.jwks_file and args.jwks_uri:
        raise CommandError("give --jwks-file or --jwks-uri, not both")
    if args.jwks_file:
        try:
            with open(args.jwks_file, encoding="utf-8") as f:
                return {"jwks": untrusted_json.loads(f.read(), unique_keys=True)}
        except (OSError, ValueError) as exc:
            raise CommandError(f"--jwks-file {args.jwks_file}: {exc}") from None
    if args.jwks_uri:
        return {"jwks_uri": args.jwks_uri}
    return {}


def _introspection_resources(
    given: list[str | None] | None, settings: OAuthSettings
) -> tuple[str, ...]:
    """The resources ``--introspection`` names (each given once per flag), checked; () when
    the flag is not given. A bare ``--introspection`` is refused: a resource server is bound to
    the resources whose tokens it may be told of (docs/oauth.md, "Token introspection")."""
    from bastion.oauth.introspection import (
        IntrospectionResourcesRefused,
        introspection_resources,
    )

    if given is None:
        return ()
    if None in given:
        raise CommandError(
            "--introspection needs the protected resource whose tokens the client may"
            " introspect: --introspection <resource URI> (repeat for several), or"
            " --introspection '*' for every resource"
        )
    try:
        return introspection_resources([uri for uri in given if uri is not None], settings)
    except IntrospectionResourcesRefused as refused:
        raise CommandError(f"--introspection: {refused}") from None


def clients_create(args: argparse.Namespace) -> int:
    from bastion.agents import identity
    from bastion.agents.registry import purpose_problem
    from bastion.facts.store import FactStore
    from bastion.oauth import registration

    settings = _settings(args)
    keys = _key_source(args)
    if keys and args.confidential:
        raise CommandError(
            "--confidential gives a secret; a client with --jwks-file or --jwks-uri has keys"
        )
    confidential = args.confidential or bool(keys)
    grant_types = args.grant_type
    if grant_types is None:
        # A redirect URI is only ever used by authorization_code: asking for one means that grant.
        acts_as_itself = confidential and not args.redirect_uri
        grant_types = (
            ["client_credentials"] if acts_as_itself else ["authorization_code", "refresh_token"]
        )
    elif args.redirect_uri and "authorization_code" not in grant_types:
        raise CommandError(
            "--redirect-uri is used only by the authorization_code grant, and this client would"
            f" have only {grant_types}: add --grant-type authorization_code, or leave out"
            " --redirect-uri"
        )
    methods = {"keys": "private_key_jwt", "secret": "client_secret_basic", "public": "none"}
    method = methods["keys" if keys else "secret" if args.confidential else "public"]
    metadata = {
        "client_name": args.name,
        "redirect_uris": args.redirect_uri or [],
        "grant_types": grant_types,
        "token_endpoint_auth_method": method,
        **keys,
    }
    if args.scope:
        metadata["scope"] = args.scope
    if args.purpose is not None and purpose_problem(args.purpose):
        raise CommandError(purpose_problem(args.purpose))
    values = registration.validate_client_metadata(metadata, settings)
    if args.purpose:
        values["metadata"]["purpose"] = args.purpose
    introspection = _introspection_resources(args.introspection, settings)
    registered = registration.new_client(
        values, source="admin", now=time.time(), introspection_resources=introspection
    )
    if introspection and registered.client.is_public:
        raise CommandError("--introspection needs --confidential, --jwks-file or --jwks-uri")
    db = _database(args)
    store, facts = OAuthStore(db), FactStore(db)
    if args.parent and store.client(args.parent) is None:
        raise CommandError(f"--parent {args.parent!r}: no such client")
    actor = cli_actor()
    with db.transaction():
        store.register_client(registered.client, actor=actor)
        # The administrator who registers an agent names its owner (and parent, for a sub-agent).
        if args.owner:
            identity.set_owner(facts, registered.client.client_id, args.owner, actor)
        if args.parent:
            identity.set_parent(facts, registered.client.client_id, args.parent, actor)
    # The secret (if any) is shown this once; only its digest is stored.
    print(json.dumps(registered.response(), indent=2))
    return 0


def clients_list(args: argparse.Namespace) -> int:
    clients = OAuthStore(_database(args)).clients()
    if args.json:
        rows = [_client_json(c) for c in clients]
        print(json.dumps(rows, indent=2))
        return 0
    for c in clients:
        state = f"revoked {_when(c.revoked_at)}" if c.revoked_at else "active"
        print(
            f"{c.client_id}\t{c.client_name}\t{c.source}\t{c.token_endpoint_auth_method}\t{state}"
        )
    return 0


def _client_json(c: Client) -> dict:
    return {
        "client_id": c.client_id,
        "client_name": c.client_name,
        "source": c.source,
        "token_endpoint_auth_method": c.token_endpoint_auth_method,
        "grant_types": list(c.grant_types),
        "redirect_uris": list(c.redirect_uris),
        "scope": c.scope,
        "may_introspect": c.may_introspect,
        "introspection_resources": list(c.introspection_resources),
        "introspection_kept_at_upgrade": c.introspection_kept_at_upgrade,
        "created_at": c.created_at,
        "revoked_at": c.revoked_at,
    }


def _introspection_line(c: Client) -> str:
    from bastion.oauth.introspection import ALL_RESOURCES

    if not c.introspection_resources:
        return "no"
    if c.introspection_resources == (ALL_RESOURCES,):
        line = f"{ALL_RESOURCES} (every resource's tokens)"
        if c.introspection_kept_at_upgrade:
            line += (
                ": kept from before the upgrade that bound each introspecting client to its"
                " resources; narrow it to the resources this resource server serves: bastion"
                f" clients update {c.client_id} --introspection <resource URI>"
            )
        return line
    return " ".join(c.introspection_resources)


def clients_show(args: argparse.Namespace) -> int:
    c = OAuthStore(_database(args)).client(args.client_id)
    if c is None:
        raise CommandError(f"no client {args.client_id!r}")
    if args.json:
        print(json.dumps(_client_json(c), indent=2))
        return 0
    state = f"revoked {_when(c.revoked_at)}" if c.revoked_at else "active"
    for name, value in (
        ("client_id", c.client_id),
        ("name", c.client_name),
        ("source", c.source),
        ("auth_method", c.token_endpoint_auth_method),
        ("grant_types", " ".join(c.grant_types)),
        ("redirect_uris", " ".join(c.redirect_uris) or "-"),
        ("scope", c.scope or "-"),
        ("introspection", _introspection_line(c)),
        ("created", _when(c.created_at)),
        ("state", state),
    ):
        print(f"{name}\t{value}")
    return 0


def clients_update(args: argparse.Namespace) -> int:
    if args.no_introspection and args.introspection is not None:
        raise CommandError("give --introspection or --no-introspection, not both")
    if not args.no_introspection and args.introspection is None:
        raise CommandError("nothing to change: give --introspection or --no-introspection")
    store = OAuthStore(_database(args))
    client = store.client(args.client_id)
    if client is None or client.revoked_at is not None:
        raise CommandError(f"no active client {args.client_id!r}")
    resources = () if args.no_introspection else None
    if resources is None:
        resources = _introspection_resources(args.introspection, _settings(args))
        if client.is_public:
            raise CommandError(
                f"{args.client_id} is a public client: only a confidential one may introspect"
            )
    if not store.bind_introspection(args.client_id, resources, actor=cli_actor()):
        raise CommandError(f"no active client {args.client_id!r}")
    print(f"{args.client_id}\tintrospection\t{_introspection_line(store.client(args.client_id))}")
    return 0


def clients_revoke(args: argparse.Namespace) -> int:
    if not OAuthStore(_database(args)).revoke_client(
        args.client_id, time.time(), actor=cli_actor()
    ):
        raise CommandError(f"no active client {args.client_id!r}")
    print(f"revoked {args.client_id} and every grant it held")
    return 0


def _key_ring(args: argparse.Namespace) -> KeyRing:
    from bastion.oauth.keys import KeyRing

    settings = _settings(args)
    return KeyRing(
        OAuthStore(_database(args)),
        settings.key_dir,
        retain_seconds=settings.access_token_seconds + settings.leeway_seconds,
        clock=time.time,
    )


def signing_keys_rotate(args: argparse.Namespace) -> int:
    kid = _key_ring(args).rotate(actor=cli_actor())
    print(
        f"new signing key {kid}; the previous key verifies until its tokens expire"
        " (if it may be stolen, retire it now: `bastion signing-keys retire -- KID`)"
    )
    return 0


def signing_keys_retire(args: argparse.Namespace) -> int:
    try:
        revoked = _key_ring(args).retire(args.kid, actor=cli_actor())
    except KeyRetirementRefused as refused:
        raise CommandError(str(refused)) from None
    print(
        f"retired signing key {args.kid}: it is no longer published (jwks.json) nor accepted."
        f" {revoked} access token(s) signed with it (or issued before bastion recorded each"
        " token's key) are revoked and stop working on every replica at their next use; their"
        " clients must get new ones. A resource server that verifies tokens itself drops the"
        " key when it next fetches jwks.json (served with max-age=60)."
    )
    return 0


def signing_keys_list(args: argparse.Namespace) -> int:
    for kid, _public, created, retired in OAuthStore(_database(args)).signing_keys():
        state = f"retired {_when(retired)}" if retired else "signing"
        print(f"{kid}\tcreated {_when(created)}\t{state}")
    return 0


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (CommandError, UserError, SettingsError, OAuthError, AgentError) as error:
            message = error.description if isinstance(error, OAuthError) else str(error)
            print(f"bastion: {message}", file=sys.stderr)
            return 2

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)"
    )
    parser.add_argument("--config", help="bastion.toml (default: ./bastion.toml if present)")


def _introspection_argument(parser: argparse.ArgumentParser) -> None:
    # nargs="?": a bare --introspection (its meaning before resources were bound) is refused
    # with a message that says what to give, not argparse's "expected one argument".
    parser.add_argument(
        "--introspection",
        action="append",
        nargs="?",
        metavar="RESOURCE",
        help="may call /introspect about the tokens of this protected resource (its URI as"
        " [[oauth.resources]] names it; repeat for several), or of every one: '*'",
    )


def register(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("users", help="people who log in at the authorization server")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    for name, func, help_text in (
        ("create", users_create, "create a user (password from a prompt or --password-stdin)"),
        ("set-password", users_set_password, "change a user's password"),
    ):
        p = users_sub.add_parser(name, help=help_text)
        p.add_argument("username")
        p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        _common(p)
        p.set_defaults(func=_guarded(func))
    p = users_sub.add_parser("list", help="list users")
    _common(p)
    p.set_defaults(func=_guarded(users_list))
    p = users_sub.add_parser("disable", help="disable a user and revoke their grants")
    p.add_argument("username")
    _common(p)
    p.set_defaults(func=_guarded(users_disable))
    p = users_sub.add_parser("enable", help="let a disabled user sign in again")
    p.add_argument("username")
    _common(p)
    p.set_defaults(func=_guarded(users_enable))
    p = users_sub.add_parser(
        "unlink",
        help="release a user from the identity-provider accounts (sub) bound to it: sign-in,"
        " trusted issuers' tokens, ID-JAGs",
    )
    p.add_argument("username")
    _common(p)
    p.set_defaults(func=_guarded(users_unlink))

    clients = sub.add_parser("clients", help="OAuth clients (agents) of the authorization server")
    clients_sub = clients.add_subparsers(dest="clients_command", required=True)
    p = clients_sub.add_parser("create", help="register a client; prints its secret once")
    p.add_argument("--name", required=True)
    p.add_argument("--redirect-uri", action="append", help="repeat for several")
    p.add_argument(
        "--grant-type",
        action="append",
        choices=[
            "authorization_code",
            "refresh_token",
            "client_credentials",
            CIBA_GRANT_TYPE,
            TOKEN_EXCHANGE_GRANT_TYPE,
            JWT_BEARER_GRANT_TYPE,
        ],
        help="repeat for several (default: authorization_code + refresh_token; with"
        f" --confidential and no --redirect-uri, client_credentials; {CIBA_GRANT_TYPE}, the"
        " backchannel requests of OpenID CIBA, needs --confidential;"
        f" {TOKEN_EXCHANGE_GRANT_TYPE} lets the client delegate its tokens, docs/delegation.md)",
    )
    p.add_argument(
        "--jwks-file",
        help="private_key_jwt: a JSON Web Key Set file of the client's public keys (preferred)",
    )
    p.add_argument(
        "--jwks-uri", help="private_key_jwt: the https URL where the client publishes its keys"
    )
    p.add_argument(
        "--confidential",
        action="store_true",
        help="give the client a secret (client_secret_basic); keys are preferred",
    )
    p.add_argument("--owner", help="the user who owns this agent (else: the first to consent)")
    p.add_argument("--parent", help="the client id of the agent this sub-agent acts under")
    p.add_argument("--purpose", help="what the agent is for, in a sentence")
    p.add_argument("--scope", help="space-separated scopes the client may receive")
    _introspection_argument(p)
    _common(p)
    p.set_defaults(func=_guarded(clients_create))
    p = clients_sub.add_parser("list", help="list clients (never their secrets)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=_guarded(clients_list))
    p = clients_sub.add_parser("show", help="one client: what it is and may do (never its secret)")
    p.add_argument("client_id")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=_guarded(clients_show))
    p = clients_sub.add_parser(
        "update", help="change the protected resources whose tokens a client may introspect"
    )
    p.add_argument("client_id")
    _introspection_argument(p)
    p.add_argument(
        "--no-introspection", action="store_true", help="the client may no longer call /introspect"
    )
    _common(p)
    p.set_defaults(func=_guarded(clients_update))
    p = clients_sub.add_parser("revoke", help="revoke a client and every grant it holds")
    p.add_argument("client_id")
    _common(p)
    p.set_defaults(func=_guarded(clients_revoke))

    keys = sub.add_parser("signing-keys", help="the keys that sign access tokens")
    keys_sub = keys.add_subparsers(dest="signing_keys_command", required=True)
    p = keys_sub.add_parser("rotate", help="start signing with a new key")
    _common(p)
    p.set_defaults(func=_guarded(signing_keys_rotate))
    p = keys_sub.add_parser(
        "retire",
        help="withdraw a key that no longer signs at once (its private half may be stolen):"
        " unpublished, and every token it signed revoked",
    )
    p.add_argument("kid", help="the key's kid, as `bastion signing-keys list` shows it")
    _common(p)
    p.set_defaults(func=_guarded(signing_keys_retire))
    p = keys_sub.add_parser("list", help="list signing keys (public information only)")
    _common(p)
    p.set_defaults(func=_guarded(signing_keys_list))
