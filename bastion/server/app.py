"""The ASGI application: the `/v1` API, health, metrics, OpenAPI and (when present) OAuth."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

# anyio's asyncio backend, which anyio would import at its first call on the event loop (the
# replica's first load, 23 ms): imported here, with the application, before the loop runs.
import anyio._backends._asyncio  # noqa: F401
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bastion import outbound_proxy, tls
from bastion.audit.buffered import flush_at_stop, flush_forever
from bastion.audit.checkpoints import keep_chains_forever
from bastion.audit.journal import open_journal
from bastion.audit.retention import prune_forever
from bastion.cors import CrossOriginRoutes, oauth_cross_origin
from bastion.db import (
    Database,
    DatabaseUnavailable,
    StorageFull,
    file_refused,
    storage_full,
    storage_full_report,
)
from bastion.delegation.labels import task_wiper
from bastion.facts.retention import purge_expired_forever
from bastion.facts.store import FactStore
from bastion.gateway.jsonrpc import INTERNAL_ERROR, RpcError
from bastion.policy.errors import PolicyError
from bastion.server import api, problems
from bastion.server.api.decisions import DecisionLog
from bastion.server.api.policy import log_policy_warnings, validate_policy
from bastion.server.config import ConfigError, ServerConfig
from bastion.server.keys import KeyStore
from bastion.server.metrics import Metrics, metrics_endpoint
from bastion.server.openapi import openapi_document
from bastion.server.problems import Problem, problem_handler
from bastion.server.replica import Replica
from bastion.server.request_limits import BodyLimit, BodyLimits, RequestBodyLimits
from bastion.server.routing import one_route_per_path

if TYPE_CHECKING:
    from bastion.audit.decision_log import DecisionStore

log = logging.getLogger("bastion.server")


async def healthz(request: Request) -> JSONResponse:
    """Alive: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Ready: the facts are loaded, the change log is being followed, and this replica confirmed
    it was current within ``max_staleness_seconds``; otherwise 503 and the reason."""
    replica: Replica = request.app.state.replica
    reason = replica.unready_reason()
    body = {
        "ready": reason is None,
        "sequence": replica.applied,
        "lag": replica.lag,
        "policy_version": replica.policy_version,
        "facts": replica.authz.facts.held,
        "staleness_seconds": round(replica.staleness, 3),
    }
    if reason is not None:
        body["reason"] = reason
    if full := storage_full_report():
        # Shown, not counted against readiness: decisions and reads need no write, and every
        # replica on the same database would be taken out alike (docs/operations.md).
        body["storage"] = full
    signals = request.app.state.signals
    if signals is not None:
        # Shown, not counted against readiness: a transmitter that is down makes no replica
        # unable to decide (docs/signals.md).
        body["ssf_streams"] = dict(signals.store.seen)
    return JSONResponse(body, status_code=200 if reason is None else 503)


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 for a request that needed the database while it is unavailable: problem+json on the
    API, Oso Cloud's form on its API, the OAuth error shape elsewhere (RFC 6749
    ``temporarily_unavailable``)."""
    if isinstance(exc, StorageFull):  # its message says what to do
        title, detail = "Storage full", str(exc)
    else:
        title, detail = "Database unavailable", f"the database is unavailable, retry: {exc}"
    retry = {"Retry-After": "1"}
    if request.url.path.startswith("/v1/"):
        response = Problem(503, title, detail).response()
        response.headers.update(retry)
        return response
    if api.oso_cloud.serves(request.url.path):
        return api.oso_cloud.error(503, detail, retry)
    body = {"error": "temporarily_unavailable", "error_description": detail}
    headers = {**retry, **problems.NOT_A_PAGE, "Cache-Control": "no-store"}
    return JSONResponse(body, status_code=503, headers=headers)


async def file_unwritable(request: Request, exc: Exception) -> Response:
    """A file this request writes (the first signing key, made at the first token) refused for
    want of room: 503 as for the database's storage; any other OSError is the 500 of
    `internal_error`."""
    assert isinstance(exc, OSError)
    if not storage_full(exc):
        raise exc
    return await database_unavailable(request, file_refused(exc))


async def openapi(request: Request) -> Response:
    return Response(_openapi_body(), media_type="application/json")


@functools.cache
def _openapi_body() -> bytes:
    """`openapi_document` as a JSON response's body, encoded once per process: it is some
    250 KB, anyone may ask for it, and encoding it took the event loop milliseconds a request."""
    return JSONResponse(openapi_document()).body


async def http_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = {
        404: f"there is no route {request.url.path}; see /v1/openapi.json",
        405: f"{request.method} is not allowed on {request.url.path}; see /v1/openapi.json",
    }.get(exc.status_code, str(exc.detail))
    if api.authzen.serves(request.url.path):
        response = api.authzen.error(exc.status_code, detail)
    elif api.oso_cloud.serves(request.url.path):
        response = api.oso_cloud.error(exc.status_code, detail)
    else:
        response = Problem(exc.status_code, str(exc.detail), detail).response()
    # The Allow header of a 405, among others.
    response.headers.update(exc.headers or {})
    return response


# What an unexpected exception's 500 says, on every route family.
FAILED = "the server failed to answer this request; the failure is in its log"


async def internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected exception: a 500 in the form of the route family, naming no internals.

    Starlette raises the exception again after this answer, and uvicorn logs it with its
    traceback.
    """
    detail = FAILED
    gateway = request.app.state.gateway
    if gateway is not None and request.url.path.startswith(gateway.PREFIXES):
        response = JSONResponse(RpcError(INTERNAL_ERROR, detail).body(None), status_code=500)
    elif api.authzen.serves(request.url.path):
        # AuthZEN's error form: the status and an error message string.
        response = api.authzen.failure(request, detail)
    elif api.oso_cloud.serves(request.url.path):
        response = api.oso_cloud.error(500, detail)
    elif request.url.path in request.app.state.oauth_paths:
        # OAuth clients read "error" (RFC 6749 §4.1.2.1 names this one server_error).
        body = {"error": "server_error", "error_description": detail}
        response = JSONResponse(body, status_code=500, headers={"Cache-Control": "no-store"})
    else:
        response = Problem(500, "Internal server error", detail).response()
    response.headers.update(problems.NOT_A_PAGE)
    # uvicorn closes the connection after an exception: say so, so no client reuses it.
    response.headers["connection"] = "close"
    return response


def oauth_paths(oauth) -> frozenset[str]:
    """The paths of the authorization server's endpoints and pages (none without [oauth])."""
    return frozenset(route.path for route in oauth.routes()) if oauth is not None else frozenset()


def body_limits(config: ServerConfig, oauth, gateway, signals=None) -> BodyLimits:
    """How large a request body each route family may send, and how a refusal is said there."""
    limits = [
        BodyLimit(
            config.max_import_bytes, "max_import_bytes", problems.refusal, path="/v1/facts/import"
        ),
        # AuthZEN's errors are a message string (bastion.server.api.authzen).
        BodyLimit(config.max_body_bytes, "max_body_bytes", _authzen_refusal, prefix="/access/"),
        BodyLimit(
            config.max_body_bytes,
            "max_body_bytes",
            _authzen_refusal,
            prefix=api.authzen.METADATA_PATH,
        ),
        # Oso Cloud's errors are {"message": ...} (bastion.server.api.oso_cloud).
        BodyLimit(
            config.max_body_bytes,
            "max_body_bytes",
            api.oso_cloud.refusal,
            prefix=api.oso_cloud.PREFIX,
        ),
    ]
    if oauth is not None:
        from bastion.oauth.errors import InvalidRequest

        def oauth_refusal(status: int, detail: str) -> tuple[str, bytes]:
            return "application/json", json.dumps(InvalidRequest(detail).as_dict()).encode()

        # A path with a parameter (/bc-approve/{request_id}) is limited below its fixed part.
        limits += [
            BodyLimit(config.max_oauth_body_bytes, "max_oauth_body_bytes", oauth_refusal, path=p)
            if "{" not in p
            else BodyLimit(
                config.max_oauth_body_bytes,
                "max_oauth_body_bytes",
                oauth_refusal,
                prefix=p.split("{", 1)[0],
            )
            for p in sorted(oauth_paths(oauth))
        ]
        # The forms of the pages under the issuer are of the same family: the approval pages'
        # answers (bastion.approvals.pages), the connection pages' (bastion.connections.pages)
        # and an alert's acknowledgement (bastion.signals.alert_pages).
        limits += [
            BodyLimit(
                config.max_oauth_body_bytes,
                "max_oauth_body_bytes",
                oauth_refusal,
                prefix=f"{oauth.settings.issuer_path}/{pages}/",
            )
            for pages in ("approvals", "connections", "alerts")
        ]
    if gateway is not None:
        from bastion.gateway.jsonrpc import INVALID_REQUEST, RpcError

        def rpc_refusal(status: int, detail: str) -> tuple[str, bytes]:
            return "application/json", json.dumps(
                RpcError(INVALID_REQUEST, detail).body(None)
            ).encode()

        limits += [
            BodyLimit(
                gateway.config.max_body_bytes, "gateway.max_body_bytes", rpc_refusal, prefix=p
            )
            for p in gateway.PREFIXES
        ]
    if signals is not None:
        from bastion.signals.ssf import PUSH_PATH

        def set_refusal(status: int, detail: str) -> tuple[str, bytes]:
            # RFC 8935 §2.4's error shape.
            return "application/json", json.dumps(
                {"err": "invalid_request", "description": detail}
            ).encode()

        limits.append(
            BodyLimit(
                signals.settings.max_body_bytes,
                "signals.ssf.max_body_bytes",
                set_refusal,
                path=PUSH_PATH,
            )
        )
    return BodyLimits(BodyLimit(config.max_body_bytes, "max_body_bytes", problems.refusal), limits)


def _authzen_refusal(status: int, detail: str) -> tuple[str, bytes]:
    return "text/plain; charset=utf-8", detail.encode()


def _bootstrap_policy(store: FactStore, config: ServerConfig) -> None:
    """Store the configured policy file when the store has no policy yet."""
    if not config.policy_file or store.policy() is not None:
        return
    path = Path(config.policy_file)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"policy_file {path}: {e}") from None
    try:
        warnings = validate_policy(text, str(path), config.policy_limits(), config.policy_strict)
    except PolicyError as e:
        raise ConfigError(f"policy_file {path} does not load:\n{e}") from None
    stored = store.put_policy(
        text, source=path.name, actor="bastion.toml", note="policy_file at start", only_if_none=True
    )
    if stored is not None:
        log_policy_warnings("policy_file", warnings)


def _oauth_server(config: ServerConfig, db: Database):
    """The OAuth authorization server from the [oauth] table, or None.

    This is the single place where the authorization server plugs in.
    """
    if not config.oauth:
        if config.identity:
            raise ConfigError(
                "[identity] needs an [oauth] table: people log in to bastion's authorization server"
            )
        return None
    try:
        from bastion.oauth import AuthorizationServer
    except ImportError as e:
        raise ConfigError(
            f"{config.named} has an [oauth] table but the authorization server is unavailable: {e}"
        ) from None
    from bastion.oauth.settings import OAuthSettings

    with config.reading("oauth"):
        settings = OAuthSettings.from_mapping(config.oauth)
    server = AuthorizationServer(settings, db, max_json_depth=config.max_json_depth)
    from bastion.oauth.keys import SigningKeyError

    try:
        server.keys.check()
    except SigningKeyError as e:
        raise ConfigError(str(e)) from None
    if config.identity:
        from bastion.identity.oidc_login import compose

        with config.reading("identity"):
            compose(server, config.identity, os.environ)
    try:  # at start, before the event loop runs (docs/operations.md, "Loaded at start")
        server.read_deployment_secrets()
    except (OSError, ValueError) as e:
        raise ConfigError(f"oauth.key_dir: {e}") from None
    return server


def _load_trust_stores(oauth) -> None:
    """The trust stores of every TLS connection bastion makes (`bastion.tls.load_trust_stores`),
    at start, before the event loop runs: made at a first fetch, each held the loop (tens of
    milliseconds; up to 218 ms seen under load)."""
    ca_file = oauth.settings.client_metadata.ca_file if oauth is not None else None
    try:
        tls.load_trust_stores([ca_file] if ca_file else [])
    except (OSError, ssl.SSLError) as e:
        store = (
            f"oauth.client_metadata.ca_file {ca_file}" if ca_file else "the system's trust store"
        )
        raise ConfigError(f"{store}: cannot be read as PEM CA certificates: {e}") from None


# -- MCP gateway (issue 5): mounted when bastion.toml has a [gateway] table ---------------------
def _gateway(config: ServerConfig, oauth, replica: Replica, approvals):
    if not config.gateway:
        return None
    from bastion.gateway.mount import gateway_from_config

    return gateway_from_config(
        config,
        oauth,
        lambda: replica.authz,
        lambda: replica.stale,
        lambda: replica.heard_not_applied(config.consistency_timeout),
        approvals=approvals,
        suspensions=replica.suspensions,
        facts_in_force=replica.in_force,
        position=lambda: (replica.policy_version, replica.applied),
    )


def _delegation(oauth, gateway, replica: Replica) -> None:
    """Token exchange (docs/delegation.md) asks the policy about the MCP server a resource is,
    as the gateway maps it, and records each decision among the gateway's decision records;
    without a gateway every exchange is refused."""
    from bastion.facts.model import Entity
    from bastion.oauth.token_exchange import DelegationPolicy

    servers = {gateway.resource(name): Entity("McpServer", name) for name in gateway.upstreams}
    oauth.delegation = DelegationPolicy(
        authorizer=lambda: replica.authz,
        server_of=servers.get,
        posture=gateway.posture,
        facts_stale=lambda: replica.stale,
        records=gateway.records,
        position=lambda: (replica.policy_version, replica.applied),
    )


def _behavior(config: ServerConfig, gateway):
    """The gateway's behaviour counters ([signals.behavior]; shared through gateway.redis_url)."""
    from bastion.signals.behavior import behavior_from_config

    return behavior_from_config(
        config.signals.get("behavior", {}),
        gateway.config.redis_url,
        gateway.config.redis_prefix,
        gateway.config.redis_timeout_seconds,
    )


def _agent_counters(config: ServerConfig, gateway):
    """The behaviour counters agent events feed (`bastion.server.api.oso_agents`), and the
    keyed digest of tool arguments: the gateway's when there is one, so both count alike;
    otherwise this process's own ([signals.behavior])."""
    if gateway is not None:
        return gateway.enforcer.behavior, gateway.enforcer.digest
    from bastion.gateway.enforce import ArgumentDigest
    from bastion.signals.behavior import behavior_from_config

    counters = behavior_from_config(config.signals.get("behavior", {}))
    return counters, ArgumentDigest(secrets.token_bytes(32))


def _labels(gateway, db: Database):
    """The gateway's session labels (docs/delegation.md; shared through gateway.redis_url,
    whose losses the audit log remembers and records)."""
    from bastion.audit import AuditLog
    from bastion.delegation.labels import LabelSettings, labels_from_config

    c = gateway.config
    settings = LabelSettings(c.label_ttl_seconds, c.label_max, c.label_max_sets)
    audit = AuditLog(db) if c.redis_url else None
    return labels_from_config(c.redis_url, c.redis_prefix, settings, c.redis_timeout_seconds, audit)


def _approvals(config: ServerConfig, oauth, replica: Replica):
    """Holds for people (docs/approvals.md): with a gateway, whose calls they hold."""
    if not config.gateway or oauth is None:
        if config.approvals:
            raise ConfigError(
                f"{config.named} has an [approvals] table but no [gateway] to hold calls"
            )
        return None
    from bastion.approvals.service import Unavailable, approvals_from_config
    from bastion.approvals.settings import ApprovalSettings

    def authorizer():
        # Who may answer, and what a reviewer sees, are the policy's: never from a replica
        # that must not decide (as the gateway and /v1 refuse then).
        if replica.stale:
            raise Unavailable(replica.stale_reason())
        return replica.authz

    async def current() -> None:
        heard = replica.heard_not_applied(config.consistency_timeout)
        if (heard is not None and not await heard) or replica.stale:
            raise Unavailable(replica.stale_reason())

    with config.reading("approvals"):
        settings = ApprovalSettings.from_mapping(config.approvals)
    return approvals_from_config(
        config.database,
        settings,
        oauth.settings.key_dir,
        oauth.settings.issuer,
        authorizer,
        lambda: replica.policy_version,
        current,
        suspensions=replica.suspensions,
    )


def _connections(config: ServerConfig, db: Database, oauth, gateway):
    """Per-user credentials toward upstreams with ``auth = "per_user"`` (docs/identity.md), or
    None when there is none."""
    if gateway is None:
        return None
    per_user = [u for u in gateway.config.upstreams if u.auth == "per_user"]
    if not per_user:
        return None
    if oauth is None:
        raise ConfigError('auth = "per_user" upstreams need an [oauth] table: people sign in there')
    from bastion.connections.sealing import ConnectionKeysError
    from bastion.connections.service import connections_from_config

    try:
        connections = connections_from_config(
            db,
            {u.name: (u.url, u.oauth) for u in per_user},
            oauth.settings.key_dir,
            oauth.settings.issuer,
        )
    except ConnectionKeysError as e:
        raise ConfigError(str(e)) from None
    gateway.connections = connections
    connections.on_revoke(gateway.connection_revoked)
    return connections


def _connection_pages(connections, oauth) -> list[BaseRoute]:
    """The connections' pages, under the issuer (where elicitations point)."""
    from bastion.connections.pages import ConnectionPages

    return list(ConnectionPages(connections, oauth).routes())


def _approval_pages(approvals, oauth) -> list[BaseRoute]:
    """The approvers' pages, under the issuer (where `Approvals.url` points)."""
    from bastion.approvals.pages import ApprovalPages

    return list(ApprovalPages(approvals, oauth).routes())


def _signals(config: ServerConfig, db: Database, store: FactStore, oauth, replica: Replica):
    """The Shared Signals receiver (docs/signals.md) from [signals.ssf], or None."""
    table = config.signals.get("ssf") if config.signals else None
    if not table:
        return None
    if oauth is None:
        raise ConfigError("[signals.ssf] needs an [oauth] table: its events revoke grants")
    from bastion.signals.settings import from_config
    from bastion.signals.ssf import SsfReceiver

    settings = from_config(config, oauth.settings.issuer)
    return SsfReceiver(settings, db, oauth.store, store, lambda: replica.authz)


def _signal_settings(config: ServerConfig):
    """The signals API's limits ([signals.api], docs/signals.md)."""
    from bastion.signals.store import SignalSettings

    with config.reading("signals.api"):
        return SignalSettings.from_mapping(config.signals.get("api"))


def _alerts(config: ServerConfig, oauth, replica: Replica, gateway):
    """Alerts (docs/signals.md): raised by the gateway's decisions, so only with a gateway."""
    table = config.signals.get("alerts", {})
    if gateway is None:
        if table:
            raise ConfigError(f"{config.named} has a [signals.alerts] table but no [gateway]")
        return None
    from bastion.signals.alerts import alerts_from_config

    with config.reading("signals.alerts"):
        alerts = alerts_from_config(
            config.database, table, oauth.settings.issuer, lambda: replica.authz
        )
    gateway.enforcer.alerts = alerts
    return alerts


def _alert_pages(alerts, oauth) -> list[BaseRoute]:
    """The alert's page, under the issuer (where `Alerts.url` points)."""
    from bastion.signals.alert_pages import AlertPages

    return list(AlertPages(alerts, oauth).routes())


def _tasks(config: ServerConfig, db: Database, store: FactStore, oauth, replica: Replica):
    """Just-in-time tasks (docs/delegation.md): their grants bind to the authorization server's
    grants when there is one; their facts are checked against the policy in force."""
    from bastion.audit import AuditLog
    from bastion.delegation.tasks import Tasks

    return Tasks(
        store,
        oauth.store if oauth is not None else None,
        oauth.audit if oauth is not None else AuditLog(db),
        config.task_settings(),
        validate=lambda fact: replica.authz.facts.validate(fact),
    )


def _decision_log(config: ServerConfig, metrics: Metrics) -> DecisionLog:
    """The decisions of /v1 (and of AuthZEN's and Oso Cloud's APIs) kept for
    /v1/decisions/{id}: in memory, and with ``decision_log = "database"`` in the database too,
    through a connection of its own written from a worker thread, journalled first in
    ``decision_journal_dir`` (opened at start: `_open_decision_journal`)."""
    if config.decision_log != "database":
        return DecisionLog(config.decision_log_size)
    from bastion.audit.decision_log import DecisionStore

    config.usable_decision_journal_directory("the decision service")
    store = DecisionStore(
        Database(config.database, role="bastion-decision-log"), config.decision_records_buffer
    )
    metrics.observe_decision_log_dropped(lambda: store.dropped + store.unstorable)
    return DecisionLog(config.decision_log_size, store)


async def _open_decision_journal(config: ServerConfig, store: DecisionStore) -> None:
    """The decision service's journal, before any decision is answered; then the journals of
    its dead processes recovered (`bastion.audit.journal.open_journal`)."""
    directory = config.decision_journal_directory()
    await anyio.to_thread.run_sync(open_journal, store, directory, config.decision_journal_fsync)


def create_app(config: ServerConfig) -> Starlette:
    """The whole server for one configuration. State is opened by the lifespan."""
    # Writes and key checks use this connection; the replica reads the log on its own.
    # The proxy every outbound client uses, or none (one per process: bastion.outbound_proxy).
    outbound_proxy.configure(config.outbound_proxy())
    db = Database(config.database)
    store = FactStore(db)
    keys = KeyStore(db, env_admin_key=config.admin_key or None)
    _bootstrap_policy(store, config)
    replica = Replica(
        config.database,
        poll_interval=config.poll_interval,
        max_staleness=config.max_staleness_seconds,
        limits=config.policy_limits(),
        snapshot_path=config.fact_snapshot_path,
        snapshot_interval=config.fact_snapshot_interval,
        max_clock_skew=config.max_clock_skew_seconds,
    )
    store.handed = replica.handed  # its changes taken as written, not read back
    metrics = Metrics()
    metrics.observe_state(
        lambda: replica.authz.facts.held, lambda: replica.applied, lambda: replica.lag
    )
    metrics.observe_staleness(lambda: replica.staleness)

    signal_settings = _signal_settings(config)
    oauth = _oauth_server(config, db)
    _load_trust_stores(oauth)
    approvals = _approvals(config, oauth, replica)
    gateway = _gateway(config, oauth, replica, approvals)
    connections = _connections(config, db, oauth, gateway)
    signals = _signals(config, db, store, oauth, replica)
    if signals is not None and oauth is not None and oauth.external_login is not None:
        # An account linked by a sign-in is added to the streams at once (docs/signals.md).
        oauth.external_login.on_signed_in.append(signals.account_signed_in)
    alerts = _alerts(config, oauth, replica, gateway)
    tasks = _tasks(config, db, store, oauth, replica)
    if oauth is not None:
        oauth.tasks = tasks
        # The kill switch holds at /token and /introspect as at the gateway.
        oauth.suspensions = replica.suspensions
        oauth.facts_stale = lambda: replica.stale
        oauth.facts_heard = lambda: replica.heard_not_applied(config.consistency_timeout)
    if gateway is not None and gateway.records is not None:
        records = gateway.records
        metrics.observe_records_dropped(lambda: records.dropped, lambda: records.unstorable)
    if gateway is not None:
        _delegation(oauth, gateway, replica)
        gateway.enforcer.shadow.on_fire = metrics.shadow_fired
        gateway.enforcer.behavior = _behavior(config, gateway)
        gateway.enforcer.labels = _labels(gateway, db)
    behavior, argument_digest = _agent_counters(config, gateway)
    decisions = _decision_log(config, metrics)
    journalled = [
        writer
        for writer in (gateway.records if gateway is not None else None, decisions.store)
        if writer is not None
    ]
    metrics.observe_journal_failures(
        lambda: sum(w.journal.failed for w in journalled if w.journal is not None)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await replica.start()
        if gateway is not None:
            await gateway.start()
            # An ended task's session labels go with it (docs/delegation.md).
            tasks.on_end(task_wiper(gateway.enforcer.labels, asyncio.get_running_loop()))
        if approvals is not None and approvals.webhooks is not None:
            await approvals.webhooks.start()
        if signals is not None:
            await signals.start()
        if alerts is not None and alerts.webhooks is not None:
            await alerts.webhooks.start()
        escalation = asyncio.create_task(alerts.escalate_forever()) if alerts is not None else None
        repeats = (
            asyncio.create_task(alerts.write_repeats_forever()) if alerts is not None else None
        )
        task_sweep = asyncio.create_task(tasks.sweep_forever())
        # Revocations of users' upstream tokens not done yet, from any process (docs/identity.md).
        revocations = (
            asyncio.create_task(connections.sweep_revocations_forever())
            if connections is not None
            else None
        )
        stored = decisions.store
        if stored is not None:
            await _open_decision_journal(config, stored)
        decision_writer = asyncio.create_task(flush_forever(stored)) if stored else None
        retention = asyncio.create_task(prune_forever(db, config.audit_retention_days))
        expired = asyncio.create_task(
            purge_expired_forever(store, config.fact_expired_grace_seconds)
        )
        chains = asyncio.create_task(keep_chains_forever(db, config.audit_checkpoint_seconds))
        # The counts of open refusal windows, written as they go (docs/oauth.md).
        counts = asyncio.create_task(oauth.write_counts_forever()) if oauth is not None else None
        sweep = (
            asyncio.create_task(approvals.drop_expired_results_forever())
            if approvals is not None
            else None
        )
        # Pending requests nobody may answer any more closed with nobody looking at them.
        stranded = (
            asyncio.create_task(approvals.sweep_stranded_forever())
            if approvals is not None
            else None
        )
        try:
            yield
        finally:
            for task in (
                retention,
                expired,
                chains,
                counts,
                sweep,
                stranded,
                escalation,
                repeats,
                task_sweep,
                revocations,
                decision_writer,
            ):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if signals is not None:
                await signals.close()
            if gateway is not None:
                await gateway.close()
            if connections is not None:  # after the gateway: no call drops a connection now
                await connections.close()
            if oauth is not None:
                await anyio.to_thread.run_sync(oauth.close)
            if approvals is not None:
                if approvals.webhooks is not None:
                    await approvals.webhooks.close()
                await anyio.to_thread.run_sync(approvals.store.db.close)
            if alerts is not None:
                try:  # after the gateway: no raising is counted after this
                    await anyio.to_thread.run_sync(alerts.write_repeats)
                except Exception:
                    log.exception("alerts: repeated raisings could not be written at shutdown")
                if alerts.webhooks is not None:
                    await alerts.webhooks.close()
                await anyio.to_thread.run_sync(alerts.store.db.close)
            if stored is not None:  # after the gateway and the API: no decision after this
                await flush_at_stop(stored)
                if stored.journal is not None:
                    await anyio.to_thread.run_sync(stored.journal.close)
                await anyio.to_thread.run_sync(stored.db.close)
            await replica.stop()
            await anyio.to_thread.run_sync(db.close)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/openapi.json", openapi, methods=["GET"]),
        *api.routes(),
        *(oauth.routes() if oauth is not None else []),
        *(_approval_pages(approvals, oauth) if approvals is not None else []),
        *(_connection_pages(connections, oauth) if connections is not None else []),
        *(signals.routes() if signals is not None else []),
        *(_alert_pages(alerts, oauth) if alerts is not None else []),
    ]
    routes = one_route_per_path(routes)
    # First, so that every body is capped while it is read, whichever route it is for.
    limits = body_limits(config, oauth, gateway, signals)
    middleware = [
        # Outside the body limits, so that their refusals echo the PEP's X-Request-ID too.
        Middleware(api.authzen.EchoRequestId),
        Middleware(RequestBodyLimits, limits=limits, body_timeout=config.body_timeout),
    ]
    if gateway is not None:
        from bastion.gateway.mount import GatewayFirst

        # /mcp/<server> and its RFC 9728 metadata go to the gateway ahead of the API's routes.
        middleware.append(Middleware(GatewayFirst, gateway=gateway))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            Problem: problem_handler,
            HTTPException: http_problem,
            DatabaseUnavailable: database_unavailable,
            OSError: file_unwritable,
            Exception: internal_error,
        },
    )
    # A path with a trailing "/" (or without one a route has) is 404, never redirected to the
    # route: the redirect's Location is built from the request (http behind a TLS proxy that
    # sends no forwarded headers), and a client that follows a 307 sends its key and its body
    # again, there, in the clear.
    app.router.redirect_slashes = False
    # The OAuth endpoints a browser-based client calls (the RFC 9728 metadata among them) answer
    # the pages of [oauth] allowed_origins and of the gateway's with CORS, and /mcp/ those of
    # the gateway's alone, around the whole stack, Starlette's ServerErrorMiddleware and the
    # body limits too: whichever layer answers (a fault's 500, a 413), the page reads the
    # answer, not "Failed to fetch". On /mcp/ the gateway's transport answers CORS itself (its
    # preflights, its answers), and this layer gives its headers to the answers made before it.
    # Starlette puts its ServerErrorMiddleware outside every middleware it is given: the stack
    # is built here, and wrapped.
    origins = frozenset(oauth.settings.allowed_origins) if oauth is not None else frozenset()
    if gateway is not None:
        origins |= gateway.allowed_origins
    cross_origin = None
    if origins:
        cross_origin = CrossOriginRoutes(
            app.build_middleware_stack(),
            oauth_cross_origin(origins),
            oauth.cross_origin_paths(),
            gateway.metadata_prefixes if gateway is not None else (),
            own=gateway.cors if gateway is not None else None,
            own_prefix=gateway.MCP_PREFIX if gateway is not None else "",
        )
        app.middleware_stack = cross_origin
    # What bastion's HTTP protocol gives its own refusals (`bastion.server.connections`).
    app.state.cross_origin = cross_origin
    app.state.config = config
    app.state.body_limits = limits
    app.state.store = store
    app.state.keys = keys
    app.state.replica = replica
    app.state.metrics = metrics
    app.state.decisions = decisions
    app.state.oauth = oauth
    app.state.oauth_paths = oauth_paths(oauth)
    app.state.gateway = gateway
    app.state.approvals = approvals
    app.state.connections = connections
    app.state.signals = signals
    app.state.signal_settings = signal_settings
    app.state.alerts = alerts
    app.state.tasks = tasks
    app.state.behavior = behavior
    app.state.argument_digest = argument_digest
    return app
