"""CLI: ``bastion serve``, ``bastion keys``, ``bastion facts`` and ``bastion policy push|versions|rollback``.

The admin commands work on a running server (``--url`` and ``--api-key``, or ``BASTION_URL`` and
``BASTION_API_KEY``) or directly on the local store (``--database``, or the one in bastion.toml).
Writes to the local store go through the change log, so running servers pick them up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, TextIO

from bastion import atomic_files, untrusted_json
from bastion.audit.actor import cli_actor
from bastion.cli import whole_number
from bastion.facts.model import FactError, format_fact
from bastion.facts.store import FactStore, StoredFact, epoch
from bastion.policy.errors import PolicyError
from bastion.server.config import (
    MAX_PORT,
    ConfigError,
    ServerConfig,
    command_database,
    environment_value,
)
from bastion.server.keys import SCOPES
from bastion.signals.suspensions import apply_facts
from bastion.untrusted_json import MAX_INTEGER

# -- helpers -----------------------------------------------------------------------------------


def _fail(message: str) -> int:
    print(f"bastion: {message}", file=sys.stderr)
    return 2


def _parse_fact(text: str, *, pattern: bool = False) -> tuple:
    """A fact or pattern in Polar text, e.g. ``has_role(User{"alice"}, "admin", Org{"acme"})``."""
    from bastion.facts.model import check_fact
    from bastion.policy.parser import parse_fact

    try:
        return check_fact(parse_fact(text), pattern=pattern)
    except PolicyError as e:
        raise FactError(f"{text!r} is not a fact: {e}") from None


def _expiry(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return epoch(seconds)
    try:
        return epoch(datetime.fromisoformat(text))
    except ValueError:
        raise FactError(
            f"--expires-at {text!r}: give epoch seconds or an ISO time with a zone"
            " (2026-12-01T18:00:00+00:00)"
        ) from None


class Progress:
    """Counts on stderr, at most a few times a second."""

    def __init__(self, verb: str, total: int | None = None, unit: str = "facts") -> None:
        self.verb, self.total, self.unit = verb, total, unit
        self.done = 0
        self._last = 0.0
        self._live = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._live and now - self._last > 0.25:
            self._last = now
            self._show("\r")

    def _show(self, end: str) -> None:
        of = f"/{self.total}" if self.total else ""
        print(f"{end}{self.verb} {self.done}{of} {self.unit}", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self._show("\r" if self._live else "")
        print(file=sys.stderr)


def _config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.load(getattr(args, "config", None))


def _remote(args: argparse.Namespace):
    """A `Client` when a server URL is given, else None (use the local store)."""
    url = args.url or environment_value(os.environ, "BASTION_URL")
    if not url:
        return None
    key = args.api_key or environment_value(os.environ, "BASTION_API_KEY")
    if not key:
        raise ConfigError("give --api-key (or BASTION_API_KEY) with --url")
    from bastion.client import Client

    return Client(url, key)


def _local_store(args: argparse.Namespace) -> FactStore:
    return FactStore.open(command_database(args))


def _validator(store: FactStore):
    """Checks facts against the policy in the store, as the server does."""
    from bastion.decide import Authorizer

    authz = Authorizer("")
    policy = store.policy()
    if policy is not None:
        authz.load_policy(policy.text, source=policy.source)
    return authz.facts.validate


def _target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running server (or BASTION_URL)")
    parser.add_argument(
        "--api-key",
        help="an API key for --url; other users of the machine see it in ps: prefer BASTION_API_KEY",
    )
    parser.add_argument(
        "--database", help="the local store: SQLite path or postgresql:// URL (or BASTION_DATABASE)"
    )
    parser.add_argument("--config", help="bastion.toml to read the database from")


def _subcommands(sub: argparse._SubParsersAction, name: str, help: str) -> Any:
    """The sub-command group ``name``, created or, if another module made it, extended."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True)


# -- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bastion.redaction import safe_url
    from bastion.server.access_log import redact_access_log
    from bastion.server.app import create_app
    from bastion.server.log_lines import configure_logging
    from bastion.server.tls import tls_options

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "database": args.database,
            "policy_file": args.policy_file,
            "tls_certificate": args.tls_cert,
            "tls_key": args.tls_key,
        }.items()
        if v is not None
    }
    config = ServerConfig.load(args.config, overrides=overrides)
    tls = tls_options(config)  # a bad certificate stops the start, before anything is opened
    configure_logging(config.log_level)
    redact_access_log()
    app = create_app(config)
    if not config.admin_key and not app.state.keys.list():
        print(
            "bastion: no API keys yet; create the first with:\n"
            f"  bastion keys create --database {safe_url(config.database)} --name admin --scope admin",
            file=sys.stderr,
        )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        # The gateway ends its open SSE streams on SIGINT/SIGTERM; anything else still open
        # after this many seconds is cut, so a stop never hangs on a client.
        timeout_graceful_shutdown=10,
        **connection_limits(config, app),
        **tls,
    )
    return 0


def connection_limits(config: ServerConfig, app: Any = None) -> dict[str, Any]:
    """uvicorn's options for slow clients, many clients and proxies (docs/security.md); with the
    application, its decisions and gateway calls answered in the protocol when they can be
    (docs/operations.md, "Decisions answered in the protocol")."""
    from bastion.server.connections import bounded_http_protocol
    from bastion.server.direct import DirectDecisions
    from bastion.server.direct_gateway import DirectGateway

    direct = DirectDecisions(app) if app is not None and config.direct_decisions else None
    gateway = (
        DirectGateway(app)
        if app is not None and config.direct_gateway and app.state.gateway is not None
        else None
    )
    return {
        "http": bounded_http_protocol(
            config.header_timeout,
            config.max_header_bytes,
            direct,
            gateway,
            app.state.body_limits if app is not None else None,
            linger_timeout=config.linger_timeout,
            max_linger_bytes=config.max_linger_bytes,
            allowed_hosts=config.host_allowlist(),
            cross_origin=app.state.cross_origin if app is not None else None,
        ),
        "limit_concurrency": config.max_connections,
        "timeout_keep_alive": config.keep_alive_timeout,
        # Only the proxies named may say who the client is; uvicorn would otherwise trust
        # X-Forwarded-For from any client on 127.0.0.1 (or FORWARDED_ALLOW_IPS).
        "proxy_headers": config.proxy_headers,
        "forwarded_allow_ips": config.forwarded_allow_ips if config.proxy_headers else "",
    }


# -- keys --------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        with client:
            created = client.create_key(args.name, args.scope, args.expires_in)
        key, record = created["key"], created
    else:
        from bastion.server.keys import KeyStore, check_new_key

        check_new_key(args.name, args.scope, args.expires_in)  # before the store is made
        store = _local_store(args)
        try:
            key, api_key = KeyStore(store.db).create(
                args.name, args.scope, expires_in=args.expires_in, created_by=cli_actor()
            )
        finally:
            store.close()
        record = api_key.to_json()
    print(key)
    print(
        f"created key {record['id']} ({args.name}; scopes: {' '.join(record['scopes'])});"
        " it is shown only now",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        with client:
            keys = client.list_keys()
    else:
        from bastion.server.keys import KeyStore

        store = _local_store(args)
        try:
            keys = [k.to_json() for k in KeyStore(store.db).list()]
        finally:
            store.close()
    for k in keys:
        state = "revoked" if k["revoked_at"] else "active"
        if not k["revoked_at"] and k["expires_at"] and k["expires_at"] <= time.time():
            state = "expired"
        print(f"{k['id']}\t{state}\t{k['name']}\t{' '.join(k['scopes'])}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        with client:
            client.revoke_key(args.id)
        ok = True
    else:
        from bastion.server.keys import KeyStore

        store = _local_store(args)
        try:
            ok = KeyStore(store.db).revoke(args.id, actor=cli_actor())
        finally:
            store.close()
    if not ok:
        return _fail(f"no active key {args.id!r}")
    print(f"revoked {args.id}", file=sys.stderr)
    return 0


# -- facts -------------------------------------------------------------------------------------


def cmd_facts_insert(args: argparse.Namespace) -> int:
    facts = [_parse_fact(t) for t in args.fact]
    expires_at = _expiry(args.expires_at)
    client = _remote(args)
    if client is not None:
        with client:
            seq = client.facts.insert_many(facts, expires_at)["sequence"]
    else:
        store = _local_store(args)
        try:
            validate = _validator(store)
            stored = [StoredFact(validate(f), expires_at) for f in facts]
            seq = apply_facts(store, stored, [], cli_actor()).seq
        finally:
            store.close()
    print(f"inserted {len(facts)} fact(s) at sequence {seq}", file=sys.stderr)
    return 0


def cmd_facts_delete(args: argparse.Namespace) -> int:
    patterns = [_parse_fact(t, pattern=True) for t in args.pattern]
    client = _remote(args)
    if client is not None:
        with client:
            r = client.facts.delete_many(patterns)
        print(f"deleted {r['deleted']} fact(s) at sequence {r['sequence']}", file=sys.stderr)
        return 0
    store = _local_store(args)
    try:
        result = store.apply([], patterns, actor=cli_actor())
    finally:
        store.close()
    print(f"deleted {result.deleted} fact(s) at sequence {result.seq}", file=sys.stderr)
    return 0


def cmd_facts_get(args: argparse.Namespace) -> int:
    pattern = _parse_fact(args.pattern, pattern=True) if args.pattern else None
    client = _remote(args)
    if client is not None:
        with client:
            for fact in client.facts.get(pattern):
                print(format_fact(fact))
        return 0
    store = _local_store(args)
    try:
        for f in store.get(pattern):
            print(format_fact(f.fact) + (f"  # expires {f.expires_at}" if f.expires_at else ""))
    finally:
        store.close()
    return 0


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    stream = sys.stdin if path == "-" else open(path)  # noqa: SIM115 - closed below
    try:
        for n, line in enumerate(stream, start=1):
            if line.strip():
                yield n, line
    finally:
        if stream is not sys.stdin:
            stream.close()


def cmd_facts_import(args: argparse.Namespace) -> int:
    """Import JSON lines (one fact each) as one transaction: all of the file or none of it."""
    client = _remote(args)
    if client is not None:
        size = os.path.getsize(args.file) if args.file != "-" else None
        progress = Progress("uploaded", size // 1024 if size else None, "KiB")

        def chunks() -> Iterable[bytes]:
            buf: list[bytes] = []
            for _, line in _read_lines(args.file):
                buf.append(line.encode())
                if len(buf) >= 5000:
                    data = b"".join(buf)
                    progress.add(len(data) // 1024)
                    yield data
                    buf = []
            if buf:
                yield b"".join(buf)

        with client:
            result = client.facts.import_lines(chunks())
        progress.finish()
        print(
            f"imported {result['inserted']} facts at sequence {result['sequence']}", file=sys.stderr
        )
        return 0
    depth = _config(args).max_json_depth
    store = _local_store(args)
    try:
        validate = _validator(store)
        progress = Progress("read")
        facts = []
        for n, line in _read_lines(args.file):
            try:
                obj = untrusted_json.loads(line, max_depth=depth, unique_keys=True)
                f = StoredFact.from_json(obj)
                facts.append(StoredFact(validate(f.fact), f.expires_at))
            except (untrusted_json.JsonRefused, FactError) as e:
                return _fail(f"{args.file}:{n}: {e}; nothing was imported")
            progress.add(1)
        progress.finish()
        print(f"writing {len(facts)} facts in one transaction...", file=sys.stderr)
        result = apply_facts(store, facts, [], cli_actor())
    finally:
        store.close()
    print(f"imported {result.inserted} facts at sequence {result.seq}", file=sys.stderr)
    return 0


def cmd_facts_export(args: argparse.Namespace) -> int:
    if args.file == "-":
        _export(args, sys.stdout)
        return 0
    # Whole or not at all: an export that fails leaves FILE as it was (a file cut at a line
    # boundary would import "successfully" with facts missing). The facts may say who may do
    # what: the file is its owner's only (0600), as the store is.
    try:
        with atomic_files.replacing(args.file, text=True) as out:
            _export(args, out)
    except BaseException:
        print(f"bastion: the export failed; {args.file} was left as it was", file=sys.stderr)
        raise
    return 0


def _export(args: argparse.Namespace, out: TextIO) -> None:
    progress = Progress("exported")
    client = _remote(args)
    if client is not None:
        with client:
            for f in client.facts.export():
                out.write(json.dumps(f.to_json(), separators=(",", ":")) + "\n")
                progress.add(1)
    else:
        store = _local_store(args)
        try:
            for f in store.iter_all():
                out.write(json.dumps(f.to_json(), separators=(",", ":")) + "\n")
                progress.add(1)
        finally:
            store.close()
    progress.finish()


def cmd_facts_snapshot(args: argparse.Namespace) -> int:
    from bastion.facts import snapshot

    store = _local_store(args)
    try:
        origin, count, size = snapshot.take(store, args.file)
    finally:
        store.close()
    print(
        f"wrote {count} facts as of sequence {origin.seq} to {args.file} ({size} bytes)",
        file=sys.stderr,
    )
    return 0


# -- policy push | versions | rollback ---------------------------------------------------------


def cmd_policy_push(args: argparse.Namespace) -> int:
    from bastion.server.api.policy import validate_policy

    with open(args.file) as f:
        text = f.read()
    source = os.path.basename(args.file)
    client = _remote(args)
    if client is not None:
        with client:
            answer = client.put_policy(
                text, source=source, note=args.note or "", strict=args.strict
            )
        for w in answer["warnings"]:
            print(w, file=sys.stderr)
        version = answer["version"]
    else:
        config = _config(args)
        strict = args.strict or config.policy_strict
        try:
            warnings = validate_policy(text, source, config.policy_limits(), strict)
        except PolicyError as e:
            return _fail(f"the policy does not load; nothing changed:\n{e}")
        for w in warnings:
            print(w, file=sys.stderr)
        store = _local_store(args)
        try:
            version, _ = store.put_policy(
                text, source=source, actor=cli_actor(), note=args.note or ""
            )
        finally:
            store.close()
    print(f"policy version {version} is in force", file=sys.stderr)
    return 0


def cmd_policy_versions(args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        with client:
            versions = client.policy_versions()
    else:
        store = _local_store(args)
        try:
            versions = [v.summary() for v in store.policy_versions()]
        finally:
            store.close()
    for v in versions:
        when = datetime.fromtimestamp(v["created_at"]).isoformat(timespec="seconds")
        print(f"{v['version']}\t{when}\t{v['created_by']}\t{v['source']}\t{v['note']}")
    return 0


def cmd_policy_rollback(args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        with client:
            version = client.rollback_policy(args.version)
    else:
        from bastion.server.api.policy import validate_policy

        store = _local_store(args)
        try:
            old = store.policy(args.version)
            if old is None:
                return _fail(f"there is no policy version {args.version}")
            config = _config(args)
            try:
                validate_policy(old.text, old.source, config.policy_limits(), config.policy_strict)
            except PolicyError as e:
                return _fail(f"version {args.version} no longer loads; nothing changed:\n{e}")
            version, _ = store.rollback_policy(args.version, actor=cli_actor())
        finally:
            store.close()
    print(f"version {args.version} is back in force as version {version}", file=sys.stderr)
    return 0


# -- changes prune -----------------------------------------------------------------------------


def cmd_changes_prune(args: argparse.Namespace) -> int:
    store = _local_store(args)
    try:
        removed = store.prune_changes(args.keep)
        head = store.head()
    finally:
        store.close()
    print(f"removed {removed} change-log entries; the log now ends at {head}", file=sys.stderr)
    return 0


# -- registration ------------------------------------------------------------------------------


def _guard(func):
    """Turn this family's refusals (a fact, a key, the server's answer) into one line on stderr
    and exit status 2; a setting, a path or the database is `bastion.cli.main`'s to say."""

    def run(args: argparse.Namespace) -> int:
        import httpx

        from bastion.client import RemoteError, Unanswered

        try:
            return func(args)
        except httpx.TransportError as e:
            return _fail(f"the server cannot be reached, or its answer broke off: {e}")
        except Unanswered as e:
            return _fail(f"the server cannot be reached, or its answer broke off: {e.detail}")
        except RemoteError as e:
            return _fail(f"the server refused: {e.detail} ({e.status} {e.title})")
        except (FactError, LookupError, ValueError) as e:
            return _fail(str(e))

    return run


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the decision service (HTTP)")
    serve.add_argument("--config", help="bastion.toml (default: ./bastion.toml if present)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=whole_number(MAX_PORT, least=0), help="listen port (default 8000)"
    )
    serve.add_argument("--database", help="SQLite path or postgresql:// URL")
    serve.add_argument("--policy-file", help="policy loaded at first start into an empty store")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS (with --tls-key)")
    serve.add_argument("--tls-key", help="the certificate's unencrypted PEM key")
    serve.set_defaults(func=_guard(cmd_serve))

    keys = _subcommands(sub, "keys", "API keys: create, list, revoke")
    p = keys.add_parser("create", help="create an API key; prints it once")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--scope", action="append", required=True, choices=SCOPES, help="repeat for several"
    )
    p.add_argument("--expires-in", type=float, help="seconds until the key expires")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_keys_create))
    p = keys.add_parser("list", help="list keys (never the keys themselves)")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_keys_list))
    p = keys.add_parser("revoke", help="revoke a key by id")
    p.add_argument("id")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_keys_revoke))

    facts = _subcommands(sub, "facts", "facts: insert, delete, get, import, export, snapshot")
    p = facts.add_parser(
        "insert", help='insert facts: has_role(User{"alice"}, "admin", Org{"acme"})'
    )
    p.add_argument("fact", nargs="+")
    p.add_argument("--expires-at", help="epoch seconds or ISO time with a zone")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_facts_insert))
    p = facts.add_parser("delete", help="delete facts matching patterns (_ is a wildcard)")
    p.add_argument("pattern", nargs="+")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_facts_delete))
    p = facts.add_parser("get", help="print facts matching a pattern (all without one)")
    p.add_argument("pattern", nargs="?")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_facts_get))
    p = facts.add_parser("import", help="import JSON lines in one transaction (- for stdin)")
    p.add_argument("file")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_facts_import))
    p = facts.add_parser("export", help="export every live fact as JSON lines")
    p.add_argument("file", nargs="?", default="-")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_facts_export))
    p = facts.add_parser(
        "snapshot",
        help="write a fact snapshot, signed with the database's snapshot key, for replicas to"
        " start from (their fact_snapshot_path)",
    )
    p.add_argument("file")
    p.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    p.add_argument("--config", help="bastion.toml to read the database from")
    p.set_defaults(func=_guard(cmd_facts_snapshot))

    changes = _subcommands(sub, "changes", "the change log that replicas follow")
    p = changes.add_parser(
        "prune", help="drop old change-log entries (replicas further behind reload a snapshot)"
    )
    p.add_argument(
        "--keep",
        type=whole_number(MAX_INTEGER),
        default=100_000,
        help="entries to keep (default 100000)",
    )
    p.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    p.add_argument("--config", help="bastion.toml to read the database from")
    p.set_defaults(func=_guard(cmd_changes_prune))

    policy = _subcommands(sub, "policy", "policy commands")
    p = policy.add_parser("push", help="validate a policy file and put it in force")
    p.add_argument("file")
    p.add_argument("--note", help="why (kept with the version)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse the policy if it has a warning (a predicate nothing defines, a type no"
        " block declares), as 'bastion policy check --strict' does",
    )
    _target_options(p)
    p.set_defaults(func=_guard(cmd_policy_push))
    p = policy.add_parser("versions", help="list stored policy versions")
    _target_options(p)
    p.set_defaults(func=_guard(cmd_policy_versions))
    p = policy.add_parser("rollback", help="put an earlier policy version back in force")
    p.add_argument("version", type=whole_number(MAX_INTEGER))
    _target_options(p)
    p.set_defaults(func=_guard(cmd_policy_rollback))
